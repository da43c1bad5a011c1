"""The GPU check script works without papermill and without the corpora packages (what the GPU image lacks):
its inline executor runs a notebook's smoke preset, reading moelab's text from a snapshot."""

import json
import os
import subprocess
import sys

import pytest

from moelab import data, runner


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return data.export_snapshot(tmp_path_factory.mktemp("snap") / "data.json.xz")


def test_snapshot_gives_the_same_text(snapshot, monkeypatch):
    want = {(d, s): data.texts(d, s) for d in data.DOMAINS for s in ("calib", "eval")}
    problems = data.math_problems("eval")
    monkeypatch.setenv(data.SNAPSHOT_ENV, str(snapshot))
    assert {(d, s): data.texts(d, s) for d in data.DOMAINS for s in ("calib", "eval")} == want
    assert data.math_problems("eval") == problems
    with pytest.raises(ValueError, match="holds the default"):
        data.math_problems("eval", n=10)
    monkeypatch.setenv(data.SNAPSHOT_ENV, str(snapshot) + ".missing")
    with pytest.raises(FileNotFoundError, match="names no file"):
        data.texts("general", "eval")


@pytest.mark.notebook
def test_gpu_check_runs_a_notebook_inline_on_the_snapshot(snapshot, tmp_path):
    """On this CPU machine the check runs as it would on the GPU one (the device is whatever torch has)."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, data.SNAPSHOT_ENV: str(snapshot), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(runner.ROOT / "scripts" / "gpu_check.py"), "run", "--notebook",
                           "00_anatomy_of_an_moe", "--dtypes", "bfloat16", "--out", str(out), "--work",
                           str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["failed"] == 0 and len(rec["runs"]) == 1
    run = rec["runs"][0]
    assert run["ok"] and run["dtype"] == "bfloat16" and run["headline"]
    assert (tmp_path / "work" / "00_anatomy_of_an_moe" / "metrics.json").exists()


def test_scale_check_runs_every_method_on_a_small_model(tmp_path):
    """The full-shape GPU scale check, on a tiny model of the same family on the CPU: every step runs."""
    import json
    import subprocess
    import sys

    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(runner.ROOT / "scripts" / "scale_check.py"), "--shape", "tiny", "--layers", "2",
                           "--device", "cpu", "--rows", "8", "--seq-len", "32", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads(out.read_text())
    names = [s["step"] for s in rec["steps"]]
    assert "observe" in names and "REAM (sequential, replay)" in names and len(names) == 11
    assert all(s["ok"] for s in rec["steps"])
    assert all(-0.01 <= s["variant_own_x_model"] < 1.5 for s in rec["steps"] if "variant_own_x_model" in s)
