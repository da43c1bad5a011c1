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
