"""MC-SMoE (arXiv 2310.01334): per-layer expert counts that save and reload, adaptive M-SMoE,
low rank + sparse experts (moelab.models, moelab.io, moelab.compress)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from moelab import compress, io, merge, models, observe, zoo

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

FAMILIES = list(models.FAMILIES)
IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _logits(model, ids=IDS):
    return model(input_ids=ids).logits


def _nonuniform(family, **overrides):
    """A tiny model of ``family`` whose MoE layers keep different expert counts (the first layer all 8)."""
    model = models.tiny_nonuniform_model(family, **overrides)
    return model, models.expert_counts(model)


# ---- the non-uniform checkpoint form ----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_nonuniform_round_trip_every_family(family, tmp_path):
    original = io.save_checkpoint(models.tiny_model(family), tmp_path / "orig")
    model, counts = _nonuniform(family)
    models.check_consistency(model)
    out = io.save_checkpoint(model, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    spec = models.family_of(model)
    listed = {i: c for i, c in enumerate(cfg[models.NONUNIFORM_KEY]) if c is not None}
    assert listed == counts and len(cfg[models.NONUNIFORM_KEY]) == model.config.num_hidden_layers
    assert getattr(model.config, spec.num_experts_field) == max(counts.values())
    assert cfg["model_type"] == models.NONUNIFORM_TYPE_PREFIX + family and cfg["auto_map"]
    assert (out / "model.safetensors").exists() and (out / models.NONUNIFORM_MODELING).exists()
    assert not (out / models.NONUNIFORM_WEIGHTS).exists()
    reloaded = models.load_model(out)
    assert type(reloaded) is type(model) and reloaded.config.model_type == family  # the family's own class
    assert models.expert_counts(reloaded) == counts
    mine, theirs = model.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the same tensors; two families differ in the last float32 bit (6e-8 and 1.2e-7 measured)
    torch.testing.assert_close(_logits(model), _logits(reloaded), atol=1e-6, rtol=0)
    assert io.checkpoint_bytes(out) < io.checkpoint_bytes(original)


def test_nonuniform_checkpoints_load_outside_moelab_every_family(tmp_path):
    """A user without moelab: plain from_pretrained refuses, naming trust_remote_code; with it, the
    checkpoint's own modeling file rebuilds every family with the logits of the saved model."""
    saved, logits, kernels = {}, {}, {}
    for family in FAMILIES:
        model, _ = _nonuniform(family)
        saved[family] = str(io.save_checkpoint(model, tmp_path / family))
        logits[family] = _logits(model)
        kernels[family] = [model.config._attn_implementation, model.config._experts_implementation]
    found = io.load_outside_moelab(list(saved.values()), IDS)
    for family, path in saved.items():
        row = found[path]
        assert row["plain"].startswith("refused: ValueError") and "trust_remote_code=True" in row["plain"], row["plain"]
        assert row["class"].endswith("modeling_moelab_nonuniform.MoelabNonUniformForCausalLM"), row["class"]
        assert row["kernels"] == kernels[family], (family, row["kernels"])  # the family's kernels, not a fallback
        diff = float((row["logits"] - logits[family]).abs().max())
        assert diff <= 1e-6, (family, diff)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_plain_from_pretrained_refuses_nonuniform(family, tmp_path):
    model, _ = _nonuniform(family)
    out = io.save_checkpoint(model, tmp_path / "ck")
    for kwargs in ({}, {"ignore_mismatched_sizes": True}, {"trust_remote_code": False}):  # never the wrong shapes
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModelForCausalLM.from_pretrained(out, **kwargs)


def test_uniform_counts_stay_a_plain_checkpoint(tmp_path):
    model = models.tiny_model("qwen3_moe")
    for layer in models.moe_layers(model):
        idx = torch.arange(6)
        models.set_experts(model, layer.layer_idx, {k: v[idx] for k, v in layer.expert_weights().items()},
                           layer.router_weight()[idx])
    models.set_expert_counts_config(model)
    assert models.NONUNIFORM_KEY not in model.config.to_dict()
    out = io.save_checkpoint(model, tmp_path / "ck")
    assert not (out / models.NONUNIFORM_MODELING).exists() and "auto_map" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(model), _logits(reloaded), atol=1e-6, rtol=0)


def test_setting_one_count_drops_the_per_layer_list():
    model, _ = _nonuniform("qwen3_moe")
    assert models.experts_per_layer(model.config) is not None
    models.set_num_experts_config(model, 8)
    assert models.experts_per_layer(model.config) is None


def test_save_refuses_unrecorded_per_layer_counts(tmp_path):
    model = models.tiny_model("qwen3_moe")
    layer = models.moe_layers(model)[0]
    idx = torch.arange(5)
    models.set_experts(model, layer.layer_idx, {k: v[idx] for k, v in layer.expert_weights().items()},
                       layer.router_weight()[idx])
    with pytest.raises(ValueError, match="set_expert_counts_config"):
        io.save_checkpoint(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_half_a_nonuniform_checkpoint_is_refused(tmp_path):
    model, _ = _nonuniform("qwen3_moe")
    out = io.save_checkpoint(model, tmp_path / "ck")
    (out / models.NONUNIFORM_MODELING).rename(out / "elsewhere.txt")
    with pytest.raises(ValueError, match=f"broken moelab non-uniform checkpoint.*{models.NONUNIFORM_MODELING}"):
        models.load_model(out)
    (out / "elsewhere.txt").rename(out / models.NONUNIFORM_MODELING)
    cfg = json.loads((out / "config.json").read_text())
    cfg[models.NONUNIFORM_KEY] = cfg[models.NONUNIFORM_KEY][:-1]  # one entry short
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="one entry per decoder layer"):
        models.load_model(out)
    del cfg[models.NONUNIFORM_KEY]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks moelab_experts_per_layer"):
        models.load_model(out)


def test_reloaded_nonuniform_model_refuses_to_overwrite_its_source(tmp_path):
    model, _ = _nonuniform("olmoe")
    out = io.save_checkpoint(model, tmp_path / "ck")
    reloaded = models.load_model(out)
    with pytest.raises(ValueError, match="source model's directory"):
        io.save_checkpoint(reloaded, out, overwrite=True)
    assert (out / "model.safetensors").exists() and (out / models.NONUNIFORM_MODELING).exists()


def test_nonuniform_loads_with_accelerate_placement(tmp_path):
    model, counts = _nonuniform("qwen3_moe")
    out = io.save_checkpoint(model, tmp_path / "ck")
    placed = models.load_model(out, device_map="auto")
    assert models.expert_counts(placed) == counts
    torch.testing.assert_close(_logits(model), _logits(placed), atol=1e-6, rtol=0)


def test_the_earlier_nonuniform_form_still_loads(tmp_path):
    """moelab first wrote non-uniform models as one moelab-nonuniform-experts.safetensors and no modeling file."""
    from safetensors.torch import save_file

    model, counts = _nonuniform("mixtral")
    out = tmp_path / "earlier"
    model.config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / models.NONUNIFORM_WEIGHTS),
              metadata={"format": "pt"})
    reloaded = models.load_model(out)
    assert models.expert_counts(reloaded) == counts
    assert torch.equal(_logits(model), _logits(reloaded))
    with pytest.raises(ValueError, match="one device"):
        models.load_model(out, device_map="auto")
    again = io.save_checkpoint(reloaded, tmp_path / "current")  # saving it again writes the current form
    assert (again / models.NONUNIFORM_MODELING).exists()


def test_tied_embeddings_are_stored_once(tmp_path):
    model, _ = _nonuniform("qwen3_moe", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = io.save_checkpoint(model, tmp_path / "ck")
    unique = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() skips the tied copy
    assert io.checkpoint_bytes(out) < unique + 64 * 1024  # tensors once, plus the safetensors header
    reloaded = models.load_model(out)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    torch.testing.assert_close(_logits(model), _logits(reloaded), atol=1e-6, rtol=0)


def test_dtype_survives_the_round_trip(tmp_path):
    model, _ = _nonuniform("mixtral")
    model = model.to(torch.bfloat16)
    out = io.save_checkpoint(model, tmp_path / "ck")
    reloaded = models.load_model(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    mine, theirs = model.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # .to(bfloat16) also rounded the in-memory RoPE frequencies, which a built model keeps in float32
    torch.testing.assert_close(_logits(model), _logits(reloaded), atol=0.05, rtol=0)


def test_edits_after_reload_keep_per_layer_counts(tmp_path):
    model, counts = _nonuniform("qwen3_moe")
    reloaded = models.load_model(io.save_checkpoint(model, tmp_path / "ck"))
    keep = {i: torch.arange(8).repeat(n, 1) for i, n in counts.items()}  # half of each expert's 16 neurons
    models.slice_expert_width(reloaded, keep)  # checks consistency against the per-layer config
    again = models.load_model(io.save_checkpoint(reloaded, tmp_path / "ck2"))
    assert models.expert_counts(again) == counts
    mine, theirs = reloaded.state_dict(), again.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    torch.testing.assert_close(_logits(reloaded), _logits(again), atol=1e-6, rtol=0)


# ---- adaptive M-SMoE --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen3-MoE (8 experts, top-2) and one observation of it on random token rows."""
    model = models.tiny_model("qwen3_moe", num_experts=8, top_k=2, seed=0)
    rows = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    return model, observe.observe(model, rows, sample_size=128, progress=False)


@pytest.mark.parametrize("total", [5, 8, 11, 15])
def test_adaptive_counts_sum_to_the_target(tiny, total):
    model, obs = tiny
    groups, freq = compress.msmoe_groups(model, obs, total)
    counts = {i: len(g) for i, g in groups.items()}
    assert sum(counts.values()) == total
    assert all(2 <= n <= 8 for n in counts.values())  # at least top_k (>= 1) in every layer
    for i, g in groups.items():
        flat = sorted(e for grp in g for e in grp)
        assert flat == list(range(8))  # a partition: every expert joins exactly one dominant
        dominants = [grp[0] for grp in g]
        assert int(torch.argmax(freq[i])) in dominants  # each layer's most used expert is dominant
        assert dominants == sorted(dominants)


def test_adaptive_dominants_are_the_globally_most_frequent(tiny):
    model, obs = tiny
    groups, freq = compress.msmoe_groups(model, obs, 7, min_per_layer=1)
    kept = {(i, grp[0]) for i, g in groups.items() for grp in g}
    forced = {(i, int(torch.argmax(f))) for i, f in freq.items()}
    rest = sorted(((float(f[e]), i, e) for i, f in freq.items() for e in range(8) if (i, e) not in forced),
                  reverse=True)
    assert kept == forced | {(i, e) for _, i, e in rest[:7 - len(forced)]}


def test_uniform_mode_and_refusals(tiny):
    model, obs = tiny
    groups, _ = compress.msmoe_groups(model, obs, 8, adaptive=False)
    assert [len(g) for g in groups.values()] == [4, 4]
    with pytest.raises(ValueError, match="split evenly"):
        compress.msmoe_groups(model, obs, 9, adaptive=False)
    with pytest.raises(ValueError, match="between the forced"):
        compress.msmoe_groups(model, obs, 3)  # below top_k in every layer


def test_adaptive_counts_refused_where_routing_forbids_them():
    model = models.tiny_model("deepseek_v3", num_experts=8, top_k=2)  # 2 groups: counts must be even
    rows = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    obs = observe.observe(model, rows, sample_size=32, progress=False)
    with pytest.raises(ValueError, match="not divisible by n_group"):
        compress.msmoe_groups(model, obs, 9, min_per_layer=4)


def test_msmoe_model_is_a_frequency_weighted_merge(tiny, tmp_path):
    model, obs = tiny
    merged, info = compress.msmoe_model(model, obs, 9, align=None)
    counts = models.expert_counts(merged)
    assert counts == {i: r["num_experts"] for i, r in info.items()} and sum(counts.values()) == 9
    before = {l.layer_idx: l.expert_weights() for l in models.moe_layers(model)}
    routers = {l.layer_idx: l.router_weight() for l in models.moe_layers(model)}
    for layer in models.moe_layers(merged):
        w = layer.expert_weights()
        f = obs[layer.layer_idx].frequency
        for j, g in enumerate(info[layer.layer_idx]["groups"]):
            c = f[g] / f[g].sum() if f[g].sum() > 0 else torch.full((len(g),), 1 / len(g), dtype=torch.float64)
            want = sum(float(ci) * before[layer.layer_idx]["down"][e] for ci, e in zip(c, g))
            torch.testing.assert_close(w["down"][j], want.to(w["down"].dtype), atol=1e-6, rtol=1e-5)
            assert torch.equal(layer.router_weight()[j], routers[layer.layer_idx][g[0]])  # the dominant's row
    out = io.save_checkpoint(merged, tmp_path / "ck")
    assert torch.equal(_logits(merged), _logits(models.load_model(out)))


@pytest.mark.parametrize("align", ["weights", "activations"])
def test_alignment_changes_the_merge_not_the_counts(tiny, align):
    model, obs = tiny
    plain, info = compress.msmoe_model(model, obs, 9, align=None)
    aligned, info2 = compress.msmoe_model(model, obs, 9, align=align)
    assert info == info2
    assert not torch.equal(_logits(plain), _logits(aligned))


def test_merged_stable_ranks(tiny):
    model, obs = tiny
    merged, info = compress.msmoe_model(model, obs, 6)
    rows = compress.merged_stable_ranks(model, merged, info)
    multi = sum(len([g for g in r["groups"] if len(g) > 1]) for r in info.values())
    assert len(rows) == 3 * multi and multi > 0
    for r in rows:
        assert r["size"] >= 2 and 1.0 <= r["merged"] <= 16 and 1.0 <= r["members_mean"] <= 16


def test_zoo_load_reloads_a_nonuniform_smoke_model(smoke, tmp_path):
    model, tok = smoke
    rows = torch.randint(3, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    obs = observe.observe(model, rows, sample_size=64, progress=False)
    total = compress.msmoe_total(model, 0.5)
    merged, _ = compress.msmoe_model(model, obs, total)
    out = io.save_checkpoint(merged, tmp_path / "ck", tok)
    reloaded, tok2 = zoo.load(str(out))
    assert len(tok2) == len(tok)
    assert torch.equal(_logits(merged, rows[:2]), _logits(reloaded, rows[:2]))
    assert io.checkpoint_bytes(out) < io.checkpoint_bytes(zoo.resolve("smoke"))


# ---- low rank + sparse ------------------------------------------------------------------------


def test_low_rank_sparse_error_decreases_with_rank_and_density():
    W = torch.randn(32, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = lambda r, s: float((W - (lambda U, V, S: U @ V + S)(*merge.low_rank_sparse(W, r, s))).norm() / W.norm())
    by_rank = [err(r, 1.0) for r in (0, 4, 8, 16, 24, 32)]
    assert all(a > b for a, b in zip(by_rank, by_rank[1:])) and by_rank[-1] < 1e-10
    by_density = [err(4, s) for s in (1.0, 0.95, 0.8, 0.5, 0.0)]
    assert all(a > b for a, b in zip(by_density, by_density[1:])) and by_density[-1] < 1e-10


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_factored_experts_compute_their_dense_weights(family):
    model = models.tiny_model(family)
    factored, info = compress.low_rank_sparse_model(model, 0.8, rank=4)
    dense = compress.densify(factored)
    torch.testing.assert_close(_logits(factored), _logits(dense), atol=1e-5, rtol=1e-5)
    assert compress.use_csr(factored) == len(models.moe_layers(model))
    torch.testing.assert_close(_logits(factored), _logits(dense), atol=1e-5, rtol=1e-5)
    counted = compress.parameter_count(factored)
    assert counted == compress.parameter_count(dense) | {
        "experts": sum(r["params"] for r in info.values()),
        "total": compress.parameter_count(dense)["total"] - sum(r["dense_params"] - r["params"] for r in info.values())}
    for r in info.values():  # rank 4 plus a fifth of the residual of 16 x 32 matrices: fewer parameters
        assert r["rank"] == 4 and r["params"] < r["dense_params"]
        assert all(0 < e < 1 for e in r["rel_error"].values())


def test_factored_full_rank_is_exact_and_fractions_round():
    model = models.tiny_model("qwen3_moe")
    exact, info = compress.low_rank_sparse_model(model, 1.0, rank_fraction=1.0)
    assert all(r["rank"] == 16 for r in info.values())
    torch.testing.assert_close(_logits(exact), _logits(model), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        compress.low_rank_sparse_model(model, 0.5)
    with pytest.raises(models.UnsupportedModelError, match="gpt_oss"):
        compress.low_rank_sparse_model(models.tiny_model("gpt_oss"), 0.5, rank=2)


def test_training_the_factored_form_keeps_its_structure():
    model = models.tiny_model("qwen3_moe")
    factored, _ = compress.low_rank_sparse_model(model, 0.9, rank=2)
    factored.train()
    opt = torch.optim.SGD(factored.parameters(), lr=0.1)
    loss = factored(input_ids=IDS, labels=IDS).loss
    loss.backward()
    for _, _, ex in compress._experts_of(factored):
        for m in ("gate", "up", "down"):
            S, idx = getattr(ex, f"S_{m}"), getattr(ex, f"Sidx_{m}")
            assert S.shape == idx.shape and idx.dtype == torch.int32  # only the kept entries are stored
            assert S.grad is not None and float(S.grad.abs().max()) > 0
    counted = compress.parameter_count(factored)
    opt.step()
    factored.eval()
    assert compress.parameter_count(factored) == counted
    dense = compress.densify(factored)
    torch.testing.assert_close(_logits(factored), _logits(dense), atol=1e-5, rtol=1e-5)


def test_relative_inference_time_reports_ratios():
    model = models.tiny_model("qwen3_moe")
    factored, _ = compress.low_rank_sparse_model(model, 0.9, rank=2)
    t = compress.relative_inference_time({"original": model, "factored": factored}, IDS, repeats=3)
    assert list(t) == ["original", "factored"] and t["original"]["ratio"] == 1.0
    assert t["factored"]["ratio"] > 0 and t["factored"]["median_s"] > 0
