"""How alike the experts of the zoo's models are: trained from scratch against upcycled.

For each model (zoo names, built on first use, or checkpoints): one calibration pass over an equal
general:math:code mix (``data.calibration_set``, calib split), then per MoE layer the measures of
``moelab.similarity.layer_report`` (weight-matching cosine after and before neuron alignment, the share
of a dropped expert's segments above DERN's alpha = 0.6 against the kept experts at 50%, routing
specialisation), and the model's held-out bits per byte per domain (``zoo.build_metrics``).

    python benchmarks/similarity.py [--models qwen3-moe-15m qwen3-moe-15m-upcycled] [--tokens 32768]

Writes ``benchmarks/results/similarity.json`` and a Markdown table beside it (``.md``), and puts the
same table into README.md between its ``similarity`` markers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moelab import data, io, observe, similarity, zoo  # noqa: E402

MARKERS = ("<!-- similarity:begin (benchmarks/similarity.py writes this) -->", "<!-- similarity:end -->")
MEASURES = [("aligned_cosine", "aligned cosine, mean over pairs"), ("aligned_cosine_best", "aligned cosine, best partner"),
            ("plain_cosine", "cosine without alignment"), ("segment_share", "segments above alpha 0.6"),
            ("main_domain_share", "main-domain share of tokens")]


def model_rows(name: str, tokens: int, seq_len: int, seed: int) -> dict:
    model, tok = zoo.load(name)
    calib = data.calibration_set(tok, "1:1:1", tokens=tokens, seq_len=seq_len, seed=seed)
    obs = observe.observe(model, calib, progress=False, outputs=False, cosines=False)
    rows = similarity.layer_report(model, obs)
    metrics = zoo.build_metrics(name)
    return {"model": name, "recipe_key": metrics.get("recipe_key"), "layers": rows,
            "bits_per_byte": {d: metrics["eval"][d]["bits_per_byte"] for d in data.DOMAINS},
            "dense_bits_per_byte": ({d: v["bits_per_byte"] for d, v in metrics["dense_eval"].items()}
                                    if "dense_eval" in metrics else None)}


def markdown(results: list[dict]) -> str:
    lines = ["| model | layer | " + " | ".join(label for _, label in MEASURES) + " |",
             "|---|---|" + "---|" * len(MEASURES)]
    for r in results:
        for row in r["layers"]:
            lines.append(f"| {r['model']} | {row['layer']} | " + " | ".join(f"{row[k]:.3f}" for k, _ in MEASURES) + " |")
        mean = {k: sum(row[k] for row in r["layers"]) / len(r["layers"]) for k, _ in MEASURES}
        lines.append(f"| **{r['model']}** | **mean** | " + " | ".join(f"**{mean[k]:.3f}**" for k, _ in MEASURES) + " |")
    lines += ["", "| model | held-out bits per byte, " + " / ".join(data.DOMAINS) + " | its dense model before upcycling |",
              "|---|---|---|"]
    for r in results:
        bpb = " / ".join(f"{r['bits_per_byte'][d]:.3f}" for d in data.DOMAINS)
        dense = "-" if not r["dense_bits_per_byte"] else " / ".join(f"{r['dense_bits_per_byte'][d]:.3f}"
                                                                    for d in data.DOMAINS)
        lines.append(f"| {r['model']} (`{r['recipe_key']}`) | {bpb} | {dense} |")
    return "\n".join(lines) + "\n"


def update_readme(table: str, readme: Path = ROOT / "README.md") -> bool:
    """Replace the README's block between the similarity markers by ``table``; False if it has none."""
    text = readme.read_text()
    pattern = re.compile(re.escape(MARKERS[0]) + r".*?" + re.escape(MARKERS[1]), re.S)
    if not pattern.search(text):
        return False
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(pattern.sub(lambda _: f"{MARKERS[0]}\n{table}{MARKERS[1]}", text))
    os.replace(tmp, readme)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["qwen3-moe-15m", "qwen3-moe-15m-upcycled"])
    ap.add_argument("--tokens", type=int, default=32_768, help="calibration tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/similarity.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = [model_rows(m, args.tokens, args.seq_len, args.seed) for m in args.models]
    out = Path(args.out)
    io.write_json_atomic(out, {"models": results, "calibration": {"mix": "1:1:1", "tokens": args.tokens,
                                                                   "seq_len": args.seq_len, "seed": args.seed},
                               "packages": io.package_versions(), "revision": io.git_revision(ROOT)})
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    if out.resolve().parent == (ROOT / "benchmarks/results").resolve():
        print("README updated" if update_readme(table) else "README has no similarity markers")
    print(table)


if __name__ == "__main__":
    main()
