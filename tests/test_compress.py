"""Tests of moelab.compress: DERN, nearest-expert merging and NAEE at the model level."""

import copy
import math
from itertools import combinations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moelab import compress, io, models, observe, prune

IDS = torch.arange(3, 67).reshape(2, 32) % 120 + 3


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen3-MoE (8 experts, top-2) and one observation of it on random token rows."""
    model = models.tiny_model("qwen3_moe", num_experts=8, top_k=2, seed=0)
    rows = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    return model, observe.observe(model, rows, sample_size=128, progress=False)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_dern_at_one_is_plain_dern_pruning(tiny):
    model, obs = tiny
    dern, info = compress.dern_model(model, obs, 4, alpha=1.0)
    pruned, kept = prune.prune(model, obs, "dern", num_experts=4)
    torch.testing.assert_close(logits(dern), logits(pruned), atol=0, rtol=0)
    for layer_idx, rec in info.items():
        assert rec["kept"] == kept[layer_idx].tolist()
        assert rec["moved"] == 0 and rec["moved_share"] == 0.0


def test_dern_flows_sum_to_moved_segments(tiny):
    model, obs = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, info = compress.dern_model(model, obs, 4, alpha=0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    for layer in models.moe_layers(new):
        rec = info[layer.layer_idx]
        I = layer.intermediate_size
        assert layer.num_experts == 4 and rec["flow"].shape == (4, 4)
        assert rec["segments"] == 4 * I
        assert int(rec["flow"].sum()) == rec["moved"]
        assert (rec["flow"].sum(1) <= I).all()
        assert rec["moved_share"] == pytest.approx(rec["moved"] / (4 * I))
        assert rec["moved"] > 0  # alpha 0: every segment with a positive best cosine moves
    assert torch.isfinite(logits(new)).all()


@pytest.mark.parametrize("method", ["dern", "merge", "naee"])
def test_methods_save_and_reload(tiny, tmp_path, method):
    model, obs = tiny
    build = {"dern": lambda: compress.dern_model(model, obs, 4),
             "merge": lambda: compress.merge_into_nearest_model(model, obs, 4),
             "naee": lambda: compress.naee_model(model, obs, 4)}[method]
    new, _ = build()
    assert all(l.num_experts == 4 for l in models.moe_layers(new))
    orig = io.save_checkpoint(model, tmp_path / "orig")
    path = io.save_checkpoint(new, tmp_path / method)
    back = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(logits(back), logits(new), atol=0, rtol=0)
    assert io.checkpoint_bytes(path) < io.checkpoint_bytes(orig)


def test_merge_groups_cover_all_experts(tiny):
    model, obs = tiny
    _, info = compress.merge_into_nearest_model(model, obs, 3)
    for rec in info.values():
        assert sorted(e for g in rec["groups"] for e in g) == list(range(8))
        assert len(rec["groups"]) == 3


def _pruned_block_error(model, layer_idx, X, kept):
    """Brute force: prune a real copy of the model and compare the block outputs (minus shared parts)."""
    full = [l for l in models.moe_layers(model) if l.layer_idx == layer_idx][0]
    m = copy.deepcopy(model)
    keep = {l.layer_idx: (list(kept) if l.layer_idx == layer_idx else list(range(len(kept))))
            for l in models.moe_layers(m)}
    models.prune_experts(m, keep)
    sub = [l for l in models.moe_layers(m) if l.layer_idx == layer_idx][0]
    with torch.no_grad():
        return float(((full.block_forward(X).double() - sub.block_forward(X).double()) ** 2).sum())


def test_naee_exhaustive_finds_the_true_minimum(tiny):
    model, obs = tiny
    layer = models.moe_layers(model)[0]
    X = obs[layer.layer_idx].input_sample[:64]
    kept, method, err = compress.naee_select(layer, X, 4)
    assert method == "exhaustive" and kept.numel() == 4
    brute = {sub: _pruned_block_error(model, layer.layer_idx, X, sub) for sub in combinations(range(8), 4)}
    best = min(brute, key=brute.get)
    assert tuple(kept.tolist()) == best
    assert err == pytest.approx(brute[best], rel=1e-4, abs=1e-6)
    # the fast error equals the real pruned layer's for any subset
    for sub in [(0, 1, 2, 3), (1, 3, 5, 7)]:
        assert compress.subset_error(layer, X, sub) == pytest.approx(brute[sub], rel=1e-4, abs=1e-6)


def test_naee_greedy_returns_the_count(tiny):
    model, obs = tiny
    layer = models.moe_layers(model)[0]
    X = obs[layer.layer_idx].input_sample
    kept, method, err = compress.naee_select(layer, X, 3, exhaustive_limit=1)
    assert method == "greedy" and kept.numel() == 3 and kept.unique().numel() == 3
    assert torch.equal(kept, kept.sort().values)
    assert math.isfinite(err) and err >= 0
    best, _, best_err = compress.naee_select(layer, X, 3)
    assert best_err <= err + 1e-9  # exhaustive is never worse than greedy
    with pytest.raises(ValueError, match="top_k"):
        compress.naee_select(layer, X, 1)


# ----------------------------------------------------------------------------- SlimQwen partial preservation
def test_partial_preservation_ends_match_pruning_and_groups_cover_all(tiny, tmp_path):
    model, obs = tiny
    full, info = compress.partial_preservation_model(model, obs, 4, preserve_ratio=1.0, criterion="frequency")
    pruned, _ = prune.prune(model, obs, "frequency", num_experts=4)
    torch.testing.assert_close(logits(full), logits(pruned), atol=1e-6, rtol=0)
    half, info = compress.partial_preservation_model(model, obs, 4, preserve_ratio=0.5, similarity="router_weight")
    for rec in info.values():
        flat = sorted(e for g in rec["groups"] for e in g)
        assert flat == list(range(8)) and len(rec["groups"]) == 4
        singles = [g[0] for g in rec["groups"] if len(g) == 1]
        assert set(rec["preserved"]) <= set(singles) and len(rec["preserved"]) == 2
    assert not torch.allclose(logits(half), logits(pruned))
    path = io.save_checkpoint(half, tmp_path / "pp")
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(logits(reloaded), logits(half))
    with pytest.raises(ValueError):
        compress.partial_preservation_model(model, obs, 4, preserve_ratio=1.5)


def test_slim_model_composes_experts_width_and_depth(smoke):
    from moelab import data

    model, tok = smoke
    obs = observe.observe(model, data.calibration_set(tok, "1:1:1", tokens=2048, seq_len=128), progress=False)
    E, H, n = models.moe_layers(model)[0].num_experts, model.config.hidden_size, len(models.decoder_layers(model))
    out, info = compress.slim_model(model, obs, remove_layers=1, width_ratio=0.5, num_experts=E // 2,
                                    criterion="reap", preserve_ratio=0.5)
    assert len(models.decoder_layers(out)) == n - 1 and out.config.hidden_size == H // 2
    assert all(l.num_experts == E // 2 for l in models.moe_layers(out))
    assert info["removed_layers"] == [n - 1] and info["parameters"] < info["original_parameters"] / 2
    models.check_consistency(out)
    same, info = compress.slim_model(model, obs)
    assert same is not model and info["parameters"] == info["original_parameters"]


# Wrong arguments fail at once with the argument named (issue 14 item 5); each of these once raised a
# TypeError deep in a tensor operation, returned a negative count, or returned an unchanged copy.
BAD_ARGUMENTS = [
    ("prune float count", lambda m, o: prune.prune(m, o, "frequency", num_experts=6.0), TypeError, r"pass int\(6.0\)"),
    ("prune string count", lambda m, o: prune.prune(m, o, "frequency", num_experts="6"), TypeError, "whole number"),
    ("HC-SMoE fractional count", lambda m, o: compress.hc_smoe_model(m, o, 6.5), TypeError, "whole number"),
    ("nearest-merge float count", lambda m, o: compress.merge_into_nearest_model(m, o, 6.0), TypeError, "num_experts"),
    ("DERN float count", lambda m, o: compress.dern_model(m, o, 6.0), TypeError, "num_experts"),
    ("M-SMoE reduction above 1", lambda m, o: compress.msmoe_total(m, 1.5), ValueError, r"reduction must lie in \(0, 1\)"),
    ("M-SMoE reduction below 0", lambda m, o: compress.msmoe_total(m, -0.2), ValueError, "reduction"),
    ("M-SMoE reduction below top-k", lambda m, o: compress.msmoe_total(m, 0.9), ValueError, "at most 0.750"),
    ("M-SMoE fractional total", lambda m, o: compress.msmoe_model(m, o, 20.5), TypeError, "total"),
    ("slim count that does not shrink", lambda m, o: compress.slim_model(m, o, num_experts=8), ValueError,
     "not below the current count"),
    ("slim width above 1", lambda m, o: compress.slim_model(m, o, width_ratio=1.5), ValueError, "width_ratio"),
    ("slim negative depth", lambda m, o: compress.slim_model(m, o, remove_layers=-1), ValueError, "remove_layers"),
    ("DERN alpha above 1", lambda m, o: compress.dern_model(m, o, 4, alpha=1.5), ValueError, r"alpha .* \[0, 1\]"),
    ("DERN alpha below 0", lambda m, o: compress.dern_model(m, o, 4, alpha=-0.1), ValueError, "alpha"),
    ("low rank of 0", lambda m, o: compress.low_rank_sparse_model(m, 0.5, rank=0), ValueError, "rank must be at least 1"),
    ("low rank above the matrix rank", lambda m, o: compress.low_rank_sparse_model(m, 0.5, rank=10 ** 6), ValueError,
     "give rank <="),
    ("rank fraction above 1", lambda m, o: compress.low_rank_sparse_model(m, 0.5, rank_fraction=2.0), ValueError,
     "rank_fraction"),
]


@pytest.mark.parametrize("name,call,error,match", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_wrong_arguments_fail_with_the_argument_named(tiny, name, call, error, match):
    model, obs = tiny
    with pytest.raises(error, match=match):
        call(model, obs)


def test_an_observation_of_another_or_edited_model_is_refused(tiny):
    model, obs = tiny
    other = models.tiny_model("qwen3_moe", num_experts=8, top_k=2, seed=1)
    with pytest.raises(ValueError, match="made on another model.*router_checksum"):
        prune.prune(other, obs, "frequency", num_experts=4)
    pruned, _ = prune.prune(model, obs, "frequency", num_experts=6)
    with pytest.raises(ValueError, match="experts was 8, is 6"):
        compress.dern_model(pruned, obs, 4)
    trained = copy.deepcopy(model)
    with torch.no_grad():
        models.moe_layers(trained)[0]._router_weight().mul_(1.01)
    with pytest.raises(ValueError, match="observe the model as it is now"):
        compress.hc_smoe_model(trained, obs, 4)
    compress.hc_smoe_model(model, obs, 4)  # the observed model itself passes
