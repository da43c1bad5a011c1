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
