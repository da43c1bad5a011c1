import copy

import pytest
import torch

from moelab import data, models, observe


@pytest.fixture(scope="module")
def calib(smoke):
    _, tok = smoke
    return data.calibration_set(tok, "1:1:1", tokens=3072, seq_len=128)


@pytest.fixture(scope="module")
def obs(smoke, calib):
    model, _ = smoke
    return observe.observe(model, calib, progress=False)


def _brute_force(model, ids):
    """Per layer: routing and expert outputs recomputed from the adapter, token by token."""
    captured = {}
    layers = {l.layer_idx: l for l in models.moe_layers(model)}
    hooks = [l.block.register_forward_pre_hook(lambda m, a, idx=i: captured.__setitem__(idx, a[0].reshape(-1, a[0].shape[-1])))
             for i, l in layers.items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    out = {}
    for i, layer in layers.items():
        x = captured[i]
        r = layer.route(x)
        E = layer.num_experts
        counts = torch.zeros(E, dtype=torch.float64)
        reap = torch.zeros(E, dtype=torch.float64)
        ean = torch.zeros(E, dtype=torch.float64)
        for e in range(E):
            tok = (r.topk_idx == e).any(-1)
            if tok.any():
                y = layer.expert_forward(e, x[tok])
                n = y.norm(dim=-1).double()
                counts[e] = tok.sum()
                reap[e] = (r.probs[tok, e].double() * n).sum()
                ean[e] = n.sum()
        out[i] = (counts, reap, ean, r.probs.double().sum(0))
    return out


def test_statistics_match_brute_force(smoke, calib, obs):
    model, _ = smoke
    ids = torch.as_tensor(calib["input_ids"])
    brute = _brute_force(model, ids)
    for i, st in obs.layers.items():
        counts, reap, ean, soft = brute[i]
        assert st.tokens == ids.numel()
        assert torch.equal(st.counts, counts)
        assert float(st.counts.sum()) == st.top_k * st.tokens
        torch.testing.assert_close(st.reap_sum, reap, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st.ean_sum, ean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st.soft_mass, soft, rtol=1e-4, atol=1e-3)
        assert st.input_sample.shape[0] == min(512, st.tokens)
        assert abs(float(st.frequency.sum()) - 1) < 1e-9


def test_padding_is_ignored(smoke, calib, obs):
    model, _ = smoke
    ids = torch.as_tensor(calib["input_ids"])
    mask = torch.ones_like(ids)
    # append padded junk rows: the statistics must not change
    junk = torch.randint(0, 100, (4, ids.shape[1]))
    ds = {"input_ids": torch.cat([ids, junk]), "attention_mask": torch.cat([mask, torch.zeros_like(junk)])}
    import datasets
    padded = observe.observe(model, datasets.Dataset.from_dict({k: v.tolist() for k, v in ds.items()}), progress=False)
    for i, st in obs.layers.items():
        assert padded[i].tokens == st.tokens
        assert torch.equal(padded[i].counts, st.counts)
        torch.testing.assert_close(padded[i].reap_sum, st.reap_sum)


def test_domain_shares_and_depth_cosines(obs, smoke):
    model, _ = smoke
    for st in obs.layers.values():
        names, share = st.group_share()
        assert names == ["code", "general", "math"]
        used = st.counts > 0
        torch.testing.assert_close(share.sum(0)[used], torch.ones(int(used.sum()), dtype=share.dtype))
        assert sum(st.counts_by_group[g].sum() for g in names) == st.counts.sum()
        assert 1 / 3 - 1e-9 <= st.main_group_share() <= 1
    assert sorted(obs.layer_cos) == list(range(model.config.num_hidden_layers))
    assert all(-1 <= c <= 1 for c in obs.layer_cos.values())


def test_sequential_observes_edited_layers(smoke, calib, obs):
    model, _ = smoke
    model = copy.deepcopy(model)

    def edit(layer_idx, stats):
        layer = {l.layer_idx: l for l in models.moe_layers(model)}[layer_idx]
        keep = torch.argsort(stats.counts, descending=True)[: stats.num_experts // 2].sort().values
        weights = {k: v[keep] for k, v in layer.expert_weights().items()}
        indexed = {k: v[keep] for k, v in layer.expert_indexed().items()}
        models.set_experts(model, layer_idx, weights, layer.router_weight()[keep], indexed)

    seen = observe.observe_sequential(model, calib, edit, progress=False)
    order = [l.layer_idx for l in models.moe_layers(model)]
    assert sorted(seen) == order
    assert all(st.tokens == len(calib) * 128 for st in seen.values())
    # the first layer sees the original model; later layers see inputs changed by earlier edits
    assert torch.equal(seen[order[0]].counts, obs[order[0]].counts)
    assert not torch.equal(seen[order[1]].counts, obs[order[1]].counts)
    assert all(l.num_experts == obs[l.layer_idx].num_experts // 2 for l in models.moe_layers(model))


def test_too_small_calibration_set_is_refused(smoke):
    model, _ = smoke
    with pytest.raises(ValueError, match="min_tokens"):
        observe.observe(model, torch.zeros(1, 8, dtype=torch.long), progress=False)


def test_stopping_after_one_layer_gives_the_same_statistics(smoke, calib, obs):
    model, _ = smoke
    one = observe.observe(model, calib, layers=[1], progress=False)
    assert list(one.layers) == [1]
    assert torch.equal(one[1].counts, obs[1].counts)


def test_observe_works_on_an_offloaded_model(smoke, calib, obs, tmp_path):
    """A model spread by accelerate over CPU memory and disk is observed like the plain one."""
    from moelab import zoo

    plain, _ = smoke
    path = zoo.path_of("smoke")
    off = models.load_model(path, device_map="auto", max_memory={"cpu": 600_000}, offload_folder=tmp_path / "off")
    assert models.is_offloaded(off)
    seen = observe.observe(off, calib, progress=False)
    for i, st in obs.layers.items():
        assert torch.equal(seen[i].counts, st.counts)
        torch.testing.assert_close(seen[i].reap_sum, st.reap_sum, rtol=1e-4, atol=1e-4)


def _halve(model):
    def edit(layer_idx, stats):
        layer = {l.layer_idx: l for l in models.moe_layers(model)}[layer_idx]
        keep = torch.argsort(stats.counts, descending=True, stable=True)[: max(layer.top_k, stats.num_experts // 2)]
        keep = keep.sort().values
        weights = {k: v[keep] for k, v in layer.expert_weights().items()}
        indexed = {k: v[keep] for k, v in layer.expert_indexed().items()}
        models.set_experts(model, layer_idx, weights, layer.router_weight()[keep], indexed)
    return edit


@pytest.mark.parametrize("family", models.TINY_FAMILIES)
def test_layer_wise_replay_gives_the_statistics_of_a_pass_per_layer(family):
    """Replay (hidden states kept at the current layer) against one pass from the embeddings per layer."""
    base = models.tiny_model(family, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (6, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding: padded tokens are left out of every statistic
    mask[4, 9:] = 0
    rows = {"input_ids": ids, "attention_mask": mask, "domain": ["general", "math", "code"] * 2}
    runs = []
    for replay in (False, True):
        model = copy.deepcopy(base)
        seen = observe.observe_sequential(model, rows, _halve(model), replay=replay, batch_size=4, sample_size=16,
                                          progress=False, min_tokens=16)
        runs.append((model, seen))
    (m0, s0), (m1, s1) = runs
    assert sorted(s0) == sorted(s1) == [l.layer_idx for l in models.moe_layers(base)]
    for j in s0:
        a, b = vars(s0[j]), vars(s1[j])
        for name, v in a.items():
            if isinstance(v, torch.Tensor):
                assert torch.allclose(v, b[name], rtol=1e-5, atol=1e-6), (family, j, name)
        assert a["tokens"] == b["tokens"] == int(mask.sum())
        assert all(torch.equal(a["counts_by_group"][k], b["counts_by_group"][k]) for k in a["counts_by_group"])
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_statistics_can_be_switched_off_and_the_methods_that_need_them_say_so(smoke, calib, obs):
    from moelab import compress, prune, scores

    model, _ = smoke
    lean = observe.observe(model, calib, progress=False, outputs=False, cosines=False)
    assert lean.layer_cos == {}
    for j, st in lean.layers.items():
        assert st.out_sum is None and st.gated_out_sum is None
        for name in ("counts", "soft_mass", "reap_sum", "ean_sum", "dern_sum", "logit_gram", "input_sample"):
            assert torch.allclose(getattr(st, name), getattr(obs[j], name), rtol=1e-6), name
    with pytest.raises(ValueError, match="outputs=True"):
        compress.hc_smoe_model(model, lean, 4, features="routed")
    compress.hc_smoe_model(model, lean, 4)  # the reference's features need only the input sample
    with pytest.raises(ValueError, match="outputs=True"):
        scores.output_cosine(lean[1])
    with pytest.raises(ValueError, match="cosines=True"):
        prune.layers_to_remove(lean, 1, "similar")
    one = observe.observe(model, calib, layers=[1], progress=False, cosines=False)  # still stops after layer 1
    assert list(one.layers) == [1] and torch.allclose(one[1].counts, obs[1].counts)


def test_only_observation_uses_moelabs_kernel(smoke, calib):
    """zoo.load keeps transformers' experts kernel; observe switches to moelab's and switches back."""
    from moelab import kernels

    model, _ = smoke
    before = model.config._experts_implementation
    assert before != kernels.KERNEL_NAME
    seen = []
    layer = models.moe_layers(model)[0]
    hook = layer.block.register_forward_pre_hook(lambda *a: seen.append(model.config._experts_implementation))
    try:
        observe.observe(model, calib, progress=False, layers=[layer.layer_idx])
    finally:
        hook.remove()
    assert seen and set(seen) == {kernels.KERNEL_NAME}
    assert model.config._experts_implementation == before


def test_saved_observation_reloads_identically_and_compresses_the_same(smoke, calib, obs, tmp_path):
    """Observe once, compress many times (issue 13): every statistic, the domains and the depth cosines
    come back bit for bit, and a method run on the reloaded observation gives the same model."""
    from moelab import compress, prune

    model, _ = smoke
    path = observe.save(obs, tmp_path / "obs.safetensors", model=model, dataset=calib, extra={"mix": "1:1:1"})
    again = observe.load(path, model)
    assert again.tokens == obs.tokens and again.groups == obs.groups and again.layer_cos == obs.layer_cos
    assert again.calibration == observe.calibration_identity(calib) == obs.calibration
    assert obs.norm_energy and again.norm_energy.keys() == obs.norm_energy.keys()
    assert all(torch.equal(v, again.norm_energy[k]) for k, v in obs.norm_energy.items())
    for idx, st in obs.layers.items():
        for name, val in vars(st).items():
            if name == "_sample_keys":
                continue
            other = getattr(again[idx], name)
            if isinstance(val, torch.Tensor):
                assert torch.equal(val, other), (idx, name)
            elif isinstance(val, dict):
                assert val.keys() == other.keys() and all(torch.equal(val[k], other[k]) for k in val)
            else:
                assert val == other, (idx, name)
    a, _ = prune.prune(model, obs, "reap", num_experts=6)
    b, _ = prune.prune(model, again, "reap", num_experts=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    m1, _ = compress.hc_smoe_model(model, obs, 6)
    m2, _ = compress.hc_smoe_model(model, again, 6)
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_a_saved_observation_refuses_another_model_and_damaged_files(smoke, obs, tmp_path):
    model, _ = smoke
    path = observe.save(obs, tmp_path / "obs.safetensors")
    pruned, _ = __import__("moelab.prune", fromlist=["prune"]).prune(model, obs, "frequency", num_experts=6)
    with pytest.raises(ValueError, match="experts was 8, is 6"):
        observe.load(path, pruned)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable observation file"):
        observe.load(path)


def test_observe_cached_observes_once(smoke, calib, tmp_path, monkeypatch):
    model, _ = smoke
    first = observe.observe_cached(model, calib, tmp_path, sample_size=64, progress=False)
    monkeypatch.setattr(observe, "observe", lambda *a, **k: pytest.fail("observed again"))
    second = observe.observe_cached(model, calib, tmp_path, sample_size=64, progress=False)
    assert torch.equal(first[0].counts, second[0].counts) and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(pytest.fail.Exception):  # other arguments: another entry
        observe.observe_cached(model, calib, tmp_path, sample_size=32, progress=False)


def test_rows_longer_than_the_models_positions_are_refused(smoke):
    """Rows beyond max_position_embeddings were once observed and scored silently."""
    from moelab import evaluate

    _, tok = smoke
    short = models.tiny_model("qwen3_moe", max_position_embeddings=16)
    with pytest.raises(ValueError, match="calibration rows of 32 tokens are longer than the model's max_position"):
        observe.observe(short, torch.randint(3, 100, (4, 32)), progress=False)
    task = evaluate.perplexity_task("general", tokens=256, seq_len=32)
    with pytest.raises(ValueError, match="ppl_general: rows of 32 tokens .* use seq_len <= 16"):
        task.score(short, tok)
