"""Every notebook runs end to end with its smoke parameters (papermill), and records finite metrics.

The executed copies land in runs/smoke/notebooks/, where `make test` then runs nbval on them (the
injected smoke parameters are part of the copy, so nbval re-executes the same quick run)."""

import json
import math

import nbformat
import pytest

from moelab import runner

NOTEBOOKS = runner.notebooks()


def _finite(x):
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


def _recorded(path) -> dict:
    """A notebook's metrics.json, checked: a non-empty headline of finite numbers."""
    rec = json.loads(path.read_text())
    head = rec["metrics"]["headline"]
    assert head and all(isinstance(v, (int, float)) and math.isfinite(v) for v in head.values()), head
    return rec


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke_run(nb):
    out = runner.run("smoke", only=nb.stem, progress=False)
    rec = _recorded(out / nb.stem / "metrics.json")
    assert _finite(rec["metrics"])
    assert rec["seed"] is not None and rec["versions"]["torch"]
    figures = list((out / "figures").glob(f"{nb.stem[:2]}_*.png"))
    assert figures, "the notebook wrote no figure"
    executed = nbformat.read(out / "notebooks" / nb.name, as_version=4)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_shape_and_output_policy(nb):
    """The notebook template: title, one parameters cell after the imports holding literals only,
    numbered sections, "What we found" and deviations; committed without outputs."""
    book = nbformat.read(nb, as_version=4)
    cells = book.cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters`"
    params = cells[tagged[0]]
    assert "import" in cells[tagged[0] - 1].source
    for line in params.source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, rest = line.partition("=")
            value = rest.split("  #")[0].strip()
            compile(value, "<param>", "eval")
            assert "(" not in value or value.startswith(("(", "[")), f"parameters must be literals: {line}"
            assert "  # " in line, f"every parameter has a comment saying what it means: {line}"
    names = [line.partition("=")[0].strip() for line in params.source.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert names[:2] == ["MODEL", "SEED"], f"the parameters start with MODEL and SEED: {names[:2]}"
    assert names[-4:] == ["DEVICE_MAP", "DTYPE", "OUTPUT_DIR", "FIGURES_DIR"], names[-4:]
    assert {"CALIB_TOKENS", "CALIB_SEQ_LEN", "EVAL_PPL_TOKENS", "EVAL_SEQ_LEN", "EVAL_MC_N", "LM_EVAL_TASKS",
            "LM_EVAL_LIMIT"} <= set(names)
    seeds = [n for n in names if "SEED" in n]
    assert set(seeds) <= {"SEED", "SEEDS"}, f"seeds are SEED (the run's) and SEEDS (a list of absolute seeds): {seeds}"
    headings = [line for c in cells if c.cell_type == "markdown" for line in c.source.splitlines()
                if line.startswith("## ")]
    numbered = [int(h[3:].split(".")[0]) for h in headings if h[3:4].isdigit()]
    assert numbered == list(range(1, len(numbered) + 1)), f"sections are numbered 1, 2, ...: {numbered}"
    closing = [h for h in headings if not h[3:4].isdigit()]
    assert headings[len(numbered) - 1].startswith(f"## {len(numbered)}. Record the result"), headings
    assert len(closing) == 3 and closing[0] == "## What we found" and closing[1].startswith("## Deviations") \
        and closing[2] == "## Try this", f"the closing sections: What we found, Deviations, Try this: {closing}"
    assert headings[-3:] == closing, "the closing sections come last"
    exercises = "\n".join(c.source for c in cells[[i for i, c in enumerate(cells) if "## Try this" in c.source][0]:])
    assert 2 <= exercises.count("<details>") == exercises.count("</details>") <= 3, "2-3 exercises, each with a solution"
    figures = [i for i, c in enumerate(cells) if c.cell_type == "code" and "plots.save(" in c.source]
    assert all(cells[i + 1].source.startswith("**What to look at.**") for i in figures), "every figure says what to look at"
    for c in cells:
        if c.cell_type == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, "commit notebooks without outputs"
    for preset in runner.PRESETS:
        runner.parameters(nb, preset)  # a parameter file exists for every preset


def _code_cells(nb, skip_injected=False):
    return [c.source for c in nb.cells if c.cell_type == "code"
            and not (skip_injected and "injected-parameters" in c.get("metadata", {}).get("tags", []))]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_executed_copy_is_committed_and_matches_its_source(nb):
    """The published run's executed copy (executed/, written by the full preset as it is) is in the
    repository, ran to the end, and holds exactly the source's code: an edited notebook needs
    `make reproduce` again before it lands."""
    copy = runner.EXECUTED / nb.name
    how = "make study" if nb.stem in runner.ON_REQUEST else f"make reproduce NB={nb.stem[:2]}"
    assert copy.is_file(), f"{copy} is missing: run `{how}` (the full preset) and commit executed/"
    ran = nbformat.read(copy, as_version=4)
    src = nbformat.read(nb, as_version=4)
    assert _code_cells(ran, skip_injected=True) == _code_cells(src), (
        f"{copy} was executed from other code than {nb}: run `{how}` and commit it")
    assert ran.metadata.get("papermill", {}).get("exception") in (None, False), f"{copy} stopped on an error"
    assert all(c.get("execution_count") for c in ran.cells if c.cell_type == "code"), f"{copy} did not run every cell"


def test_only_the_published_run_writes_executed_copies(tmp_path, monkeypatch):
    """publish_executed copies atomically into executed/; runs with other presets or overrides never call it
    (the smoke runs above leave executed/ as committed)."""
    monkeypatch.setattr(runner, "EXECUTED", tmp_path / "executed")
    src = tmp_path / "x.ipynb"
    src.write_text("{}")
    out = runner.publish_executed(src)
    assert out == tmp_path / "executed" / "x.ipynb" and out.read_text() == "{}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.ipynb"]


def test_notebooks_name_moelab_s_kernel_and_the_runner_falls_back(monkeypatch):
    """The sources ask for the kernel `make env` registers (not `python3`, which would shadow a user's
    default); the runner uses it when registered and the running interpreter's otherwise."""
    import jupyter_client.kernelspec as ks

    for nb in NOTEBOOKS:
        spec = nbformat.read(nb, as_version=4).metadata.get("kernelspec", {})
        assert spec.get("name") == runner.KERNEL and "moelab" in spec.get("display_name", ""), nb.name
    monkeypatch.setattr(ks, "find_kernel_specs", lambda: {"python3": "/x", runner.KERNEL: "/y"})
    assert runner.kernel_name() == runner.KERNEL
    monkeypatch.setattr(ks, "find_kernel_specs", lambda: {"python3": "/x"})
    assert runner.kernel_name() == "python3"


def test_published_summary_keeps_the_sections_of_notebooks_not_run(tmp_path, monkeypatch):
    """A published run of one notebook replaces its own section of executed/SUMMARY.md and keeps the
    others' (their executed copies are unchanged); a section never published stays 'not run'."""
    monkeypatch.setattr(runner, "EXECUTED", tmp_path / "executed")
    run = tmp_path / "run"
    for stem, value in (("00_a", 1.0), ("01_b", 2.0)):
        (run / stem).mkdir(parents=True)
        (run / stem / "metrics.json").write_text(json.dumps({"metrics": {"headline": {"x": value}}, "seed": 0}))
    runner.publish_summary(runner.write_summary(run, ["00_a", "01_b", "02_c"]))
    first = (tmp_path / "executed" / "SUMMARY.md").read_text()
    assert "| x | 1 |" in first and "| x | 2 |" in first and first.count(runner.NOT_RUN) == 1
    (run / "00_a" / "metrics.json").unlink()
    (run / "01_b" / "metrics.json").write_text(json.dumps({"metrics": {"headline": {"x": 3.0}}, "seed": 0}))
    runner.publish_summary(runner.write_summary(run, ["00_a", "01_b", "02_c"]))
    second = (tmp_path / "executed" / "SUMMARY.md").read_text()
    assert "| x | 1 |" in second and "| x | 3 |" in second and "| x | 2 |" not in second
    assert second.count(runner.NOT_RUN) == 1 and second.index("## 00_a") < second.index("## 01_b") < second.index("## 02_c")
    assert sorted(p.name for p in (tmp_path / "executed").iterdir()) == ["SUMMARY.md"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_parameter_values_are_the_parameters_cell(nb):
    """What a notebook records as its parameters is read from its parameters cell (the names papermill
    sees, in order), not retyped; the runner's paths are left out and a missing name is refused."""
    names = runner.parameter_names(nb.stem)
    assert names == list(runner.declared(nb))
    cell = next(c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    by_line = [l.split("=")[0].strip() for l in cell.source.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert names == by_line  # every line, also one whose comment holds an "=" (papermill's inspector skips those)
    runner.check_overrides([nb], {n: v for n, v in runner.declared(nb).items() if v is not None and n not in ("OUTPUT_DIR", "FIGURES_DIR")})
    namespace = {n: i for i, n in enumerate(names)}
    values = runner.parameter_values(nb.stem, namespace)
    assert list(values) == [n for n in names if n not in ("OUTPUT_DIR", "FIGURES_DIR")]
    assert "MODEL" in values and "SEED" in values
    del namespace["SEED"]
    with pytest.raises(ValueError, match="SEED"):
        runner.parameter_values(nb.stem, namespace)


def test_a_relative_cache_is_made_absolute_before_the_kernels_start(tmp_path, monkeypatch):
    """Kernels run in notebooks/: a relative MOELAB_CACHE must name the caller's folder, not one under it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOELAB_CACHE", "rel/cache")
    runner._absolute_cache_env()
    import os

    assert os.environ["MOELAB_CACHE"] == str(tmp_path / "rel" / "cache")
    runner._absolute_cache_env()  # an absolute one is left as it is
    assert os.environ["MOELAB_CACHE"] == str(tmp_path / "rel" / "cache")


def _digests(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


@pytest.mark.notebook
def test_a_notebook_scores_the_lm_eval_tasks_its_parameters_name(tmp_path, monkeypatch):
    """LM_EVAL_TASKS adds lm-evaluation-harness tasks to a notebook's evaluation; offline, a task file of
    one's own (the paper presets name the papers' benchmarks, which need the hub)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from conftest import write_mc_task

    task = write_mc_task(tmp_path, "local_word_order", [
        {"context": "The cat sat on the", "choices": [" mat.", " the on."], "label": 0},
        {"context": "Two plus two equals", "choices": [" four.", " two equals."], "label": 0},
        {"context": "def add(a, b):\n    return", "choices": [" a + b", " + a b"], "label": 0}], metrics=("acc",))
    nb = NOTEBOOKS[0]
    out = runner.run("smoke", only=nb.stem, out_root=tmp_path / "run", progress=False,
                     overrides={"LM_EVAL_TASKS": [str(task)]})
    rec = _recorded(out / nb.stem / "metrics.json")
    rows = [r for r in rec["metrics"]["scores"] if r["task"] == "lm_eval:local_word_order"]
    assert rows and {r["metric"] for r in rows} == {"acc"} and all(r["n"] == 3 for r in rows), rows


# What "only a smaller model" takes beyond MODEL: 05 studies several models (its upcycled twin at three
# seeds by default), so it studies the smoke model alone.
SMALLER = {"05_claims_across_models": {"UPCYCLED_MODEL": None, "SEEDS": [0]}}


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_as_opened_with_its_own_defaults(nb, tmp_path):
    """A notebook opened in JupyterLab runs top to bottom on its own parameters cell: no OUTPUT_DIR or
    FIGURES_DIR injected (the runner sets them; a student's kernel does not), only a smaller model. It
    writes under ../runs/interactive/ beside its own folder and leaves the published figures alone."""
    import shutil

    import papermill as pm

    (tmp_path / "notebooks").mkdir()
    copy = tmp_path / "notebooks" / nb.name
    shutil.copy(nb, copy)
    published = _digests(runner.ROOT / "figures")
    smaller = {"MODEL": "smoke", **SMALLER.get(nb.stem, {})}
    pm.execute_notebook(str(copy), str(tmp_path / "out.ipynb"), parameters=smaller,
                        cwd=str(copy.parent), kernel_name=runner.kernel_name(), progress_bar=False)
    interactive = tmp_path / "runs" / "interactive"
    _recorded(interactive / nb.stem / "metrics.json")
    assert list((interactive / "figures").glob(f"{nb.stem[:2]}_*.png")), "no figure under runs/interactive/figures"
    assert _digests(runner.ROOT / "figures") == published, "an interactive run changed the published figures"


def test_a_run_of_all_notebooks_leaves_out_the_study_unless_named():
    """`make reproduce` runs every notebook but 05 (the claims matrix over six models: `make study`)."""
    everything = [p.stem for p in runner.notebooks()]
    default = [p.stem for p in runner.selected()]
    assert "05_claims_across_models" in everything and set(runner.ON_REQUEST) <= set(everything)
    assert default == [s for s in everything if s not in runner.ON_REQUEST] and "00_anatomy_of_an_moe" in default
    assert [p.stem for p in runner.selected("05")] == ["05_claims_across_models"]
