"""Model-level expert compression: DERN recombination, nearest-expert merging (M-SMoE) and NAEE selection.

Each function is a short composition of the shared parts, applied to every MoE layer of a copy of
the model, from one calibration ``Observation`` (``moelab.observe``):

* ``dern_model`` (DERN, arXiv 2509.10377): ``scores.importance(stats, "dern")`` picks the kept experts,
  ``merge.dern_recombine`` moves the dropped experts' segments into them, ``models.set_experts``
  writes the layer (router rows and expert-indexed tensors of the kept experts).
* ``merge_into_nearest_model`` (M-SMoE, arXiv 2310.01334, with a uniform per-layer count):
  ``merge.group_nearest`` on a router similarity, ``merge.merge_layer`` with weight matching and
  frequency weights.
* ``partial_preservation_model`` (SlimQwen, arXiv 2605.08738): the top p T experts kept intact,
  the rest merged into the next (1 - p) T merge bases with importance weights; ``slim_model`` adds
  width and depth pruning (``moelab.prune``) for SlimQwen's combined student.
* ``merge_model``: the shared last step of every merging method (groups and weights in, merged
  copy out).
* ``naee_select`` / ``naee_model`` (the NAEE / O-prune baseline): the kept subset that
  minimises the layer's output reconstruction error on the sampled calibration inputs
  (``LayerStats.input_sample``); exhaustive when the number of subsets allows, greedy backward
  elimination otherwise.
* ``ream_model`` (REAM, arXiv 2604.04356): ``ream_groups`` (REAP saliency, ``scores.ream_distance``,
  ``merge.group_ream``) and saliency-weighted merging with REAM's neuron alignment, layer by layer on
  re-observed inputs (``observe.observe_sequential``) or one-shot; ``hc_smoe_model`` (the HC-SMoE
  baseline): average-linkage clusters of mean expert outputs, frequency-weighted merge.
* ``msmoe_model`` (MC-SMoE's M-SMoE, arXiv 2310.01334): dominant experts by frequency chosen over
  all layers (adaptive per-layer counts, saved in moelab's non-uniform form) or per layer, every other
  expert merged into its most similar dominant; ``low_rank_sparse_model`` / ``LowRankSparseExperts``
  (MC-SMoE's compression W ~ U V + S), ``densify``, ``parameter_count``, ``merged_stable_ranks`` and
  ``relative_inference_time`` for notebook 04.

Notebook 03 (DERN) compares them with ``prune.prune`` (frequency, REAP).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Mapping, Sequence

import torch
from torch import Tensor

from . import merge, models, observe, prune, recipe, scores

__all__ = ["dern_model", "merge_into_nearest_model", "merge_model", "partial_preservation_model", "slim_model", "expert_outputs", "subset_error", "naee_select", "naee_model",
           "ream_groups", "mean_expert_outputs", "ream_model", "hc_smoe_model", "group_roles", "routing_mass_by_role",
           "msmoe_groups", "msmoe_total", "msmoe_model", "merged_stable_ranks", "LowRankSparseExperts",
           "low_rank_sparse_model", "densify", "use_csr", "parameter_count", "relative_inference_time",
           "apply_recipe"]


def _edit_copy(model, obs, num_experts: int):
    """Validate the target, copy the model, and pair each MoE layer of the copy with its statistics."""
    models.check_target(model, num_experts)
    stats = observe.layer_stats(obs, model)
    out = models.variant(model)
    return out, [(layer, stats[layer.layer_idx]) for layer in models.moe_layers(out)]


def _slice_indexed(layer: models.MoELayer, idx: Sequence[int]) -> dict[str, Tensor]:
    idx = torch.as_tensor(list(idx), dtype=torch.long)
    return {k: v[idx] for k, v in layer.expert_indexed().items()}


# ---------------------------------------------------------------------------------------------
# DERN (arXiv 2509.10377)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def dern_model(model, obs, num_experts: int, alpha: float = 0.6, use_gate: bool = False, init: str = "max_gate",
               weighted: bool = True, seed: int = 0, iters: int = 30):
    """DERN on every MoE layer of a copy of ``model``: keep the top experts, recombine the dropped ones' segments.

    Args:
        model: the model (left untouched).
        obs: the ``Observation`` of a calibration pass on ``model`` (needs ``dern_sum``).
        num_experts: experts kept per layer.
        alpha: segment similarity threshold in [0, 1] (paper: best near 0.6; at 1 nothing moves = plain
            DERN-importance pruning).
        use_gate: include the gate row in the segment similarity (paper: leaving it out is slightly better).
        init: k-means initialisation, ``"max_gate"`` (paper) or ``"random"``.
        weighted: weight segments by their source expert's importance (False: the "no weighting" ablation).
        seed: seed of the random initialisation.
        iters: k-means iterations.

    Returns:
        (new model, info) with info ``{layer: {"kept", "dropped": [int], "flow": LongTensor [dropped, kept]
        of moved segment counts, "moved": int, "segments": int (dropped x I), "moved_share": float}}``.
    """
    from .checks import share, whole

    share(alpha, "alpha (DERN's segment similarity threshold, a cosine)", 0, 1)
    whole(iters, "iters", minimum=1)
    out, layers = _edit_copy(model, obs, num_experts)
    info = {}
    for layer, st in layers:
        imp = scores.importance(st, "dern")
        kept = scores.select_top(imp, num_experts).tolist()
        dropped = [e for e in range(layer.num_experts) if e not in set(kept)]
        w = layer.expert_weights()
        # the same assignment dern_recombine makes (deterministic), kept for the flow matrix
        assign = merge.assign_segments(w, kept, dropped, alpha, use_gate=use_gate)
        flow = torch.zeros(len(dropped), len(kept), dtype=torch.long)
        for i, d in enumerate(dropped):
            moved = assign[d][assign[d] >= 0]
            for j, k in enumerate(kept):
                flow[i, j] = int((moved == k).sum())
        _dern_layer_into(out, layer, kept, dropped, imp, alpha=alpha, use_gate=use_gate, init=init, iters=iters,
                         seed=seed, weighted=weighted)
        n_seg = len(dropped) * w["gate"].shape[1]
        info[layer.layer_idx] = {"kept": kept, "dropped": dropped, "flow": flow, "moved": int(flow.sum()),
                                 "segments": n_seg, "moved_share": float(flow.sum()) / max(1, n_seg)}
    models.set_num_experts_config(out, num_experts)
    models.check_consistency(out)
    return out, info


def _dern_layer_into(model, layer: models.MoELayer, kept: list[int], dropped: list[int], importance: Tensor,
                     **options) -> None:
    """One layer of DERN in place (``merge.dern_recombine``: kept experts, their router rows and indexed
    tensors), recorded as a ``dern_layer`` step of the model's recipe: everything it decided from the
    calibration pass (kept, dropped, importance) and its options."""
    with recipe.step(model, "dern_layer", layer=layer.layer_idx, kept=[int(e) for e in kept],
                     dropped=[int(e) for e in dropped], importance=importance,
                     importance_dtype=str(importance.dtype).replace("torch.", ""), options=dict(options)):
        new = merge.dern_recombine(layer.expert_weights(), kept, dropped, importance, **options)
        router = layer.router_weight()[torch.tensor(kept)]
        models.set_experts(model, layer.layer_idx, new, router, _slice_indexed(layer, kept))


# ---------------------------------------------------------------------------------------------
# M-SMoE-style merging into the nearest kept expert (MC-SMoE, arXiv 2310.01334)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def merge_into_nearest_model(model, obs, num_experts: int, criterion: str = "frequency",
                             similarity: str = "router_logit", align: str | None = "weights"):
    """Keep the top experts per layer; merge every other expert into its most similar kept one.

    M-SMoE (MC-SMoE, arXiv 2310.01334) with the same count in every layer: dominant experts by
    ``criterion``, similarity of router-logit columns, members aligned to the dominant by weight
    matching, merged with the criterion's weights W = sum f_i W_i / sum f_i. The dominant's router
    row is kept.

    Args:
        model: the model (left untouched).
        obs: the ``Observation`` of a calibration pass on ``model``.
        num_experts: experts per layer after merging.
        criterion: importance criterion choosing the dominant experts and weighting the merge.
        similarity: a ``scores.SIMILARITIES`` name.
        align: neuron alignment of ``merge.merge_experts`` (``"weights"``, ``"activations"``, ``"ream"`` or None).

    Returns:
        (new model, info) with info ``{layer: {"groups": [[dominant, members...], ...]}}``.
    """
    models.check_target(model, num_experts)
    stats = observe.layer_stats(obs, model)
    groups, coeffs = {}, {}
    for layer in models.moe_layers(model):
        st = stats[layer.layer_idx]
        coeffs[layer.layer_idx] = scores.importance(st, criterion)
        keep = scores.select_top(coeffs[layer.layer_idx], num_experts).tolist()
        sim = scores.similarity(st, similarity, router_weight=layer.router_weight())
        groups[layer.layer_idx] = merge.group_nearest(keep, sim)
    out = merge_model(model, groups, coeffs, align=align, samples={l: s.input_sample for l, s in stats.items()})
    return out, {l: {"groups": g} for l, g in groups.items()}


@torch.no_grad()
def apply_recipe(model, recipe_or_path, *, upto: int | None = None):
    """Rebuild a recorded compression of ``model`` without calibration: ``moelab.recipe.apply`` (a recipe
    dict, a ``moelab_recipe.json``, a checkpoint folder holding one, or a variant)."""
    return recipe.apply(model, recipe_or_path, upto=upto)


def _merge_layer_into(model, layer: models.MoELayer, groups: list[list[int]], coeffs: Tensor, *,
                      keep_router: str = "centroid", perms: Mapping[int, Tensor] | None = None, **merge_kwargs) -> None:
    """Merge one layer's groups in place (``merge.merge_layer``; representatives' router rows and indexed
    tensors), recorded as a ``merge_layer`` step of the model's recipe (``moelab.recipe``): the groups,
    the float64 merge weights and the alignment permutations found (or the given ``perms``)."""
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64).flatten()
    found = {} if perms is None else dict(perms)
    with recipe.step(model, "merge_layer", layer=layer.layer_idx, groups=[[int(e) for e in g] for g in groups],
                     coeffs=coeffs, keep_router=keep_router) as entry:
        w, router, reps = merge.merge_layer(layer.expert_weights(), layer.router_weight(), groups, coeffs,
                                            keep_router=keep_router, perms=perms, found=found, **merge_kwargs)
        models.set_experts(model, layer.layer_idx, w, router, _slice_indexed(layer, reps.tolist()))
        entry["perms"] = {int(m): p for m, p in found.items()}


@torch.no_grad()
def merge_model(model, groups: Mapping[int, list[list[int]]], coeffs: Mapping[int, Tensor], *,
                align: str | None = None, samples: Mapping[int, Tensor] | None = None, keep_router: str = "centroid",
                **merge_kwargs):
    """Merge given expert groups in every MoE layer of a copy of ``model`` (the shared last step of
    M-SMoE, SlimQwen's partial preservation, REAM and HC-SMoE).

    Each group becomes one expert: its members aligned to the group's first element (the
    representative) and averaged with weights ``coeffs`` (``merge.merge_layer``); the
    representative's router row (and router / correction bias) is kept. Experts in no group are
    dropped. Layers may end with different numbers of groups (MC-SMoE's adaptive counts): the copy
    then records its per-layer counts (``models.set_expert_counts_config``) and ``io.save_checkpoint``
    writes it in moelab's non-uniform form (``moelab.models`` docstring).

    Args:
        model: the model (left untouched).
        groups: ``{layer_idx: [[representative, members...], ...]}`` for every MoE layer.
        coeffs: ``{layer_idx: [E] merge weights}`` (frequency, importance, REAP saliency...).
        align: neuron alignment (``None``, ``"weights"``, ``"activations"``, ``"ream"``).
        samples: ``{layer_idx: [n, H] sampled MoE-layer inputs}`` for activation-based alignment.
        keep_router: ``"centroid"`` (the representative's row) or ``"weighted"`` (merge-weighted mean).
        **merge_kwargs: passed on to ``merge.merge_experts``.

    Returns:
        The merged copy.
    """
    layers = models.moe_layers(model)
    ids = {layer.layer_idx for layer in layers}
    if set(groups) != ids or set(coeffs) != ids:
        raise ValueError(f"give groups and coeffs for every MoE layer {sorted(ids)}; got groups for "
                         f"{sorted(groups)} and coeffs for {sorted(coeffs)}")
    counts = {i: len(g) for i, g in groups.items()}
    uniform = len(set(counts.values())) == 1
    if uniform:
        num_experts = next(iter(counts.values()))
        models.check_target(model, num_experts)
    else:
        models.check_layer_counts(model, counts)
    out = models.variant(model)
    for layer in models.moe_layers(out):
        i = layer.layer_idx
        X = samples.get(i) if samples is not None else None
        _merge_layer_into(out, layer, groups[i], coeffs[i], align=align, X=X, keep_router=keep_router, **merge_kwargs)
    if uniform:
        models.set_num_experts_config(out, num_experts)
    else:
        models.set_expert_counts_config(out)
    models.check_consistency(out)
    return out


# ---------------------------------------------------------------------------------------------
# SlimQwen partial-preservation merging (SlimQwen, arXiv 2605.08738)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def partial_preservation_model(model, obs, num_experts: int, preserve_ratio: float = 0.5,
                               criterion: str = "frequency", similarity: str = "router_logit",
                               align: str | None = None):
    """SlimQwen's partial preservation on every MoE layer of a copy of ``model``.

    Per layer, with T = ``num_experts``: the top round(p T) experts by ``criterion`` stay unchanged,
    the next T - round(p T) are merge bases, and every other expert merges into its most similar base
    (``merge.partial_preservation_groups``) with importance weights,
    theta_b <- (I_b theta_b + sum_d I_d theta_d) / (I_b + sum_d I_d); the bases' router rows are kept.
    p = 1 is plain pruning, p = 0 plain merging.

    Args:
        model: the model (left untouched).
        obs: the ``Observation`` of a calibration pass on ``model``.
        num_experts: T, experts per layer afterwards.
        preserve_ratio: p (paper: 1/2).
        criterion: importance criterion (frequency, soft_logit, reap, ...).
        similarity: ``scores.SIMILARITIES`` name: ``"router_logit"``, ``"router_weight"``, ``"output"``.
        align: neuron alignment before averaging (the paper does not align: None).

    Returns:
        (new model, info) with info ``{layer: {"groups": [[base, merged...], ...], "preserved": [int]}}``.
    """
    models.check_target(model, num_experts)
    stats = observe.layer_stats(obs, model)
    groups, coeffs, info = {}, {}, {}
    for layer in models.moe_layers(model):
        st = stats[layer.layer_idx]
        coeffs[layer.layer_idx] = scores.importance(st, criterion)
        sim = scores.similarity(st, similarity, router_weight=layer.router_weight())
        g = merge.partial_preservation_groups(coeffs[layer.layer_idx], sim, num_experts, preserve_ratio)
        groups[layer.layer_idx] = g
        n_keep = int(math.floor(preserve_ratio * num_experts + 0.5))
        info[layer.layer_idx] = {"groups": g,
                                 "preserved": scores.rank(coeffs[layer.layer_idx])[:n_keep].tolist()}
    out = merge_model(model, groups, coeffs, align=align, samples={l: s.input_sample for l, s in stats.items()})
    return out, info


def slim_model(model, obs, *, remove_layers: int = 0, depth_how: str = "last", width_ratio: float = 1.0,
               num_experts: int | None = None, criterion: str = "frequency", preserve_ratio: float = 1.0,
               similarity: str = "router_logit", rescale: bool = True):
    """SlimQwen's combined compression: experts, then width, then depth (SlimQwen, arXiv 2605.08738).

    Each step uses the one observation of the original model: experts by ``criterion`` (with
    ``preserve_ratio`` < 1 the dropped experts are merged by partial preservation), hidden channels by
    mean |activation| (``prune.slice_width``), and the last (or most input-like) decoder layers.

    Args:
        model: the model (left untouched).
        obs: the ``Observation`` of a calibration pass on ``model``.
        remove_layers: decoder layers removed (0: none).
        depth_how: ``"last"`` or ``"similar"``.
        width_ratio: share of hidden channels kept (1: all).
        num_experts: experts per layer afterwards (None: all; a count must be below the current one).
        criterion, preserve_ratio, similarity: the expert step (``partial_preservation_model``).
        rescale: restore the norms' output scale after width slicing (``prune.slice_width``).

    Returns:
        (new model, info) with ``removed_layers``, ``channels`` (kept hidden channels or None) and the
        parameter counts before and after.
    """
    from .checks import share, whole

    whole(remove_layers, "remove_layers", minimum=0)
    share(width_ratio, "width_ratio (share of hidden channels kept; 1 keeps all)", 0, 1, low_open=True)
    share(preserve_ratio, "preserve_ratio", 0, 1)
    if num_experts is not None:
        models.check_target(model, num_experts)  # None keeps every expert; a count must reduce them
    out, info = model, {"removed_layers": [], "channels": None}
    if num_experts is not None:
        out, info["experts"] = partial_preservation_model(model, obs, num_experts, preserve_ratio, criterion, similarity)
    if width_ratio < 1:
        out, info["channels"] = prune.slice_width(out, obs, width_ratio, rescale=rescale)
    if remove_layers:
        out, info["removed_layers"] = prune.remove_layers(out, obs, remove_layers, depth_how)
    if out is model:
        out = models.variant(model)
    info["parameters"] = sum(p.numel() for p in out.parameters())
    info["original_parameters"] = sum(p.numel() for p in model.parameters())
    return out, info


# ---------------------------------------------------------------------------------------------
# NAEE: the kept subset with the least output reconstruction error (a pruning baseline)
# ---------------------------------------------------------------------------------------------

class _SubsetRouting:
    """A view of a layer as if only ``kept`` experts were left: the routing code sees sliced
    expert-indexed tensors (router bias, score-correction bias), exactly as the pruned layer will."""

    def __init__(self, layer: models.MoELayer, kept: Tensor):
        self._layer, self._kept = layer, kept

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def _indexed(self) -> dict[str, Tensor]:
        return {k: v[self._kept] for k, v in self._layer._indexed().items()}


@torch.no_grad()
def expert_outputs(layer: models.MoELayer, X: Tensor) -> Tensor:
    """Un-gated outputs of every expert on ``X`` [n, H]: [E, n, H] in float32 (float64 stays float64)."""
    dt = torch.float64 if X.dtype == torch.float64 else torch.float32
    w = layer.router_weight()
    x = X.to(device=w.device, dtype=w.dtype)  # samples live on the CPU, weights anywhere
    return torch.stack([layer.expert_forward(e, x).to(dt) for e in range(layer.num_experts)])


@torch.no_grad()
def _subset_output(layer: models.MoELayer, X: Tensor, logits: Tensor, kept: Tensor, Y: Tensor | None) -> Tensor:
    """The routed experts' output (no shared expert) of the layer pruned to ``kept``, [n, H]."""
    kept = kept.to(X.device)
    r = models._route(_SubsetRouting(layer, kept), X, logits[:, kept])
    idx = kept[r.topk_idx]  # [n, K] original expert indices
    w = r.topk_weight.to(Y.dtype if Y is not None else torch.float32)
    if not layer.spec.weight_on_input:
        n = X.shape[0]
        return (w[..., None] * Y[idx, torch.arange(n, device=X.device)[:, None]]).sum(1)
    out = torch.zeros(X.shape[0], X.shape[1], dtype=w.dtype, device=X.device)
    for e in idx.unique().tolist():  # the weight scales the input (Llama4): no cached outputs
        tok, pos = torch.where(idx == e)
        out.index_add_(0, tok, layer.expert_forward(e, X[tok] * w[tok, pos, None].to(X.dtype)).to(out.dtype))
    return out


class _Reconstruction:
    """Squared reconstruction error of the routed experts' output for kept subsets of one layer."""

    def __init__(self, layer: models.MoELayer, X: Tensor):
        self.layer = layer
        w = layer.router_weight()
        self.X = X.to(device=w.device, dtype=w.dtype)  # samples live on the CPU, weights anywhere
        self.logits = layer.router_logits(self.X)
        self.Y = None if layer.spec.weight_on_input else expert_outputs(layer, self.X)
        all_e = torch.arange(layer.num_experts)
        self.full = _subset_output(layer, self.X, self.logits, all_e, self.Y).double()

    def __call__(self, kept) -> float:
        kept = torch.as_tensor(sorted(int(k) for k in kept), dtype=torch.long)
        y = _subset_output(self.layer, self.X, self.logits, kept, self.Y).double()
        return float(((self.full - y) ** 2).sum())


def subset_error(layer: models.MoELayer, X: Tensor, kept: Sequence[int]) -> float:
    """NAEE's reconstruction error sum_x ||F(x) - F_kept(x)||^2 of one layer on inputs ``X`` [n, H].

    F is the layer's routed-expert output; F_kept re-routes among the ``kept`` experts only (their
    router rows and biases), as the pruned layer does. The shared expert, if any, cancels.
    """
    return _Reconstruction(layer, X)(kept)


@torch.no_grad()
def naee_select(layer: models.MoELayer, X: Tensor, num_experts: int, exhaustive_limit: int = 5000):
    """The ``num_experts`` experts whose layer best reconstructs the full layer's output on ``X`` (NAEE).

    Exhaustive over all C(E, num_experts) subsets when that count is at most ``exhaustive_limit``;
    otherwise greedy backward elimination: repeatedly drop the expert whose removal increases the
    error least (E - num_experts steps, each trying every remaining expert).

    Args:
        layer: the MoE layer (a ``models.MoELayer``).
        X: [n, H] inputs of the layer (``LayerStats.input_sample``).
        num_experts: experts to keep (at least the layer's top_k).
        exhaustive_limit: the largest number of subsets enumerated.

    Returns:
        (LongTensor of kept experts ascending, method ``"exhaustive"`` or ``"greedy"``, error of the subset).
    """
    E = layer.num_experts
    if not layer.top_k <= num_experts <= E:
        raise ValueError(f"naee_select: num_experts={num_experts} must lie in [top_k={layer.top_k}, {E}]")
    if X is None or X.shape[0] == 0:
        raise ValueError("naee_select needs sample inputs X (observe with sample_size > 0)")
    return _naee_search(_Reconstruction(layer, X), E, num_experts, exhaustive_limit)


def _naee_search(err: _Reconstruction, E: int, num_experts: int, exhaustive_limit: int):
    if math.comb(E, num_experts) <= exhaustive_limit:
        best, best_err = None, math.inf
        for sub in combinations(range(E), num_experts):
            e = err(sub)
            if e < best_err:
                best, best_err = sub, e
        return torch.tensor(best, dtype=torch.long), "exhaustive", best_err
    current = list(range(E))
    cur_err = 0.0
    while len(current) > num_experts:
        trials = [(err([c for c in current if c != d]), d) for d in current]
        cur_err, drop = min(trials)  # ties: the lower index
        current.remove(drop)
    return torch.tensor(current, dtype=torch.long), "greedy", cur_err


@torch.no_grad()
def naee_model(model, obs, num_experts: int, exhaustive_limit: int = 5000):
    """Prune every MoE layer of a copy of ``model`` to its NAEE subset (``naee_select`` on ``input_sample``).

    Returns:
        (pruned model, info) with info ``{layer: {"kept": [int], "method": str, "error": float,
        "relative_error": float}}`` (relative to sum ||F(x)||^2).
    """
    models.check_target(model, num_experts)
    stats = observe.layer_stats(obs, model)
    keep, info = {}, {}
    for layer in models.moe_layers(model):
        X = stats[layer.layer_idx].input_sample
        if X is None or X.shape[0] == 0:
            raise ValueError("naee_model needs LayerStats.input_sample (observe with sample_size > 0)")
        err = _Reconstruction(layer, X)
        kept, method, e = _naee_search(err, layer.num_experts, num_experts, exhaustive_limit)
        full = float((err.full ** 2).sum())
        keep[layer.layer_idx] = kept.tolist()
        info[layer.layer_idx] = {"kept": kept.tolist(), "method": method, "error": e,
                                 "relative_error": e / full if full > 0 else 0.0}
    out = models.variant(model)
    models.prune_experts(out, keep)
    return out, info


# ---------------------------------------------------------------------------------------------
# REAM (arXiv 2604.04356) and the HC-SMoE baseline (reference code wazenmai/HC-SMoE)
# ---------------------------------------------------------------------------------------------

def ream_groups(stats, num_experts: int, C: int = 16, saliency: str = "reap", use_router: bool = True,
                normalise: str = "unit", mean_outputs: Tensor | None = None) -> tuple[list[list[int]], Tensor, Tensor]:
    """REAM's grouping of one layer (REAM, arXiv 2604.04356): saliency, distance, pseudo-pruning.

    An expert never routed in calibration would get saliency 0, and so weight 0 in its group's merge.
    Like REAM's reference code, it gets the layer's smallest non-zero saliency instead (for frequency,
    half a routed token, the reference's 0.5 in its units of token counts), so that it can still be merged.

    Args:
        stats: the layer's ``LayerStats``.
        num_experts: centroids kept, T.
        C: maximum group size (``merge.group_ream``; 0: every non-centroid joins its nearest centroid,
            1: plain pruning by saliency).
        saliency: importance criterion choosing the centroids and weighting the merge (REAM: ``"reap"``;
            ``"frequency"`` is the paper's ablation).
        use_router: include the router-logit term in the distance (False: the "no router weighting" ablation).
        normalise: normalisation of the router-logit columns (``scores.ream_distance``).
        mean_outputs: [E, H] ybar for the distance (``scores.ream_distance``; None: the routed-token mean).

    Returns:
        (groups [[centroid, members...], ...] by centroid index, saliency [E], distance [E, E]).
    """
    sal = _floored(scores.importance(stats, saliency), stats, saliency)
    dist = scores.ream_distance(stats, normalise=normalise, use_router=use_router, mean_outputs=mean_outputs)
    return merge.group_ream(sal, dist, num_experts, C), sal, dist


def _floored(sal: Tensor, stats, criterion: str) -> Tensor:
    """Saliency with zeros raised to the smallest non-zero value (``ream_groups``)."""
    positive = sal[sal > 0]
    if positive.numel() in (0, sal.numel()):
        return sal
    floor = positive.min()
    if criterion == "frequency":
        floor = torch.minimum(floor, torch.tensor(0.5 / max(1, stats.top_k * stats.tokens), dtype=sal.dtype))
    return torch.where(sal > 0, sal, floor)


@torch.no_grad()
def mean_expert_outputs(layer: models.MoELayer, X: Tensor, gated: bool, chunk: int = 1024) -> Tensor:
    """Every expert's output averaged over every token of ``X`` [n, H], whether routed to it or not: [E, H] float64.

    ``gated=False``: (1/n) sum_x f_e(x), HC-SMoE's expert feature (its reference runs every expert on all
    collected layer inputs). ``gated=True``: (1/n) sum_x p_e(x) f_e(x) with p the router's probability
    over all experts (``MoELayer.route``: softmax, or the family's sigmoid), REAM's ybar as its reference
    code computes it (the paper writes the mean of g_e(x) f_e(x)). Experts run one at a time on chunks
    of ``chunk`` tokens, so memory stays at one expert's activations whatever the number of experts.
    """
    w = layer.router_weight()
    X = X.reshape(-1, layer.hidden_size)
    if X.shape[0] == 0:
        raise ValueError(f"layer {layer.layer_idx}: no sampled inputs to average expert outputs over; "
                         "observe with sample_size > 0")
    out = torch.zeros(layer.num_experts, layer.hidden_size, dtype=torch.float64)
    for start in range(0, X.shape[0], chunk):
        x = X[start:start + chunk].to(device=w.device, dtype=w.dtype)  # samples live on the CPU
        p = layer.route(x).probs.float() if gated else None
        for e in range(layer.num_experts):
            y = layer.expert_forward(e, x).float()
            if gated:
                y = y * p[:, e:e + 1]
            out[e] += y.sum(0).double().cpu()
    return out / X.shape[0]


OUTPUT_MEANS = ("all_tokens", "routed")


def _sampled_means(layer: models.MoELayer, st, gated: bool, option: str) -> Tensor:
    """``mean_expert_outputs`` on the observation's input sample, or a clear error when it holds none."""
    if st.input_sample is None or st.input_sample.numel() == 0:
        raise ValueError(f"layer {layer.layer_idx}: {option}='all_tokens' averages expert outputs over the observation's "
                         f"input sample, and it holds none: observe with sample_size > 0, or pass {option}='routed'")
    return mean_expert_outputs(layer, st.input_sample, gated=gated)


def _check_mean_choice(value: str, option: str) -> None:
    if value not in OUTPUT_MEANS:
        raise ValueError(f"{option} must be one of {OUTPUT_MEANS}, got {value!r}")


def _ream_info(groups: list[list[int]], sal: Tensor, dist: Tensor) -> dict:
    grouped = {e for g in groups for e in g}
    return {"groups": groups, "centroids": [g[0] for g in groups],
            "merged": sorted(e for g in groups for e in g[1:]),
            "dropped": [e for e in range(sal.numel()) if e not in grouped],
            "saliency": sal.tolist(), "distance": dist.float()}


@torch.no_grad()
def ream_model(model, calib, num_experts: int, *, C: int = 16, saliency: str = "reap", use_router: bool = True,
               normalise: str = "unit", outputs: str = "all_tokens", align: str | None = "ream",
               sequential: bool = True, obs=None, sample_size: int = 512, seed: int = 0, batch_size: int = 8,
               progress: bool = False, **merge_kwargs):
    """REAM on every MoE layer of a copy of ``model`` (REAM, arXiv 2604.04356).

    Per layer: the ``num_experts`` most salient experts are centroids, each takes up to C - 1 nearest
    non-centroids (``ream_groups``); every group is merged with weights s_i / sum s after aligning its
    members' neurons to the centroid (``align="ream"``: activation + PCA-feature Hungarian matching on
    the layer's sampled inputs); the centroids' router rows are kept.

    ``sequential=True`` (the paper): layers are processed front to back and each is observed after the
    earlier ones were merged (``observe.observe_sequential``, by layer-wise replay of the kept hidden
    states: about three forward passes of the calibration set whatever the depth). ``sequential=False`` merges every layer from one observation of the
    original model (``obs``, or one pass over ``calib`` when none is given).

    Args:
        model: the model (left untouched).
        calib: the calibration set (as for ``observe.observe``); unused in one-shot mode when ``obs`` is given.
        num_experts: experts per layer after merging.
        C, saliency, use_router, normalise: of ``ream_groups``.
        outputs: ybar of the distance. ``"all_tokens"`` (REAM's reference code): p_e(x) f_e(x) averaged
            over the layer's sampled inputs, every expert on every token (``mean_expert_outputs``);
            ``"routed"``: g_e(x) f_e(x) averaged over the tokens routed to e, from the observation's sums.
        align: neuron alignment before merging (None, ``"weights"``, ``"activations"``, ``"ream"``).
        sequential: re-observe each layer after merging the earlier ones.
        obs: an ``Observation`` of ``model`` on ``calib`` to reuse in one-shot mode.
        sample_size, seed, batch_size, progress: of the observation passes.
        **merge_kwargs: passed to ``merge.merge_experts`` (pca_dims, feature_weight, weight_cost).

    Returns:
        (new model, info) with info ``{layer: {"groups": [[centroid, members...]], "centroids": [int],
        "merged": [int] (members merged into a centroid), "dropped": [int] (in no group), "saliency": [E]
        floats, "distance": [E, E] REAM distance}}``, statistics as seen when the layer was merged.
    """
    models.check_target(model, num_experts)
    _check_mean_choice(outputs, "outputs")
    ybar = lambda layer, st: _sampled_means(layer, st, True, "outputs") if outputs == "all_tokens" else None  # noqa: E731
    grouping = dict(C=C, saliency=saliency, use_router=use_router, normalise=normalise)
    observing = dict(sample_size=sample_size, seed=seed, batch_size=batch_size, progress=progress)
    info = {}
    if not sequential:
        stats = observe.layer_stats(obs if obs is not None else observe.observe(model, calib, **observing), model)
        groups, coeffs = {}, {}
        for layer in models.moe_layers(model):
            st = stats[layer.layer_idx]
            g, sal, dist = ream_groups(st, num_experts, mean_outputs=ybar(layer, st), **grouping)
            groups[layer.layer_idx], coeffs[layer.layer_idx] = g, sal
            info[layer.layer_idx] = _ream_info(g, sal, dist)
        out = merge_model(model, groups, coeffs, align=align, samples={l: s.input_sample for l, s in stats.items()},
                          **merge_kwargs)
        return out, info
    out = models.variant(model)
    by_idx = {layer.layer_idx: layer for layer in models.moe_layers(out)}

    def edit(layer_idx, st):
        layer = by_idx[layer_idx]
        g, sal, dist = ream_groups(st, num_experts, mean_outputs=ybar(layer, st), **grouping)
        _merge_layer_into(out, layer, g, sal, align=align, X=st.input_sample, **merge_kwargs)
        info[layer_idx] = _ream_info(g, sal, dist)

    observe.observe_sequential(out, calib, edit, **observing)
    models.set_num_experts_config(out, num_experts)
    models.check_consistency(out)
    return out, info


@torch.no_grad()
def hc_smoe_model(model, obs, num_experts: int, *, linkage: str = "average", features: str = "all_tokens",
                  align: str | None = None):
    """HC-SMoE (baseline; reference code wazenmai/HC-SMoE): cluster experts on their mean outputs, merge each cluster by frequency.

    Per layer: agglomerative clustering (``merge.group_hierarchical``, ``linkage`` average by default,
    Euclidean) of each expert's mean un-gated output into ``num_experts`` clusters; each cluster is
    merged with frequency weights, represented by (and keeping the router row of) its most frequent member.

    Args:
        model: the model (left untouched).
        obs: the ``Observation`` of a calibration pass on ``model``.
        num_experts: clusters (experts) per layer.
        linkage: scipy linkage method.
        features: ``"all_tokens"`` (HC-SMoE's reference code): every expert run on the layer's sampled
            inputs, whether routed to it or not, and averaged (``mean_expert_outputs``); ``"routed"``: the
            mean over the tokens routed to each expert (out_sum / counts; an expert never routed has a
            zero feature).
        align: neuron alignment before averaging (HC-SMoE: none).

    Returns:
        (new model, info) with info ``{layer: {"groups": [[representative, members...], ...]}}``.
    """
    models.check_target(model, num_experts)
    _check_mean_choice(features, "features")
    stats = observe.layer_stats(obs, model)
    groups, coeffs = {}, {}
    for layer in models.moe_layers(model):
        st = stats[layer.layer_idx]
        freq = scores.importance(st, "frequency")
        if features == "all_tokens":
            mean_out = _sampled_means(layer, st, False, "features")
        else:
            if st.out_sum is None:
                raise ValueError("HC-SMoE's routed features are the mean expert outputs: observe with outputs=True "
                                 "(the default)")
            mean_out = st.out_sum.double() / st.counts.double().clamp_min(1)[:, None]
        groups[layer.layer_idx] = merge.group_hierarchical(mean_out, num_experts, linkage=linkage, frequency=freq)
        coeffs[layer.layer_idx] = freq
    out = merge_model(model, groups, coeffs, align=align, samples={l: s.input_sample for l, s in stats.items()})
    return out, {l: {"groups": g} for l, g in groups.items()}


ROLES = ("centroid", "merged", "dropped")


def group_roles(groups: list[list[int]], num_experts: int) -> list[str]:
    """Each expert's part in a grouping: ``"centroid"`` (first of its group, kept), ``"merged"`` (merged into a
    centroid) or ``"dropped"`` (in no group). A pruning's kept experts are singleton groups."""
    roles = ["dropped"] * num_experts
    for g in groups:
        roles[g[0]] = "centroid"
        for e in g[1:]:
            roles[e] = "merged"
    return roles


def routing_mass_by_role(stats, groups: list[list[int]]) -> dict[str, dict[str, float]]:
    """Where each calibration domain's routing goes under a grouping (notebook 02, a look inside REAM).

    Args:
        stats: a layer's ``LayerStats`` from a calibration set with a ``domain`` column (``counts_by_group``).
        groups: the layer's groups (``ream_model`` info, or ``[[k] for k in kept]`` for a pruning).

    Returns:
        ``{domain: {role: share}}``: the share of the domain's routed (token, expert) slots that went to
        experts of each role of ``group_roles`` (shares sum to 1 for a domain with routed tokens).
    """
    if not stats.counts_by_group:
        raise ValueError("no per-domain counts: observe a calibration set that has a `domain` column")
    roles = group_roles(groups, stats.num_experts)
    out = {}
    for domain, counts in sorted(stats.counts_by_group.items()):
        total = float(counts.sum())
        out[domain] = {r: (float(sum(counts[e] for e in range(stats.num_experts) if roles[e] == r)) / total
                           if total else 0.0) for r in ROLES}
    return out


# ---------------------------------------------------------------------------------------------
# MC-SMoE (arXiv 2310.01334): adaptive M-SMoE merging, then low rank + sparse experts
# ---------------------------------------------------------------------------------------------

def msmoe_groups(model, obs, total: int, *, adaptive: bool = True, criterion: str = "frequency",
                 similarity: str = "router_logit", min_per_layer: int | None = None):
    """M-SMoE's dominant experts and groups for every MoE layer (MC-SMoE, arXiv 2310.01334).

    Dominant experts are the most used (``criterion``, frequency in the paper): with ``adaptive`` chosen
    over all layers together (``scores.global_dominant``: each layer's top ``min_per_layer`` are forced,
    its most-used expert among them), so per-layer counts differ; otherwise ``total / layers`` per
    layer. Every other expert joins its most similar dominant (``merge.group_nearest``).

    Args:
        model: the model.
        obs: the ``Observation`` of a calibration pass on ``model``.
        total: experts kept over all MoE layers.
        adaptive: global choice (adaptive counts) or the same count in every layer.
        criterion: importance criterion choosing the dominants and weighting the merge.
        similarity: a ``scores.SIMILARITIES`` name (``router_logit``, ``router_weight``, ``output`` ...).
        min_per_layer: experts forced per layer (default: top_k, the fewest a layer can route to; the
            paper's Switch models route to one expert and force one).

    Returns:
        (groups ``{layer: [[dominant, members...], ...]}`` with dominants ascending, coeffs ``{layer: [E]}``).
        Raises ValueError when a layer's count does not suit its routing (``models.check_layer_counts``).
    """
    from .checks import whole

    layers = models.moe_layers(model)
    whole(total, "total", minimum=1)
    if min_per_layer is not None:
        whole(min_per_layer, "min_per_layer", minimum=1)
    stats = observe.layer_stats(obs, model)
    imp = {l.layer_idx: scores.importance(stats[l.layer_idx], criterion) for l in layers}
    if adaptive:
        forced = max(l.top_k for l in layers) if min_per_layer is None else min_per_layer
        kept = scores.global_dominant(imp, total, min_per_layer=forced)
    else:
        if total % len(layers):
            raise ValueError(f"total={total} does not split evenly over {len(layers)} MoE layers; use adaptive=True")
        kept = scores.uniform_per_layer(imp, total // len(layers))
    models.check_layer_counts(model, {i: len(k) for i, k in kept.items()})
    groups = {}
    for l in layers:
        sim = scores.similarity(stats[l.layer_idx], similarity, router_weight=l.router_weight())
        groups[l.layer_idx] = merge.group_nearest(kept[l.layer_idx].tolist(), sim)
    return groups, imp


def msmoe_total(model, reduction: float) -> int:
    """Experts kept over all MoE layers after removing the share ``reduction`` of them (rounded).

    Raises:
        ValueError: ``reduction`` outside (0, 1), or one that keeps fewer than top-k experts per layer.
    """
    from .checks import share

    share(reduction, "reduction", 0, 1, low_open=True, high_open=True)
    layers = models.moe_layers(model)
    n = sum(l.num_experts for l in layers)
    total = int(round(n * (1 - reduction)))
    least = sum(l.top_k for l in layers)
    if total < least:
        raise ValueError(f"reduction={reduction} keeps {total} experts over {len(layers)} MoE layers, fewer than "
                         f"top_k per layer ({least} in all); use a reduction of at most {1 - least / n:.3f}")
    return total


@torch.no_grad()
def msmoe_model(model, obs, total: int, *, adaptive: bool = True, criterion: str = "frequency",
                similarity: str = "router_logit", align: str | None = "weights", min_per_layer: int | None = None):
    """M-SMoE on a copy of ``model``: ``msmoe_groups`` then frequency-weighted merging (MC-SMoE, arXiv 2310.01334).

    Members are aligned to their dominant (``align``: None, ``"weights"`` = weight matching as in the
    paper, ``"activations"``, ``"ream"``) and merged as W = sum f_i W_i / sum f_i; the dominant's router
    row is kept. With adaptive counts the copy records per-layer counts and saves in moelab's
    non-uniform form; the merged layers really shrink (no tied copies, unlike the reference code).

    Returns:
        (merged model, info ``{layer: {"groups": [[dominant, members...]], "num_experts": int}}``).
    """
    groups, coeffs = msmoe_groups(model, obs, total, adaptive=adaptive, criterion=criterion,
                                  similarity=similarity, min_per_layer=min_per_layer)
    stats = observe.layer_stats(obs, model)
    out = merge_model(model, groups, coeffs, align=align, samples={l: s.input_sample for l, s in stats.items()})
    return out, {l: {"groups": g, "num_experts": len(g)} for l, g in groups.items()}


def merged_stable_ranks(original, merged, info: Mapping[int, Mapping]) -> list[dict]:
    """Stable rank (``merge.stable_rank``) of every merged expert's matrices against its members' before.

    MC-SMoE reports that merging lowers the stable rank, which makes the merged experts easier to
    compress. Only groups of two or more experts are listed.

    Args:
        original: the model before merging.
        merged: the merged model (``msmoe_model`` / ``merge_model``), expert j of a layer = group j.
        info: ``{layer: {"groups": [[dominant, members...], ...]}}``.

    Returns:
        One row per (layer, group, matrix): layer, group, size, matrix (gate/up/down), dominant (its
        stable rank before), members_mean (mean over the group before), merged.
    """
    before = {l.layer_idx: l.expert_weights() for l in models.moe_layers(original)}
    rows = []
    for l in models.moe_layers(merged):
        after = l.expert_weights()
        for j, g in enumerate(info[l.layer_idx]["groups"]):
            if len(g) < 2:
                continue
            for name in ("gate", "up", "down"):
                sr = [merge.stable_rank(before[l.layer_idx][name][e]) for e in g]
                rows.append({"layer": l.layer_idx, "group": j, "size": len(g), "matrix": name, "dominant": sr[0],
                             "members_mean": sum(sr) / len(sr), "merged": merge.stable_rank(after[name][j])})
    return rows


_MATRICES = ("gate", "up", "down")


class LowRankSparseExperts(torch.nn.Module):
    """A MoE layer's routed experts stored as W ~ U V + S (MC-SMoE's compression, arXiv 2310.01334).

    For every expert and each of its matrices (gate, up ``[I, H]``, down ``[H, I]``): ``U_<m>`` ``[E, rows, r]``,
    ``V_<m>`` ``[E, r, cols]`` and the sparse residual as its kept entries only: values ``S_<m>`` ``[E, k]``
    (a parameter: they act and train) at flat positions ``Sidx_<m>`` ``[E, k]`` (an int32 buffer), k the
    kept count of one matrix. Nothing dense is stored; the forward scatters one expert's residual at a
    time. It replaces a family's fused experts module and is called the same way,
    ``(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``, over tokens sorted by
    expert (as ``moelab.kernels``). ``use_csr()`` switches inference to torch's CSR sparse matmul for the
    residual. ``dense_weights()`` gives the uniform dense W = U V + S. The replaced module is kept
    (unregistered; in a ``models.variant`` it shares the original's tensors) so ``densify`` can put
    dense weights back.
    """

    def __init__(self, weights: Mapping[str, Tensor], rank: int, sparsity: float, act_fn, dense_module=None):
        super().__init__()
        self.num_experts, self.rank, self.sparsity = weights["gate"].shape[0], int(rank), float(sparsity)
        self.act_fn = act_fn
        for name in _MATRICES:
            parts = [merge.low_rank_sparse(W, rank, sparsity, sparse_out=True) for W in weights[name]]
            U, V, idx, vals = (torch.stack([p[i] for p in parts]) for i in range(4))
            self.register_parameter(f"U_{name}", torch.nn.Parameter(U.contiguous()))
            self.register_parameter(f"V_{name}", torch.nn.Parameter(V.contiguous()))
            self.register_parameter(f"S_{name}", torch.nn.Parameter(vals.contiguous()))
            self.register_buffer(f"Sidx_{name}", idx.to(torch.int32).contiguous())
        for b in ("gate_bias", "up_bias", "down_bias"):
            if b in weights:
                self.register_parameter(b, torch.nn.Parameter(weights[b].clone()))
        self.__dict__["_dense"] = dense_module  # not a submodule: no parameters, no state_dict entries
        self._csr = None

    def num_parameters(self) -> int:
        """Stored parameters as the paper counts them: U, V, the kept residual entries, biases."""
        n = sum(getattr(self, f"{p}_{m}").numel() for p in ("U", "V", "S") for m in _MATRICES)
        return n + sum(getattr(self, b).numel() for b in ("gate_bias", "up_bias", "down_bias") if hasattr(self, b))

    def residual(self, m: str, e: int, dtype: torch.dtype | None = None) -> Tensor:
        """Expert ``e``'s dense residual S of matrix ``m`` (built on demand; differentiable in the values)."""
        vals = getattr(self, f"S_{m}")[e]
        rows, cols = getattr(self, f"U_{m}").shape[1], getattr(self, f"V_{m}").shape[2]
        flat = torch.zeros(rows * cols, dtype=dtype or vals.dtype, device=vals.device)
        return flat.scatter(0, getattr(self, f"Sidx_{m}")[e].long(), vals.to(flat.dtype)).view(rows, cols)

    @torch.no_grad()
    def dense_weights(self) -> dict[str, Tensor]:
        """Uniform dense weights W = U V + S (gate/up ``[E, I, H]``, down ``[E, H, I]``, biases)."""
        out = {m: getattr(self, f"U_{m}") @ getattr(self, f"V_{m}")
               + torch.stack([self.residual(m, e) for e in range(self.num_experts)]) for m in _MATRICES}
        out.update({b: getattr(self, b).detach().clone() for b in ("gate_bias", "up_bias", "down_bias") if hasattr(self, b)})
        return out

    @torch.no_grad()
    def use_csr(self, on: bool = True) -> None:
        """Run the residual as CSR sparse matmuls in eval mode (snapshots the current S; call again after training)."""
        import warnings

        S0 = self.S_gate
        # torch's CPU CSR matmul has no bf16/fp16 kernel: there the residual runs in float32 and its
        # product is cast back (CUDA's cuSPARSE takes bf16 as it is).
        self._csr_dtype = S0.dtype if S0.device.type != "cpu" or S0.dtype in (torch.float32, torch.float64) \
            else torch.float32
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self._csr = None if not on else {
                m: [self.residual(m, e, self._csr_dtype).to_sparse_csr() for e in range(self.num_experts)]
                for m in _MATRICES}

    def _project(self, m: str, e: int, x: Tensor, U, V) -> Tensor:
        y = (x @ V[e].transpose(0, 1)) @ U[e].transpose(0, 1)
        if self._csr is not None and not self.training:
            xt = x.transpose(0, 1).to(self._csr_dtype)
            y = y + torch.sparse.mm(self._csr[m][e], xt).transpose(0, 1).to(y.dtype)
        else:
            y = y + x @ self.residual(m, e, x.dtype).transpose(0, 1)
        bias = getattr(self, f"{m}_bias", None)
        return y if bias is None else y + bias[e]

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        E, K = self.num_experts, top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)[:E].tolist()
        order = order[:sum(counts)]  # indices >= E (expert-parallel sentinels) are skipped
        token_idx = order // K
        w_sorted = top_k_weights.reshape(-1)[order]
        fac = {m: (getattr(self, f"U_{m}").unbind(0), getattr(self, f"V_{m}").unbind(0)) for m in _MATRICES}
        outs = []
        for e, xs in enumerate(hidden_states[token_idx].split(counts)):
            if counts[e] == 0:
                continue
            h = self.act_fn(self._project("gate", e, xs, *fac["gate"])) * self._project("up", e, xs, *fac["up"])
            outs.append(self._project("down", e, h, *fac["down"]))
        out = torch.zeros_like(hidden_states)
        if outs:
            y = torch.cat(outs) * w_sorted.unsqueeze(-1).to(hidden_states.dtype)
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _experts_of(model):
    """(block, experts attribute name, experts module) of every sparse block, dense or factored."""
    spec = models.family_of(model)
    found = []
    for layer in models.decoder_layers(model):
        block = getattr(layer, spec.block_attr, None)
        ex = getattr(block, spec.experts_attr, None) if block is not None else None
        if isinstance(ex, torch.nn.Module):
            found.append((block, spec.experts_attr, ex))
    return found


@torch.no_grad()
def low_rank_sparse_model(model, sparsity: float, *, rank: int | None = None, rank_fraction: float | None = None):
    """MC-SMoE's compression on a copy of ``model``: every expert matrix W becomes U V + S (``merge.low_rank_sparse``).

    Args:
        model: the (merged) model, left untouched.
        sparsity: share of the residual's entries set to zero (1: low rank only).
        rank: r for every matrix; or ``rank_fraction`` of min(rows, cols) (e.g. 0.25 of the expert width).

    Returns:
        (copy whose experts are ``LowRankSparseExperts``, info ``{layer: {"rank", "dense_params",
        "params", "rel_error": {matrix: mean ||W - U V - S||_F / ||W||_F}}}``). The copy runs, trains
        (``train.recover``) and times as the factored form; ``densify`` turns it back into a dense model
        that moelab's editing functions and checkpoints accept.
    """
    from .checks import share, whole

    if (rank is None) == (rank_fraction is None):
        raise ValueError("give exactly one of rank and rank_fraction")
    share(sparsity, "sparsity", 0, 1)
    if rank_fraction is not None:
        share(rank_fraction, "rank_fraction", 0, 1, low_open=True)
    else:
        whole(rank, "rank", minimum=1)
        full = min(min(l.intermediate_size, l.hidden_size) for l in models.moe_layers(model))
        if rank > full:
            raise ValueError(f"rank={rank} is above the rank {full} an expert matrix can have (the smaller of its "
                             f"width and hidden size); give rank <= {full}")
    out = models.variant(model)
    info = {}
    with recipe.step(out, "low_rank_sparse", sparsity=sparsity, rank=rank, rank_fraction=rank_fraction):
        _factor_layers(out, sparsity, rank, rank_fraction, info)
    return out, info


def _factor_layers(out, sparsity, rank, rank_fraction, info) -> None:
    for layer in models.moe_layers(out):
        spec = layer.spec
        if spec.activation != "glu" or spec.weight_on_input:
            raise models.UnsupportedModelError(
                f"low_rank_sparse_model supports experts computing down(act(gate x) * up x) on routed tokens; "
                f"{spec.model_type} ({spec.activation}, weight_on_input={spec.weight_on_input}) is not covered")
        w = layer.expert_weights()
        I, H = w["gate"].shape[1:]
        r = int(rank) if rank is not None else max(1, int(round(rank_fraction * min(I, H))))
        ex = layer.experts_module()
        lrs = LowRankSparseExperts(w, r, sparsity, ex.act_fn, dense_module=ex)
        rec = lrs.dense_weights()
        err = {m: float(((w[m] - rec[m]).flatten(1).norm(dim=1) / w[m].flatten(1).norm(dim=1).clamp_min(1e-12)).mean())
               for m in _MATRICES}
        info[layer.layer_idx] = {"rank": r, "dense_params": sum(p.numel() for p in ex.parameters()),
                                 "params": lrs.num_parameters(), "rel_error": err}
        setattr(layer.block, spec.experts_attr, lrs)


@torch.no_grad()
def densify(model):
    """A dense copy of a ``low_rank_sparse_model`` result: every ``LowRankSparseExperts`` becomes its
    family's fused experts module holding W = U V + S (same function; the checkpoint stays dense)."""
    out = models.variant(model)
    factored = [(block, name, ex) for block, name, ex in _experts_of(out) if isinstance(ex, LowRankSparseExperts)]
    for block, name, ex in factored:
        setattr(block, name, ex._dense)
    by_block = {id(block): ex for block, _, ex in factored}
    with recipe.step(out, "densify"):
        for layer in models.moe_layers(out):
            ex = by_block.get(id(layer.block))
            if ex is not None:
                models.set_experts(out, layer.layer_idx, ex.dense_weights(), layer.router_weight())
    models.check_consistency(out)
    return out


def use_csr(model, on: bool = True) -> int:
    """Switch every ``LowRankSparseExperts`` of ``model`` to CSR residual matmuls in eval mode (or back);
    returns how many were switched. Snapshots the current residuals: call again after training."""
    found = [ex for _, _, ex in _experts_of(model) if isinstance(ex, LowRankSparseExperts)]
    for ex in found:
        ex.use_csr(on)
    return len(found)


def parameter_count(model) -> dict:
    """Parameters of ``model`` as MC-SMoE counts them: ``{"total", "experts"}`` (routed experts only;
    a ``LowRankSparseExperts`` counts U, V and the kept residual entries, not the zeros it stores)."""
    total = sum(p.numel() for p in model.parameters())
    experts = 0
    for _, _, ex in _experts_of(model):
        stored = sum(p.numel() for p in ex.parameters())
        counted = ex.num_parameters() if isinstance(ex, LowRankSparseExperts) else stored
        experts += counted
        total -= stored - counted
    return {"total": total, "experts": experts}


@torch.no_grad()
def relative_inference_time(variants: Mapping[str, torch.nn.Module], input_ids: Tensor, repeats: int = 7,
                            warmup: int = 1) -> dict:
    """Forward-pass time of each model relative to the first, measured side by side.

    Each repeat times every model once, one after the other, so all see the same machine load; a
    model's ratio is the median over repeats of its time / the first model's time in that repeat.

    Args:
        variants: ``{name: model}``; the first is the reference.
        input_ids: the batch every model runs.
        repeats: timed rounds (after ``warmup`` untimed ones).

    Returns:
        ``{name: {"ratio": median ratio, "median_s": median seconds}}`` (seconds depend on the machine;
        quote ratios).
    """
    import statistics
    import time

    names = list(variants)
    times = {n: [] for n in names}

    def sync(device):  # CUDA runs asynchronously: wait for the kernels before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for r in range(warmup + repeats):
        for n in names:
            m = variants[n]
            m.eval()
            device = models.input_device(m)
            ids = input_ids.to(device)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                m(input_ids=ids)
            sync(device)
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    ref = times[names[0]]
    return {n: {"ratio": statistics.median(t / t0 for t, t0 in zip(times[n], ref)),
                "median_s": statistics.median(times[n])} for n in names}
