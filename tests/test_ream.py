"""Tests of REAM at the model level (compress.ream_model, REAM, arXiv 2604.04356) and the HC-SMoE baseline."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from moelab import compress, data, io, merge, models, observe, prune, scores

IDS = torch.arange(3, 67).reshape(2, 32) % 120 + 3


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen3-MoE (8 experts, top-2), random calibration rows and one observation of them."""
    model = models.tiny_model("qwen3_moe", num_experts=8, top_k=2, seed=0)
    rows = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    return model, rows, observe.observe(model, rows, sample_size=128, progress=False)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("C", [0, 2, 16])
def test_groups_partition_and_centroids_are_most_salient(tiny, C):
    model, _, obs = tiny
    for idx, st in obs.layers.items():
        groups, sal, dist = compress.ream_groups(st, 3, C=C)
        flat = [e for g in groups for e in g]
        assert len(flat) == len(set(flat)) and set(flat) <= set(range(8))
        assert [g[0] for g in groups] == sorted(scores.select_top(sal, 3).tolist())
        assert all(len(g) <= C for g in groups) if C else True
        if C in (0, 16):  # 5 non-centroids fit into the groups: nobody is dropped
            assert sorted(flat) == list(range(8))
        assert dist.shape == (8, 8) and torch.equal(dist, dist.T) and (dist >= 0).all() and (dist <= 1).all()


def test_c1_is_pruning_by_reap(tiny):
    model, rows, obs = tiny
    before = state(model)
    ream, info = compress.ream_model(model, rows, 4, C=1, sequential=False, obs=obs)
    pruned, kept = prune.prune(model, obs, "reap", num_experts=4)
    torch.testing.assert_close(logits(ream), logits(pruned), atol=0, rtol=0)
    for idx, rec in info.items():
        assert rec["centroids"] == kept[idx].tolist() and rec["merged"] == [] and len(rec["dropped"]) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched


def test_merged_expert_is_the_saliency_weighted_mean(tiny):
    """Without alignment, a group's expert is sum s_i W_i / sum s_i and keeps the centroid's router row."""
    model, rows, obs = tiny
    new, info = compress.ream_model(model, rows, 3, C=0, align=None, sequential=False, obs=obs)
    old_layer, new_layer = models.moe_layers(model)[0], models.moe_layers(new)[0]
    rec = info[old_layer.layer_idx]
    w_old, w_new = old_layer.expert_weights(), new_layer.expert_weights()
    s = torch.tensor(rec["saliency"], dtype=torch.float64)
    big = max(range(3), key=lambda j: len(rec["groups"][j]))
    g = rec["groups"][big]
    assert len(g) > 1
    c = s[g] / s[g].sum()
    expected = sum(float(ci) * w_old["gate"][e].double() for ci, e in zip(c, g))
    torch.testing.assert_close(w_new["gate"][big].double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(new_layer.router_weight()[big], old_layer.router_weight()[g[0]])


def test_alignment_changes_the_merge_but_not_the_groups(tiny):
    model, rows, obs = tiny
    plain, info_plain = compress.ream_model(model, rows, 3, C=0, align=None, sequential=False, obs=obs)
    aligned, info_aligned = compress.ream_model(model, rows, 3, C=0, align="ream", sequential=False, obs=obs)
    assert all(info_plain[l]["groups"] == info_aligned[l]["groups"] for l in info_plain)
    assert not torch.equal(logits(plain), logits(aligned))


def test_sequential_differs_from_one_shot_only_after_the_first_layer(tiny):
    model, rows, obs = tiny
    # weight matching does not depend on the sampled inputs, so layer 0 must come out identical
    one, info_one = compress.ream_model(model, rows, 4, C=0, align="weights", sequential=False, obs=obs)
    seq, info_seq = compress.ream_model(model, rows, 4, C=0, align="weights", sequential=True, sample_size=128)
    first, *later = sorted(info_one)
    assert info_seq[first]["groups"] == info_one[first]["groups"]
    assert info_seq[first]["saliency"] == pytest.approx(info_one[first]["saliency"], rel=1e-9)
    w1 = models.moe_layers(one)[0].expert_weights()
    ws = models.moe_layers(seq)[0].expert_weights()
    assert all(torch.equal(w1[k], ws[k]) for k in w1)
    # later layers see inputs changed by the earlier merges
    assert later and all(info_seq[l]["saliency"] != pytest.approx(info_one[l]["saliency"], rel=1e-6) for l in later)
    assert not torch.equal(logits(one), logits(seq))
    assert all(l.num_experts == 4 for l in models.moe_layers(seq))
    assert model.config.num_experts == 8 and seq.config.num_experts == 4


def test_frequency_saliency_and_no_router_change_the_choice(tiny):
    model, _, obs = tiny
    st = obs[models.moe_layers(model)[0].layer_idx]
    g_freq, sal, _ = compress.ream_groups(st, 3, C=0, saliency="frequency")
    assert [g[0] for g in g_freq] == sorted(scores.select_top(st.frequency, 3).tolist())
    _, _, d_router = compress.ream_groups(st, 3, C=0)
    _, _, d_plain = compress.ream_groups(st, 3, C=0, use_router=False)
    torch.testing.assert_close(d_plain, scores.ream_distance(st, use_router=False))
    assert not torch.allclose(d_router, d_plain)


def test_hc_smoe_clusters_all_experts_and_merges_by_frequency(tiny):
    model, _, obs = tiny
    new, info = compress.hc_smoe_model(model, obs, 3, features="routed")
    assert all(l.num_experts == 3 for l in models.moe_layers(new))
    for layer_old, layer_new in zip(models.moe_layers(model), models.moe_layers(new)):
        st, groups = obs[layer_old.layer_idx], info[layer_old.layer_idx]["groups"]
        assert sorted(e for g in groups for e in g) == list(range(8)) and len(groups) == 3
        freq = st.frequency
        for j, g in enumerate(groups):
            assert float(freq[g[0]]) == float(freq[g].max())  # the most frequent member represents
            c = freq[g] / freq[g].sum() if freq[g].sum() > 0 else torch.full((len(g),), 1 / len(g), dtype=torch.float64)
            expected = sum(float(ci) * layer_old.expert_weights()["up"][e].double() for ci, e in zip(c, g))
            torch.testing.assert_close(layer_new.expert_weights()["up"][j].double(), expected, atol=1e-6, rtol=1e-5)
        # groups are average-linkage clusters of the mean expert outputs over each expert's routed tokens
        mean_out = st.out_sum / st.counts.clamp_min(1)[:, None]
        assert groups == merge.group_hierarchical(mean_out, 3, linkage="average", frequency=freq)


def _brute_mean_outputs(layer, X, gated):
    """sum over tokens x of (p_e(x)) f_e(x) / n, one token at a time, in float64."""
    with torch.no_grad():
        X = X.double()
        w = {k: v.double() for k, v in layer.expert_weights().items()}
        router = layer.router_weight().double()
        out = torch.zeros(layer.num_experts, X.shape[1], dtype=torch.float64)
        for x in X:
            p = torch.softmax(x @ router.T, -1)
            for e in range(layer.num_experts):
                f = (torch.nn.functional.silu(w["gate"][e] @ x) * (w["up"][e] @ x)) @ w["down"][e].T
                out[e] += (p[e] if gated else 1.0) * f
        return out / X.shape[0]


@pytest.mark.parametrize("gated", [False, True])
def test_mean_expert_outputs_average_every_expert_over_every_token(tiny, gated):
    """HC-SMoE's feature (gated=False) and REAM's reference ybar (gated=True): every expert on every sampled
    token, known answer by a per-token loop; chunking does not change it."""
    model, _, obs = tiny
    layer = models.moe_layers(model)[0]
    X = obs[layer.layer_idx].input_sample[:40]
    got = compress.mean_expert_outputs(layer, X, gated=gated, chunk=16)
    torch.testing.assert_close(got, _brute_mean_outputs(layer, X, gated), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="sample_size > 0"):
        compress.mean_expert_outputs(layer, X[:0], gated=gated)


def test_ream_distance_follows_the_reference_ybar_by_default(tiny):
    """ream_model's default distance uses p_e f_e averaged over all sampled tokens; outputs='routed' the
    routed-token mean of g_e f_e from the observation's sums; the two differ."""
    model, _, obs = tiny
    layer = models.moe_layers(model)[0]
    st = obs[layer.layer_idx]
    ybar = compress.mean_expert_outputs(layer, st.input_sample, gated=True)
    cos = torch.nn.functional.cosine_similarity(ybar[:, None], ybar[None], dim=-1)
    expected = (1 - (cos + 1) / 2).clamp(0, 1).fill_diagonal_(0)
    torch.testing.assert_close(scores.ream_distance(st, use_router=False, mean_outputs=ybar), expected)
    _, _, d_ref = compress.ream_groups(st, 3, C=0, mean_outputs=ybar)
    _, _, d_routed = compress.ream_groups(st, 3, C=0)
    assert not torch.allclose(d_ref, d_routed)
    _, info_ref = compress.ream_model(model, None, 3, C=0, align=None, sequential=False, obs=obs)
    _, info_routed = compress.ream_model(model, None, 3, C=0, align=None, sequential=False, obs=obs, outputs="routed")
    torch.testing.assert_close(info_ref[layer.layer_idx]["distance"], d_ref.float())
    torch.testing.assert_close(info_routed[layer.layer_idx]["distance"], d_routed.float())
    with pytest.raises(ValueError, match="outputs must be one of"):
        compress.ream_model(model, None, 3, obs=obs, sequential=False, outputs="mean")


def test_never_routed_experts_get_the_smallest_nonzero_saliency():
    """REAM's reference raises zero saliencies to the smallest non-zero one (frequency: half a token) so that
    an expert never routed still takes part in its group's merge."""
    st = observe.LayerStats(layer=0, num_experts=4, top_k=2, tokens=10)
    st.counts = torch.tensor([6.0, 0.0, 10.0, 4.0], dtype=torch.float64)
    st.reap_sum = torch.tensor([3.0, 0.0, 2.0, 8.0], dtype=torch.float64)
    st.logit_gram = torch.eye(4, dtype=torch.float64)
    st.gated_out_sum = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, sal, _ = compress.ream_groups(st, 2, C=0)
    torch.testing.assert_close(sal, torch.tensor([0.5, 0.2, 0.2, 2.0], dtype=torch.float64))
    _, sal, _ = compress.ream_groups(st, 2, C=0, saliency="frequency")
    torch.testing.assert_close(sal, torch.tensor([0.3, 0.025, 0.5, 0.2], dtype=torch.float64))


def test_hc_smoe_features_run_every_expert_on_every_sampled_token(tiny):
    """By default (HC-SMoE's reference) the clustering features are mean_expert_outputs on the input sample."""
    model, _, obs = tiny
    _, info = compress.hc_smoe_model(model, obs, 3)
    _, info_routed = compress.hc_smoe_model(model, obs, 3, features="routed")
    differs = False
    for layer in models.moe_layers(model):
        st = obs[layer.layer_idx]
        feats = compress.mean_expert_outputs(layer, st.input_sample, gated=False)
        expected = merge.group_hierarchical(feats, 3, linkage="average", frequency=st.frequency)
        assert info[layer.layer_idx]["groups"] == expected
        differs |= info[layer.layer_idx]["groups"] != info_routed[layer.layer_idx]["groups"]
    assert differs
    with pytest.raises(ValueError, match="features must be one of"):
        compress.hc_smoe_model(model, obs, 3, features="mean")


def test_ream_on_the_smoke_model_saves_reloads_and_shrinks(smoke, tmp_path):
    model, tok = smoke
    calib = data.calibration_set(tok, "0:0.3:0.7", tokens=2048, seq_len=128, seed=0)
    new, info = compress.ream_model(model, calib, 6, C=16, sample_size=128)
    assert all(l.num_experts == 6 for l in models.moe_layers(new))
    # C = 16 on 8 experts: the most salient centroid takes both non-centroids, nothing is dropped
    for rec in info.values():
        assert sorted(e for g in rec["groups"] for e in g) == list(range(8)) and rec["dropped"] == []
        top = max(rec["centroids"], key=lambda c: rec["saliency"][c])
        assert [len(g) for g in rec["groups"] if g[0] == top] == [3]
    orig = io.save_checkpoint(copy.deepcopy(model), tmp_path / "orig")
    path = io.save_checkpoint(new, tmp_path / "ream", tok)
    back = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor(calib[:2]["input_ids"])
    torch.testing.assert_close(logits(back, ids), logits(new, ids), atol=1e-5, rtol=1e-5)
    assert back.config.num_experts == 6
    assert io.checkpoint_bytes(path) < io.checkpoint_bytes(orig)


# ---------------------------------------------------------------------------------------------
# Helpers of notebook 02's calibration-mix trade-off (moelab.evaluate, moelab.plots)
# ---------------------------------------------------------------------------------------------

def test_pareto_front():
    import numpy as np

    from moelab import evaluate

    mc = [0.30, 0.25, 0.28, 0.20, 0.30, float("nan")]
    gen = [0.10, 0.20, 0.12, 0.05, 0.10, 0.9]
    # 3 is dominated by everything, 2 and 1 trade off with 0; 0 and 4 tie and are both on the front
    assert evaluate.pareto_front(mc, gen).tolist() == [True, True, True, False, True, False]
    bpb = [1.0, 2.0, 1.5]
    acc = [0.2, 0.3, 0.1]  # lower bpb is better: 2 is dominated by 0
    assert evaluate.pareto_front(bpb, acc, maximize=(False, True)).tolist() == [True, True, False]
    assert evaluate.pareto_front([], []).tolist() == []
    assert np.all(evaluate.pareto_front([1, 2, 3], [3, 2, 1]))


def test_correlation():
    import math

    import numpy as np

    from moelab import evaluate

    x = np.arange(10.0)
    c = evaluate.correlation(x, 2 * x + 1)
    assert c["r"] == pytest.approx(1.0) and c["p"] < 1e-6 and c["n"] == 10
    assert evaluate.correlation(x, -x)["r"] == pytest.approx(-1.0)
    flat = evaluate.correlation(x, np.zeros(10))  # a constant sample has no correlation
    assert math.isnan(flat["r"]) and math.isnan(flat["p"]) and flat["n"] == 10
    assert evaluate.correlation([1, 2, float("nan"), 4], [1, 2, 3, 5])["n"] == 3
    with pytest.raises(ValueError, match="pair"):
        evaluate.correlation([1, 2], [1, 2, 3])


def test_select_tasks_keeps_paired_units():
    import pandas as pd

    from moelab import evaluate

    rows = [{"task": t, "kind": "ppl", "domain": t[4:], "metric": "bits_per_byte", "value": v, "stderr": 0.1, "n": 3}
            for t, v in (("ppl_general", 2.0), ("ppl_math", 1.0), ("ppl_code", 3.0))]
    a = pd.DataFrame(rows)
    a.attrs = {"units": {r["task"]: {"kind": "ppl", "values": [r["value"]] * 3} for r in rows},
               "seconds": {r["task"]: 1.0 for r in rows}}
    b = a.copy()
    b.attrs = {"units": {t: {"kind": "ppl", "values": [v + d for v, d in zip(u["values"], (0.1, 0.2, 0.3))]}
                         for t, u in a.attrs["units"].items()}, "seconds": dict(a.attrs["seconds"])}
    sub = evaluate.select_tasks(a, ["ppl_math", "ppl_code"])
    assert sorted(sub.task) == ["ppl_code", "ppl_math"] and sorted(sub.attrs["units"]) == ["ppl_code", "ppl_math"]
    assert evaluate.summary_score(sub)["bits_per_byte"] == pytest.approx(2.0)
    d = evaluate.paired_difference(evaluate.select_tasks(b, ["ppl_math", "ppl_code"]), sub)
    assert d["diff"] == pytest.approx(0.2) and d["n"] == 6
    with pytest.raises(ValueError, match="no task"):
        evaluate.select_tasks(a, "ppl_klingon")


def test_pareto_scatter_draws_one_frontier_per_group():
    import pandas as pd

    from moelab import plots

    df = pd.DataFrame({"method": ["A"] * 3 + ["B"] * 3, "mix": list("xyzxyz"),
                       "mc": [0.3, 0.2, 0.1, 0.25, 0.25, 0.1], "gen": [0.1, 0.2, 0.05, 0.1, 0.1, 0.3]})
    fig = plots.pareto_scatter(df, x="mc", y="gen", hue="method", label="mix")
    lines = [l for l in fig.axes[0].get_lines() if l.get_linestyle() == "-"]
    assert [len(l.get_xdata()) for l in lines] == [2, 3]  # A: x, y (z dominated); B: x and y tie, z
    # B's x and y coincide: one label for both
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["x", "x, y", "y", "z", "z"]


def test_roles_and_routing_mass(tiny):
    model, _, obs = tiny
    groups = [[1, 0, 5], [3], [6, 2]]
    assert compress.group_roles(groups, 8) == ["merged", "centroid", "merged", "centroid", "dropped", "merged",
                                               "centroid", "dropped"]
    st = copy.deepcopy(obs[models.moe_layers(model)[0].layer_idx])
    with pytest.raises(ValueError, match="domain"):
        compress.routing_mass_by_role(st, groups)
    st.counts_by_group = {"a": torch.arange(8, dtype=torch.float64), "b": torch.zeros(8, dtype=torch.float64)}
    mass = compress.routing_mass_by_role(st, groups)
    assert mass["a"] == pytest.approx({"centroid": 10 / 28, "merged": 7 / 28, "dropped": 11 / 28})
    assert mass["b"] == {"centroid": 0.0, "merged": 0.0, "dropped": 0.0}


def test_expert_groups_figure():
    from moelab import plots

    fig = plots.expert_groups([0.1, 0.5, 0.2, 0.4], [[1, 0], [3]], title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3", "2", "0"]
    assert [t.get_text() for t in ax.texts] == ["→1"]
