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
