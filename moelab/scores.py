"""Expert importance, expert similarity and expert selection, all read off one ``LayerStats``.

Every expert importance criterion the papers use and every similarity the
papers use is defined once here, so REAP saliency or the router-logit cosine mean the same thing in
every notebook. Inputs are the per-layer sums of ``moelab.observe.LayerStats``; outputs are float64
tensors indexed by expert.

* importance: ``importance(stats, "reap")`` dispatches through ``CRITERIA``, a registry that refuses
  duplicate names.
* similarity: ``similarity(stats, "router_logit")`` dispatches through ``SIMILARITIES``;
  ``ream_distance`` gives REAM's distance (REAM, arXiv 2604.04356).
* selection: ``select_top`` (per layer), ``global_dominant`` (MC-SMoE's global count with each
  layer's most-used expert forced, MC-SMoE, arXiv 2310.01334) and ``uniform_per_layer``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .observe import LayerStats

__all__ = [
    "Registry", "CRITERIA", "SIMILARITIES", "register_criterion", "register_similarity", "importance",
    "similarity", "gram_cosine", "router_logit_cosine", "router_logit_cosine01", "router_prob_cosine",
    "router_weight_cosine", "output_cosine", "logit_column_distance", "ream_distance", "ream_similarity",
    "rank", "select_top", "uniform_per_layer", "global_dominant",
]


class Registry(dict):
    """A name -> function mapping that refuses to register a name twice (so a typo cannot shadow a method)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable:
        def deco(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self[name].__qualname__})")
            self[name] = fn
            return fn
        return deco

    def get_or_raise(self, name: str) -> Callable:
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self)}")
        return self[name]


CRITERIA = Registry("importance criterion")
SIMILARITIES = Registry("similarity")
register_criterion = CRITERIA.register
register_similarity = SIMILARITIES.register


def _need(stats: LayerStats, *names: str) -> None:
    for n in names:
        if getattr(stats, n) is None:
            raise ValueError(f"LayerStats of layer {stats.layer} has no {n!r}; was the layer observed?")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 where den == 0 (experts never routed score 0, not NaN)."""
    den = den.to(num.dtype)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), torch.zeros_like(num))


# ---------------------------------------------------------------------------------------------
# Importance criteria (frequency, REAP saliency, gate-weighted norms: shared by every paper)
# ---------------------------------------------------------------------------------------------

@register_criterion("frequency")
def _frequency(stats: LayerStats, **_) -> Tensor:
    """freq_e = |X_e| / (K T)."""
    _need(stats, "counts")
    return stats.counts.double() / max(1, stats.top_k * stats.tokens)


@register_criterion("soft_logit")
def _soft_logit(stats: LayerStats, **_) -> Tensor:
    """Mean over all T tokens of g_e(x)."""
    _need(stats, "soft_mass")
    return stats.soft_mass.double() / max(1, stats.tokens)


@register_criterion("soft_logit_routed")
def _soft_logit_routed(stats: LayerStats, **_) -> Tensor:
    """Sum of g_e(x) over routed tokens X_e, divided by T (not by |X_e|: it stays a frequency-like mass)."""
    _need(stats, "soft_mass_routed")
    return stats.soft_mass_routed.double() / max(1, stats.tokens)


@register_criterion("reap")
def _reap(stats: LayerStats, **_) -> Tensor:
    """REAP: mean over X_e of g_e(x) ||f_e(x)|| with g the softmax over all experts; 0 if never routed."""
    _need(stats, "reap_sum", "counts")
    return _safe_div(stats.reap_sum.double(), stats.counts)


@register_criterion("reap_topk")
def _reap_topk(stats: LayerStats, **_) -> Tensor:
    """REAP with the weight the model applies (top-k renormalised when the family renormalises)."""
    _need(stats, "reap_topk_sum", "counts")
    return _safe_div(stats.reap_topk_sum.double(), stats.counts)


@register_criterion("ean")
def _ean(stats: LayerStats, **_) -> Tensor:
    """EAN: sum over X_e of ||f_e(x)|| (a sum, so frequency counts)."""
    _need(stats, "ean_sum")
    return stats.ean_sum.double().clone()


@register_criterion("dern")
def _dern(stats: LayerStats, **_) -> Tensor:
    """DERN: (1/T) sum_t 1[e in TopK(x_t)] g_e(x_t) / sum_{j in TopK} g_j(x_t)."""
    _need(stats, "dern_sum")
    return stats.dern_sum.double() / max(1, stats.tokens)


@register_criterion("random")
def _random(stats: LayerStats, seed: int = 0, **_) -> Tensor:
    """Uniform random scores from ``seed`` (the random-pruning baseline)."""
    gen = torch.Generator().manual_seed(int(seed) + 1_000_003 * int(stats.layer or 0))
    return torch.rand(stats.num_experts, generator=gen, dtype=torch.float64)


def importance(stats: LayerStats, criterion: str, *, seed: int = 0) -> Tensor:
    """Per-expert importance of one layer (the criteria every paper shares, listed in this module's docstring).

    Criteria (see ``CRITERIA``): ``frequency`` = counts / (K T); ``soft_logit`` = soft_mass / T;
    ``soft_logit_routed`` = soft_mass_routed / T; ``reap`` = reap_sum / counts (REAP saliency, mean over
    routed tokens, experts never routed get 0); ``reap_topk`` = reap_topk_sum / counts; ``ean`` =
    ean_sum; ``dern`` = dern_sum / T; ``random`` (seeded by ``seed`` and the layer index).

    Args:
        stats: the layer's ``LayerStats``.
        criterion: a name registered in ``CRITERIA``.
        seed: seed of the ``random`` criterion (ignored by the others).

    Returns:
        float64 tensor [E]; larger means more important.
    """
    return CRITERIA.get_or_raise(criterion)(stats, seed=seed)


# ---------------------------------------------------------------------------------------------
# Similarities between experts
# ---------------------------------------------------------------------------------------------

def gram_cosine(gram: Tensor) -> Tensor:
    """Cosine between the columns behind a Gram matrix: G_ij / sqrt(G_ii G_jj).

    Args:
        gram: [E, E] Gram matrix sum_t v_t v_t^T of per-token vectors v_t in R^E.

    Returns:
        [E, E] in [-1, 1], symmetric, diagonal 1 (also for an all-zero column, whose off-diagonal is 0).
    """
    g = gram.double()
    g = (g + g.T) / 2
    d = g.diagonal().clamp_min(0).sqrt()
    denom = d[:, None] * d[None, :]
    cos = torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g)).clamp(-1, 1)
    cos.fill_diagonal_(1.0)
    return cos


def _row_cosine(m: Tensor) -> Tensor:
    m = m.detach().double().cpu()  # similarities live on the CPU beside the statistics, whatever the weights' device
    return gram_cosine(m @ m.T)


@register_similarity("router_logit")
def router_logit_cosine(stats: LayerStats, **_) -> Tensor:
    """Cosine of router-logit columns z_{:,i}, z_{:,j} over calibration tokens, from ``logit_gram``. [-1, 1]."""
    _need(stats, "logit_gram")
    return gram_cosine(stats.logit_gram)


@register_similarity("router_logit_mc")
def router_logit_cosine01(stats: LayerStats, **_) -> Tensor:
    """MC-SMoE's (cos(z_{:,i}, z_{:,j}) + 1) / 2 (MC-SMoE, arXiv 2310.01334). [0, 1]."""
    return (router_logit_cosine(stats) + 1) / 2


@register_similarity("router_prob")
def router_prob_cosine(stats: LayerStats, **_) -> Tensor:
    """Cosine of router-probability columns g_{:,i}, g_{:,j}, from ``prob_gram``. [0, 1] (g >= 0)."""
    _need(stats, "prob_gram")
    return gram_cosine(stats.prob_gram)


@register_similarity("router_weight")
def router_weight_cosine(stats: LayerStats | None = None, router_weight: Tensor | None = None, **_) -> Tensor:
    """Cosine of router weight rows W_r[i], W_r[j] (SlimQwen's router-weight similarity, SlimQwen, arXiv 2605.08738).

    Args:
        stats: unused (kept so every similarity has the same call signature).
        router_weight: [E, H] router weight.

    Returns:
        [E, E] in [-1, 1].
    """
    if router_weight is None:
        raise ValueError("the router_weight similarity needs router_weight=[E, H]")
    return _row_cosine(router_weight)


def output_cosine(stats: LayerStats, gated: bool = False) -> Tensor:
    """Cosine of mean expert outputs (SlimQwen's output similarity; REAM's cos(ybar_i, ybar_j)).

    The mean over routed tokens X_e is out_sum / counts (``gated``: gated_out_sum / counts, i.e. of
    g_e(x) f_e(x)). Dividing by counts does not change a cosine; an expert never routed has a zero mean
    and similarity 0 to every other expert.

    Args:
        stats: the layer's ``LayerStats``.
        gated: use g_e(x) f_e(x) (REAM's ybar) instead of f_e(x).

    Returns:
        [E, E] in [-1, 1].
    """
    name = "gated_out_sum" if gated else "out_sum"
    if getattr(stats, name) is None:
        raise ValueError(f"layer {stats.layer}: this observation holds no expert output sums ({name}); "
                         "observe with outputs=True (the default)")
    _need(stats, name, "counts")
    mean = _safe_div(getattr(stats, name).double(), stats.counts[:, None])
    return _row_cosine(mean)


@register_similarity("output")
def _output(stats: LayerStats, **_) -> Tensor:
    return output_cosine(stats, gated=False)


@register_similarity("gated_output")
def _gated_output(stats: LayerStats, **_) -> Tensor:
    return output_cosine(stats, gated=True)


def logit_column_distance(gram: Tensor, normalise: str = "unit") -> Tensor:
    """Euclidean distance between router-logit columns z_{:,i}, z_{:,j} (over tokens), from their Gram matrix.

    Args:
        gram: [E, E] sum_t z_t z_t^T.
        normalise: ``"unit"`` scales each column to unit L2 norm first (REAM's reference code), so
            D_ij = sqrt(2 - 2 cos_ij); ``"none"`` uses the raw columns, D_ij^2 = G_ii + G_jj - 2 G_ij
            (any global scale, e.g. 1/sqrt(T), cancels in REAM's D / max D).

    Returns:
        [E, E] non-negative, symmetric, zero diagonal.
    """
    if normalise == "unit":
        d2 = 2 - 2 * gram_cosine(gram)
    elif normalise == "none":
        g = gram.double()
        g = (g + g.T) / 2
        diag = g.diagonal()
        d2 = diag[:, None] + diag[None, :] - 2 * g
    else:
        raise ValueError(f"normalise must be 'unit' or 'none', got {normalise!r}")
    d = d2.clamp_min(0).sqrt()
    d.fill_diagonal_(0.0)
    return d


def ream_distance(stats: LayerStats, normalise: str = "unit", use_router: bool = True,
                  mean_outputs: Tensor | None = None) -> Tensor:
    """REAM's expert distance (REAM, arXiv 2604.04356).

    d_ij = 1 - 0.5 [ (cos(ybar_i, ybar_j) + 1) / 2 + simgate_ij ], ybar_e a mean gated output,
    simgate = 1 - D / max D, D the Euclidean distance between router-logit columns
    (``logit_column_distance``; default ``normalise="unit"``: columns scaled to unit norm, as the
    reference code does; ``"none"`` keeps raw logits).

    Args:
        stats: the layer's ``LayerStats``.
        normalise: normalisation of the logit columns before the distance ("unit" or "none").
        use_router: False drops simgate (d = 1 - (cos + 1) / 2), REAM's "no router weighting" ablation.
        mean_outputs: [E, H] ybar to use. None takes the mean of g_e(x) f_e(x) over the tokens routed
            to each expert (``output_cosine(gated=True)``); REAM's reference averages p_e(x) f_e(x) over
            every token (``compress.mean_expert_outputs``), which ``compress.ream_model`` passes here.

    Returns:
        [E, E] in [0, 1], symmetric, zero diagonal.
    """
    if mean_outputs is None:
        cos = output_cosine(stats, gated=True)
    else:
        if mean_outputs.shape[0] != stats.num_experts:
            raise ValueError(f"layer {stats.layer}: mean_outputs has {mean_outputs.shape[0]} rows for "
                             f"{stats.num_experts} experts")
        cos = _row_cosine(mean_outputs.double())
    sim_out = (cos + 1) / 2
    if use_router:
        _need(stats, "logit_gram")
        D = logit_column_distance(stats.logit_gram, normalise)
        mx = D.max()
        simgate = 1 - D / mx if mx > 0 else torch.ones_like(D)
        d = 1 - 0.5 * (sim_out + simgate)
    else:
        d = 1 - sim_out
    d = d.clamp(0, 1)
    d.fill_diagonal_(0.0)
    return d


@register_similarity("ream")
def ream_similarity(stats: LayerStats, normalise: str = "unit", **_) -> Tensor:
    """1 - REAM's distance (``ream_distance``), in [0, 1] with diagonal 1."""
    return 1 - ream_distance(stats, normalise=normalise)


def similarity(stats: LayerStats, kind: str, router_weight: Tensor | None = None, **kwargs) -> Tensor:
    """Expert-by-expert similarity of one layer, by name (larger = more similar).

    Kinds (see ``SIMILARITIES``): ``router_logit`` (cosine of router-logit columns, [-1, 1]);
    ``router_logit_mc`` (MC-SMoE's (cos + 1) / 2, [0, 1]); ``router_prob`` (cosine of probability
    columns, [0, 1]); ``router_weight`` (cosine of router rows, [-1, 1], needs ``router_weight``);
    ``output`` / ``gated_output`` (cosine of mean f_e / g_e f_e, [-1, 1]); ``ream`` (1 - REAM's d, [0, 1]).

    Args:
        stats: the layer's ``LayerStats``.
        kind: a name registered in ``SIMILARITIES``.
        router_weight: [E, H] router weight (only for ``router_weight``).
        **kwargs: passed to the similarity (e.g. ``normalise`` for ``ream``).

    Returns:
        float64 [E, E], symmetric, diagonal 1.
    """
    return SIMILARITIES.get_or_raise(kind)(stats, router_weight=router_weight, **kwargs)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------

def rank(scores: Tensor) -> Tensor:
    """Expert indices by descending score; ties go to the lower index (deterministic)."""
    return torch.sort(-scores.double(), stable=True).indices


def select_top(scores: Tensor, k: int) -> Tensor:
    """The k highest-scoring experts (ties to the lower index), returned in ascending index order.

    Ascending order keeps the surviving experts in their original router order when a layer is sliced.

    Args:
        scores: [E] importance.
        k: how many to keep, 0 <= k <= E.

    Returns:
        LongTensor [k].
    """
    E = scores.numel()
    if not 0 <= k <= E:
        raise ValueError(f"cannot keep {k} of {E} experts")
    return rank(scores)[:k].sort().values


def uniform_per_layer(scores_per_layer: dict[int, Tensor], per_layer: int) -> dict[int, Tensor]:
    """The same number of top experts in every layer (``select_top`` per layer)."""
    return {l: select_top(s, per_layer) for l, s in scores_per_layer.items()}


def global_dominant(scores_per_layer: dict[int, Tensor], total: int, min_per_layer: int = 1) -> dict[int, Tensor]:
    """MC-SMoE's global choice of dominant experts (M-SMoE, arXiv 2310.01334).

    Each layer's ``min_per_layer`` highest-scoring experts are forced dominant (with the default 1, its
    most-used expert); the remaining ``total - forced`` slots go to the highest scores over all layers
    together, so per-layer counts become adaptive. Scores must be comparable across layers (frequency
    is: it is normalised per layer). Ties go to the lower layer, then the lower expert index.

    Args:
        scores_per_layer: {layer: [E_l] scores}.
        total: number of experts kept over all layers.
        min_per_layer: experts forced per layer.

    Returns:
        {layer: LongTensor of kept expert indices, ascending}.
    """
    layers = sorted(scores_per_layer)
    n_all = sum(scores_per_layer[l].numel() for l in layers)
    forced_n = sum(min(min_per_layer, scores_per_layer[l].numel()) for l in layers)
    if not forced_n <= total <= n_all:
        raise ValueError(f"total={total} must lie between the forced {forced_n} and all {n_all} experts")
    kept = {l: set(rank(scores_per_layer[l])[:min_per_layer].tolist()) for l in layers}
    pool = [(-float(s), li, e) for li, l in enumerate(layers)
            for e, s in enumerate(scores_per_layer[l].double().tolist()) if e not in kept[l]]
    pool.sort()
    for _, li, e in pool[: total - forced_n]:
        kept[layers[li]].add(e)
    return {l: torch.tensor(sorted(kept[l]), dtype=torch.long) for l in layers}
