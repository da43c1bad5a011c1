"""The claims matrix: the papers' headline comparisons on models trained from scratch and upcycled.

Runs ``moelab.study.run_model`` on each model, one after the other (zoo models are built first, on
first use), and writes the per-model rows, the matrix (claim x kind of model: holds on k of n) and the
effect figure.

    python benchmarks/claims_matrix.py [--models qwen3-moe-15m qwen3-moe-15m-upcycled ...]
        [--calib-tokens 32768] [--eval-tokens 16384] [--seq-len 256] [--out benchmarks/results/claims_matrix.json]

Writes the JSON, and beside it a Markdown page (``.md``) and the figure (``.png``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moelab import io, plots, study, zoo  # noqa: E402

DEFAULT_MODELS = [f"{r}@seed{s}" for r in ("qwen3-moe-15m", "qwen3-moe-15m-upcycled") for s in (0, 1, 2)]


def markdown(results: list[dict], mat) -> str:
    mat = mat.rename(columns={"holds on": "holds_on", "opposite holds": "opposite", "does not hold": "does_not",
                              "cannot tell": "cannot", "mean advantage": "mean_advantage"})
    lines = ["| paper | claim | kind | holds on | opposite holds | does not hold | cannot tell | mean advantage (bpb) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in mat.itertuples():
        lines.append(f"| {r.paper} | {r.claim} | {r.kind} | {r.holds_on} | {r.opposite} | {r.does_not} | {r.cannot} | "
                     f"{r.mean_advantage:+.4f} |")
    lines += ["", "| model | kind | original bpb | aligned cosine (best partner) | segments above alpha 0.6 | "
              "main-domain share | seconds |", "|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["similarity"]
        lines.append(f"| {r['model']} | {r['kind']} | {r['bits_per_byte']:.4f} | {s['aligned_cosine_best']:.3f} | "
                     f"{s['segment_share']:.3f} | {s['main_domain_share']:.3f} | {r['seconds']:.0f} |")
    lines += ["", "| model | claim | verdict | our figure |", "|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['model']} | {row['claim']} | {row['verdict']} | {row['our figure']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--calib-tokens", type=int, default=32_768)
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens per domain")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/claims_matrix.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    for name in args.models:  # builds first, so a failed build stops before any study time is spent
        if zoo.is_zoo_name(name):
            zoo.build(name)
    results = []
    for name in args.models:
        results.append(study.run_model(name, calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens,
                                       seq_len=args.seq_len, seed=args.seed))
        print(f"{name}: {results[-1]['seconds']:.0f} s", flush=True)
    mat = study.matrix(results)
    out = Path(args.out)
    io.write_json_atomic(out, {"models": results, "matrix": mat.to_dict("records"),
                               "settings": {k: v for k, v in vars(args).items() if k != "out"},
                               "packages": io.package_versions(), "revision": io.git_revision(ROOT)})
    out.with_suffix(".md").write_text(markdown(results, mat))
    plots.style()
    plots.save(plots.claim_effects(study.effects(results)), out.stem, out.parent)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
