"""The papers' headline comparisons, run the same way on many models: the claims matrix.

A verdict on one model can be the model's, not the method's. This module runs each paper's headline
comparisons (``CLAIMS``) on a list of models (zoo names with seeds, e.g. ``qwen3-moe-15m@seed1``, or
checkpoints), one model at a time and one variant alive at a time, each judged by ``claims.judge`` on
paired held-out bits per byte. ``matrix`` then counts, per claim and kind of model (trained from scratch
or upcycled, ``moelab.upcycle``), on how many models it holds.

Per model: one calibration pass over an equal general:math:code mix (``observe``), the variants the
claims name (``VARIANTS``) built at ``reduction`` of each layer's experts, each scored on the same
held-out rows (and MC items, when the run scores MC), and the expert-similarity summary of
``moelab.similarity``. ``models_to_study`` lists the models of a run (a recipe at each seed), ``reading``
says in words which claims replicate on which kind of model. Notebook 05 is the study's front end.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

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


KINDS = ("from scratch", "upcycled")  # the kinds a checkpoint can be declared as (a zoo recipe knows its own)


def models_to_study(scratch, upcycled, seeds, extra=None) -> list[tuple[str, str]]:
    """The models of a study and their kinds, in order: ``scratch`` then ``upcycled`` at each of ``seeds``,
    then ``extra``.

    Args:
        scratch: a model trained from scratch: a zoo recipe (studied at every seed of ``seeds``), a zoo
            name with its seed (``"qwen3-moe-15m@seed1"``: that model alone) or a checkpoint (one model:
            a checkpoint has no seeds to vary), or None.
        upcycled: the same for a model upcycled from a dense one, or None.
        seeds: model seeds (whole numbers >= 0).
        extra: {name: kind} of further models (each one model as named; kind one of ``KINDS``).

    Returns:
        [(name, kind)]: zoo names canonical (``zoo.parse_name``), each kind the recipe's own for a zoo
        model (so a recipe named in the wrong slot is still counted right) and the slot's for a checkpoint.

    Raises:
        ValueError: no model at all, a seed that is no whole number >= 0, an unknown kind, or one model twice.
    """
    seeds = list(seeds or [])
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"SEEDS={seeds!r}: give a non-empty list of whole numbers >= 0, e.g. [0, 1, 2]")
    out = []
    slots = [(scratch, "from scratch", True), (upcycled, "upcycled", True),
             *((n, k, False) for n, k in dict(extra or {}).items())]
    for name, slot, seeded in slots:
        if name is None:
            continue
        if slot not in KINDS:
            raise ValueError(f"model {name!r}: kind {slot!r} is none of {KINDS}; say how it was trained")
        name = str(name)
        if not zoo.is_zoo_name(name):
            out.append((name, slot))
        elif "@seed" in name or not seeded:
            out.append((zoo.parse_name(name)[0], model_kind(name)))
        else:
            out += [(zoo.parse_name(name, seed=s)[0], model_kind(name)) for s in seeds]
    if not out:
        raise ValueError("no model to study: give MODEL, UPCYCLED_MODEL or EXTRA_MODELS")
    names = [n for n, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{twice} would be studied twice; name each model once (seeds: SEEDS)")
    return out


def build_models(models_and_kinds, progress: bool = True):
    """Build the zoo models of a study before any of it runs (a failed build then costs no study time),
    and tabulate what their builds recorded (``zoo.build_metrics``).

    Args:
        models_and_kinds: ``models_to_study``'s list.

    Returns:
        a DataFrame, one row per model: model, kind, cache key, held-out bits per byte per domain (and of
        the dense model before upcycling), build seconds; a checkpoint's row has its name and kind only.
    """
    import pandas as pd

    rows = []
    for name, kind in models_and_kinds:
        row = {"model": name, "kind": kind}
        if zoo.is_zoo_name(name):
            zoo.build(name, progress=progress)
            m = zoo.build_metrics(name)
            row["key"] = m["recipe_key"]
            row.update({f"bits per byte, {d}": m["eval"][d]["bits_per_byte"] for d in data.DOMAINS})
            if "dense_eval" in m:
                row.update({f"dense model's, {d}": m["dense_eval"][d]["bits_per_byte"] for d in data.DOMAINS})
            row["build seconds"] = m.get("build_seconds")
        rows.append(row)
    return pd.DataFrame(rows)


def run_model(name: str, *, calib_tokens: int, eval_tokens: int, seq_len: int, calib_seq_len: int | None = None,
              seed: int = 0, kind: str | None = None, mc_n: int = 0, lm_eval=(), lm_eval_limit: int | None = None,
              device_map=None, dtype=None, claim_list=None, progress: bool = True) -> dict:
    """Every claim of ``claim_list`` (default ``CLAIMS``) on one model.

    Args:
        name: a zoo name (``"<recipe>@seed<N>"`` for a seed) or a checkpoint.
        calib_tokens: calibration tokens (equal mix of the three domains, calib split).
        eval_tokens: held-out tokens per domain each variant is scored on.
        seq_len: row length of the held-out rows (and of the calibration rows unless ``calib_seq_len``).
        seed: seeds calibration, evaluation and the methods' own draws.
        kind: the model's kind (default ``model_kind(name)``).
        mc_n, lm_eval, lm_eval_limit: MC items per domain and lm-evaluation-harness tasks scored too
            (``evaluate.notebook_tasks``); with any, every claim is judged on ``mc_acc`` as well, a
            "cannot tell" where the original does not score MC clearly above chance (4-way items: 0.25).
        device_map, dtype: how the model loads (``zoo.load``).

    Returns:
        {"model", "kind", "rows": [judged claim rows with "paper"], "similarity": per-layer mean of
        ``similarity.layer_report``, "bits_per_byte" (and "mc_acc" when scored): the original's, "seconds"}.
    """
    from tqdm.auto import tqdm

    claim_list = CLAIMS if claim_list is None else claim_list
    needed = sorted({v for _, c in claim_list for v in (c.a, c.b)})
    unknown = [v for v in needed if v not in VARIANTS]
    if unknown:
        raise ValueError(f"claims name variants the study cannot build: {unknown}; known: {sorted(VARIANTS)}")
    t0 = time.time()
    model, tok = zoo.load(name, device_map=device_map, dtype=dtype)
    calib = data.calibration_set(tok, "1:1:1", tokens=calib_tokens, seq_len=calib_seq_len or seq_len, seed=seed)
    obs = observe.observe(model, calib, progress=False, seed=seed)
    ctx = Context(model, obs, calib, seed)
    kinds = ("ppl", "mc") if mc_n else ("ppl",)
    tasks = evaluate.notebook_tasks(kinds, ppl_tokens=eval_tokens, seq_len=seq_len, mc_n=mc_n, seed=seed,
                                    lm_eval=lm_eval, lm_eval_limit=lm_eval_limit)
    tables = {"original": evaluate.evaluate(model, tok, tasks, progress=False)}
    for v in tqdm(needed, desc=f"variants of {name}", disable=not progress):
        variant = VARIANTS[v](ctx)
        tables[v] = evaluate.evaluate(variant, tok, tasks, progress=False)
        del variant  # one variant alive at a time
        gc.collect()
    layers = similarity.layer_report(model, obs)
    summary = {k: sum(r[k] for r in layers) / len(layers) for k in layers[0] if k != "layer"}
    original = evaluate.summary_score(tables["original"])
    judged = list(claim_list)
    signal = {}
    if original["mc_tasks"]:  # MC scored: the same comparisons on the papers' kind of metric
        judged += [(paper, replace(c, metric="mc_acc")) for paper, c in claim_list]
        signal = {m: why for m in ("mc_acc",) if (why := claims.informative(tables["original"], m, 0.25))}
    rows = [{"paper": paper, **claims.judge(c, tables, signal=signal)} for paper, c in judged]
    del model, obs, ctx, tables  # the next model of a study loads into this one's memory
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"model": name, "kind": kind or model_kind(name), "rows": rows, "similarity": summary,
            "bits_per_byte": original["bits_per_byte"],
            **({"mc_acc": original["mc_acc"]} if original["mc_tasks"] else {}), "seconds": time.time() - t0}


def matrix(results: list[dict]):
    """Claim x model kind: on how many of the kind's models each verdict came out.

    Returns:
        a DataFrame with paper, claim, metric, kind, ``holds`` (k), ``opposite holds``, ``cannot tell``,
        ``does not hold`` and ``models`` (n), ``holds on`` as "k of n", and the mean advantage and z.
    """
    import pandas as pd

    long = pd.DataFrame([{**row, "kind": r["kind"], "model": r["model"]} for r in results for row in r["rows"]])
    out = []
    for (paper, claim, metric, kind), g in long.groupby(["paper", "claim", "metric", "kind"], sort=False):
        counts = g.verdict.value_counts()
        out.append({"paper": paper, "claim": claim, "metric": metric, "kind": kind, "models": len(g),
                    **{v: int(counts.get(v, 0)) for v in claims.VERDICTS},
                    "holds on": f"{int(counts.get('holds', 0))} of {len(g)}",
                    "mean advantage": float(g.advantage.mean()),
                    "mean z": float(g.z.replace([math.inf, -math.inf], float("nan")).mean())})
    return pd.DataFrame(out)


def effects(results: list[dict], metric: str = "bits_per_byte"):
    """One row per (claim, model) on ``metric``: the advantage and its interval (± 2 paired SE), for the
    figure (``plots.claim_effects``)."""
    import pandas as pd

    return pd.DataFrame([{"paper": row["paper"], "claim": row["claim"], "model": r["model"], "kind": r["kind"],
                          "advantage": row["advantage"], "lo": row["advantage"] - 2 * row["stderr"],
                          "hi": row["advantage"] + 2 * row["stderr"], "verdict": row["verdict"]}
                         for r in results for row in r["rows"] if row["metric"] == metric])


SIMILARITY_COLUMNS = {  # similarity.layer_report key -> what the model table calls it
    "aligned_cosine": "aligned cosine, mean over pairs",
    "aligned_cosine_best": "aligned cosine, best partner",
    "plain_cosine": "cosine without alignment",
    "segment_share": "segments above alpha 0.6",
    "main_domain_share": "main-domain share of tokens",
}


def model_table(results: list[dict]):
    """One row per model: its kind, the original's held-out bits per byte (and MC accuracy when scored),
    the expert-similarity means over its MoE layers (``SIMILARITY_COLUMNS``) and the study's seconds."""
    import pandas as pd

    rows = []
    for r in results:
        sim = {label: r["similarity"][k] for k, label in SIMILARITY_COLUMNS.items() if k in r["similarity"]}
        rows.append({"model": r["model"], "kind": r["kind"], "original bits per byte": r["bits_per_byte"],
                     **({"original MC accuracy": r["mc_acc"]} if "mc_acc" in r else {}), **sim,
                     "seconds": r["seconds"]})
    return pd.DataFrame(rows)


def _kind_word(row) -> str:
    """One kind's verdicts on a claim in a word: all or most hold, the opposite on all or most, or
    unclear (no majority either way)."""
    n, k, opp = row["models"], row["holds"], row["opposite holds"]
    if k == n:
        return "holds"
    if opp == n:
        return "opposite"
    if 2 * k > n:
        return "mostly holds"
    if 2 * opp > n:
        return "mostly opposite"
    return "unclear"


READINGS = {
    "replicates": "holds on every kind of model",
    "fails": "the opposite holds on every kind of model",
    "depends": "holds on some kinds of model only",
    "opposite on some": "the opposite holds on some kinds, no clear verdict on the others",
    "unsettled": "no clear verdict on any kind",
}


def reading(mat):
    """Which claims replicate on which kind of model. Per claim and metric of ``matrix``, each kind's
    verdicts in a word (``_kind_word``: holds, mostly holds, opposite, mostly opposite, unclear) and one
    of ``READINGS``: the claim holds on all or most models of every kind, the opposite does on every
    kind, it holds on some kinds only, the opposite holds on some kinds while the others are unclear, or
    no kind has a majority either way.

    Returns:
        a DataFrame: paper, claim, metric, one column per kind ("k of n (word)"), reading.
    """
    import pandas as pd

    kinds = list(dict.fromkeys(mat["kind"]))
    out = []
    for (paper, claim, metric), g in mat.groupby(["paper", "claim", "metric"], sort=False):
        rows = {row["kind"]: row for row in g.to_dict("records")}
        words = {k: _kind_word(row) for k, row in rows.items()}
        held = [w in ("holds", "mostly holds") for w in words.values()]
        against = [w in ("opposite", "mostly opposite") for w in words.values()]
        verdict = ("replicates" if all(held) else "fails" if all(against) else "depends" if any(held)
                   else "opposite on some" if any(against) else "unsettled")
        out.append({"paper": paper, "claim": claim, "metric": metric,
                    **{k: f"{rows[k]['holds on']} ({words[k]})" if k in rows else "not studied" for k in kinds},
                    "reading": READINGS[verdict]})
    return pd.DataFrame(out)


def reading_markdown(read) -> str:
    """``reading`` in words: one bullet per reading that occurs, naming its claims (and the metric where
    it is not bits per byte) with each kind's count."""
    kinds = [c for c in read.columns if c not in ("paper", "claim", "metric", "reading")]
    lines = []
    for label in READINGS.values():
        sub = read[read.reading == label]
        if sub.empty:
            continue
        lines.append(f"- **{label[0].upper() + label[1:]}** ({len(sub)} of {len(read)}):")
        for r in sub.to_dict("records"):
            metric = "" if r["metric"] == "bits_per_byte" else f" (on {r['metric']})"
            counts = "; ".join(f"{k}: {r[k]}" for k in kinds)
            lines.append(f"  - {r['paper']}: {r['claim']}{metric}: {counts}")
    return "\n".join(lines) + "\n"


def claims_table():
    """``CLAIMS`` as a table: paper, claim, the paper's figure, and the two variants compared (a vs b)."""
    import pandas as pd

    return pd.DataFrame([{"paper": p, "claim": c.claim, "paper figure": c.paper_figure, "a": c.a, "b": c.b}
                         for p, c in CLAIMS])


def verdicts(results: list[dict], metric: str = "bits_per_byte"):
    """Claim x model: each model's verdict on each claim (on ``metric``), models in study order."""
    import pandas as pd

    long = pd.DataFrame([{"paper": row["paper"], "claim": row["claim"], "model": f"{r['model']} ({r['kind']})",
                          "verdict": row["verdict"]} for r in results for row in r["rows"] if row["metric"] == metric])
    wide = long.pivot(index=["paper", "claim"], columns="model", values="verdict")
    order = list(dict.fromkeys(long["claim"]))
    return wide[list(dict.fromkeys(long["model"]))].reset_index().set_index("claim").loc[order].reset_index()


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def headline(results: list[dict], mat) -> dict:
    """The study in scalars (a notebook's ``headline``): models per kind, each kind's mean original bits
    per byte and expert similarity, and per claim on bits per byte and kind the models it holds on."""
    out: dict = {"models": len(results)}
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    for kind in kinds:
        mine = [r for r in results if r["kind"] == kind]
        k = _slug(kind)
        out[f"models_{k}"] = len(mine)
        out[f"original_bpb_{k}"] = sum(r["bits_per_byte"] for r in mine) / len(mine)
        for key in ("aligned_cosine_best", "segment_share", "main_domain_share"):
            out[f"{key}_{k}"] = sum(r["similarity"][key] for r in mine) / len(mine)
    for row in mat[mat.metric == "bits_per_byte"].to_dict("records"):
        out[f"holds_{_slug(row['claim'])}_{_slug(row['kind'])}"] = row["holds"]
    out["study_seconds"] = sum(r["seconds"] for r in results)
    return out


def report_markdown(results: list[dict], mat) -> str:
    """The study as a Markdown page (what notebook 05 writes beside its metrics, for a README or a
    report): the matrix, the models with their expert similarity, and every model's verdicts."""
    kinds = list(dict.fromkeys(mat["kind"]))
    lines = ["| paper | claim | metric | " + " | ".join(f"{k}: holds on" for k in kinds) + " | reading |",
             "|---|---|---|" + "---|" * len(kinds) + "---|"]
    for r in reading(mat).to_dict("records"):
        lines.append(f"| {r['paper']} | {r['claim']} | {r['metric']} | " + " | ".join(r[k] for k in kinds)
                     + f" | {r['reading']} |")
    table = model_table(results)
    cols = [c for c in table.columns if c != "model"]
    lines += ["", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in table.to_dict("records"):
        lines.append(f"| {r['model']} | " + " | ".join(
            f"{r[c]:.0f}" if c == "seconds" else f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    lines += ["", "| model | claim | metric | verdict | our figure |", "|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['model']} | {row['claim']} | {row['metric']} | {row['verdict']} | {row['our figure']} |")
    return "\n".join(lines) + "\n"
