"""A paper's claims judged on our figures, with one rule for every notebook.

A claim compares two variants scored on the same units (perplexity rows, MC items, GEN prompts) by
``evaluate.evaluate``. The comparison is paired (``evaluate.paired_difference``): the difference is taken
unit by unit, so what the units share (hard text is hard for both) drops out of its standard error.
Let ``adv`` be the advantage of ``a`` over ``b`` in the metric's good direction (for bits per byte,
b - a; for accuracy and exact match, a - b), ``se`` its paired standard error and ``z`` the threshold
(2 by default). Three tests:

* ``"better"``: a is better than b. **holds** when adv > z se; **opposite holds** when adv < -z se;
  **does not hold** when |adv| + z se <= margin (the interval excludes any advantage larger than the
  margin; two identical variants, se = 0, land here with margin 0); otherwise **cannot tell**.
* ``"not_worse"``: a is at most ``margin`` worse than b. **holds** when adv - z se >= -margin;
  **does not hold** when adv + z se < -margin; otherwise **cannot tell**.
* ``"equivalent"``: a stays within ``margin`` of b either way. **holds** when |adv| + z se <= margin;
  **does not hold** when |adv| - z se > margin; otherwise **cannot tell**.

A margin is stated in the metric's own units on our scale, never taken from a paper's other scale.
A claim whose variants are missing, or whose metric carries no signal (``informative``), is
**cannot tell**, with the reason in its figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from . import evaluate

__all__ = ["VERDICTS", "Claim", "judge", "table", "observed", "trend", "informative"]

VERDICTS = ("holds", "does not hold", "opposite holds", "cannot tell")
_LOWER_IS_BETTER = {"bits_per_byte": True, "mc_acc": False, "gen_em": False}
_TESTS = ("better", "not_worse", "equivalent")


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: "``a`` <test> ``b`` on ``metric``".

    Attributes:
        claim: the claim in words, as the paper makes it.
        paper_figure: the paper's own number(s) for it.
        a, b: the names of the two variants compared (keys of the scores given to ``judge``).
        metric: ``"bits_per_byte"``, ``"mc_acc"`` or ``"gen_em"`` (``evaluate.paired_difference``).
        test: ``"better"``, ``"not_worse"`` or ``"equivalent"`` (module docstring).
        margin: the margin of ``not_worse`` / ``equivalent`` (and of "does not hold" for ``better``),
            in the metric's units.
        z: standard errors a difference must exceed.
    """

    claim: str
    paper_figure: str
    a: str
    b: str
    metric: str = "bits_per_byte"
    test: str = "better"
    margin: float = 0.0
    z: float = 2.0

    def __post_init__(self):
        if self.metric not in _LOWER_IS_BETTER:
            raise ValueError(f"claim {self.claim!r}: metric must be one of {sorted(_LOWER_IS_BETTER)}, got {self.metric!r}")
        if self.test not in _TESTS:
            raise ValueError(f"claim {self.claim!r}: test must be one of {_TESTS}, got {self.test!r}")
        if not (math.isfinite(self.margin) and self.margin >= 0) or not self.z > 0:
            raise ValueError(f"claim {self.claim!r}: margin must be finite and >= 0 and z > 0")


def _verdict(test: str, adv: float, se: float, margin: float, z: float) -> str:
    lo, hi = adv - z * se, adv + z * se
    if test == "better":
        if lo > 0:
            return "holds"
        if hi < 0:
            return "opposite holds"
        return "does not hold" if max(abs(lo), abs(hi)) <= margin else "cannot tell"
    if test == "not_worse":
        if lo >= -margin:
            return "holds"
        return "does not hold" if hi < -margin else "cannot tell"
    if max(abs(lo), abs(hi)) <= margin:  # equivalent
        return "holds"
    return "does not hold" if min(abs(lo), abs(hi)) > margin and lo * hi > 0 else "cannot tell"


def _mean(frames, metric: str) -> float:
    frames = frames if isinstance(frames, (list, tuple)) else [frames]
    return float(sum(evaluate.summary_score(f)[metric] for f in frames) / len(frames))


def judge(claim: Claim, scores: Mapping[str, object], *, signal: Mapping[str, str] | None = None) -> dict:
    """Judge one claim on the scored variants.

    Args:
        claim: the claim.
        scores: {variant name: table from ``evaluate.evaluate`` (or a list of them, one per seed)}.
        signal: {metric: reason} for metrics that carry no signal in this run (``informative``); a
            claim on such a metric is "cannot tell" with the reason.

    Returns:
        {"claim", "paper figure", "our figure", "test", "a", "b", "metric", "advantage", "stderr", "z",
        "z if units were independent", "n", "documents", "verdict"}: ``advantage`` is a's advantage over b
        in the metric's good direction; ``stderr`` and ``z`` cluster units by document
        (``evaluate.paired_difference``), the other z shows what treating them as independent would claim.
    """
    row = {"claim": claim.claim, "paper figure": claim.paper_figure, "test": _describe(claim), "a": claim.a,
           "b": claim.b, "metric": claim.metric, "advantage": float("nan"), "stderr": float("nan"),
           "z": float("nan"), "z if units were independent": float("nan"), "n": 0, "documents": 0}
    missing = [v for v in (claim.a, claim.b) if v not in scores]
    if missing:
        return {**row, "our figure": f"not measured in this run ({', '.join(missing)})", "verdict": "cannot tell"}
    if signal and claim.metric in signal:
        return {**row, "our figure": signal[claim.metric], "verdict": "cannot tell"}
    d = evaluate.paired_difference(scores[claim.a], scores[claim.b], claim.metric)
    sign = -1.0 if _LOWER_IS_BETTER[claim.metric] else 1.0
    adv, se = sign * d["diff"], d["stderr"]
    if not math.isfinite(se):
        return {**row, "our figure": "no standard error (fewer than two units)", "verdict": "cannot tell"}
    va, vb = _mean(scores[claim.a], claim.metric), _mean(scores[claim.b], claim.metric)
    z = adv / se if se > 0 else (0.0 if adv == 0 else math.copysign(math.inf, adv))
    figure = (f"{claim.metric} {va:.4f} ({claim.a}) vs {vb:.4f} ({claim.b}); advantage {adv:+.4f} "
              f"± {se:.4f} paired (z {z:+.1f}, {d['n']} units in {d['clusters']} documents)")
    return {**row, "our figure": figure, "advantage": adv, "stderr": se, "z": float(z),
            "z if units were independent": sign * d["z_independent"], "n": d["n"], "documents": d["clusters"],
            "verdict": _verdict(claim.test, adv, se, claim.margin, claim.z)}


def _describe(claim: Claim) -> str:
    good = "lower" if _LOWER_IS_BETTER[claim.metric] else "higher"
    if claim.test == "better":
        return f"{claim.metric} ({good} is better) of {claim.a} beyond {claim.z:g} paired SE of {claim.b}'s"
    if claim.test == "not_worse":
        return f"{claim.a} at most {claim.margin:g} worse than {claim.b} on {claim.metric} ({claim.z:g} SE)"
    return f"{claim.a} within ±{claim.margin:g} of {claim.b} on {claim.metric} ({claim.z:g} SE)"


def observed(claim: str, paper_figure: str, our_figure: str, holds: bool | None, test: str) -> dict:
    """A claim judged on a measurement other than a paired score (a rank, a time ratio, a size), in the
    same row form as ``judge``: ``holds`` True / False / None (cannot tell), ``test`` says the rule."""
    verdict = "cannot tell" if holds is None else ("holds" if holds else "does not hold")
    return {"claim": claim, "paper figure": paper_figure, "our figure": our_figure, "test": test, "verdict": verdict}


def trend(claim: str, paper_figure: str, x, y, *, direction: int, x_name: str, y_name: str,
          alpha: float = 0.05, no_signal: str | None = None) -> dict:
    """A claim that ``y`` rises (``direction=+1``) or falls (``-1``) with ``x`` across runs (a sweep),
    judged by Pearson's r and its two-sided p-value (``evaluate.correlation``): **holds** when p < alpha
    with r of the claimed sign, **opposite holds** when p < alpha with the other sign, **cannot tell**
    otherwise (also when r is undefined because a sample is constant, and when ``no_signal`` gives the
    reason ``y`` carries no signal, as ``informative`` does). Same row form as ``judge``."""
    if direction not in (-1, 1):
        raise ValueError(f"claim {claim!r}: direction must be +1 (rises) or -1 (falls), got {direction!r}")
    c = evaluate.correlation(x, y)
    r, p, n = c["r"], c["p"], c["n"]
    rule = f"Pearson r of {y_name} on {x_name} over {n} runs, {'> 0' if direction > 0 else '< 0'} with p < {alpha:g}"
    row = {"claim": claim, "paper figure": paper_figure, "test": rule, "metric": y_name, "advantage": r,
           "z": float("nan"), "n": n, "p": p}
    if no_signal:
        return {**row, "our figure": no_signal, "verdict": "cannot tell"}
    if not math.isfinite(r):
        return {**row, "our figure": f"r undefined ({y_name} or {x_name} is constant over the {n} runs)",
                "verdict": "cannot tell"}
    verdict = "cannot tell" if not p < alpha else ("holds" if r * direction > 0 else "opposite holds")
    return {**row, "our figure": f"r = {r:+.2f} (p {p:.2g}, {n} runs)", "verdict": verdict}


def informative(original_scores, metric: str, chance: float, z: float = 2.0) -> str | None:
    """None when the original model scores ``metric`` clearly above ``chance`` (beyond ``z`` standard
    errors of its mean), else the reason a claim on it cannot be judged (for ``judge(signal=...)``)."""
    s = evaluate.summary_score(original_scores)
    value, se = s[metric], s[f"{metric}_stderr"]
    if not math.isfinite(value):
        return f"{metric} was not measured"
    if value - z * se > chance:
        return None
    return (f"the original scores {metric} {value:.3f} ± {se:.3f}, not clearly above chance ({chance:g}): "
            "the metric carries no signal here")


def table(claims: Sequence[Claim | dict], scores: Mapping[str, object], *, signal: Mapping[str, str] | None = None):
    """A DataFrame with one judged row per claim (``Claim`` rows judged here, ``observed`` and ``trend``
    rows as given)."""
    import pandas as pd

    rows = [c if isinstance(c, dict) else judge(c, scores, signal=signal) for c in claims]
    cols = ["claim", "paper figure", "our figure", "verdict", "test"]
    df = pd.DataFrame(rows)
    return df[cols + [c for c in df.columns if c not in cols]]
