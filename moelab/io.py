"""Reading and writing checkpoints safely, and recording results with their provenance."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

__all__ = ["check_finite", "checkpoint_bytes", "save_checkpoint", "record", "load_record", "write_json_atomic",
           "git_revision", "package_versions"]


def _source_dirs(model, source) -> list[Path]:
    """Local directories the model was loaded from (``source`` and the config's name_or_path)."""
    cands = []
    if source is not None:
        cands.append(source)
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "_name_or_path", None), getattr(model, "name_or_path", None)):
        if c:
            cands.append(c)
    out = []
    for c in cands:
        p = Path(c).expanduser()
        if p.is_dir() or c is source:
            out.append(p.resolve())
    return out


def check_finite(model) -> None:
    """Raise ValueError naming the first parameter/buffer that holds NaN or Inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or not t.is_floating_point() or t.device.type == "meta":
            continue
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"refusing to save: tensor {name!r} {tuple(t.shape)} has {bad} NaN/Inf value(s); "
                "the edit that produced it is broken"
            )


def save_checkpoint(model, out_dir, tokenizer=None, *, overwrite: bool = False, source=None) -> Path:
    """Save ``model`` (and ``tokenizer``) to ``out_dir`` atomically and return the resolved path.

    The checkpoint is written to a temporary sibling directory and renamed into place, so an
    interrupted save leaves no half-written checkpoint at ``out_dir``. Refuses when ``out_dir``
    exists (unless ``overwrite=True``), always when ``out_dir`` is (or contains) the directory the
    model was loaded from (``source``, or ``config._name_or_path`` / ``name_or_path`` when that is a
    local directory), when any weight is NaN/Inf, and when a MoE model's cached counts disagree with
    its config (see ``moelab.models.check_consistency``).

    A MoE model whose layers keep different expert counts (``models.set_expert_counts_config``) is
    written in moelab's non-uniform form (``moelab.models`` docstring): config.json with the per-layer
    counts and the weights in ``models.NONUNIFORM_WEIGHTS``, which ``models.load_model`` / ``zoo.load``
    reload and plain ``from_pretrained`` refuses. Every other model is a plain ``save_pretrained``
    checkpoint.
    """
    out = Path(out_dir).expanduser().resolve()
    for src in _source_dirs(model, source):
        if out == src or out in src.parents:
            raise ValueError(
                f"refusing to save into {out}: it is (or contains) the source model's directory {src}; "
                "choose another output directory"
            )
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists; pass overwrite=True to replace it, or choose another directory"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output directory")
    check_finite(model)
    nonuniform = False
    try:
        from .models import check_consistency, expert_counts, experts_per_layer, family_of

        family_of(model)
    except (ImportError, ValueError):
        pass  # not a supported MoE model: nothing to cross-check
    else:
        counts = expert_counts(model)
        nonuniform = len(set(counts.values())) > 1
        if nonuniform and experts_per_layer(model.config) is None:
            raise ValueError(
                f"refusing to save: the MoE layers keep different expert counts {counts} but the config records "
                "one; call moelab.models.set_expert_counts_config(model) to write the per-layer counts")
        check_consistency(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = None
    try:
        if nonuniform:
            _save_nonuniform(model, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)  # put the previous checkpoint back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _save_nonuniform(model, path: Path) -> None:
    """Write a model with per-layer expert counts in moelab's form (``moelab.models`` docstring)."""
    import copy

    from safetensors.torch import save_model

    from .models import NONUNIFORM_WEIGHTS

    path.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = next(model.parameters()).dtype
    config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    # tied tensors (embeddings / LM head) are stored once; the loader restores the tie
    save_model(model, str(path / NONUNIFORM_WEIGHTS), metadata={"format": "pt", "moelab": "nonuniform-experts/1"},
               force_contiguous=True)


def checkpoint_bytes(path) -> int:
    """Total size of the ``*.safetensors`` files of a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# Recorded results (STYLE rule 7): metrics with the code version, packages, seed and parameters
# --------------------------------------------------------------------------------------------
_PACKAGES = ("moelab", "torch", "transformers", "datasets", "accelerate", "safetensors", "scipy", "numpy",
             "papermill")


def git_revision(path=None) -> str | None:
    """The git commit of the working tree that produced a result (with '+dirty' if it has changes)."""
    import subprocess

    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    """Versions of the packages that decide a result."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _jsonable(obj):
    """Turn tensors, numpy values and DataFrames into plain JSON (NaN/Inf become None)."""
    import math

    import numpy as np

    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        pd = None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if pd is not None and isinstance(obj, pd.DataFrame):
        plain_index = isinstance(obj.index, pd.RangeIndex)
        return _jsonable(obj.to_dict(orient="records" if plain_index else "index"))
    if pd is not None and isinstance(obj, pd.Series):
        return _jsonable(obj.to_dict())
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path, payload) -> Path:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(payload), indent=1))
    os.replace(tmp, path)
    return path


def record(path, metrics: dict, *, parameters: dict | None = None, seed: int | None = None,
           notebook: str | None = None) -> Path:
    """Write a notebook's recorded result: metrics plus the provenance that produced them.

    Args:
        path: the metrics JSON file to write (its directory is created).
        metrics: the results (nested dicts, lists, numbers, tensors or DataFrames); a ``headline``
            dict of scalars is what the run summary shows.
        parameters: the notebook's parameters cell values.
        seed: the seed of the run.
        notebook: the notebook's name.

    Returns:
        The path written.
    """
    import time

    payload = {"notebook": notebook, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "git_revision": git_revision(), "versions": package_versions(), "seed": seed,
               "parameters": parameters or {}, "metrics": metrics}
    return write_json_atomic(path, payload)


def load_record(path) -> dict:
    """Read a metrics file written by ``record``."""
    import json

    return json.loads(Path(path).read_text())
