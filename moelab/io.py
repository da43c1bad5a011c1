"""Reading and writing checkpoints safely, and recording results with their provenance."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

__all__ = ["check_finite", "checkpoint_bytes", "source_bytes", "save_checkpoint", "save_and_check", "model_dtype",
           "record", "load_record", "write_json_atomic", "git_revision", "package_versions", "recover_interrupted",
           "load_outside_moelab", "check_outside_moelab"]


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


def model_dtype(model) -> torch.dtype:
    """The dtype of a model's floating-point weights (the first floating parameter's)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r}; use e.g. 'bfloat16', 'float16' or 'float32'")
    return value


def save_dtype(model, dtype="source") -> torch.dtype:
    """The dtype a checkpoint of ``model`` is written in.

    ``"source"``: the dtype of the checkpoint the model was loaded from (``models.load_model`` records
    it as ``model.moelab_source_dtype``; a bf16 hub checkpoint loaded in float32 for CPU numerics is
    saved in bf16 again), else the model's own; None: the model's own; or a dtype / its name.
    """
    if dtype == "source":
        return _as_dtype(getattr(model, "moelab_source_dtype", None)) or model_dtype(model)
    return _as_dtype(dtype) or model_dtype(model)


def _cast_state_dict(model, dtype: torch.dtype) -> dict:
    """The model's state dict with floating tensors in ``dtype`` on the CPU (what gets written).

    Tensors that are one tensor in the model (tied embeddings and LM head) stay one tensor, so the
    checkpoint stores them once as ``save_pretrained`` would.
    """
    out, cast = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.device)
        if key not in cast:
            cast[key] = v.detach().to(device="cpu", dtype=dtype) if v.is_floating_point() else v.detach().cpu()
        out[k] = cast[key]
    return out


def save_checkpoint(model, out_dir, tokenizer=None, *, overwrite: bool | str = False, source=None,
                    dtype="source") -> Path:
    """Save ``model`` (and ``tokenizer``) to ``out_dir`` atomically and return the resolved path.

    The weights are written in ``save_dtype(model, dtype)``: by default the source checkpoint's dtype,
    so a bf16 checkpoint pruned in float32 is a bf16 checkpoint again (and really smaller).

    The checkpoint is written to a temporary sibling directory and renamed into place, so an
    interrupted save leaves no half-written checkpoint at ``out_dir``; an overwrite swaps the new
    checkpoint in atomically, so ``out_dir`` is the old or the new one at every instant (``_put_in_place``),
    and what a killed save left beside it is tidied by the next save (``recover_interrupted``). Refuses
    when ``out_dir`` exists (unless ``overwrite=True``, which replaces a checkpoint folder only; a folder
    holding anything else needs ``overwrite="folder"``), always when ``out_dir`` is (or contains) the directory the
    model was loaded from (``source``, or ``config._name_or_path`` / ``name_or_path`` when that is a
    local directory), when any weight is NaN/Inf, and when a MoE model's cached counts disagree with
    its config (see ``moelab.models.check_consistency``).

    A model moelab edited carries its recipe (``moelab.recipe``): the steps that made it from its source,
    written as ``moelab_recipe.json`` beside the weights, which ``recipe.apply`` replays on the source.

    A MoE model whose layers keep different expert counts (``models.set_expert_counts_config``) is
    written with its own modeling file (``moelab.models`` docstring): stock transformers and every tool
    built on it (lm-eval, pipelines) load it with ``trust_remote_code=True``, plain ``from_pretrained``
    refuses it asking for that flag, and ``models.load_model`` / ``zoo.load`` reload it without running
    the file. Every other model is a plain ``save_pretrained`` checkpoint.
    """
    out = Path(out_dir).expanduser().resolve()
    for src in _source_dirs(model, source):
        if out == src or out in src.parents:
            raise ValueError(
                f"refusing to save into {out}: it is (or contains) the source model's directory {src}; "
                "choose another output directory"
            )
    recover_interrupted(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists; pass overwrite=True to replace it, or choose another directory"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output directory")
    if overwrite not in (False, True, "folder"):
        raise ValueError(f"overwrite must be False, True or 'folder', got {overwrite!r}")
    factored = [n for n, m in model.named_modules() if type(m).__name__ == "LowRankSparseExperts"]
    if factored:
        raise ValueError(f"refusing to save: {len(factored)} experts module(s) ({factored[0]}, ...) are in MC-SMoE's "
                         "factored form U V + S, which transformers cannot load; save "
                         "moelab.compress.densify(model) instead (the same function, dense weights)")
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

    target = save_dtype(model, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and overwrite != "folder" and not _is_checkpoint_folder(out):
        raise FileExistsError(
            f"{out} exists and is not a checkpoint folder (no config.json, or files a checkpoint does not hold: "
            f"{_foreign_files(out)[:5]}); overwrite=True replaces checkpoints only. Choose another directory, or "
            "pass overwrite='folder' to delete the folder and everything in it")
    tmp = _temp_path(out, "tmp")
    try:
        if nonuniform:
            _save_nonuniform(model, tmp, target)
        elif target == model_dtype(model):
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=_cast_state_dict(model, target))
            _set_config_dtype(tmp, target)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        from . import recipe

        if recipe.steps(model):  # how the model was made from its source (moelab.recipe)
            recipe.save(model, tmp / recipe.RECIPE_FILE)
        _put_in_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# Replacing a directory so that it is the old or the new one at every instant
# ---------------------------------------------------------------------------------------------
# Temporaries live beside the target as ".NAME.KIND-PID-RANDOM": KIND "tmp" (being written) or "old"
# (a replaced checkpoint, kept only where the atomic exchange is missing). A temporary whose process is
# gone is stale: the next save to (or ``recover_interrupted`` of) the target removes it, and puts an
# "old" one back when the target itself is missing (a save killed between its two renames).
_CHECKPOINT_FILES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken", ".py", ".md", ".bin")


def _temp_path(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    """Whether a process runs (POSIX signal 0); on Windows always True: os.kill would end it, so
    temporaries are never taken for stale there."""
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale_temporaries(out: Path) -> list[tuple[str, Path]]:
    """(kind, path) of the temporaries beside ``out`` whose writing process is no longer running."""
    import re

    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    found = []
    if not out.parent.is_dir():
        return found
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and not _pid_alive(int(m.group(2))):
            found.append((m.group(1), p))
    return found


def recover_interrupted(out) -> list[str]:
    """Finish what a killed save to ``out`` left: put a replaced checkpoint back where the target is
    missing, and delete stale temporaries (of processes no longer running). Returns what was done.

    ``save_checkpoint`` calls it before every save; call it yourself to tidy a folder after a crash.
    """
    out = Path(out).expanduser().resolve()
    done = []
    stale = _stale_temporaries(out)
    if not out.exists():
        old = sorted((p for kind, p in stale if kind == "old"), key=lambda p: p.stat().st_mtime)
        if old:
            os.replace(old[-1], out)
            done.append(f"restored {out} from {old[-1].name}")
            stale = [(k, p) for k, p in stale if p != old[-1]]
    for _kind, p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        done.append(f"removed {p.name}")
    return done


def _is_checkpoint_folder(path: Path) -> bool:
    """A folder ``save_checkpoint`` may replace: empty, or a checkpoint (config.json, and only files of
    the kinds a model/tokenizer folder holds)."""
    entries = list(path.iterdir())
    if not entries:
        return True
    return (path / "config.json").is_file() and not _foreign_files(path)


def _foreign_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() or not p.name.endswith(_CHECKPOINT_FILES))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system lacks it."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    import errno

    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL)):
        return False  # the filesystem cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _put_in_place(tmp: Path, out: Path) -> None:
    """Make the finished ``tmp`` the directory at ``out``.

    A new target is one rename. An existing one is exchanged with ``tmp`` in one atomic step where the
    system allows it, so ``out`` is the old or the new checkpoint at every instant; the old one, now
    at ``tmp``, is deleted. Elsewhere the old one is first renamed aside as ".NAME.old-PID-*": a kill
    between the two renames leaves no target, and the next save (``recover_interrupted``) puts the old
    checkpoint back.
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _temp_path(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """Record the dtype the weights were written in (save_pretrained writes the in-memory one)."""
    import json

    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save_nonuniform(model, path: Path, dtype: torch.dtype | None = None) -> None:
    """Write a model with per-layer expert counts with its modeling file (``moelab.nonuniform_modeling``).

    The weights are the model's state dict under its in-memory names (``save_pretrained`` without
    converting them back to the family's original layout, so they are exactly the tensors the
    modeling file's model expects; sharded and with tied tensors once, as ``save_pretrained`` does),
    config.json is the family's config under the modeling file's ``model_type`` with ``auto_map``, the
    family and the plan of expert-indexed tensors. Before the checkpoint is put in place, the modeling
    file's model is built from the written config and checked against ``model`` tensor by tensor.
    """
    import json

    from . import nonuniform_modeling
    from .models import (NONUNIFORM_BASE_KEY, NONUNIFORM_MODELING, NONUNIFORM_PLAN_KEY, NONUNIFORM_TYPE_PREFIX,
                         _family_type, expert_tensor_plan, nonuniform_classes, shape_problems)

    dtype = dtype or model_dtype(model)
    base = _family_type(model.config)
    plan = expert_tensor_plan(model)
    model.save_pretrained(path, state_dict=_cast_state_dict(model, dtype), save_original_format=False)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"model_type": NONUNIFORM_TYPE_PREFIX + base, NONUNIFORM_BASE_KEY: base, NONUNIFORM_PLAN_KEY: plan,
                "architectures": ["MoelabNonUniformForCausalLM"], "dtype": str(dtype).replace("torch.", ""),
                "auto_map": {"AutoConfig": f"{NONUNIFORM_MODELING[:-3]}.MoelabNonUniformConfig",
                             "AutoModelForCausalLM": f"{NONUNIFORM_MODELING[:-3]}.MoelabNonUniformForCausalLM"}})
    cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    source = Path(nonuniform_modeling.__file__).read_text()
    line = f'BASE_MODEL_TYPE = "{nonuniform_modeling.BASE_MODEL_TYPE}"'
    if source.count(line) != 1:
        raise RuntimeError(f"moelab/nonuniform_modeling.py must hold the line {line!r} exactly once")
    (path / NONUNIFORM_MODELING).write_text(source.replace(line, f'BASE_MODEL_TYPE = "{base}"'))
    config_class, model_class = nonuniform_classes(base)
    with torch.device("meta"):
        rebuilt = model_class(config_class.from_pretrained(path))
    problems = shape_problems(model, rebuilt)
    if problems:
        raise ValueError("the modeling file would not rebuild this model: " + "; ".join(problems[:8]))


def checkpoint_bytes(path) -> int:
    """Total size of the ``*.safetensors`` files of a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def source_bytes(model, source=None) -> int:
    """Bytes of the checkpoint ``model`` was loaded from: its safetensors files when ``source`` (or the
    config's name_or_path) is a local directory, else its parameters at the source dtype (a hub id)."""
    for src in _source_dirs(model, source):
        if src.is_dir() and checkpoint_bytes(src):
            return checkpoint_bytes(src)
    dtype = save_dtype(model, "source")
    seen, total = set(), 0
    for p in model.parameters():  # tied tensors once
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * (p.element_size() if not p.is_floating_point() else dtype.itemsize)
    return total


def _placement(model):
    """A device_map that reloads a checkpoint where ``model`` lives (one device, or its dispatch map)."""
    hf_map = getattr(model, "hf_device_map", None)
    if isinstance(hf_map, dict) and len(set(map(str, hf_map.values()))) > 1:
        return hf_map
    return str(next(model.parameters()).device)


@torch.no_grad()
def save_and_check(model, out_dir, tokenizer=None, *, check_ids, source=None, dtype="source",
                   overwrite: bool = False, min_top1: float | None = None) -> dict:
    """Save ``model`` (``save_checkpoint``), reload it as a user would, and check the reload.

    The reload (``models.load_model``) takes the model's own dtype, device placement and experts
    kernel, so it is compared with the in-memory model like with like:

    * weights: every tensor of the reload equals the in-memory one rounded to the saved dtype (exact);
    * logits on ``check_ids``: saved in the model's own dtype, the same weights and kernel give the same
      logits (float32: max |diff| <= 1e-4; bf16/fp16: top-1 agreement >= 0.99, max |diff| reported);
      saved in a narrower dtype than the model runs in (float32 -> bf16), the logits differ by the
      rounding, so only top-1 agreement is checked (>= 0.9).

    Args:
        check_ids: [B, L] token ids for the logits check.
        source: the source checkpoint (directory or hub id) for the size comparison and the refusal
            to write into it.
        min_top1: override the top-1 agreement threshold.

    Returns:
        {"path", "saved_dtype", "model_dtype", "bytes", "original_bytes", "share", "tensors_checked",
        "max_logit_diff", "top1_agreement", "compared"}.

    Raises:
        ValueError: a weight differs, or the logits disagree beyond the threshold.
    """
    from . import models

    target, own = save_dtype(model, dtype), model_dtype(model)
    device = models.input_device(model)
    ids = torch.as_tensor(check_ids).to(device)
    ref = model(input_ids=ids).logits.float()
    path = save_checkpoint(model, out_dir, tokenizer, overwrite=overwrite, source=source, dtype=dtype)
    reloaded = models.load_model(path, dtype=own, device_map=_placement(model))
    impl = getattr(model.config, "_experts_implementation", None)
    if impl and reloaded._can_set_experts_implementation():
        from . import kernels

        kernels.register()
        reloaded.set_experts_implementation(impl)
    mine, theirs = model.state_dict(), reloaded.state_dict()
    if set(mine) != set(theirs):
        raise ValueError(f"the reloaded checkpoint at {path} has other tensors than the model: missing "
                         f"{sorted(set(mine) - set(theirs))[:5]}, extra {sorted(set(theirs) - set(mine))[:5]}")
    for name, t in theirs.items():
        expect = mine[name].to(device=t.device)
        if expect.is_floating_point():
            expect = expect.to(target).to(t.dtype)
        if not torch.equal(expect, t):
            raise ValueError(f"tensor {name!r} of the checkpoint at {path} differs from the model's "
                             f"(max |diff| {float((expect.float() - t.float()).abs().max()):.3g})")
    out = reloaded(input_ids=ids.to(models.input_device(reloaded))).logits.float().to(ref.device)
    del reloaded, theirs
    diff = float((ref - out).abs().max())
    top1 = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    if target == own:
        compared = f"saved in {str(own).replace('torch.', '')}, the same weights and kernel"
        threshold = 0.99 if min_top1 is None else min_top1
        ok = top1 >= threshold and (own != torch.float32 or diff <= 1e-4)
    else:
        compared = (f"saved in {str(target).replace('torch.', '')} from a {str(own).replace('torch.', '')} model: "
                    "logits differ by the rounding of the weights")
        threshold = 0.9 if min_top1 is None else min_top1
        ok = top1 >= threshold
    if not ok:
        raise ValueError(f"the checkpoint at {path} reloads with other logits ({compared}): max |diff| {diff:.3g}, "
                         f"top-1 agreement {top1:.3f} (threshold {threshold})")
    new, orig = checkpoint_bytes(path), source_bytes(model, source)
    return {"path": str(path), "saved_dtype": str(target).replace("torch.", ""),
            "model_dtype": str(own).replace("torch.", ""), "bytes": new, "original_bytes": orig,
            "share": new / orig if orig else float("nan"), "tensors_checked": len(mine),
            "max_logit_diff": diff, "top1_agreement": top1, "compared": compared}


_OUTSIDE = r"""
import sys
sys.modules["moelab"] = None  # the checkpoint must load without moelab: any import of it fails
import json, torch
from transformers import AutoModelForCausalLM
paths, ids_file, out_file, threads = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)  # the caller's: the same reduction order, so the same float32 sums
ids, found = torch.load(ids_file), {}
for path in paths:
    row = {}
    try:
        AutoModelForCausalLM.from_pretrained(path)
        row["plain"] = "loaded"
    except Exception as exc:
        row["plain"] = f"refused: {type(exc).__name__}: {exc}"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto").eval()
    with torch.no_grad():
        row["logits"] = model(input_ids=ids).logits.float()
    row["class"] = type(model).__module__ + "." + type(model).__name__
    row["kernels"] = [getattr(model.config, "_attn_implementation", None),
                      getattr(model.config, "_experts_implementation", None)]
    found[path] = row
torch.save(found, out_file)
"""


def load_outside_moelab(paths, check_ids, *, timeout: float = 900) -> dict:
    """Load checkpoints the way a user without moelab does, in a fresh Python process.

    The process makes ``import moelab`` fail, then for each checkpoint tries plain
    ``AutoModelForCausalLM.from_pretrained(path)`` and records whether it loaded or was refused (and why),
    loads it with ``trust_remote_code=True`` (a non-uniform checkpoint's own modeling file; a uniform one
    is the family's class either way) and computes float32 logits on ``check_ids`` with the caller's
    number of torch threads.

    Returns:
        ``{str(path): {"plain": "loaded" | "refused: <error>", "class": "<module>.<class>",
        "kernels": [attention, experts implementation], "logits": [B, L, V] float32 tensor}}``.
    """
    import json
    import subprocess
    import sys
    import tempfile

    paths = [str(Path(p).expanduser().resolve()) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = Path(tmp) / "ids.pt", Path(tmp) / "out.pt"
        torch.save(torch.as_tensor(check_ids).cpu(), ids_file)
        done = subprocess.run([sys.executable, "-c", _OUTSIDE, json.dumps(paths), str(ids_file), str(out_file),
                               str(torch.get_num_threads())],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        if done.returncode != 0:
            raise RuntimeError(f"loading {paths} outside moelab failed:\n{done.stderr[-3000:]}")
        return torch.load(out_file)


def check_outside_moelab(path, check_ids, reference_logits, *, max_bytes: int = 2 * 2**30) -> dict:
    """How a user without moelab meets the checkpoint at ``path`` (:func:`load_outside_moelab`).

    Compares the logits transformers computes with ``trust_remote_code=True`` in a fresh process with
    ``reference_logits`` (the saved model's on ``check_ids``). A checkpoint above ``max_bytes`` is not
    loaded a second time beside the model that is still in memory (the fresh process would hold a
    whole copy on the CPU): the check says so and is left to the user.

    Returns:
        ``{"plain_from_pretrained": "loaded" | "refused: ...", "trust_remote_code": "<class>" | "skipped: ...",
        "max_logit_diff": float | None}``.
    """
    size = checkpoint_bytes(path)
    if size > max_bytes:
        return {"plain_from_pretrained": None, "max_logit_diff": None,
                "trust_remote_code": f"skipped: the checkpoint is {size / 2**30:.1f} GiB, above max_bytes; run "
                                     "io.load_outside_moelab on it when the model is no longer in memory"}
    row = load_outside_moelab([path], check_ids)[str(Path(path).expanduser().resolve())]
    diff = float((row["logits"] - torch.as_tensor(reference_logits).float().cpu()).abs().max())
    return {"plain_from_pretrained": row["plain"].split("\n")[0], "trust_remote_code": row["class"].rsplit(".", 1)[-1],
            "max_logit_diff": diff}


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

    return write_text_atomic(path, json.dumps(_jsonable(payload), indent=1))


def write_text_atomic(path, text: str) -> Path:
    """Write text to a temporary file beside ``path`` and rename it into place (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # a killed writer's
        pid = stale.name.rpartition(".tmp")[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
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
