"""moelab.io.save_checkpoint: atomic, refuses to clobber, refuses broken weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from moelab.io import check_finite, checkpoint_bytes, save_checkpoint
from moelab.models import moe_layers, tiny_model

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe")


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_save_and_reload(model, tmp_path):
    out = save_checkpoint(model, tmp_path / "ck")
    assert out == (tmp_path / "ck").resolve()
    assert (out / "config.json").exists() and checkpoint_bytes(out) > 0
    assert _siblings(out) == ["ck"]  # no temporary directories left behind
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-6)


def test_refuses_existing_dir_unless_overwrite(model, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an (older) checkpoint folder
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True.*another directory"):
        save_checkpoint(model, out)
    assert (out / "old.txt").exists()
    save_checkpoint(model, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert _siblings(out) == ["ck"]


def test_refuses_source_dir_even_with_overwrite(model, tmp_path):
    src = save_checkpoint(model, tmp_path / "src")
    loaded = AutoModelForCausalLM.from_pretrained(src)
    with pytest.raises(ValueError, match="source model's directory"):
        save_checkpoint(loaded, src, overwrite=True)
    # the same directory spelled differently
    with pytest.raises(ValueError, match="source model's directory"):
        save_checkpoint(loaded, tmp_path / "x" / ".." / "src", overwrite=True)
    # a parent of the source would delete it on overwrite
    with pytest.raises(ValueError, match="source model's directory"):
        save_checkpoint(loaded, tmp_path, overwrite=True)
    # an explicit source argument
    with pytest.raises(ValueError, match="source model's directory"):
        save_checkpoint(model, tmp_path / "other", source=tmp_path / "other", overwrite=True)
    assert (src / "config.json").exists()
    save_checkpoint(loaded, tmp_path / "elsewhere")


def test_refuses_nan_and_inf(tmp_path):
    m = tiny_model("mixtral")
    l = moe_layers(m)[0]
    with torch.no_grad():
        l.experts_module().down_proj[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj.*NaN/Inf"):
        save_checkpoint(m, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with torch.no_grad():
        l.experts_module().down_proj[1, 2, 3] = 0.0
        m.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="lm_head.weight"):
        check_finite(m)


def test_interrupted_save_leaves_nothing(model, tmp_path, monkeypatch):
    def broken(self, path, *a, **k):
        (path / "partial.bin").parent.mkdir(parents=True, exist_ok=True)
        (path / "partial.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_checkpoint(model, tmp_path, monkeypatch):
    out = save_checkpoint(model, tmp_path / "ck")
    before = checkpoint_bytes(out)

    def broken(self, path, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, out, overwrite=True)
    assert checkpoint_bytes(out) == before and _siblings(out) == ["ck"]


def test_refuses_inconsistent_moe_model(tmp_path):
    m = tiny_model("qwen3_moe")
    moe_layers(m)[0].experts_module().num_experts = 3  # a stale cached count
    with pytest.raises(ValueError, match="num_experts = 3"):
        save_checkpoint(m, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------------------------------------
# Killed saves (issue 14 item 4): the target is the old or the new checkpoint, nothing left behind
# ---------------------------------------------------------------------------------------------

def test_killed_saves_leave_old_or_new_and_no_temporaries(tmp_path):
    """A saver SIGKILLed at random moments, 40 times, over a fresh save and then overwrites."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("kill_saves.py")
    run = subprocess.run([sys.executable, str(script), str(tmp_path), "40", "0"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["errors"] == []
    assert seen["kills"] == 40
    assert seen["found"]["A"] + seen["found"]["B"] + seen["found"]["absent"] == 40
    # absent only before the first save ever finished (kill_saves records an error otherwise), and the
    # delays, scaled to this machine's save time, let most kills find a written checkpoint
    assert seen["found"]["A"] + seen["found"]["B"] >= 20, seen
    assert seen["temporaries_before_recovery"] > 0  # some kills did land in the middle of a save


def test_kill_between_the_two_renames_is_recovered(model, tmp_path, monkeypatch):
    """Where the atomic exchange is missing, an overwrite renames the old checkpoint aside first; a kill
    right then leaves no target, and the next save puts the old checkpoint back before it runs."""
    import os
    import signal

    from moelab import io

    out = save_checkpoint(model, tmp_path / "ck")
    before = (out / "model.safetensors").read_bytes()
    pid = os.fork()
    if pid == 0:
        try:
            monkeypatch.setattr(io, "_exchange", lambda a, b: False)
            real, calls = os.replace, []

            def replace_then_die(a, b):
                calls.append(1)
                if len(calls) == 2:  # the old one is aside, the new one not yet in place
                    os.kill(os.getpid(), signal.SIGKILL)
                real(a, b)

            monkeypatch.setattr(os, "replace", replace_then_die)
            save_checkpoint(model, out, overwrite=True)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = _siblings(out)
    assert "ck" not in left and any(".ck.old-" in n for n in left) and any(".ck.tmp-" in n for n in left)
    with pytest.raises(FileExistsError, match="already exists"):  # the next call restores, then refuses
        save_checkpoint(model, out)
    assert _siblings(out) == ["ck"] and (out / "model.safetensors").read_bytes() == before


def test_overwrite_is_one_atomic_exchange(model, tmp_path, monkeypatch):
    """On Linux the new checkpoint is swapped in with renameat2(RENAME_EXCHANGE): no rename leaves the
    target missing, at any instant."""
    import os

    from moelab import io

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    assert io._exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    out = save_checkpoint(model, tmp_path / "ck")
    calls = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: calls.append((s, d)) or real(s, d))
    save_checkpoint(model, out, overwrite=True)
    assert calls == [] and _siblings(out) == ["a", "b", "ck"]


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(model, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "table.csv").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint folder.*overwrite='folder'"):
        save_checkpoint(model, folder, overwrite=True)
    assert (folder / "table.csv").read_text() == "keep me"
    ck = save_checkpoint(model, tmp_path / "ck")
    (ck / "notes.csv").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.csv"):
        save_checkpoint(model, ck, overwrite=True)
    save_checkpoint(model, folder, overwrite="folder")  # told so: replaced
    assert not (folder / "table.csv").exists() and (folder / "config.json").is_file()
    with pytest.raises(ValueError, match="overwrite must be"):
        save_checkpoint(model, folder, overwrite="yes")


def test_stale_temporaries_of_dead_processes_are_removed(model, tmp_path):
    from moelab import io

    out = save_checkpoint(model, tmp_path / "ck")
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    for kind in ("tmp", "old"):
        (tmp_path / f".ck.{kind}-{dead}-0123abcd").mkdir()
    (tmp_path / f".ck.tmp-{os_getpid()}-0123abcd").mkdir()  # our own: in use, kept
    done = io.recover_interrupted(out)
    assert len(done) == 2 and _siblings(out) == [f".ck.tmp-{os_getpid()}-0123abcd", "ck"]


def os_getpid():
    import os

    return os.getpid()


def test_damaged_weights_file_and_impossible_top_k_are_named(model, tmp_path):
    import json

    from moelab import models

    ck = save_checkpoint(model, tmp_path / "ck")
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is damaged"):
        models.load_model(ck)
    ck2 = save_checkpoint(model, tmp_path / "ck2")
    cfg = json.loads((ck2 / "config.json").read_text())
    cfg["num_experts_per_tok"] = cfg["num_local_experts"] + 3
    (ck2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="top_k=.* fix config.json"):
        models.load_model(ck2)


def test_factored_model_is_refused_with_densify_named(model, tmp_path):
    from moelab import compress

    factored, _ = compress.low_rank_sparse_model(model, 0.5, rank=2)
    with pytest.raises(ValueError, match=r"densify\(model\)"):
        save_checkpoint(factored, tmp_path / "f")
    save_checkpoint(compress.densify(factored), tmp_path / "f")


def test_recorded_json_clears_a_killed_writers_temporary(tmp_path):
    from moelab import io

    dead = 2 ** 22 + 12345
    (tmp_path / f".metrics.json.tmp{dead}").write_text("{")
    io.write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
