"""Per-layer expert counts outside moelab: the round-trip table of every family.

For each family in ``moelab.models.FAMILIES``, in float32 and in bf16: a tiny random-init model whose
MoE layers keep different expert counts (``models.tiny_nonuniform_model``, the shape of an adaptive
MC-SMoE model) is saved by ``io.save_checkpoint``, then loaded in a fresh Python process in which
``import moelab`` fails (``io.load_outside_moelab``): plain ``from_pretrained`` (refused or not) and
``from_pretrained(trust_remote_code=True)``, whose logits are compared with those of moelab's own
loader (``models.load_model``, same dtype) and, in float32, of the saved model in memory. The
checkpoint's bytes are compared with the same model saved before any layer lost experts. A bf16
checkpoint is the float32 model saved in bf16 (``save_checkpoint(dtype=...)``).

    python benchmarks/nonuniform.py [--out benchmarks/results/nonuniform_roundtrip.json]

Writes the JSON and a Markdown table beside it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moelab import io, models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/nonuniform_roundtrip.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    rows, saved, logits = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            for family in models.FAMILIES:
                model = models.tiny_nonuniform_model(family)
                name = f"{family}-{str(dtype).replace('torch.', '')}"
                original = io.save_checkpoint(models.tiny_model(family), Path(tmp) / f"{name}-uniform", dtype=dtype)
                path = io.save_checkpoint(model, Path(tmp) / name, dtype=dtype)
                with torch.no_grad():
                    mine = models.load_model(path)  # moelab's own loader, in the checkpoint's dtype
                    logits[str(path)] = (mine(input_ids=ids).logits.float(),
                                         model(input_ids=ids).logits.float() if dtype == torch.float32 else None)
                counts = models.expert_counts(model)
                saved[str(path)] = {"family": family, "dtype": str(dtype).replace("torch.", ""),
                                    "experts_per_layer": [counts[i] for i in sorted(counts)],
                                    "bytes": io.checkpoint_bytes(path), "uniform_bytes": io.checkpoint_bytes(original)}
        found = io.load_outside_moelab(list(saved), ids)
        for path, row in saved.items():
            got, (loaded, in_memory) = found[path], logits[path]
            refused = got["plain"].startswith("refused") and "trust_remote_code=True" in got["plain"]
            rows.append({**row, "plain_from_pretrained": "refused, asking for trust_remote_code=True" if refused
                         else got["plain"][:200],
                         "trust_remote_code_class": got["class"].rsplit(".", 1)[-1],
                         "max_logit_diff_vs_moelab_load": float((got["logits"] - loaded).abs().max()),
                         "max_logit_diff_vs_saved_model": None if in_memory is None
                         else float((got["logits"] - in_memory).abs().max())})
    out = Path(args.out)
    io.write_json_atomic(out, {"rows": rows, "packages": io.package_versions(), "revision": io.git_revision(ROOT)})
    lines = ["| family | dtype | experts per layer | plain `from_pretrained` | `trust_remote_code=True` loads "
             "| max \\|logit diff\\| vs moelab's loader | vs the saved model | bytes (same model, 8 experts everywhere) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_saved = "-" if r["max_logit_diff_vs_saved_model"] is None else f"{r['max_logit_diff_vs_saved_model']:.2g}"
        lines.append(f"| {r['family']} | {r['dtype']} | {r['experts_per_layer']} | {r['plain_from_pretrained']} | "
                     f"{r['trust_remote_code_class']} | {r['max_logit_diff_vs_moelab_load']:.2g} | {vs_saved} | "
                     f"{r['bytes']:,} ({r['uniform_bytes']:,}) |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
