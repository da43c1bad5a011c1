"""Expert pruning: keep the top experts of every MoE layer by an importance criterion.

A composition of the shared parts: ``scores.importance`` ranks experts from an ``Observation``,
``scores.select_top`` picks the survivors, ``models.prune_experts`` slices router rows and every
expert-indexed tensor. Used by notebook 00 (frequency pruning by calibration domain) and as the
frequency / REAP / EAN / random baselines of the paper notebooks.
"""

from __future__ import annotations


import torch

from . import models, observe, scores


def target_count(model, keep_ratio: float) -> int:
    """Experts per layer left by keeping ``keep_ratio`` of them (rounded; validated by ``check_target``)."""
    from .checks import share

    share(keep_ratio, "keep_ratio", 0, 1, low_open=True, high_open=True)
    current = models.moe_layers(model)[0].num_experts
    n = max(1, int(round(current * keep_ratio)))
    models.check_target(model, n)
    return n


def keep_by_importance(obs, criterion: str, num_experts: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """The ``num_experts`` most important experts of every observed layer.

    Args:
        obs: an ``observe.Observation`` (or a dict {layer: LayerStats}).
        criterion: an importance criterion of ``scores.CRITERIA`` (frequency, soft_logit, reap, ean, dern, random).
        num_experts: experts kept per layer.
        seed: seed of the random criterion.

    Returns:
        {layer index: LongTensor of kept expert indices, ascending}.
    """
    layers = observe.layer_stats(obs)
    return {l: scores.select_top(scores.importance(st, criterion, seed=seed), num_experts)
            for l, st in layers.items()}


def prune(model, obs, criterion: str = "frequency", *, num_experts: int | None = None,
          keep_ratio: float | None = None, seed: int = 0, inplace: bool = False):
    """Prune every MoE layer to its top experts by ``criterion`` (one of the importance criteria of ``moelab.scores``).

    Args:
        model: the model (copied first unless ``inplace``).
        obs: the ``Observation`` of a calibration pass on ``model``.
        criterion: importance criterion name.
        num_experts / keep_ratio: the target count per layer (give one).
        seed: seed of the random criterion.
        inplace: edit ``model`` itself instead of a deep copy.

    Returns:
        (pruned model, {layer: kept expert indices}).
    """
    if (num_experts is None) == (keep_ratio is None):
        raise ValueError("give exactly one of num_experts or keep_ratio")
    n = target_count(model, keep_ratio) if num_experts is None else num_experts
    models.check_target(model, n)
    observe.layer_stats(obs, model)  # refuses another model's observation
    keep = keep_by_importance(obs, criterion, n, seed=seed)
    out = model if inplace else models.variant(model)
    models.prune_experts(out, {l: idx.tolist() for l, idx in keep.items()})
    return out, keep


def jaccard(a, b) -> float:
    """Overlap |a & b| / |a | b| of two kept sets (1 = the same experts survive)."""
    a, b = set(torch.as_tensor(a).tolist()), set(torch.as_tensor(b).tolist())
    return len(a & b) / max(1, len(a | b))


def calibration_sweep(model, tokenizer, mixes: dict, tasks, *, criterion: str = "frequency",
                      keep_ratio: float = 0.5, calib_tokens: int = 32768, seq_len: int = 256, seed: int = 0,
                      progress: bool = True):
    """Prune with each calibration mix in turn and evaluate every task (notebook 00, section 4).

    Args:
        model, tokenizer: the model to prune (left untouched; each run prunes a copy).
        mixes: {label: mix} with mixes as accepted by ``data.parse_mix`` (e.g. {"math": "0:1:0"}).
        tasks: evaluation tasks (``moelab.evaluate``).
        criterion, keep_ratio: what to keep (see ``prune``).
        calib_tokens, seq_len: calibration set size.
        seed: calibration order and random criterion.

    Returns:
        (tidy DataFrame of scores with a ``calibration`` column, {label: {layer: kept indices}}).
    """
    import pandas as pd

    from . import data, evaluate

    frames, kept = [], {}
    for label, mix in mixes.items():
        calib = data.calibration_set(tokenizer, mix, tokens=calib_tokens, seq_len=seq_len, seed=seed)
        obs = observe.observe(model, calib, seed=seed, progress=progress)
        pruned, kept[label] = prune(model, obs, criterion, keep_ratio=keep_ratio, seed=seed)
        frames.append(evaluate.evaluate(pruned, tokenizer, tasks, progress=progress).assign(calibration=label))
        del pruned
    return pd.concat(frames, ignore_index=True), kept


def mean_overlap(kept_a: dict, kept_b: dict) -> float:
    """Mean over layers of the Jaccard overlap of two {layer: kept indices} choices."""
    return sum(jaccard(kept_a[l], kept_b[l]) for l in kept_a) / max(1, len(kept_a))


# ----------------------------------------------------------------------------- depth and width (SlimQwen)
def layers_to_remove(obs, num_layers: int, how: str = "last", total: int | None = None) -> list[int]:
    """Which decoder layers SlimQwen's depth pruning removes (SlimQwen, arXiv 2605.08738).

    Args:
        obs: an ``Observation`` (its ``layer_cos``: mean cosine between each decoder layer's input and
            output on the calibration set).
        num_layers: L, layers to remove.
        how: ``"last"`` (the last L layers) or ``"similar"`` (the L layers whose output is most similar
            to their input, i.e. that change the residual stream least).
        total: number of decoder layers (default: those in ``obs.layer_cos``).

    Returns:
        Sorted layer indices.
    """
    cos = dict(obs.layer_cos)
    if how == "similar" and not cos:
        raise ValueError("removing the most input-like layers needs layer cosines: observe with cosines=True (the default)")
    n = total if total is not None else len(cos)
    if not 1 <= num_layers < n:
        raise ValueError(f"num_layers must be in [1, {n - 1}] for a {n}-layer model, got {num_layers}")
    if how == "last":
        return list(range(n - num_layers, n))
    if how == "similar":
        if len(cos) != n:
            raise ValueError(f"the observation has layer cosines for {len(cos)} of {n} layers; observe every layer")
        return sorted(sorted(cos, key=lambda i: (-cos[i], i))[:num_layers])
    raise ValueError(f"how must be 'last' or 'similar', got {how!r}")


def remove_layers(model, obs, num_layers: int, how: str = "last"):
    """A copy of ``model`` without the L layers ``layers_to_remove`` picks.

    Returns:
        (pruned copy, removed layer indices).
    """
    n = len(models.decoder_layers(model))
    drop = layers_to_remove(obs, num_layers, how, total=n)
    out = models.variant(model)
    models.remove_layers(out, drop)
    return out, drop


def channel_importance(obs) -> torch.Tensor:
    """Per hidden channel, mean |activation| of the normalised hidden states entering each MoE layer,
    summed over layers (SlimQwen's width criterion; SlimQwen, arXiv 2605.08738). Shape [H]."""
    layers = observe.layer_stats(obs)
    return sum(st.hidden_abs_sum / max(1, st.tokens) for st in layers.values())


def keep_channels(obs, num_channels: int, how: str = "activation", seed: int = 0) -> torch.Tensor:
    """The hidden channels kept: the ``num_channels`` largest by ``channel_importance``, or a seeded
    random choice (the baseline). Ascending LongTensor."""
    imp = channel_importance(obs)
    H = imp.numel()
    if not 1 <= num_channels <= H:
        raise ValueError(f"num_channels must be in [1, {H}], got {num_channels}")
    if how == "activation":
        idx = scores.select_top(imp, num_channels)
    elif how == "random":
        idx = torch.randperm(H, generator=torch.Generator().manual_seed(seed))[:num_channels]
    else:
        raise ValueError(f"how must be 'activation' or 'random', got {how!r}")
    return idx.sort().values


def norm_factors(obs, channels) -> dict[str, float]:
    """Per residual norm, sqrt(mean over the kept ``channels`` of ``obs.norm_energy``): on average how
    much a norm's denominator grows when only those channels are left (>1 when they carry more than
    their share of the energy, as activation-ranked channels do; about 1 for a random choice).

    Raises:
        ValueError: an observation without the norms' statistics (saved before they existed, or made
            with ``observe(layers=...)``).
    """
    if not obs.norm_energy:
        raise ValueError("this observation holds no residual-norm statistics (an older file, or observe(layers=...)); "
                         "observe the whole model again (moelab.observe.observe), or slice with rescale=False")
    idx = torch.as_tensor(channels, dtype=torch.long)
    return {name: float(e[idx].mean().sqrt()) for name, e in obs.norm_energy.items()}


def slice_width(model, obs, keep_ratio: float, how: str = "activation", seed: int = 0, rescale: bool = True):
    """A copy of ``model`` keeping ``keep_ratio`` of its hidden channels everywhere (embeddings, norms,
    attention, router, experts, head; ``models.slice_hidden``).

    A norm over fewer channels divides by their root mean square alone. Channels kept for their large
    activations carry more than their share of it, so every norm output would shrink, which random
    channels escape: with ``rescale`` each norm's output is multiplied back by ``norm_factors`` from
    the calibration pass, so the kept channels see, on average, the values they had in the full model. The paper does not say whether it rescales.

    Returns:
        (sliced copy, kept channel indices).
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
    H = model.config.hidden_size
    idx = keep_channels(obs, max(1, int(round(H * keep_ratio))), how, seed)
    factors = norm_factors(obs, idx) if rescale else None
    out = models.variant(model)
    models.slice_hidden(out, idx)
    if factors:
        models.scale_norm_outputs(out, factors)
    return out, idx
