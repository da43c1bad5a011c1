"""Unit tests of moelab.merge: alignment, merging, grouping, low rank + sparse, DERN."""

import pytest
import torch

from moelab import merge

E, I, H = 4, 12, 8


def layer(seed=0, E=E, I=I, H=H, bias=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = {"gate": torch.randn(E, I, H, generator=g, dtype=dtype), "up": torch.randn(E, I, H, generator=g, dtype=dtype),
         "down": torch.randn(E, H, I, generator=g, dtype=dtype)}
    if bias:
        w["gate_bias"] = torch.randn(E, I, generator=g, dtype=dtype)
        w["up_bias"] = torch.randn(E, I, generator=g, dtype=dtype)
        w["down_bias"] = torch.randn(E, H, generator=g, dtype=dtype)
    return w


def inputs(n=64, seed=1, dtype=torch.float64):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def with_expert(w, e, expert):
    out = {k: v.clone() for k, v in w.items()}
    for k, v in expert.items():
        out[k][e] = v
    return out


def assert_expert_equal(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol)


# -- permutation and alignment ---------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_permute_neurons_leaves_output_unchanged(bias):
    w = merge.get_expert(layer(bias=bias, dtype=torch.float32), 0)
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(3))
    x = inputs(dtype=torch.float32)
    y0, y1 = merge.expert_forward(w, x), merge.expert_forward(merge.permute_neurons(w, perm), x)
    assert (y0 - y1).abs().max() < 1e-6 * max(1.0, y0.abs().max())
    with pytest.raises(ValueError):
        merge.permute_neurons(w, [0] * I)


@pytest.mark.parametrize("cost", ["dot", "l2", "cosine"])
def test_align_weights_recovers_permutation(cost):
    w = merge.get_expert(layer(bias=True), 1)
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(4))
    shuffled = merge.permute_neurons(w, perm)
    back = merge.align_weights(w, shuffled, cost=cost)
    assert_expert_equal(merge.permute_neurons(shuffled, back), w, tol=0)


def test_align_activations_and_ream_recover_permutation():
    w = merge.get_expert(layer(), 2)
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(5))
    shuffled = merge.permute_neurons(w, perm)
    X = inputs()
    a, b = merge.neuron_activations(w, X), merge.neuron_activations(shuffled, X)
    assert a.shape == (64, I)
    p = merge.align_activations(a, b)
    torch.testing.assert_close(b[:, p], a)
    assert_expert_equal(merge.permute_neurons(shuffled, p), w, tol=0)
    p2 = merge.align_ream(w, shuffled, a, b, pca_dims=4)
    assert_expert_equal(merge.permute_neurons(shuffled, p2), w, tol=0)


def test_neuron_activations_layer_shape():
    w = layer()
    acts = merge.neuron_activations(w, inputs(), experts=[0, 2])
    assert acts.shape == (2, 64, I)
    torch.testing.assert_close(acts[1], merge.neuron_activations(merge.get_expert(w, 2), inputs()))


# -- merging ---------------------------------------------------------------------------------

@pytest.mark.parametrize("align", ["weights", "activations", "ream"])
def test_merge_with_permuted_copy_returns_original(align):
    w = layer(bias=True)
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(6))
    w = with_expert(w, 3, merge.permute_neurons(merge.get_expert(w, 0), perm))
    m = merge.merge_experts(w, [0, 3], torch.tensor([0.3, 0.7]), align=align, X=inputs())
    assert_expert_equal(m, merge.get_expert(w, 0))


def test_merge_coefficients():
    w = layer(bias=True)
    assert_expert_equal(merge.merge_experts(w, [0, 1], torch.tensor([1.0, 0.0])), merge.get_expert(w, 0))
    m = merge.merge_experts(w, [1, 2], torch.tensor([1.0, 3.0]))
    for k in w:
        torch.testing.assert_close(m[k], 0.25 * w[k][1] + 0.75 * w[k][2])
    # all-zero coefficients average uniformly; negative ones are refused
    m0 = merge.merge_experts(w, [1, 2], torch.zeros(2))
    torch.testing.assert_close(m0["up"], (w["up"][1] + w["up"][2]) / 2)
    with pytest.raises(ValueError):
        merge.merge_experts(w, [1, 2], torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        merge.merge_experts(w, [1, 2], torch.ones(2), align="activations")  # needs X


def test_merge_layer_shapes_router_and_dtype():
    w = {k: v.to(torch.bfloat16) for k, v in layer(E=6).items()}
    router = torch.randn(6, H).to(torch.bfloat16)
    groups = [[4, 0, 1], [2], [3, 5]]
    coeffs = torch.tensor([1.0, 1.0, 2.0, 1.0, 2.0, 1.0])
    nw, nr, kept = merge.merge_layer(w, router, groups, coeffs, align="weights")
    assert nw["gate"].shape == (3, I, H) and nw["down"].shape == (3, H, I) and nw["gate"].dtype == torch.bfloat16
    assert kept.tolist() == [4, 2, 3]
    assert torch.equal(nr, router[[4, 2, 3]])
    assert torch.equal(nw["up"][1], w["up"][2])  # a singleton is copied unchanged
    _, nr2, _ = merge.merge_layer(w, router, [[3, 5]], coeffs, align=None, keep_router="weighted")
    torch.testing.assert_close(nr2[0].float(), (router[3].float() + router[5].float()) / 2, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError):
        merge.merge_layer(w, router, [[0, 1], [1]], coeffs)


# -- grouping --------------------------------------------------------------------------------

def ream_case():
    # 6 experts; saliency order 0 > 1 > 2 > 3 > 4 > 5; centroids (T=2) are 0 and 1
    sal = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    d = torch.tensor([
        [0.0, 0.9, 0.1, 0.2, 0.3, 0.8],
        [0.9, 0.0, 0.05, 0.7, 0.6, 0.4],
        [0.1, 0.05, 0.0, 0.5, 0.5, 0.5],
        [0.2, 0.7, 0.5, 0.0, 0.5, 0.5],
        [0.3, 0.6, 0.5, 0.5, 0.0, 0.5],
        [0.8, 0.4, 0.5, 0.5, 0.5, 0.0],
    ])
    return sal, d


def test_group_ream():
    sal, d = ream_case()
    # C = 0: every non-centroid to its nearest centroid (2 -> 1 at 0.05, 3 -> 0, 4 -> 0, 5 -> 1)
    assert merge.group_ream(sal, d, 2, C=0) == [[0, 3, 4], [1, 2, 5]]
    # C = 2: centroid 0 first takes its single nearest (2, at 0.1); centroid 1 then takes 5 (2 is gone);
    # 3 and 4 are left over and dropped
    assert merge.group_ream(sal, d, 2, C=2) == [[0, 2], [1, 5]]
    # C = 16: centroid 0 takes everything still free
    assert merge.group_ream(sal, d, 2, C=16) == [[0, 2, 3, 4, 5], [1]]
    # C = 1 is plain pruning
    assert merge.group_ream(sal, d, 3, C=1) == [[0], [1], [2]]


def test_group_nearest_and_cap():
    sim = 1 - ream_case()[1]
    assert merge.group_nearest([1, 0], sim) == [[1, 2, 5], [0, 3, 4]]
    capped = merge.group_nearest([0, 1], sim, max_group=2)
    # greedy by similarity: 2->1 (0.95), 3->0 (0.8); 0 and 1 are then full, 4 and 5 are dropped
    assert capped == [[0, 3], [1, 2]]


def test_partial_preservation_groups():
    imp = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7])  # order: 1, 3, 5, 2, 4, 0
    sim = torch.eye(6)
    sim[0, 5] = sim[5, 0] = 0.9
    sim[2, 3] = sim[3, 2] = 0.9
    sim[4, 5] = sim[5, 4] = 0.8
    # p = 1: pure pruning to the top 3
    assert merge.partial_preservation_groups(imp, sim, 3, preserve_ratio=1.0) == [[1], [3], [5]]
    # p = 0: all three are bases and absorb everything else
    assert merge.partial_preservation_groups(imp, sim, 3, preserve_ratio=0.0) == [[1], [3, 2], [5, 0, 4]]
    # p = 1/3: expert 1 preserved; bases 3, 5; 2 would be closest to 3, 0 and 4 to 5
    assert merge.partial_preservation_groups(imp, sim, 3, preserve_ratio=1 / 3) == [[1], [3, 2], [5, 0, 4]]
    # p = 2/3: 1 and 3 preserved (3 absorbs nothing), base 5 takes every discarded expert
    assert merge.partial_preservation_groups(imp, sim, 3, preserve_ratio=2 / 3) == [[1], [3], [5, 0, 2, 4]]


def test_group_hierarchical_separated_points():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    feats = centers[labels] + 0.1 * torch.randn(8, 2, generator=g)
    freq = torch.tensor([1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 5.0])
    groups = merge.group_hierarchical(feats, 3, frequency=freq)
    assert sorted(sorted(gr) for gr in groups) == [[0, 3, 6], [1, 4, 7], [2, 5]]
    reps = {gr[0] for gr in groups}
    assert {3, 7} <= reps  # the most frequent member represents its cluster
    assert len(merge.group_hierarchical(feats, 3)) == 3


# -- MC-SMoE low rank + sparse ---------------------------------------------------------------

def test_low_rank_sparse_and_stable_rank():
    W = torch.randn(6, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, V, S = merge.low_rank_sparse(W, rank=6, sparsity=1.0)
    assert U.shape == (6, 6) and V.shape == (6, 9) and S.count_nonzero() == 0
    torch.testing.assert_close(U @ V, W)
    U, V, S = merge.low_rank_sparse(W, rank=2, sparsity=0.0)
    torch.testing.assert_close(U @ V + S, W)  # the full residual restores W
    U, V, S = merge.low_rank_sparse(W, rank=2, sparsity=0.75)
    R = W - U @ V
    assert S.count_nonzero() == round(0.25 * W.numel())
    kept = S != 0
    assert R[kept].abs().min() >= R[~kept].abs().max()  # largest residual entries are kept
    assert merge.stable_rank(torch.eye(7)) == pytest.approx(7.0)
    assert merge.stable_rank(torch.outer(torch.arange(1.0, 4), torch.ones(5))) == pytest.approx(1.0)


# -- DERN ------------------------------------------------------------------------------------

def test_segments_layout():
    w = layer()
    s = merge.segments(w, 1)
    assert s.shape == (I, 3 * H)
    torch.testing.assert_close(s[:, :H], w["gate"][1])
    torch.testing.assert_close(s[:, 2 * H:], w["down"][1].T)
    assert merge.segments(w, 1, use_gate=False).shape == (I, 2 * H)


def test_dern_alpha_above_one_is_plain_pruning():
    w = layer(E=6, bias=True)
    imp = torch.rand(6, generator=torch.Generator().manual_seed(0))
    assign = merge.assign_segments(w, [0, 2, 5], [1, 3, 4], alpha=1.01)
    assert all((t == -1).all() for t in assign.values())
    out = merge.dern_recombine(w, [0, 2, 5], [1, 3, 4], imp, alpha=1.01)
    for k in w:
        assert torch.equal(out[k], w[k][[0, 2, 5]])


def test_dern_duplicate_of_kept_recombines_to_kept():
    w = layer(E=4)
    w = with_expert(w, 3, merge.get_expert(w, 1))  # dropped 3 duplicates kept 1
    imp = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assign = merge.assign_segments(w, [0, 1], [2, 3], alpha=0.99)
    assert torch.equal(assign[3], torch.ones(I, dtype=torch.long))
    assert (assign[2] == -1).all()  # random segments are not similar enough
    out = merge.dern_recombine(w, [0, 1], [2, 3], imp, alpha=0.99)
    for k in w:
        torch.testing.assert_close(out[k], w[k][[0, 1]])
    assert out["gate"].shape == (2, I, H)  # width I restored


def test_dern_width_restored_when_segments_move():
    w = layer(E=4, I=6)
    imp = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = merge.dern_recombine(w, [0, 1], [2, 3], imp, alpha=-1.0)  # every dropped segment moves
    assert out["gate"].shape == (2, 6, H) and out["down"].shape == (2, H, 6)
    assert torch.isfinite(out["up"]).all()


def test_weighted_spherical_kmeans():
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(3, 9, generator=g, dtype=torch.float64), dim=1)
    # 3 tight direction clusters with different norms
    which, scale = [0, 1, 2, 0, 1, 2, 0, 1], torch.tensor([1.0, 1, 1, 1, 1, 1, 3, 2], dtype=torch.float64)
    pts = dirs[which] * scale[:, None] + 1e-3 * torch.randn(8, 9, generator=g, dtype=torch.float64)
    for init in ("max_gate", "random"):
        cent, labels = merge.weighted_spherical_kmeans(pts, torch.ones(8), 3, init=init, seed=1)
        assert cent.shape == (3, 9)
        assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]  # clusters ordered by lowest member index
        cos = torch.nn.functional.cosine_similarity(cent, dirs, dim=1)
        assert (cos > 0.999).all()
    # equalised norms: cluster 0 holds norms 1, 1, 3 with equal weights -> centroid norm ~ 5/3
    assert cent[0].norm().item() == pytest.approx(5 / 3, rel=1e-3)
    # spread members: the centroid keeps the weighted mean norm (3 and 1, weights 1 and 3 -> 1.5) along the
    # weighted mean direction, instead of shrinking by the length of the mean unit vector (here 0.79)
    e = torch.eye(3, dtype=torch.float64)
    spread = torch.stack([3 * e[0], e[1], e[1], e[1]])
    c, lab = merge.weighted_spherical_kmeans(spread, torch.tensor([1.0, 1, 1, 1]), 1, iters=1)
    expected_dir = torch.nn.functional.normalize(e[0] + 3 * e[1], dim=0)
    torch.testing.assert_close(c[0], 1.5 * expected_dir)
    # N == k returns the input unchanged
    c2, l2 = merge.weighted_spherical_kmeans(pts[:3], torch.ones(3), 3)
    assert torch.equal(c2, pts[:3]) and l2.tolist() == [0, 1, 2]


def test_kmeans_cluster_with_zero_weights_falls_back_to_equal_weights():
    """A cluster whose members all weigh 0 averages them equally (finite, inside the cluster)."""
    g = torch.Generator().manual_seed(0)
    # the initialisation (largest |entry|) takes a[0] (norm 3) and then a point of b (norm 2)
    a = torch.tensor([1.0, 0.0, 0.0]) * torch.tensor([3.0, 1, 1, 1])[:, None] + 0.01 * torch.randn(4, 3, generator=g)
    b = torch.tensor([0.0, 1.0, 0.0]) * 2 + 0.01 * torch.randn(4, 3, generator=g)
    pts = torch.cat([a, b])
    w = torch.tensor([1.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    cent, labels = merge.weighted_spherical_kmeans(pts, w, 2, iters=10, gate_dim=3)
    assert torch.isfinite(cent).all()
    assert labels[:4].unique().numel() == 1 and labels[4:].unique().numel() == 1 and labels[0] != labels[4]
    cb = cent[labels[4]]
    units = b / b.norm(dim=1, keepdim=True)
    # equal weights: the direction of the plain mean of the members' unit vectors
    assert torch.nn.functional.cosine_similarity(cb, units.mean(0), dim=0) > 0.99999


def _assignment_cost(cost, perm):
    return float(cost[torch.arange(len(perm)), perm].double().sum())


def test_restricted_matching_finds_the_exact_optimum_and_falls_back_when_it_cannot():
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 32, generator=g)
    b = 0.7 * a[torch.randperm(600, generator=g)] + torch.randn(600, 32, generator=g)
    cost = torch.cdist(a, b)
    rows, cols = linear_sum_assignment(cost.double().numpy())
    exact = float(cost.double().numpy()[rows, cols].sum())
    perm = merge.hungarian(cost, candidates=32)
    assert sorted(perm.tolist()) == list(range(600))  # a permutation
    # the optimum over 32 candidates per row: never below the exact one, and close to it
    assert exact - 1e-9 <= _assignment_cost(cost, perm) <= exact * (1 + 1e-3)
    assert _assignment_cost(cost, merge.hungarian(cost, candidates=300)) == pytest.approx(exact, rel=1e-9)
    # one candidate per row, every row's cheapest the same column: no perfect matching inside the candidates,
    # so the candidates grow (4, 16, ...) until one exists, and the answer is still the optimum
    cost2 = torch.rand(50, 50, generator=g) + 1.0
    cost2[:, 0] = 0.0
    perm2 = merge.hungarian(cost2, candidates=1)
    r2, c2 = linear_sum_assignment(cost2.double().numpy())
    assert sorted(perm2.tolist()) == list(range(50))
    assert _assignment_cost(cost2, perm2) == pytest.approx(float(cost2.double().numpy()[r2, c2].sum()), rel=1e-9)
    with pytest.raises(FloatingPointError):
        merge.hungarian(torch.full((3, 3), float("nan")))


def test_wide_experts_take_the_restricted_matching(monkeypatch):
    """Above DENSE_MATCH_MAX neurons weight matching goes through the sparse candidate graph, same answer."""
    g = torch.Generator().manual_seed(1)
    I, H = 256, 24
    ref = {"gate": torch.randn(I, H, generator=g), "up": torch.randn(I, H, generator=g), "down": torch.randn(H, I, generator=g)}
    perm = torch.randperm(I, generator=g)
    other = merge.permute_neurons({k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in ref.items()}, perm)
    dense = merge.align_weights(ref, other)
    monkeypatch.setattr(merge, "DENSE_MATCH_MAX", 64)
    calls = []
    real = merge._restricted_match
    monkeypatch.setattr(merge, "_restricted_match", lambda c, k: calls.append(k) or real(c, k))
    assert torch.equal(merge.align_weights(ref, other), dense)
    assert calls and calls[0] == merge.MATCH_CANDIDATES


def test_randomized_pca_matches_the_exact_components(monkeypatch):
    g = torch.Generator().manual_seed(2)
    # strong low-rank structure plus noise, as in trained weights
    basis = torch.randn(8, 300, generator=g, dtype=torch.float64)
    fa = torch.randn(200, 8, generator=g, dtype=torch.float64) @ basis * 5 + torch.randn(200, 300, generator=g, dtype=torch.float64)
    fb = torch.randn(200, 8, generator=g, dtype=torch.float64) @ basis * 5 + torch.randn(200, 300, generator=g, dtype=torch.float64)
    pa, pb = merge._pca_pair(fa, fb, 8)
    monkeypatch.setattr(merge, "EXACT_PCA_MAX", 16)
    ra, rb = merge._pca_pair(fa, fb, 8)
    # the same subspace: pairwise distances between projected neurons agree (signs and rotations drop out)
    d_exact, d_rand = torch.cdist(pa, pb), torch.cdist(ra, rb)
    assert torch.allclose(d_exact, d_rand, rtol=1e-6, atol=1e-6)
    again = merge._pca_pair(fa, fb, 8)
    assert torch.equal(again[0], ra)  # seeded: deterministic
