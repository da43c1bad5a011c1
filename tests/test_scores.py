"""Unit tests of moelab.scores on hand-made LayerStats with known values."""

import pytest
import torch

from moelab import scores
from moelab.observe import LayerStats


def make_stats(E=4, H=3, K=2, T=10, seed=0) -> LayerStats:
    st = LayerStats(layer=3, num_experts=E, top_k=K)
    st.init(H)
    st.tokens = T
    st.counts = torch.tensor([8.0, 6.0, 6.0, 0.0], dtype=torch.float64)[:E]  # sums to K*T = 20
    st.soft_mass = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)[:E]
    st.soft_mass_routed = torch.tensor([3.0, 2.0, 1.5, 0.0], dtype=torch.float64)[:E]
    st.reap_sum = torch.tensor([16.0, 3.0, 12.0, 0.0], dtype=torch.float64)[:E]
    st.reap_topk_sum = torch.tensor([8.0, 6.0, 3.0, 0.0], dtype=torch.float64)[:E]
    st.ean_sum = torch.tensor([5.0, 7.0, 1.0, 0.0], dtype=torch.float64)[:E]
    st.dern_sum = torch.tensor([5.0, 2.0, 3.0, 0.0], dtype=torch.float64)[:E]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(T, E, generator=gen, dtype=torch.float64)
    st.logit_gram = z.T @ z
    p = z.softmax(-1)
    st.prob_gram = p.T @ p
    st.out_sum = torch.randn(E, H, generator=gen, dtype=torch.float64) * st.counts[:, None]
    st.gated_out_sum = torch.randn(E, H, generator=gen, dtype=torch.float64) * st.counts[:, None]
    st._z = z  # kept for reference computations in tests
    return st


def test_importance_known_values():
    st = make_stats()
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(scores.importance(st, "frequency"), torch.tensor([0.4, 0.3, 0.3, 0.0], **f64))
    torch.testing.assert_close(scores.importance(st, "soft_logit"), torch.tensor([0.4, 0.3, 0.2, 0.1], **f64))
    torch.testing.assert_close(scores.importance(st, "soft_logit_routed"),
                               torch.tensor([0.3, 0.2, 0.15, 0.0], **f64))
    # REAP is a mean over routed tokens; the never-routed expert 3 scores 0 (not NaN)
    torch.testing.assert_close(scores.importance(st, "reap"), torch.tensor([2.0, 0.5, 2.0, 0.0], **f64))
    torch.testing.assert_close(scores.importance(st, "reap_topk"), torch.tensor([1.0, 1.0, 0.5, 0.0], **f64))
    torch.testing.assert_close(scores.importance(st, "ean"), torch.tensor([5.0, 7.0, 1.0, 0.0], **f64))
    torch.testing.assert_close(scores.importance(st, "dern"), torch.tensor([0.5, 0.2, 0.3, 0.0], **f64))


def test_importance_random_is_seeded_and_unknown_raises():
    st = make_stats()
    a, b = scores.importance(st, "random", seed=1), scores.importance(st, "random", seed=1)
    assert torch.equal(a, b) and a.shape == (4,)
    assert not torch.equal(a, scores.importance(st, "random", seed=2))
    with pytest.raises(KeyError):
        scores.importance(st, "nope")


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        scores.register_criterion("reap")(lambda stats, **_: stats.counts)
    with pytest.raises(ValueError, match="already registered"):
        scores.register_similarity("router_logit")(lambda stats, **_: None)


@pytest.mark.parametrize("kind", ["router_logit", "router_logit_mc", "router_prob", "router_weight", "output",
                                  "gated_output", "ream"])
def test_similarity_symmetric_unit_diagonal_and_range(kind):
    st = make_stats()
    rw = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    s = scores.similarity(st, kind, router_weight=rw)
    assert s.shape == (4, 4)
    torch.testing.assert_close(s, s.T)
    torch.testing.assert_close(s.diagonal(), torch.ones(4, dtype=s.dtype))
    lo = 0.0 if kind in ("router_logit_mc", "router_prob", "ream") else -1.0
    assert s.min() >= lo - 1e-12 and s.max() <= 1 + 1e-12


def test_router_logit_cosine_matches_direct_computation():
    st = make_stats()
    z = torch.nn.functional.normalize(st._z, dim=0)
    torch.testing.assert_close(scores.similarity(st, "router_logit"), z.T @ z)
    torch.testing.assert_close(scores.similarity(st, "router_logit_mc"), (z.T @ z + 1) / 2)


def test_router_weight_cosine_and_needs_weight():
    rw = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    s = scores.router_weight_cosine(router_weight=rw)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0, -1], [0, 1, 0], [-1, 0, 1]], dtype=torch.float64))
    with pytest.raises(ValueError):
        scores.similarity(make_stats(), "router_weight")


def test_output_cosine_unrouted_expert_is_orthogonal():
    s = scores.output_cosine(make_stats())
    assert torch.all(s[3, :3] == 0) and s[3, 3] == 1


def test_ream_distance_formula():
    st = make_stats()
    z = st._z
    for normalise, cols in (("unit", torch.nn.functional.normalize(z, dim=0)), ("none", z)):
        D = torch.cdist(cols.T, cols.T)
        simgate = 1 - D / D.max()
        y = st.gated_out_sum / st.counts.clamp_min(1)[:, None]
        y = torch.nn.functional.normalize(y, dim=1)
        cos = y @ y.T
        expected = 1 - 0.5 * ((cos + 1) / 2 + simgate)
        expected.fill_diagonal_(0)
        got = scores.ream_distance(st, normalise=normalise)
        torch.testing.assert_close(got, expected)
        assert got.min() >= 0 and got.max() <= 1
    torch.testing.assert_close(scores.similarity(st, "ream"), 1 - scores.ream_distance(st))
    with pytest.raises(ValueError):
        scores.ream_distance(st, normalise="zscore")


def test_select_top_ties_and_order():
    s = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.0])
    assert scores.select_top(s, 2).tolist() == [1, 3]  # tie 1/2 goes to the lower index
    assert scores.rank(s).tolist() == [3, 1, 2, 0, 4]
    assert scores.select_top(s, 0).tolist() == []
    with pytest.raises(ValueError):
        scores.select_top(s, 6)


def test_global_dominant_forces_each_layers_top_expert():
    per = {
        0: torch.tensor([0.40, 0.30, 0.20, 0.10]),
        1: torch.tensor([0.05, 0.90, 0.03, 0.02]),
        2: torch.tensor([0.26, 0.25, 0.25, 0.24]),
    }
    kept = scores.global_dominant(per, total=5)
    # forced: 0->0, 1->1, 2->0; then the two best of the rest globally: 0.30 (layer 0), 0.25 (layer 2, e=1)
    assert {l: v.tolist() for l, v in kept.items()} == {0: [0, 1], 1: [1], 2: [0, 1]}
    assert sum(v.numel() for v in kept.values()) == 5
    with pytest.raises(ValueError):
        scores.global_dominant(per, total=2)
    uni = scores.uniform_per_layer(per, 2)
    assert {l: v.tolist() for l, v in uni.items()} == {0: [0, 1], 1: [0, 1], 2: [0, 1]}
