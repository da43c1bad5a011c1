import pytest
import torch

from moelab import data, models, observe, prune


@pytest.fixture(scope="module")
def obs(smoke):
    model, tok = smoke
    return observe.observe(model, data.calibration_set(tok, "1:1:1", tokens=2048, seq_len=128), progress=False)


def test_prune_keeps_most_frequent_and_leaves_original(smoke, obs):
    model, _ = smoke
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, kept = prune.prune(model, obs, "frequency", keep_ratio=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for layer in models.moe_layers(pruned):
        st = obs[layer.layer_idx]
        assert layer.num_experts == st.num_experts // 2
        top = torch.argsort(st.counts, descending=True, stable=True)[: layer.num_experts]
        assert set(kept[layer.layer_idx].tolist()) == set(top.tolist())
        # surviving router rows are the kept rows of the original
        orig = [l for l in models.moe_layers(model) if l.layer_idx == layer.layer_idx][0]
        torch.testing.assert_close(layer.router_weight(), orig.router_weight()[kept[layer.layer_idx]])
    ids = torch.arange(10, 42).reshape(1, 32)
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=ids).logits).all()


def test_prune_rejects_bad_targets(smoke, obs):
    model, _ = smoke
    with pytest.raises(ValueError, match="keep_ratio"):
        prune.prune(model, obs, keep_ratio=1.5)
    with pytest.raises(ValueError, match="top_k"):
        prune.prune(model, obs, num_experts=1)
    with pytest.raises(ValueError, match="exactly one"):
        prune.prune(model, obs)


def test_jaccard_and_overlap():
    assert prune.jaccard([1, 2, 3], [1, 2, 3]) == 1
    assert prune.jaccard([1, 2], [3, 4]) == 0
    assert prune.mean_overlap({0: [1, 2], 1: [1]}, {0: [1, 2], 1: [2]}) == 0.5


# ----------------------------------------------------------------------------- depth and width (SlimQwen)
def test_layers_to_remove_last_and_most_similar():
    from types import SimpleNamespace

    fake = SimpleNamespace(layer_cos={0: 0.2, 1: 0.9, 2: 0.5, 3: 0.95, 4: 0.1})
    assert prune.layers_to_remove(fake, 2, "last") == [3, 4]
    assert prune.layers_to_remove(fake, 2, "similar") == [1, 3]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="num_layers"):
            prune.layers_to_remove(fake, bad)
    with pytest.raises(ValueError, match="how"):
        prune.layers_to_remove(fake, 1, "first")


def test_remove_layers_on_the_smoke_model(smoke, obs):
    model, _ = smoke
    n = len(models.decoder_layers(model))
    out, drop = prune.remove_layers(model, obs, 1, "similar")
    assert drop == prune.layers_to_remove(obs, 1, "similar") and len(models.decoder_layers(out)) == n - 1
    assert len(models.decoder_layers(model)) == n  # the original is untouched
    with torch.no_grad():
        assert torch.isfinite(out(input_ids=torch.arange(5, 37).reshape(1, 32)).logits).all()


def test_width_keeps_the_most_active_channels_and_all_channels_change_nothing(smoke, obs):
    model, _ = smoke
    imp = prune.channel_importance(obs)
    H = model.config.hidden_size
    assert imp.shape == (H,) and (imp > 0).all()
    idx = prune.keep_channels(obs, H // 2)
    assert set(idx.tolist()) == set(torch.argsort(imp, descending=True)[: H // 2].tolist())
    rnd = prune.keep_channels(obs, H // 2, "random", seed=1)
    assert torch.equal(rnd, prune.keep_channels(obs, H // 2, "random", seed=1)) and not torch.equal(rnd, idx)
    ids = torch.arange(5, 37).reshape(1, 32)
    same, _ = prune.slice_width(model, obs, 1.0)
    half, kept = prune.slice_width(model, obs, 0.5)
    assert half.config.hidden_size == H // 2 and torch.equal(kept, idx)
    with torch.no_grad():
        torch.testing.assert_close(same(input_ids=ids).logits, model(input_ids=ids).logits)
        assert torch.isfinite(half(input_ids=ids).logits).all()
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in model.parameters())


def _norm_output(model, name, ids):
    got = {}
    h = models.residual_norms(model)[name].register_forward_hook(lambda m, a, out: got.setdefault("y", out.detach()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return got["y"]


def test_width_rescale_restores_the_scale_of_the_kept_channels(smoke):
    """A norm over the kept channels alone divides by their RMS; the calibration statistics give the
    factor that undoes it on average. The embedding channels the activation ranking keeps are made 3
    times larger, so the kept half carries most of the energy whatever the smoke build looks like
    (builds differ across machines); layer 0's input norm reads the embeddings, which slicing keeps
    exactly, so only its denominator differs."""
    import copy

    model, tok = smoke
    model = copy.deepcopy(model)
    H = model.config.hidden_size
    calib = data.calibration_set(tok, "1:1:1", tokens=2048, seq_len=128)
    first = prune.keep_channels(observe.observe(model, calib, progress=False), H // 2)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, first] *= 3
    obs = observe.observe(model, calib, progress=False)
    assert len(set(prune.keep_channels(obs, H // 2).tolist()) & set(first.tolist())) >= 0.9 * (H // 2)
    name = "layers.0.input_layernorm"
    assert name in models.residual_norms(model) and "norm" in obs.norm_energy
    energy = obs.norm_energy[name]
    assert energy.shape == (H,) and float(energy.mean()) == pytest.approx(1.0, rel=1e-4)
    ids = torch.as_tensor(calib[:4]["input_ids"])
    full = _norm_output(model, name, ids)
    gaps = {}
    for rescale in (True, False):
        half, kept = prune.slice_width(model, obs, 0.5, rescale=rescale)
        ratio = (_norm_output(half, name, ids).pow(2).mean() / full[..., kept].pow(2).mean()).sqrt()
        gaps[rescale] = abs(float(ratio) - 1)
    assert gaps[False] > 0.1 and gaps[True] < 0.03, gaps
    factors = prune.norm_factors(obs, prune.keep_channels(obs, H))
    assert set(factors) == set(obs.norm_energy) and all(f == pytest.approx(1.0, rel=1e-4) for f in factors.values())
    lean = observe.Observation(obs.layers, obs.layer_cos, obs.tokens, obs.groups)
    with pytest.raises(ValueError, match="rescale=False"):
        prune.slice_width(model, lean, 0.5)
    prune.slice_width(model, lean, 0.5, rescale=False)


def test_norm_forms_are_told_apart():
    """w x_hat and (1 + w) x_hat norms are told apart by probing a copy with a zero weight."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

    assert models._norm_form(torch.nn.RMSNorm(8)) == "scale" and models._norm_form(torch.nn.LayerNorm(8)) == "scale"
    offset = Qwen3NextRMSNorm(8)
    offset.weight.data.uniform_(-0.5, 0.5)
    assert models._norm_form(offset) == "offset"

    class Odd(torch.nn.RMSNorm):  # applies its weight some third way
        def forward(self, x):
            return super().forward(x) + 0.5
    with pytest.raises(models.UnsupportedModelError, match="neither"):
        models._norm_form(Odd(8))
