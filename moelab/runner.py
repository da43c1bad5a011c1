"""Batch-run the notebooks with papermill: ``python -m moelab.runner --preset full|smoke [--notebook STEM]``.

Each notebook has one parameter file per preset, ``notebooks/params/<stem>.<preset>.yaml``. The
runner injects those values plus absolute output paths (``OUTPUT_DIR``, ``FIGURES_DIR``), writes the
executed copies under ``runs/<preset>/notebooks/``, each notebook's outputs under
``runs/<preset>/<stem>/``, figures under ``figures/`` (full) or ``runs/<preset>/figures/`` (other
presets, so a test run never replaces the published figures), and a markdown summary of every
notebook's recorded metrics in ``runs/<preset>/SUMMARY.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PRESETS = ("full", "smoke")


def notebooks(only: str | None = None) -> list[Path]:
    """The notebooks to run, in order (``only`` picks one by stem or file name)."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        stem = Path(only).stem
        found = [p for p in found if p.stem == stem or p.stem.startswith(stem + "_") or p.stem.startswith(stem)]
        if not found:
            raise SystemExit(f"no notebook matches {only!r}; choose one of: "
                             + ", ".join(p.stem for p in sorted(NOTEBOOKS.glob('[0-9][0-9]_*.ipynb'))))
    return found


def parameters(nb: Path, preset: str) -> dict:
    """The preset's parameter values for one notebook (an empty file means the notebook's defaults)."""
    import yaml

    path = NOTEBOOKS / "params" / f"{nb.stem}.{preset}.yaml"
    if not path.exists():
        raise SystemExit(f"{nb.name} has no {preset!r} parameter file; create {path.relative_to(ROOT)}")
    return yaml.safe_load(path.read_text()) or {}


def run(preset: str = "full", only: str | None = None, out_root: Path | None = None, progress: bool = True) -> Path:
    """Execute notebooks with papermill and write the summary; returns the run directory.

    Raises:
        papermill.PapermillExecutionError: a notebook failed (its executed copy shows where).
    """
    import papermill as pm

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {PRESETS}")
    out_root = (out_root or ROOT / "runs" / preset).resolve()
    executed = out_root / "notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    figures = ROOT / "figures" if preset == "full" else out_root / "figures"
    todo = notebooks(only)
    if preset == "full":
        # Build the embedded model up front, with its progress bar in this terminal, not in a notebook.
        from . import zoo

        print(f"embedded model: {zoo.build(zoo.DEFAULT_MODEL)}", flush=True)
    timings = {}
    for nb in todo:
        params = dict(parameters(nb, preset))
        params.update(OUTPUT_DIR=str(out_root / nb.stem), FIGURES_DIR=str(figures))
        print(f"== {nb.name} ({preset})", flush=True)
        t0 = time.time()
        pm.execute_notebook(str(nb), str(executed / nb.name), parameters=params, cwd=str(NOTEBOOKS),
                            progress_bar=progress, kernel_name="python3", log_output=False)
        timings[nb.stem] = time.time() - t0
        print(f"   done in {timings[nb.stem]:.0f} s", flush=True)
    # The summary covers every notebook with a recorded result in this run directory, not only the
    # ones run now, so running one notebook alone keeps the others' figures in the page.
    summary = write_summary(out_root, [nb.stem for nb in notebooks()], timings)
    print(f"summary: {summary}")
    return out_root


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(out_root: Path, stems: list[str], timings: dict | None = None) -> Path:
    """A markdown page with each notebook's headline metrics (the ``headline`` dict it recorded)."""
    lines = [f"# Run summary ({out_root.name})", ""]
    for stem in stems:
        path = out_root / stem / "metrics.json"
        lines.append(f"## {stem}")
        if not path.exists():
            lines += ["", "not run in this run directory yet", ""]
            continue
        rec = json.loads(path.read_text())
        head = rec.get("metrics", {}).get("headline") or {
            k: v for k, v in rec.get("metrics", {}).items() if isinstance(v, (int, float, str))}
        lines += ["", f"revision `{rec.get('git_revision')}`, seed {rec.get('seed')}"
                  + (f", {timings[stem]:.0f} s" if timings and stem in timings else ""), "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in head.items()]
        lines.append("")
    path = out_root / "SUMMARY.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", choices=PRESETS, help="parameter set (default: full)")
    ap.add_argument("--notebook", default=None, help="run only this notebook (stem, e.g. 00_anatomy_of_an_moe or 00)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    run(args.preset, args.notebook, Path(args.out) if args.out else None, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
