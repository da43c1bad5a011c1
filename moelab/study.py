"""The papers' headline comparisons, run the same way on many models: the claims matrix.

A verdict on one model can be the model's, not the method's. This module runs each paper's headline
comparisons (``CLAIMS``) on a list of models (zoo names with seeds, e.g. ``qwen3-moe-15m@seed1``, or
checkpoints), one model at a time and one variant alive at a time, each judged by ``claims.judge`` on
paired held-out bits per byte. ``matrix`` then counts, per claim and kind of model (trained from scratch
or upcycled, ``moelab.upcycle``), on how many models it holds.

Per model: one calibration pass over an equal general:math:code mix (``observe``), the variants the
claims name (``VARIANTS``) built at ``reduction`` of each layer's experts, each scored on the same
held-out rows, and the expert-similarity summary of ``moelab.similarity``.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable

from . import claims, compress, data, evaluate, models, observe, prune, similarity, zoo


@dataclass
class Context:
    """What a variant is built from: the model, its observation, its calibration set."""

    model: object
    obs: object
    calib: object
    seed: int

    def experts(self, reduction: float) -> int:
        """Experts kept per layer at ``reduction`` (a share removed), never below top_k."""
        layer = models.moe_layers(self.model)[0]
        return max(layer.top_k, round(layer.num_experts * (1 - reduction)))


def _ream(c: Context, r: float):
    return compress.ream_model(c.model, c.calib, c.experts(r), C=16, saliency="reap", use_router=True, align="ream",
                               sequential=True, seed=c.seed)[0]


def _msmoe(c: Context, r: float, adaptive: bool):
    return compress.msmoe_model(c.model, c.obs, compress.msmoe_total(c.model, r), adaptive=adaptive,
                                similarity="router_logit", align="weights")[0]


def _same_experts_pruned(c: Context, r: float):
    """M-SMoE's adaptive choice of dominant experts, the others dropped instead of merged."""
    groups, freq = compress.msmoe_groups(c.model, c.obs, compress.msmoe_total(c.model, r))
    return compress.merge_model(c.model, {l: [[g[0]] for g in gs] for l, gs in groups.items()}, freq)


def _depth(c: Context, how: str):
    return prune.remove_layers(c.model, c.obs, 1, how)[0]


# name -> builder(context). Names say the method and the share of experts removed.
VARIANTS: dict[str, Callable[[Context], object]] = {
    **{f"REAP {p}%": (lambda c, r=p / 100: prune.prune(c.model, c.obs, "reap", num_experts=c.experts(r))[0])
       for p in (25, 50)},
    **{f"REAM {p}%": (lambda c, r=p / 100: _ream(c, r)) for p in (25, 50)},
    **{f"M-SMoE uniform {p}%": (lambda c, r=p / 100: _msmoe(c, r, adaptive=False)) for p in (25, 50)},
    "M-SMoE 50%": lambda c: _msmoe(c, 0.5, adaptive=True),
    "M-SMoE's experts pruned 50%": lambda c: _same_experts_pruned(c, 0.5),
    "DERN 50%": lambda c: compress.dern_model(c.model, c.obs, c.experts(0.5), alpha=0.6, use_gate=False,
                                              init="max_gate", weighted=True, seed=c.seed)[0],
    "NAEE 50%": lambda c: compress.naee_model(c.model, c.obs, c.experts(0.5))[0],
    "frequency pruning 50%": lambda c: prune.prune(c.model, c.obs, "frequency", num_experts=c.experts(0.5))[0],
    "partial preservation 50%": lambda c: compress.partial_preservation_model(c.model, c.obs, c.experts(0.5), 0.5)[0],
    "plain merging 50%": lambda c: compress.partial_preservation_model(c.model, c.obs, c.experts(0.5), 0.0)[0],
    "remove the last layer": lambda c: _depth(c, "last"),
    "remove the most input-like layer": lambda c: _depth(c, "similar"),
}

_C = claims.Claim
# (paper, claim): each a paired "better" test on held-out bits per byte.
CLAIMS: list[tuple[str, claims.Claim]] = [
    *[("REAM", _C(f"REAM beats REAP pruning at {p}%", "REAM > REAP on Qwen3 MoEs", f"REAM {p}%", f"REAP {p}%"))
      for p in (25, 50)],
    *[("REAM", _C(f"REAM beats M-SMoE at {p}%", "REAM > M-SMoE", f"REAM {p}%", f"M-SMoE uniform {p}%"))
      for p in (25, 50)],
    ("DERN", _C("DERN beats NAEE at 50%", "DERN > NAEE", "DERN 50%", "NAEE 50%")),
    ("DERN", _C("DERN beats frequency pruning at 50%", "DERN > frequency", "DERN 50%", "frequency pruning 50%")),
    ("MC-SMoE", _C("merging beats pruning the same experts", "M-SMoE > pruning", "M-SMoE 50%",
                   "M-SMoE's experts pruned 50%")),
    ("MC-SMoE", _C("adaptive counts beat uniform counts", "adaptive > uniform", "M-SMoE 50%", "M-SMoE uniform 50%")),
    ("SlimQwen", _C("partial preservation beats plain merging", "p = 1/2 > p = 0", "partial preservation 50%",
                    "plain merging 50%")),
    ("SlimQwen", _C("partial preservation beats pruning", "p = 1/2 > p = 1", "partial preservation 50%",
                    "frequency pruning 50%")),
    ("SlimQwen", _C("removing the last layer beats removing the most input-like one", "last > similar",
                    "remove the last layer", "remove the most input-like layer")),
]


def model_kind(name: str) -> str:
    """``"upcycled"`` for a zoo recipe with a dense phase, ``"from scratch"`` for another zoo recipe,
    ``"checkpoint"`` for anything else."""
    if not zoo.is_zoo_name(name):
        return "checkpoint"
    return "upcycled" if zoo.parse_name(name)[1].dense_steps else "from scratch"


def run_model(name: str, *, calib_tokens: int, eval_tokens: int, seq_len: int, seed: int = 0,
              claim_list=None, progress: bool = True) -> dict:
    """Every claim of ``claim_list`` (default ``CLAIMS``) on one model.

    Args:
        name: a zoo name (``"<recipe>@seed<N>"`` for a seed) or a checkpoint.
        calib_tokens: calibration tokens (equal mix of the three domains, calib split).
        eval_tokens: held-out tokens per domain each variant is scored on.
        seq_len: row length of both.
        seed: seeds calibration, evaluation and the methods' own draws.

    Returns:
        {"model", "kind", "rows": [judged claim rows with "paper"], "similarity": per-layer mean of
        ``similarity.layer_report``, "bits_per_byte": the original's, "seconds"}.
    """
    from tqdm.auto import tqdm

    claim_list = CLAIMS if claim_list is None else claim_list
    needed = sorted({v for _, c in claim_list for v in (c.a, c.b)})
    unknown = [v for v in needed if v not in VARIANTS]
    if unknown:
        raise ValueError(f"claims name variants the study cannot build: {unknown}; known: {sorted(VARIANTS)}")
    t0 = time.time()
    model, tok = zoo.load(name)
    calib = data.calibration_set(tok, "1:1:1", tokens=calib_tokens, seq_len=seq_len, seed=seed)
    obs = observe.observe(model, calib, progress=False, seed=seed)
    ctx = Context(model, obs, calib, seed)
    tasks = evaluate.notebook_tasks(("ppl",), ppl_tokens=eval_tokens, seq_len=seq_len, mc_n=0, seed=seed)
    tables = {"original": evaluate.evaluate(model, tok, tasks, progress=False)}
    for v in tqdm(needed, desc=f"variants of {name}", disable=not progress):
        variant = VARIANTS[v](ctx)
        tables[v] = evaluate.evaluate(variant, tok, tasks, progress=False)
        del variant  # one variant alive at a time
        gc.collect()
    layers = similarity.layer_report(model, obs)
    summary = {k: sum(r[k] for r in layers) / len(layers) for k in layers[0] if k != "layer"}
    rows = [{"paper": paper, **claims.judge(c, tables)} for paper, c in claim_list]
    return {"model": name, "kind": model_kind(name), "rows": rows, "similarity": summary,
            "bits_per_byte": evaluate.summary_score(tables["original"])["bits_per_byte"],
            "seconds": time.time() - t0}


def matrix(results: list[dict]):
    """Claim x model kind: on how many of the kind's models each verdict came out.

    Returns:
        a DataFrame with paper, claim, kind, ``holds`` (k), ``opposite holds``, ``cannot tell``,
        ``does not hold`` and ``models`` (n), and ``holds on`` as "k of n".
    """
    import pandas as pd

    long = pd.DataFrame([{**row, "kind": r["kind"], "model": r["model"]} for r in results for row in r["rows"]])
    out = []
    for (paper, claim, kind), g in long.groupby(["paper", "claim", "kind"], sort=False):
        counts = g.verdict.value_counts()
        out.append({"paper": paper, "claim": claim, "kind": kind, "models": len(g),
                    **{v: int(counts.get(v, 0)) for v in claims.VERDICTS},
                    "holds on": f"{int(counts.get('holds', 0))} of {len(g)}",
                    "mean advantage": float(g.advantage.mean()),
                    "mean z": float(g.z.replace([math.inf, -math.inf], float("nan")).mean())})
    return pd.DataFrame(out)


def effects(results: list[dict]):
    """One row per (claim, model): the advantage and its interval (± 2 paired SE), for the figure."""
    import pandas as pd

    return pd.DataFrame([{"paper": row["paper"], "claim": row["claim"], "model": r["model"], "kind": r["kind"],
                          "advantage": row["advantage"], "lo": row["advantage"] - 2 * row["stderr"],
                          "hi": row["advantage"] + 2 * row["stderr"], "verdict": row["verdict"]}
                         for r in results for row in r["rows"]])
