"""How alike a model's experts are: what decides whether merging can beat pruning.

Merging (M-SMoE, REAM, HC-SMoE) averages experts and DERN moves a dropped expert's neurons into kept
experts; both can only keep what the experts share. These measures say, per MoE layer, how much they
share, so a verdict on one model can be read against the kind of model it came from (trained from
scratch or upcycled from a dense one, ``moelab.upcycle``):

* ``aligned_cosine``: the cosine between two experts' weights after matching the neurons of one to
  the other (MC-SMoE's weight matching, ``merge.align_weights``); without alignment, two experts that
  are the same FFN in another neuron order look unrelated;
* ``segment_share``: the share of a dropped expert's segments (neurons as [up row | down column],
  DERN's vectors) whose best cosine with a kept expert's segment exceeds DERN's alpha: the segments
  DERN would move rather than discard;
* ``main_domain_share``: routing specialisation, the mean share of an expert's tokens that come from
  its main domain (1/3 for none over three domains, 1 for full; ``observe.LayerStats``).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from . import merge, models, scores


def _flat_features(w: dict, e: int, perm: Tensor | None = None) -> Tensor:
    one = merge.get_expert(w, e)
    if perm is not None:
        one = merge.permute_neurons(one, perm)
    return merge.neuron_features(one).double().flatten()


def _cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


@torch.no_grad()
def aligned_cosine(weights: dict, pairs=None) -> dict:
    """Cosines between experts' weights, before and after neuron alignment.

    Args:
        weights: one layer's uniform weights (``MoELayer.expert_weights``).
        pairs: the (e, f) pairs to compare (default all e < f).

    Returns:
        ``{"aligned": [E, E], "plain": [E, E]}`` float64 matrices (unit diagonal, NaN where not compared);
        ``aligned[e, f]`` aligns f's neurons to e's by maximal summed inner product (MC-SMoE, section 3.2)
        and takes the cosine of the whole [gate | up | down] feature matrices.
    """
    E = weights["gate"].shape[0]
    pairs = list(itertools.combinations(range(E), 2)) if pairs is None else pairs
    aligned = torch.full((E, E), float("nan"), dtype=torch.float64)
    plain = aligned.clone()
    aligned.fill_diagonal_(1.0)
    plain.fill_diagonal_(1.0)
    flat = [_flat_features(weights, e) for e in range(E)]
    for e, f in pairs:
        perm = merge.align_weights(merge.get_expert(weights, e), merge.get_expert(weights, f))
        aligned[e, f] = aligned[f, e] = _cos(flat[e], _flat_features(weights, f, perm))
        plain[e, f] = plain[f, e] = _cos(flat[e], flat[f])
    return {"aligned": aligned, "plain": plain}


def _off_diagonal(m: Tensor) -> Tensor:
    mask = ~torch.eye(m.shape[0], dtype=torch.bool)
    return m[mask].reshape(m.shape[0], -1)


@torch.no_grad()
def segment_share(weights: dict, kept: list[int], dropped: list[int], alpha: float = 0.6) -> float:
    """Share of the dropped experts' segments DERN would move at ``alpha`` (``merge.assign_segments``,
    gate rows left out as DERN's better variant does)."""
    assign = merge.assign_segments(weights, kept, dropped, alpha, use_gate=False)
    moved = sum(int((t >= 0).sum()) for t in assign.values())
    return moved / max(1, sum(t.numel() for t in assign.values()))


def layer_report(model, obs, keep_share: float = 0.5, alpha: float = 0.6) -> list[dict]:
    """The similarity measures of every MoE layer of ``model``, one row each.

    Args:
        model: the model ``obs`` observed.
        obs: an ``observe.Observation`` of a calibration set with a ``domain`` column.
        keep_share: the share of experts kept when the dropped ones are chosen (DERN's importance, the
            50% setting of its paper).
        alpha: DERN's segment similarity threshold.

    Returns:
        rows with ``layer``, ``aligned_cosine`` (mean over expert pairs), ``aligned_cosine_best`` (mean
        over experts of their most similar partner's), ``plain_cosine`` (mean over pairs, no alignment),
        ``segment_share`` and ``main_domain_share``.
    """
    obs.check_model(model)
    rows = []
    for layer in models.moe_layers(model):
        st = obs[layer.layer_idx]
        w = layer.expert_weights()
        cos = aligned_cosine(w)
        off, plain = _off_diagonal(cos["aligned"]), _off_diagonal(cos["plain"])
        n_keep = max(1, round(layer.num_experts * keep_share))
        kept = scores.select_top(scores.importance(st, "dern"), n_keep).tolist()
        dropped = [e for e in range(layer.num_experts) if e not in set(kept)]
        rows.append({"layer": layer.layer_idx, "aligned_cosine": float(off.mean()),
                     "aligned_cosine_best": float(off.max(1).values.mean()), "plain_cosine": float(plain.mean()),
                     "segment_share": segment_share(w, kept, dropped, alpha),
                     "main_domain_share": st.main_group_share()})
    return rows
