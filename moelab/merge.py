"""Neuron alignment, expert merging, expert grouping, low-rank + sparse compression and DERN recombination.

Weights use moelab's uniform layout (see moelab.models): a layer is ``{"gate": [E, I, H], "up": [E, I, H],
"down": [E, H, I]}`` (optionally ``gate_bias`` / ``up_bias`` [E, I] and ``down_bias`` [E, H]); one expert
is the same dict without the leading E (``get_expert``). f_e(x) = down_e(act(gate_e x) * up_e x).
A neuron (a "segment" in DERN) n of an expert is (row n of gate, row n of up, column n of down), with
its biases gate_bias[n], up_bias[n]; the expert output is the sum of its neurons' contributions, so
reordering neurons changes nothing (``permute_neurons``) and merging must first match neurons.

The papers served here:

* alignment by Hungarian matching: weight matching (MC-SMoE, section 4), activation matching and
  REAM's activation + PCA-feature cost (section 2);
* merging: weighted averages W = sum c_i W_i / sum c_i (sections 1, 2, 4; HC-SMoE baseline);
* grouping: nearest kept expert (MC-SMoE / SlimQwen), REAM pseudo-pruning, HC-SMoE hierarchical
  clustering, SlimQwen partial preservation;
* MC-SMoE's low rank + sparse compression and stable rank (section 4);
* DERN's segment reassignment and weighted spherical k-means (section 3).

Permutation convention: ``perm`` maps new position -> old neuron, so ``permute_neurons(w, perm)`` puts
neuron ``perm[n]`` of ``w`` at position n. The ``align_*`` functions return the perm that makes
``other`` line up with ``ref``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .scores import rank

__all__ = [
    "get_expert", "stack_experts", "expert_forward", "permute_neurons", "neuron_features", "neuron_activations",
    "hungarian", "align_weights", "align_activations", "align_ream", "merge_experts", "merge_layer",
    "group_nearest", "group_ream", "group_hierarchical", "partial_preservation_groups", "low_rank_sparse",
    "stable_rank", "segments", "assign_segments", "weighted_spherical_kmeans", "dern_recombine",
]

NEURON_KEYS = ("gate", "up", "gate_bias", "up_bias")  # tensors indexed by neuron along dim 0 (per expert)
ALIGNMENTS = (None, "weights", "activations", "ream")


# ---------------------------------------------------------------------------------------------
# Expert dicts
# ---------------------------------------------------------------------------------------------

def get_expert(weights: Mapping[str, Tensor], e: int) -> dict[str, Tensor]:
    """Expert ``e`` of a layer's uniform dict: gate/up [I, H], down [H, I] (+ biases [I], [H])."""
    return {k: v[e] for k, v in weights.items()}


def stack_experts(experts: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack single-expert dicts back into a layer dict with a leading expert dimension."""
    if not experts:
        raise ValueError("no experts to stack")
    return {k: torch.stack([x[k] for x in experts]) for k in experts[0]}


def expert_forward(w: Mapping[str, Tensor], x: Tensor, act: Callable = F.silu) -> Tensor:
    """f(x) = down(act(gate x + b_g) * (up x + b_u)) + b_d for one expert dict; x [n, H] -> [n, H]."""
    h = act(F.linear(x, w["gate"], w.get("gate_bias"))) * F.linear(x, w["up"], w.get("up_bias"))
    return F.linear(h, w["down"], w.get("down_bias"))


def _work_dtype(t: Tensor) -> torch.dtype:
    # bf16/fp16 checkpoints are averaged in float32; float64 stays float64 (tests).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_perm(perm, n: int) -> Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long)
    if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
        raise ValueError(f"perm must be a permutation of range({n})")
    return perm


def permute_neurons(weights_e: Mapping[str, Tensor], perm) -> dict[str, Tensor]:
    """Reorder one expert's neurons: position n gets old neuron ``perm[n]`` (the output is unchanged).

    Args:
        weights_e: one expert: gate/up [I, H], down [H, I] (+ gate_bias/up_bias [I], down_bias [H]).
        perm: a permutation of range(I) (list or LongTensor).

    Returns:
        A new expert dict.
    """
    I = weights_e["gate"].shape[0]
    perm = _as_perm(perm, I).to(weights_e["gate"].device)
    out = dict(weights_e)
    for k in NEURON_KEYS:
        if k in weights_e:
            out[k] = weights_e[k][perm]
    out["down"] = weights_e["down"][:, perm]
    return out


def neuron_features(weights_e: Mapping[str, Tensor], include_bias: bool = True) -> Tensor:
    """Per-neuron vectors [gate row | up row | down column (| gate_bias | up_bias)]: [I, 3H (+2)]."""
    parts = [weights_e["gate"], weights_e["up"], weights_e["down"].T]
    if include_bias:
        parts += [weights_e[k][:, None] for k in ("gate_bias", "up_bias") if k in weights_e]
    dt = _work_dtype(weights_e["gate"])
    return torch.cat([p.to(dt) for p in parts], dim=1)


def neuron_activations(weights: Mapping[str, Tensor], X: Tensor, act: Callable = F.silu,
                       experts: list[int] | None = None) -> Tensor:
    """Neuron activations act(gate x + b_g) * (up x + b_u) on sample inputs (e.g. ``LayerStats.input_sample``).

    Args:
        weights: one expert (gate [I, H]) or a layer (gate [E, I, H]).
        X: [n, H] inputs of the MoE layer.
        act: the experts' activation (SiLU for SwiGLU families).
        experts: for a layer dict, the experts to compute (default all).

    Returns:
        [n, I] for one expert, [len(experts), n, I] for a layer.
    """
    if weights["gate"].dim() == 2:
        dt = _work_dtype(weights["gate"])
        x = X.to(device=weights["gate"].device, dtype=dt)  # samples live on the CPU, weights anywhere
        g = F.linear(x, weights["gate"].to(dt), weights["gate_bias"].to(dt) if "gate_bias" in weights else None)
        u = F.linear(x, weights["up"].to(dt), weights["up_bias"].to(dt) if "up_bias" in weights else None)
        return act(g) * u
    idx = range(weights["gate"].shape[0]) if experts is None else experts
    return torch.stack([neuron_activations(get_expert(weights, e), X, act) for e in idx])


# ---------------------------------------------------------------------------------------------
# Alignment by Hungarian matching
# ---------------------------------------------------------------------------------------------

DENSE_MATCH_MAX = 4096  # above this many neurons the matching is restricted to each neuron's cheapest partners
MATCH_CANDIDATES = 64   # partners kept per neuron in the restricted matching


def hungarian(cost: Tensor, candidates: int | None = None) -> Tensor:
    """Minimum-cost perfect matching of a square cost matrix.

    Up to ``DENSE_MATCH_MAX`` rows: the exact assignment (scipy's ``linear_sum_assignment``). Wider
    (Mixtral's experts have 14,336 neurons: a dense float64 problem of 1.6 GB and about half a minute
    per match) the matching is restricted to each row's ``candidates`` cheapest columns and solved on
    that sparse graph (scipy's ``min_weight_full_bipartite_matching``); when the sparse graph has no
    perfect matching the candidates are multiplied by 4, up to the dense problem. The restricted
    optimum equals the exact one whenever the exact matching uses only candidate pairs
    (benchmarks/methods.py measures both: cost gap and speed).

    Args:
        cost: [n, n] costs (any device and dtype).
        candidates: force the restricted matching with this many partners per row (default: dense up
            to ``DENSE_MATCH_MAX`` rows, else ``MATCH_CANDIDATES``).

    Returns:
        LongTensor perm with cost rows i matched to columns perm[i].
    """
    n = cost.shape[0]
    if cost.dim() != 2 or cost.shape[1] != n:
        raise ValueError(f"hungarian needs a square cost matrix, got {tuple(cost.shape)}")
    c = cost.detach()
    if not torch.isfinite(c).all():
        raise FloatingPointError("alignment cost holds NaN or Inf")
    k = candidates if candidates is not None else (None if n <= DENSE_MATCH_MAX else MATCH_CANDIDATES)
    while k is not None and k < n:
        cols = _restricted_match(c, k)
        if cols is not None:
            return torch.as_tensor(cols, dtype=torch.long)
        k *= 4
    rows, cols = linear_sum_assignment(c.double().cpu().numpy())
    perm = torch.empty(n, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def _restricted_match(c: Tensor, k: int):
    """Optimal perfect matching using only each row's k cheapest columns, or None when there is none."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n = c.shape[0]
    vals, cols = torch.topk(c.float(), k, dim=1, largest=False)  # on the cost's device
    vals = vals.double().cpu()
    # shifted to be strictly positive: an explicit zero would drop out of the sparse graph
    data = (vals - vals.min() + 1.0).numpy().ravel()
    graph = csr_matrix((data, cols.cpu().numpy().ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    try:
        _, matched = min_weight_full_bipartite_matching(graph)
    except ValueError:  # no perfect matching inside the candidates
        return None
    return matched


def _unit_rows(m: Tensor, eps: float = 1e-12) -> Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(eps)


def align_weights(ref: Mapping[str, Tensor], other: Mapping[str, Tensor], cost: str = "dot") -> Tensor:
    """MC-SMoE weight matching (MC-SMoE, arXiv 2310.01334): match ``other``'s neurons to ``ref``'s.

    Features per neuron are [gate row | up row | down column (| biases)] (``neuron_features``).

    Args:
        ref, other: one expert each.
        cost: ``"dot"`` maximises the summed inner product (MC-SMoE); ``"l2"`` minimises Euclidean
            distance; ``"cosine"`` maximises cosine.

    Returns:
        perm such that ``permute_neurons(other, perm)`` is aligned with ``ref``.
    """
    fr, fo = neuron_features(ref), neuron_features(other)
    if cost == "dot":
        c = -(fr @ fo.T)
    elif cost == "l2":
        c = torch.cdist(fr, fo)
    elif cost == "cosine":
        c = -(_unit_rows(fr) @ _unit_rows(fo).T)
    else:
        raise ValueError(f"cost must be 'dot', 'l2' or 'cosine', got {cost!r}")
    return hungarian(c)


def _unit_columns(acts: Tensor, center: bool) -> Tensor:
    a = acts.to(_work_dtype(acts))
    if center:
        a = a - a.mean(0, keepdim=True)
    return a / a.norm(dim=0, keepdim=True).clamp_min(1e-12)


def align_activations(ref_acts: Tensor, other_acts: Tensor, center: bool = False) -> Tensor:
    """Activation matching (REAM, arXiv 2604.04356): neurons that fire alike on shared tokens are matched.

    Cost: Euclidean distance between neuron activation vectors over the n tokens, each scaled to unit
    norm (so only the pattern counts, not the scale).

    Args:
        ref_acts, other_acts: [n, I] neuron activations on the same tokens (``neuron_activations``).
        center: subtract each neuron's mean activation before normalising (a correlation distance).

    Returns:
        perm such that ``other_acts[:, perm]`` (and ``permute_neurons(other, perm)``) line up with ref.
    """
    a, b = _unit_columns(ref_acts, center), _unit_columns(other_acts, center)
    return hungarian(torch.cdist(a.T, b.T))


EXACT_PCA_MAX = 4096  # above this many rows and columns, principal components by randomized subspace iteration


def _pca_pair(fa: Tensor, fb: Tensor, dims: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Project two neuron-feature sets onto the top ``dims`` principal components of both together.

    Exact (an eigendecomposition of the smaller Gram matrix) when either side of the stacked features
    is at most ``EXACT_PCA_MAX``; otherwise (Mixtral: 28,672 neurons x 12,288 features, whose exact
    12,288 x 12,288 eigendecomposition takes about a minute on a CPU) by randomized subspace iteration
    with a fixed seed (Halko, Martinsson and Tropp, 2011), which costs a few products with the features.
    Component signs do not matter: both sets share the same projection.
    """
    X = torch.cat([fa, fb])
    Xc = X - X.mean(0, keepdim=True)
    dims = max(1, min(dims, *Xc.shape))
    if min(Xc.shape) > EXACT_PCA_MAX:
        Z = _randomized_scores(Xc, dims, seed=seed)
    elif Xc.shape[0] <= Xc.shape[1]:
        # eigh of the smaller [N, N] Gram: scores = U sqrt(lambda), exact and deterministic
        evals, evecs = torch.linalg.eigh(Xc @ Xc.T)
        top = evals.flip(0)[:dims].clamp_min(0).sqrt()
        Z = evecs.flip(1)[:, :dims] * top
    else:
        evals, evecs = torch.linalg.eigh(Xc.T @ Xc)
        Z = Xc @ evecs.flip(1)[:, :dims]
    return Z[: fa.shape[0]], Z[fa.shape[0]:]


def _randomized_scores(Xc: Tensor, dims: int, oversample: int = 16, iters: int = 4, seed: int = 0) -> Tensor:
    """Top-``dims`` principal component scores of centred ``Xc`` [N, D] by randomized subspace iteration."""
    q = min(dims + oversample, *Xc.shape)
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.randn(Xc.shape[1], q, generator=g, dtype=Xc.dtype).to(Xc.device)
    Y = torch.linalg.qr(Xc @ Q).Q
    for _ in range(iters):  # power iterations, re-orthonormalised, sharpen the leading subspace
        Y = torch.linalg.qr(Xc @ torch.linalg.qr(Xc.T @ Y).Q).Q
    U, S, _ = torch.linalg.svd(Y.T @ Xc, full_matrices=False)
    return (Y @ U[:, :dims]) * S[:dims]


def align_ream(ref: Mapping[str, Tensor], other: Mapping[str, Tensor], ref_acts: Tensor, other_acts: Tensor,
               pca_dims: int = 64, feature_weight: float = 1.0) -> Tensor:
    """REAM's alignment cost (REAM, arXiv 2604.04356): activation distance + PCA weight-feature distance.

    cost_ij = || a_i - b_j || + feature_weight * || p_i - q_j ||, with a, b the unit-normalised neuron
    activations (as in ``align_activations``) and p, q the [gate | up | down] features of both experts
    projected on their joint top ``pca_dims`` principal components and scaled to unit norm, so both
    terms lie in [0, 2]. ``pca_dims=64`` follows the reference code.

    Args:
        ref, other: one expert each.
        ref_acts, other_acts: [n, I] neuron activations on the same tokens.
        pca_dims: PCA dimensions of the weight features.
        feature_weight: weight of the feature term (0 gives pure activation matching).

    Returns:
        perm such that ``permute_neurons(other, perm)`` is aligned with ``ref``.
    """
    a, b = _unit_columns(ref_acts, False), _unit_columns(other_acts, False)
    cost = torch.cdist(a.T, b.T)
    if feature_weight:
        p, q = _pca_pair(neuron_features(ref), neuron_features(other), pca_dims)
        cost = cost + feature_weight * torch.cdist(_unit_rows(p), _unit_rows(q)).to(cost.dtype)
    return hungarian(cost)


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------

def merge_experts(weights: Mapping[str, Tensor], members: list[int], coeffs: Tensor, align: str | None = None,
                  ref: int | None = None, X: Tensor | None = None, act: Callable = F.silu,
                  weight_cost: str = "dot", pca_dims: int = 64, feature_weight: float = 1.0,
                  perms: Mapping[int, Tensor] | None = None, found: dict | None = None) -> dict[str, Tensor]:
    """Merge a group of experts into one: align each member to ``ref``, then W = sum c_i W_i / sum c_i.

    SlimQwen (importance weights), REAM (saliency weights, its alignment) and MC-SMoE (frequency
    weights, weight matching). Biases are averaged the same way. If every coefficient is 0 (a group the
    router never chose) the members are averaged uniformly.

    Args:
        weights: the layer's uniform dict ([E, ...]).
        members: expert indices of the group.
        coeffs: [len(members)] non-negative merge weights, in the order of ``members``.
        align: None (plain average), ``"weights"`` (``align_weights``), ``"activations"``
            (``align_activations``, needs X) or ``"ream"`` (``align_ream``, needs X).
        ref: the member every other is aligned to (centroid / dominant); default ``members[0]``.
        X: [n, H] sample MoE inputs (``LayerStats.input_sample``) for activation-based alignment.
        act: the experts' activation.
        weight_cost: cost of ``align_weights``.
        pca_dims, feature_weight: of ``align_ream``.
        perms: ``{member: permutation}`` to use instead of computing an alignment (a recipe's); a
            member without one is not permuted.
        found: a dict that receives ``{member: permutation}`` for every aligned member.

    Returns:
        One expert's uniform dict, in the dtype of ``weights``.
    """
    members = [int(m) for m in members]
    if not members:
        raise ValueError("empty group")
    if len(set(members)) != len(members):
        raise ValueError(f"repeated member in {members}")
    ref = members[0] if ref is None else int(ref)
    if ref not in members:
        raise ValueError(f"ref {ref} is not a member of {members}")
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64).flatten()
    if coeffs.numel() != len(members):
        raise ValueError(f"{coeffs.numel()} coefficients for {len(members)} members")
    if not torch.isfinite(coeffs).all() or (coeffs < 0).any():
        raise ValueError(f"merge coefficients must be finite and non-negative, got {coeffs.tolist()}")
    out_dtype = weights["gate"].dtype
    if len(members) == 1:
        return {k: v.clone() for k, v in get_expert(weights, members[0]).items()}

    if perms is not None:
        align = None  # the permutations are given
    elif align in ("activations", "ream") and X is None:
        raise ValueError(f"align={align!r} needs sample inputs X (e.g. LayerStats.input_sample)")
    w_ref = get_expert(weights, ref)
    ref_acts = neuron_activations(w_ref, X, act) if align in ("activations", "ream") else None
    aligned = []
    for m in members:
        w = get_expert(weights, m)
        if perms is not None and m in perms:
            w = permute_neurons(w, perms[m])
        elif m != ref and align is not None:
            if align == "weights":
                perm = align_weights(w_ref, w, cost=weight_cost)
            elif align == "activations":
                perm = align_activations(ref_acts, neuron_activations(w, X, act))
            else:
                perm = align_ream(w_ref, w, ref_acts, neuron_activations(w, X, act), pca_dims, feature_weight)
            if found is not None:
                found[m] = perm
            w = permute_neurons(w, perm)
        aligned.append(w)

    c = coeffs if coeffs.sum() > 0 else torch.ones_like(coeffs)
    c = c / c.sum()
    dt = _work_dtype(weights["gate"])
    merged = {}
    for k in w_ref:
        acc = sum(float(ci) * w[k].to(dt) for ci, w in zip(c, aligned))
        merged[k] = acc.to(weights[k].dtype if k in weights else out_dtype)
    return merged


def _check_groups(groups: list[list[int]], E: int) -> list[list[int]]:
    groups = [[int(e) for e in g] for g in groups]
    flat = [e for g in groups for e in g]
    if any(not g for g in groups):
        raise ValueError("empty group")
    if len(set(flat)) != len(flat):
        raise ValueError("an expert appears in two groups")
    if any(not 0 <= e < E for e in flat):
        raise ValueError(f"expert index out of range(0, {E})")
    return groups


def merge_layer(weights: Mapping[str, Tensor], router_weight: Tensor, groups: list[list[int]], coeffs: Tensor,
                align: str | None = "weights", X: Tensor | None = None, keep_router: str = "centroid",
                act: Callable = F.silu, **merge_kwargs) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Merge a layer's experts group by group (SlimQwen, REAM, MC-SMoE; the HC-SMoE baseline).

    Each group's first element is its representative (centroid / dominant / base): members are aligned
    to it and, with ``keep_router="centroid"``, its router row is the merged expert's row (the papers
    keep the centroids' / bases' router rows). Experts in no group are dropped.

    Args:
        weights: the layer's uniform dict ([E, ...]).
        router_weight: [E, H].
        groups: disjoint lists of expert indices, representative first; the output follows this order.
        coeffs: [E] merge weights (frequency, REAP saliency, importance...).
        align: see ``merge_experts``.
        X: [n, H] sample MoE inputs for activation-based alignment.
        keep_router: ``"centroid"`` keeps the representative's row; ``"weighted"`` averages the
            group's rows with the merge weights.
        act: the experts' activation.
        **merge_kwargs: passed to ``merge_experts`` (weight_cost, pca_dims, feature_weight).

    Returns:
        (weights [G, ...], router weight [G, H], LongTensor [G] of the representatives' old indices).
        Router biases or correction biases, where a family has them, are sliced by these indices.
    """
    E = weights["gate"].shape[0]
    groups = _check_groups(groups, E)
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64).flatten()
    if coeffs.numel() != E:
        raise ValueError(f"coeffs must have one weight per expert ({E}), got {coeffs.numel()}")
    if keep_router not in ("centroid", "weighted"):
        raise ValueError(f"keep_router must be 'centroid' or 'weighted', got {keep_router!r}")
    merged, rows = [], []
    for g in groups:
        c = coeffs[g]
        merged.append(merge_experts(weights, g, c, align=align, ref=g[0], X=X, act=act, **merge_kwargs))
        if keep_router == "centroid" or len(g) == 1:
            rows.append(router_weight[g[0]])
        else:
            cn = c if c.sum() > 0 else torch.ones_like(c)
            cn = (cn / cn.sum()).to(device=router_weight.device, dtype=_work_dtype(router_weight))
            rows.append((cn[:, None] * router_weight[g].to(cn.dtype)).sum(0).to(router_weight.dtype))
    kept = torch.tensor([g[0] for g in groups], dtype=torch.long)
    return stack_experts(merged), torch.stack(rows), kept


# ---------------------------------------------------------------------------------------------
# Grouping (every function returns groups as lists, representative first, other members ascending)
# ---------------------------------------------------------------------------------------------

def group_nearest(keep: list[int], sim: Tensor, max_group: int | None = None) -> list[list[int]]:
    """Every expert not in ``keep`` joins its most similar kept expert (MC-SMoE, SlimQwen).

    Args:
        keep: the kept (dominant / base) experts; the groups follow this order.
        sim: [E, E] similarity (larger = closer).
        max_group: optional cap on group size (representative included). With a cap, pairs are
            assigned greedily by descending similarity, a full group passes its candidates to their
            next most similar kept expert, and experts that fit nowhere are dropped.

    Returns:
        [[k, members...] for k in keep]. Ties go to the earlier kept expert.
    """
    keep = [int(k) for k in keep]
    E = sim.shape[0]
    if len(set(keep)) != len(keep) or any(not 0 <= k < E for k in keep):
        raise ValueError(f"keep must be distinct indices in range({E}), got {keep}")
    if not keep:
        return []
    others = [e for e in range(E) if e not in set(keep)]
    members: dict[int, list[int]] = {k: [] for k in keep}
    s = sim.double()
    if max_group is None:
        for o in others:
            members[keep[int(torch.argmax(s[o, keep]))]].append(o)
    else:
        if max_group < 1:
            raise ValueError("max_group must be >= 1")
        pairs = sorted((-float(s[o, k]), o, ki) for o in others for ki, k in enumerate(keep))
        placed = set()
        for _, o, ki in pairs:
            k = keep[ki]
            if o not in placed and len(members[k]) + 1 < max_group:
                members[k].append(o)
                placed.add(o)
    return [[k] + sorted(members[k]) for k in keep]


def group_ream(saliency: Tensor, dist: Tensor, n_centroids: int, C: int = 16) -> list[list[int]]:
    """REAM pseudo-pruning (REAM, arXiv 2604.04356).

    The ``n_centroids`` most salient experts are centroids. Visiting centroids in descending saliency,
    each takes its C - 1 nearest still-unassigned non-centroids (ties to the lower index); experts
    left over are dropped (with C = 1 this is plain pruning). C = 0 is MC-SMoE's rule: every
    non-centroid joins its nearest centroid (ties to the more salient centroid).

    Args:
        saliency: [E] (REAP by default in REAM).
        dist: [E, E] distance (``moelab.scores.ream_distance``).
        n_centroids: experts kept, T.
        C: maximum group size.

    Returns:
        Groups [centroid, members ascending...], ordered by centroid index.
    """
    E = saliency.numel()
    if not 1 <= n_centroids <= E:
        raise ValueError(f"n_centroids must be in [1, {E}], got {n_centroids}")
    if C < 0:
        raise ValueError("C must be >= 0")
    d = dist.double()
    centroids = rank(saliency)[:n_centroids].tolist()
    members: dict[int, list[int]] = {c: [] for c in centroids}
    free = [e for e in range(E) if e not in set(centroids)]
    if C == 0:
        for j in free:
            members[centroids[int(torch.argmin(d[centroids, j]))]].append(j)
    else:
        taken = set()
        for c in centroids:
            cand = sorted((float(d[c, j]), j) for j in free if j not in taken)
            for _, j in cand[: C - 1]:
                members[c].append(j)
                taken.add(j)
    return [[c] + sorted(members[c]) for c in sorted(centroids)]


def group_hierarchical(features: Tensor, n_groups: int, linkage: str = "average", metric: str = "euclidean",
                       frequency: Tensor | None = None) -> list[list[int]]:
    """HC-SMoE: agglomerative clustering of experts on mean outputs (baseline; reference code wazenmai/HC-SMoE).

    Args:
        features: [E, D] per-expert features (mean outputs: ``out_sum / counts``).
        n_groups: number of clusters (exactly this many, via scipy's ``cut_tree``).
        linkage: scipy linkage method (HC-SMoE: ``"average"``).
        metric: scipy pdist metric (HC-SMoE's code: Euclidean).
        frequency: [E]; the most frequent member represents its cluster. Without it, the member
            closest to the cluster mean does (HC-SMoE's code).

    Returns:
        Groups [representative, members ascending...], ordered by representative index.
    """
    from scipy.cluster.hierarchy import cut_tree
    from scipy.cluster.hierarchy import linkage as hc_linkage
    from scipy.spatial.distance import pdist

    E = features.shape[0]
    if not 1 <= n_groups <= E:
        raise ValueError(f"n_groups must be in [1, {E}], got {n_groups}")
    f = features.detach().double().cpu()
    if n_groups == E:
        labels = np.arange(E)
    else:
        Z = hc_linkage(pdist(f.numpy(), metric=metric), method=linkage)
        labels = cut_tree(Z, n_clusters=n_groups).ravel()
    groups = []
    for lab in np.unique(labels):
        idx = [int(i) for i in np.flatnonzero(labels == lab)]
        if frequency is not None:
            fr = torch.as_tensor(frequency, dtype=torch.float64)[idx]
            rep = idx[int(torch.argmax(fr))]
        else:
            center = f[idx].mean(0, keepdim=True)
            rep = idx[int(torch.argmin(torch.cdist(f[idx], center).squeeze(1)))]
        groups.append([rep] + [i for i in idx if i != rep])
    return sorted(groups, key=lambda g: g[0])


def partial_preservation_groups(importance: Tensor, sim: Tensor, target: int,
                                preserve_ratio: float = 0.5) -> list[list[int]]:
    """SlimQwen partial-preservation grouping (SlimQwen, arXiv 2605.08738).

    The top round(p T) experts by importance are preserved unchanged (singletons that absorb nothing);
    the next T - round(p T) are merge bases; every other expert joins its most similar base. p = 1 is
    pure pruning; p = 0 merges everything into T bases. Merge the groups with ``merge_layer`` and
    ``coeffs=importance`` for theta_b <- (I_b theta_b + sum_d I_d theta_d) / (I_b + sum_d I_d).

    Args:
        importance: [E].
        sim: [E, E] similarity (router logits, router weights or expert outputs).
        target: T, experts after compression.
        preserve_ratio: p in [0, 1] (paper: 1/2); round half up.

    Returns:
        T groups [representative, members ascending...], ordered by representative index.
    """
    E = importance.numel()
    if not 1 <= target <= E:
        raise ValueError(f"target must be in [1, {E}], got {target}")
    if not 0 <= preserve_ratio <= 1:
        raise ValueError(f"preserve_ratio must be in [0, 1], got {preserve_ratio}")
    order = rank(importance).tolist()
    n_keep = int(math.floor(preserve_ratio * target + 0.5))
    preserved, bases, rest = order[:n_keep], order[n_keep:target], order[target:]
    groups = [[p] for p in preserved]
    if bases:
        s = sim.double()
        members: dict[int, list[int]] = {b: [] for b in bases}
        for d in rest:
            members[bases[int(torch.argmax(s[d, bases]))]].append(d)
        groups += [[b] + sorted(members[b]) for b in bases]
    return sorted(groups, key=lambda g: g[0])


# ---------------------------------------------------------------------------------------------
# MC-SMoE compression
# ---------------------------------------------------------------------------------------------

def low_rank_sparse(W: Tensor, rank: int, sparsity: float, scores: Tensor | None = None,
                    sparse_out: bool = False) -> tuple[Tensor, ...]:
    """MC-SMoE's W ~ U V + S (MC-SMoE, arXiv 2310.01334): truncated SVD plus a sparse residual.

    U V is the best rank-r approximation (singular values split as sqrt between U and V). The residual
    R = W - U V keeps its (1 - sparsity) fraction of entries with the largest |R| (or the largest
    ``scores``, e.g. a sensitivity); the rest are zeroed.

    Args:
        W: [m, n].
        rank: r, 0 <= r (clipped to min(m, n)).
        sparsity: fraction of residual entries set to zero, in [0, 1] (1: no sparse part).
        scores: optional [m, n] keep-priority for residual entries instead of the magnitude.

        sparse_out: return the kept residual as (flat indices, values) instead of a dense S.

    Returns:
        (U [m, r], V [r, n], S [m, n] dense with zeros; ``S.count_nonzero()`` entries kept), in W's dtype;
        with ``sparse_out`` (U, V, idx [k] int64 into the flattened [m, n], values [k]), k = the kept count.
    """
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if rank < 0:
        raise ValueError("rank must be >= 0")
    dt = _work_dtype(W)
    Wf = W.to(dt)
    U_, s, Vh = torch.linalg.svd(Wf, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    U, V = U_[:, :r] * root, root[:, None] * Vh[:r]
    R = Wf - U @ V
    n_keep = int(round((1 - sparsity) * R.numel()))
    idx = torch.zeros(0, dtype=torch.long, device=W.device)
    if n_keep:
        key = (R.abs() if scores is None else scores.to(dt)).flatten()
        idx = torch.topk(key, n_keep).indices.sort().values
    if sparse_out:
        return U.to(W.dtype), V.to(W.dtype), idx, R.flatten()[idx].to(W.dtype)
    S = torch.zeros_like(R)
    S.view(-1)[idx] = R.flatten()[idx]
    return U.to(W.dtype), V.to(W.dtype), S.to(W.dtype)


def stable_rank(W: Tensor) -> float:
    """Stable rank ||W||_F^2 / ||W||_2^2 (MC-SMoE, arXiv 2310.01334; 0 for a zero matrix)."""
    Wf = W.to(_work_dtype(W))
    spec = torch.linalg.matrix_norm(Wf, ord=2)
    if spec == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(Wf, ord="fro") ** 2 / spec ** 2)


# ---------------------------------------------------------------------------------------------
# DERN (arXiv 2509.10377)
# ---------------------------------------------------------------------------------------------

def segments(weights: Mapping[str, Tensor], e: int, use_gate: bool = True) -> Tensor:
    """Expert ``e``'s segments as vectors [gate row | up row | down column]: [I, 3H] ([I, 2H] without gate).

    Args:
        weights: the layer's uniform dict.
        e: expert index.
        use_gate: include the gate row (DERN found leaving it out of the similarity slightly better).
    """
    w = get_expert(weights, e)
    parts = ([w["gate"]] if use_gate else []) + [w["up"], w["down"].T]
    dt = _work_dtype(w["gate"])
    return torch.cat([p.to(dt) for p in parts], dim=1)


def assign_segments(weights: Mapping[str, Tensor], kept: list[int], dropped: list[int], alpha: float,
                    use_gate: bool = False, chunk: int = 1024) -> dict[int, Tensor]:
    """DERN step 2: send each dropped segment to the kept expert holding its most similar segment.

    Similarity is the cosine between segment vectors (``segments``); a segment moves only if its best
    similarity exceeds ``alpha`` (paper: about 0.6), otherwise it is discarded.

    Args:
        weights: the layer's uniform dict.
        kept, dropped: expert indices.
        alpha: similarity threshold (alpha > 1 moves nothing: DERN becomes plain pruning).
        use_gate: include gate rows in the similarity (default False, the paper's better variant).
        chunk: rows of dropped segments compared at once (bounds memory).

    Returns:
        {dropped expert: LongTensor [I] of target kept expert index, -1 where discarded}.
    """
    kept = [int(k) for k in kept]
    if not kept:
        raise ValueError("no kept experts")
    I = weights["gate"].shape[1]
    bank = _unit_rows(torch.cat([segments(weights, k, use_gate) for k in kept]))  # [len(kept) * I, D]
    owner = torch.tensor(kept, dtype=torch.long, device=bank.device).repeat_interleave(I)
    out = {}
    for d in dropped:
        seg = _unit_rows(segments(weights, int(d), use_gate))
        target = torch.full((I,), -1, dtype=torch.long, device=bank.device)
        for i in range(0, I, chunk):
            best, where = (seg[i:i + chunk] @ bank.T).max(dim=1)
            t = owner[where]
            target[i:i + chunk] = torch.where(best > alpha, t, torch.full_like(t, -1))
        out[int(d)] = target.cpu()
    return out


def _distinct_init(units: Tensor, order: list[int], k: int, tol: float = 1e-6) -> list[int]:
    """The first k points of ``order`` whose directions differ from those already chosen (then any)."""
    chosen: list[int] = []
    for i in order:
        if len(chosen) == k:
            break
        if not chosen or float((units[chosen] @ units[i]).max()) < 1 - tol:
            chosen.append(i)
    for i in order:  # fewer than k distinct directions: fill with the rest, in order
        if len(chosen) == k:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


def weighted_spherical_kmeans(vectors: Tensor, weights: Tensor, k: int, init: str = "max_gate", iters: int = 30,
                              seed: int = 0, gate_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """DERN step 3: weighted spherical k-means over segments (DERN, arXiv 2509.10377).

    Points are assigned by cosine to the centroid directions; a direction is the weighted sum of its
    members' unit vectors. The returned centroid equalises norms inside the cluster: it points along the
    cluster's weighted mean direction and has the weighted mean norm of its members (averaging the
    rescaled members instead would shrink it by the length of their mean unit vector, the more the
    more they spread). Empty
    clusters take the point farthest (by cosine) from its centroid. Clusters are ordered by their lowest
    member index, so with N == k the input comes back unchanged.

    Args:
        vectors: [N, D] segments (N >= k).
        weights: [N] non-negative (DERN: importance of the source expert; all-zero in a cluster -> uniform).
        k: number of clusters (the expert width I).
        init: ``"max_gate"`` starts from the k segments with the largest max |gate entry| (the paper's
            choice; exact duplicates are skipped); ``"random"`` from k random segments (``seed``).
        iters: maximum Lloyd iterations.
        seed: for ``init="random"``.
        gate_dim: how many leading coordinates hold the gate row (default D // 3, the ``segments`` layout).

    Returns:
        (centroids [k, D], labels [N] in range(k)).
    """
    N, D = vectors.shape
    if not 1 <= k <= N:
        raise ValueError(f"cannot form {k} clusters from {N} vectors")
    dt = _work_dtype(vectors)
    v = vectors.to(dt)
    dev = v.device  # everything below runs where the segments are
    w = torch.as_tensor(weights, dtype=dt).flatten().to(dev)
    if w.numel() != N or (w < 0).any():
        raise ValueError("weights must be [N] and non-negative")
    if N == k:
        return v.clone(), torch.arange(N, device=dev)
    norms = v.norm(dim=1)
    units = v / norms[:, None].clamp_min(1e-12)
    if init == "max_gate":
        gd = D // 3 if gate_dim is None else gate_dim
        score = v[:, :gd].abs().amax(1)
        start = _distinct_init(units, torch.sort(-score, stable=True).indices.tolist(), k)
    elif init == "random":
        gen = torch.Generator().manual_seed(seed)
        start = torch.randperm(N, generator=gen)[:k].tolist()
    else:
        raise ValueError(f"init must be 'max_gate' or 'random', got {init!r}")
    cent = units[start].clone()
    labels = None
    for _ in range(max(1, iters)):
        sims = units @ cent.T
        new = sims.argmax(1)
        counts = torch.bincount(new, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            own = sims[torch.arange(N, device=dev), new]
            own = torch.where(counts[new] > 1, own, torch.full_like(own, math.inf))
            p = int(torch.argmin(own))
            counts[new[p]] -= 1
            new[p] = j
            counts[j] += 1
        # a cluster whose weights are all zero falls back to equal weights (one scatter, not a loop over k)
        csum = torch.zeros(k, dtype=dt, device=dev).index_add_(0, new, w)
        wu = torch.where(csum[new] == 0, torch.ones_like(w), w)
        dirs = torch.zeros(k, D, dtype=dt, device=dev).index_add_(0, new, wu[:, None] * units)
        cent = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
    labels = new
    wsum = torch.zeros(k, dtype=dt, device=dev).index_add_(0, labels, wu)
    mean_norm = torch.zeros(k, dtype=dt, device=dev).index_add_(0, labels, wu * norms) / wsum
    mean_dir = torch.zeros(k, D, dtype=dt, device=dev).index_add_(0, labels, wu[:, None] * units)
    centroids = mean_norm[:, None] * mean_dir / mean_dir.norm(dim=1, keepdim=True).clamp_min(1e-12)
    first = torch.full((k,), N, dtype=torch.long, device=dev).scatter_reduce_(
        0, labels, torch.arange(N, device=dev), reduce="amin")
    order = torch.sort(first, stable=True).indices
    remap = torch.empty(k, dtype=torch.long, device=dev)
    remap[order] = torch.arange(k, device=dev)
    return centroids[order], remap[labels]


def dern_recombine(weights: Mapping[str, Tensor], kept: list[int], dropped: list[int], importance: Tensor,
                   alpha: float = 0.6, use_gate: bool = False, init: str = "max_gate", iters: int = 30,
                   seed: int = 0, weighted: bool = True) -> dict[str, Tensor]:
    """DERN (arXiv 2509.10377): drop experts, move their segments into kept experts, restore width I.

    Dropped segments go to kept experts by ``assign_segments``; each kept expert that received any
    clusters its own plus received segments back to I with ``weighted_spherical_kmeans`` (weights:
    importance of the source expert); centroids become its gate rows, up rows and down columns
    (gate/up biases ride along as extra coordinates; down_bias stays the kept expert's). A kept expert
    that received nothing is returned unchanged.

    Args:
        weights: the layer's uniform dict ([E, ...]).
        kept: experts that stay (the output follows this order); dropped: those removed.
        importance: [E] DERN importance (``moelab.scores.importance(stats, "dern")``).
        alpha: segment similarity threshold (paper: best about 0.6; > 1 is plain pruning).
        use_gate: include gate rows in the assignment similarity.
        init, iters, seed: of the k-means.
        weighted: False gives every segment weight 1 (the paper's "no weighting" ablation).

    Returns:
        Uniform dict [len(kept), ...] with the original width I.
    """
    kept = [int(k) for k in kept]
    dropped = [int(d) for d in dropped]
    if set(kept) & set(dropped):
        raise ValueError("an expert is both kept and dropped")
    imp = torch.as_tensor(importance, dtype=torch.float64).flatten()
    E, I, H = weights["gate"].shape
    has_b = [k for k in ("gate_bias", "up_bias") if k in weights]
    assign = assign_segments(weights, kept, dropped, alpha, use_gate=use_gate)

    def full(e: int) -> Tensor:
        w = get_expert(weights, e)
        return torch.cat([neuron_features(w, include_bias=False)] + [w[k][:, None].to(_work_dtype(w["gate"]))
                                                                     for k in has_b], dim=1)

    out = []
    for a in kept:
        w_a = get_expert(weights, a)
        recv = [(d, torch.nonzero(assign[d] == a).flatten()) for d in dropped]
        recv = [(d, idx) for d, idx in recv if idx.numel()]
        if not recv:
            out.append({k: v.clone() for k, v in w_a.items()})
            continue
        vecs = torch.cat([full(a)] + [full(d)[idx] for d, idx in recv])
        wts = torch.cat([torch.full((I,), float(imp[a]))] + [torch.full((idx.numel(),), float(imp[d]))
                                                             for d, idx in recv])
        if not weighted:
            wts = torch.ones_like(wts)
        cent, _ = weighted_spherical_kmeans(vecs, wts, I, init=init, iters=iters, seed=seed, gate_dim=H)
        new = dict(w_a)
        new["gate"] = cent[:, :H].to(w_a["gate"].dtype)
        new["up"] = cent[:, H:2 * H].to(w_a["up"].dtype)
        new["down"] = cent[:, 2 * H:3 * H].T.contiguous().to(w_a["down"].dtype)
        for i, k in enumerate(has_b):
            new[k] = cent[:, 3 * H + i].to(w_a[k].dtype)
        out.append(new)
    return stack_experts(out)
