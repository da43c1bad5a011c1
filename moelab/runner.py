"""Batch-run the notebooks with papermill.

    python -m moelab.runner [--preset full|smoke|paper] [--notebook STEM ...]
                            [-p NAME=VALUE ...] [--params FILE.yaml] [--out DIR]

A run without ``--notebook`` executes every notebook but those in ``ON_REQUEST`` (05, the claims matrix
across models: `make study`). Each notebook has one parameter file per preset,
``notebooks/params/<stem>.<preset>.yaml``: ``full`` runs the meaningful experiment on the embedded
model, ``smoke`` the same notebook in about a minute (tests), ``paper`` the paper's own model and
budgets (a hub checkpoint on a GPU; see the README). On top of the preset come the values of
``--params FILE.yaml`` and then of each ``-p NAME=VALUE`` (VALUE is read as YAML: ``-p DTYPE=bfloat16``,
``-p SEEDS=[0,1]``, ``-p DEVICE_MAP=null``). A name
that no selected notebook declares in its parameters cell is refused; a notebook is handed only the
names it declares.

Where a run writes: the executed copies under ``<run>/notebooks/``, each notebook's outputs under
``<run>/<stem>/``, a markdown summary in ``<run>/SUMMARY.md`` and the parameters in ``<run>/run.json``.
``<run>`` is ``runs/<preset>`` for a preset as it is, ``runs/<preset>-<hash of the overrides>`` when
any parameter was overridden (``--out`` picks it). Figures go to the published ``figures/`` only for
the full preset as it is (the embedded default); every other run writes them to ``<run>/figures/``.
That published run also copies each executed notebook that succeeded to ``executed/`` (committed, so
the results can be read without running; ``tests/test_notebooks.py`` checks that their code is the
sources') and its summary to ``executed/SUMMARY.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = ROOT / "executed"  # the published run's executed notebooks (committed)
PRESETS = ("full", "smoke", "classroom", "paper")
PUBLISHED_PRESET = "full"  # the one preset whose unmodified run writes the committed figures/
# Notebooks a run of "all notebooks" leaves out: they run when named (`make study` runs 05, the claims
# matrix over six models, about 85 minutes with its builds on a fresh machine).
ON_REQUEST = ("05_claims_across_models",)
_RUNNER_SET = ("OUTPUT_DIR", "FIGURES_DIR")  # parameters the runner sets itself
KERNEL = "moelab"  # the Jupyter kernel `make env` registers in the venv (the notebooks' kernelspec)


def kernel_name() -> str:
    """The kernel to execute notebooks with: moelab's own when it is registered (``make env``), else
    ``python3``, which Jupyter resolves to the interpreter running this (a venv set up by hand)."""
    from jupyter_client.kernelspec import find_kernel_specs

    return KERNEL if KERNEL in find_kernel_specs() else "python3"


def notebooks(only=None) -> list[Path]:
    """The notebooks to run, in order (``only``: a stem, its number such as "02", a file name, or a list
    of them; None: all). A number must be whole: "0" matches no notebook rather than all of them."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not only:
        return found
    picks = [only] if isinstance(only, (str, Path)) else list(only)
    chosen = []
    for pick in picks:
        stem = Path(str(pick)).stem
        match = [p for p in found if stem in (p.stem, p.stem.split("_")[0])]
        if not match:
            raise SystemExit(f"no notebook matches {pick!r}; choose one of: " + ", ".join(p.stem for p in found))
        chosen += [p for p in match if p not in chosen]
    return [p for p in found if p in chosen]


def selected(only=None) -> list[Path]:
    """The notebooks a run executes: those ``only`` names (``notebooks``), or without it every notebook
    but the ``ON_REQUEST`` ones."""
    return notebooks(only) if only else [nb for nb in notebooks() if nb.stem not in ON_REQUEST]


def parameters(nb: Path, preset: str) -> dict:
    """The preset's parameter values for one notebook (an empty file means the notebook's defaults)."""
    import yaml

    path = NOTEBOOKS / "params" / f"{nb.stem}.{preset}.yaml"
    if not path.exists():
        raise SystemExit(f"{nb.name} has no {preset!r} parameter file; create {path.relative_to(ROOT)}")
    return yaml.safe_load(path.read_text()) or {}


def declared(nb: Path) -> dict:
    """The parameters a notebook declares in its ``parameters`` cell: {name: default value}.

    Read with ``ast`` (``parameter_names``), not papermill's inspector, which skips a line whose comment
    holds an ``=`` (``LORA_RANK = 16  # ... when RECOVERY_TRAINABLE = "lora"``) and would refuse it."""
    import ast

    out = {}
    for name, node in _parameter_nodes(nb):
        try:
            out[name] = ast.literal_eval(node)
        except (ValueError, SyntaxError):
            out[name] = ast.unparse(node)
    return out


def _parameter_nodes(nb) -> list:
    import ast

    path = Path(nb) if str(nb).endswith(".ipynb") else NOTEBOOKS / f"{nb}.ipynb"
    cells = [c for c in json.loads(path.read_text())["cells"]
             if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name} has {len(cells)} cells tagged 'parameters'; it needs exactly one")
    src = cells[0]["source"]
    nodes = {}
    for node in ast.parse("".join(src) if isinstance(src, list) else src).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                nodes[t.id] = node.value
    return list(nodes.items())


def parameter_names(nb) -> list[str]:
    """The names assigned in a notebook's ``parameters`` cell, in order (``ast``; no papermill, so a
    notebook can call it wherever it runs). ``nb``: a path, or a stem under ``notebooks/``."""
    return [name for name, _ in _parameter_nodes(nb)]


def parameter_values(nb, namespace: dict) -> dict:
    """{name: value} of the notebook's parameters (``parameter_names``) as ``namespace`` holds them now,
    without the paths the runner sets: what a notebook records beside its metrics, ``io.record(...,
    parameters=runner.parameter_values("02_ream", globals()))``."""
    names = parameter_names(nb)
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ValueError(f"parameters {missing} of {nb} are not defined here; run the parameters cell first")
    return {n: namespace[n] for n in names if n not in _RUNNER_SET}


def _type_ok(value, default) -> bool:
    """Whether an override fits a parameter whose default is ``default`` (None accepts anything)."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def parse_assignments(items) -> dict:
    """``["NAME=VALUE", ...]`` -> {NAME: value}, each VALUE read as YAML.

    Raises:
        SystemExit: an item without ``=`` or with an empty name.
    """
    import yaml

    out = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise SystemExit(f"-p takes NAME=VALUE (e.g. -p DTYPE=bfloat16), got {item!r}")
        out[name] = yaml.safe_load(value) if value.strip() else ""
    return out


def read_params_file(path) -> dict:
    """A YAML mapping of parameter values (``--params``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"no parameter file at {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"{path} must hold a mapping NAME: value, got {type(values).__name__}")
    return values


def check_overrides(books: list[Path], overrides: dict) -> None:
    """Refuse a parameter that none of ``books`` declares (a typo would otherwise be ignored)."""
    names = set()
    for nb in books:
        defaults = declared(nb)
        names |= set(defaults)
        for k, v in overrides.items():
            if k in defaults and not _type_ok(v, defaults[k]):
                raise SystemExit(f"parameter {k}={v!r} ({type(v).__name__}) does not fit {nb.stem}, whose default is "
                                 f"{defaults[k]!r} ({type(defaults[k]).__name__}); give a {type(defaults[k]).__name__}")
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise SystemExit(f"unknown parameter(s) {unknown} for {', '.join(nb.stem for nb in books)}; "
                         f"known: {sorted(names - set(_RUNNER_SET))}")
    runner_set = sorted(set(overrides) & set(_RUNNER_SET))
    if runner_set:
        raise SystemExit(f"{runner_set} are set by the runner from the run directory; use --out instead")


def run_dir(preset: str, overrides: dict) -> Path:
    """``runs/<preset>``, or ``runs/<preset>-<hash>`` for a run with overridden parameters."""
    if not overrides:
        return ROOT / "runs" / preset
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return ROOT / "runs" / f"{preset}-{digest}"


class NotebookFailed(RuntimeError):
    """One or more notebooks failed; the message names them and their executed copies."""


def _absolute_cache_env() -> None:
    """Make a relative ``MOELAB_CACHE`` absolute: the kernels run in ``notebooks/``, and would otherwise
    read and write a second cache under it instead of the one the caller named."""
    import os

    root = os.environ.get("MOELAB_CACHE")
    if root and not Path(root).expanduser().is_absolute():
        os.environ["MOELAB_CACHE"] = str(Path(root).expanduser().resolve())


def run(preset: str = "full", only=None, out_root: Path | None = None, progress: bool = True,
        overrides: dict | None = None, stop_on_error: bool = False) -> Path:
    """Execute notebooks with papermill and write the summary; returns the run directory.

    Args:
        preset: one of PRESETS (the parameter files).
        only: a notebook stem or a list of them (default all).
        out_root: the run directory (default ``run_dir(preset, overrides)``).
        overrides: parameter values on top of the preset's ({NAME: value}).
        stop_on_error: stop at the first failing notebook (default: run the others, then raise).

    Raises:
        SystemExit: an unknown preset, notebook or parameter, or one of the wrong type.
        NotebookFailed: a notebook failed (after the summary, which marks it, is written); the message
            names the executed copy that shows where.
    """
    import papermill as pm

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {PRESETS}")
    overrides = dict(overrides or {})
    _absolute_cache_env()
    todo = selected(only)
    if not only:
        print(f"   not run unless named (--notebook): {', '.join(ON_REQUEST)}", flush=True)
    check_overrides(todo, overrides)
    out_root = Path(out_root or run_dir(preset, overrides)).resolve()
    published = preset == PUBLISHED_PRESET and not overrides
    figures = ROOT / "figures" if published else out_root / "figures"
    executed = out_root / "notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    plan = {}
    for nb in todo:
        names = declared(nb)
        params = {k: v for k, v in {**parameters(nb, preset), **overrides}.items() if k in names}
        for k in _RUNNER_SET:
            if k in names:
                params[k] = str(out_root / nb.stem) if k == "OUTPUT_DIR" else str(figures)
        skipped = sorted(set(overrides) - set(names))
        if skipped:
            print(f"   {nb.stem} declares no {skipped}: not passed to it", flush=True)
        plan[nb] = params
    _build_zoo_models({p.get("MODEL", declared(nb).get("MODEL")) for nb, p in plan.items()})
    from . import io

    io.write_json_atomic(out_root / "run.json", {"preset": preset, "overrides": overrides, "published": published,
                                                 "figures": str(figures), "git_revision": io.git_revision(),
                                                 "notebooks": {nb.stem: p for nb, p in plan.items()}})
    timings, failed, kernel = {}, {}, kernel_name()
    for nb, params in plan.items():
        print(f"== {nb.name} ({preset}{', ' + ', '.join(f'{k}={v}' for k, v in overrides.items()) if overrides else ''})",
              flush=True)
        t0 = time.time()
        try:
            pm.execute_notebook(str(nb), str(executed / nb.name), parameters=params, cwd=str(NOTEBOOKS),
                                progress_bar=progress, kernel_name=kernel, log_output=False)
        except pm.PapermillExecutionError as err:
            failed[nb.stem] = f"{err.ename}: {err.evalue} (cell {err.exec_count}; see {executed / nb.name})"
            print(f"   FAILED after {time.time() - t0:.0f} s: {failed[nb.stem]}", flush=True)
            if stop_on_error:
                break
            continue
        finally:
            timings[nb.stem] = time.time() - t0
        print(f"   done in {timings[nb.stem]:.0f} s", flush=True)
        if published:
            publish_executed(executed / nb.name)
    # The summary covers every notebook with a recorded result in this run directory, not only the
    # ones run now, so running one notebook alone keeps the others' figures in the page.
    summary = write_summary(out_root, [nb.stem for nb in notebooks()], timings, failed)
    print(f"summary: {summary}")
    if published:
        publish_summary(summary)
    if failed:
        raise NotebookFailed("notebook(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return out_root


NOT_RUN = "not run in this run directory yet"


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """A summary page split into its head and its sections by notebook stem (``## stem`` and body)."""
    head, out, stem = "", {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            stem = line[3:].strip()
            out[stem] = ""
        if stem is None:
            head += line
        else:
            out[stem] += line
    return head, out


def publish_summary(summary: Path) -> Path:
    """Publish a run's summary to ``executed/SUMMARY.md``, keeping the published sections of the
    notebooks this run directory holds no result for: a run of one notebook on a fresh clone updates
    its own section, and the others stay as their executed copies are."""
    import os

    target = EXECUTED / "SUMMARY.md"
    _, old = _sections(target.read_text()) if target.exists() else ("", {})
    head, new = _sections(Path(summary).read_text())
    keep = lambda stem, body: stem in old and NOT_RUN in body and NOT_RUN not in old[stem]
    body = [(old[stem] if keep(stem, part) else part).rstrip("\n") + "\n" for stem, part in new.items()]
    EXECUTED.mkdir(exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(head + "\n".join(body))
    os.replace(tmp, target)
    return target


def publish_executed(path: Path) -> Path:
    """Copy a file of the published run into ``executed/`` (temporary name, then rename)."""
    import os
    import shutil

    EXECUTED.mkdir(exist_ok=True)
    target = EXECUTED / Path(path).name
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.copyfile(path, tmp)
    os.replace(tmp, target)
    return target


def _build_zoo_models(names) -> None:
    """Build the zoo models a run uses up front, with their progress bars here, not inside a notebook."""
    from . import zoo

    for name in sorted(n for n in names if isinstance(n, str)):
        name = name.strip('"\'')
        if zoo.is_zoo_name(name):
            print(f"zoo model {name}: {zoo.build(name)}", flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(out_root: Path, stems: list[str], timings: dict | None = None, failed: dict | None = None) -> Path:
    """A markdown page with each notebook's headline metrics (the ``headline`` dict it recorded);
    a notebook that failed in this run is marked so, with its error."""
    lines = [f"# Run summary ({out_root.name})", ""]
    for stem in stems:
        path = out_root / stem / "metrics.json"
        lines.append(f"## {stem}")
        if failed and stem in failed:
            lines += ["", f"**FAILED** in this run: {failed[stem]}", ""]
            continue
        if not path.exists():
            lines += ["", NOT_RUN, ""]
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
    ap = argparse.ArgumentParser(prog="python -m moelab.runner", description="Batch-run moelab's notebooks.",
                                 epilog="example: python -m moelab.runner --notebook 02 -p MODEL=Qwen/Qwen3-30B-A3B "
                                        "-p DTYPE=bfloat16 -p DEVICE_MAP=auto")
    ap.add_argument("--preset", default="full", choices=PRESETS, help="parameter set (default: full)")
    ap.add_argument("--notebook", action="append", default=None,
                    help="run only this notebook (stem or its number, e.g. 02); repeat for several; "
                         f"without it, every notebook but {', '.join(ON_REQUEST)}")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                    help="override one parameter (VALUE is YAML); repeatable")
    ap.add_argument("--params", default=None, metavar="FILE.yaml", help="override parameters from a YAML mapping")
    ap.add_argument("--out", default=None, help="run directory (default runs/<preset>[-<hash of overrides>])")
    ap.add_argument("--stop-on-error", action="store_true", help="stop at the first failing notebook")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    overrides = {**(read_params_file(args.params) if args.params else {}), **parse_assignments(args.param)}
    try:
        run(args.preset, args.notebook, Path(args.out) if args.out else None, progress=not args.no_progress,
            overrides=overrides, stop_on_error=args.stop_on_error)
    except NotebookFailed as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
