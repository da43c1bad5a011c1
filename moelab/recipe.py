"""Recipes: what a compression did to a model, as JSON, and how to do it again without calibration.

Every edit moelab makes to a variant is recorded on it, in order, as a step of its recipe
(``model.moelab_recipe``); a variant of a variant starts with its parent's steps (``models.variant``
copies the list). A step holds the decisions, never the new weights, so it is small, readable, and
tied to the weights it was decided on:

* ``prune_experts``: the kept experts of every MoE layer (frequency, REAP, NAEE, ... pruning);
* ``merge_layer``: one layer's groups (representative first), the merge weights of every expert,
  the neuron permutation that aligned each member to its representative, and how the router row was
  made (M-SMoE, REAM, HC-SMoE, SlimQwen's partial preservation; MC-SMoE, arXiv 2310.01334, Eq. 4);
* ``dern_layer``: DERN's kept and dropped experts, the importance of every expert and its options
  (segment threshold alpha, k-means seed and iterations; DERN, arXiv 2509.10377);
* ``remove_layers``, ``slice_hidden`` and ``scale_norm_outputs``, ``slice_expert_width``: depth and
  width choices (SlimQwen); ``set_num_experts_config`` / ``set_expert_counts_config``: the recorded counts;
* ``low_rank_sparse`` and ``densify``: MC-SMoE's compression stage (deterministic given the weights);
* ``trained`` (``train.recover``) and ``set_experts`` (weights given from outside moelab's methods):
  steps a recipe cannot redo, which ``apply`` refuses by name.

``apply(model, recipe)`` replays the steps on a variant of ``model`` (the same model: its MoE layers'
identity is checked first) and rebuilds the same tensors, bit for bit, without any calibration data:
the statistics a method needed were spent on the decisions the recipe stores. ``io.save_checkpoint``
writes the recipe beside the weights as ``moelab_recipe.json``.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

__all__ = ["RECIPE_FILE", "ATTRIBUTE", "steps", "recipe", "save", "load", "apply", "check_source", "records",
           "step", "note", "inherit"]

RECIPE_FILE = "moelab_recipe.json"
ATTRIBUTE = "moelab_recipe"
VERSION = 1
_UNREPEATABLE = {"trained": "trained its weights (train.recover)",
                 "set_experts": "set a layer's experts to weights computed outside moelab's recorded methods",
                 "reinitialised": "re-initialised every weight at random"}
_depth = 0  # > 0 while a recorded edit runs: the edits it makes are part of its own step


def steps(model) -> list[dict]:
    """The steps recorded on ``model`` so far (empty for a model nothing was done to); tensors stay
    tensors here, ``recipe`` gives them as JSON."""
    return list(getattr(model, ATTRIBUTE, None) or [])


def _append(model, entry: dict) -> None:
    model.__dict__[ATTRIBUTE] = steps(model) + [entry]


@contextlib.contextmanager
def step(model, op: str, **fields):
    """Record one step ``op`` on ``model`` around the edits of the block; the block may add fields to the
    yielded dict (decisions known only once it ran). Edits inside record nothing of their own; a block
    that raises records nothing."""
    global _depth
    entry = {"op": op, **fields}
    outer = _depth == 0
    if outer:
        remember_source(model)  # before the first edit: the identity of the model the recipe starts from
    _depth += 1
    try:
        yield entry
    finally:
        _depth -= 1
    if outer:
        _append(model, _stored(entry))


def records(op: str, fields):
    """Decorator for an edit ``f(model, *args, **kwargs)``: record ``{"op": op, **fields(*args, **kwargs)}``
    when it is called from outside another recorded edit."""
    def wrap(f):
        @functools.wraps(f)
        def inner(model, *args, **kwargs):
            if _depth:
                return f(model, *args, **kwargs)
            with step(model, op, **fields(*args, **kwargs)):
                return f(model, *args, **kwargs)
        return inner
    return wrap


def _stored(obj):
    """A step as kept on the model until it is written: tensors as compact CPU copies (the permutations
    of a 30B model's merges are millions of indices), everything else as JSON-ready values."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        if not t.is_floating_point() and t.numel() and -2**31 <= int(t.min()) and int(t.max()) < 2**31:
            t = t.to(torch.int32)
        return t.clone()
    if isinstance(obj, dict):
        return {k: _stored(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_stored(v) for v in obj]
    return obj


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def recipe(model, source=None) -> dict:
    """``model``'s recipe as one JSON-ready dict: the steps, and the identity of the model they start from
    (its name or path and, per MoE layer, expert count, width and a router checksum:
    ``observe.model_key``; ``source`` is the original model to take it from, default the first
    recorded identity)."""
    from . import io

    ident = getattr(model, "moelab_recipe_source", None)
    if source is not None:
        ident = _identity(source)
    return {"moelab_recipe": VERSION, "source": ident, "steps": _jsonable(steps(model)),
            "moelab_version": io.package_versions().get("moelab")}


def _identity(model) -> dict:
    from . import observe

    cfg = getattr(model, "config", None)
    return {"name_or_path": getattr(cfg, "_name_or_path", None), "model_type": getattr(cfg, "model_type", None),
            "layers": {str(k): v for k, v in observe.model_key(model).items()}}


def note(model, op: str, **fields) -> None:
    """Record a step that is not an edit of moelab's (``trained``, ``reinitialised``)."""
    with step(model, op, **fields):
        pass


def inherit(new, old) -> None:
    """Give ``new`` (a model built apart from ``old``, e.g. re-initialised from its config) ``old``'s
    steps and source, as ``models.variant`` does by copying."""
    new.__dict__[ATTRIBUTE] = steps(old)
    new.__dict__["moelab_recipe_source"] = getattr(old, "moelab_recipe_source", None)


def remember_source(model) -> None:
    """Record the identity of ``model`` as the start of its recipe, if it has no steps yet (variants
    inherit it with the steps)."""
    if not steps(model) and getattr(model, "moelab_recipe_source", None) is None:
        try:
            model.__dict__["moelab_recipe_source"] = _identity(model)
        except Exception:  # not a MoE model moelab reads: no identity to check against
            model.__dict__["moelab_recipe_source"] = None


def save(model_or_recipe, path) -> Path:
    """Write a recipe (or a model's) as JSON, atomically."""
    from . import io

    data = model_or_recipe if isinstance(model_or_recipe, dict) else recipe(model_or_recipe)
    return io.write_json_atomic(path, data)


def load(path) -> dict:
    """Read a recipe: a ``moelab_recipe.json`` file or a checkpoint directory holding one."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / RECIPE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no recipe at {p}: a checkpoint moelab saved from a recorded variant holds {RECIPE_FILE}")
    data = json.loads(p.read_text())
    if data.get("moelab_recipe") != VERSION or not isinstance(data.get("steps"), list):
        raise ValueError(f"{p} is not a moelab recipe (version {VERSION})")
    return data


def check_source(model, data: dict) -> None:
    """Raise ValueError when ``model`` is not the model the recipe starts from (its MoE layers differ)."""
    want = (data.get("source") or {}).get("layers")
    if not want:
        return
    have = _identity(model)["layers"]
    for k, v in want.items():
        h = have.get(k)
        same = h is not None and all(h.get(f) == v.get(f) for f in ("experts", "top_k", "hidden", "expert_width"))
        if same and v.get("router_checksum") is not None and h.get("router_checksum") is not None:
            same = abs(h["router_checksum"] - v["router_checksum"]) <= 1e-3 * max(1.0, abs(v["router_checksum"]))
        if not same:
            raise ValueError(f"this recipe starts from another model ({data['source'].get('name_or_path')}): MoE layer "
                             f"{k} is {h} here and {v} there; apply it to the model it was made on")
    if set(want) != set(have):
        raise ValueError(f"this recipe starts from a model with MoE layers {sorted(want)}; this one has {sorted(have)}")


def apply(model, data, *, upto: int | None = None):
    """Rebuild the recorded variant from ``model`` without calibration: a variant of ``model`` with
    every step of ``data`` (a recipe dict, a path, or a model whose steps to repeat) replayed, in order.

    Args:
        model: the model the recipe starts from (checked: ``check_source``); left untouched.
        data: ``recipe(variant)``, ``load(path)``, a path, or a variant.
        upto: replay only the first ``upto`` steps (e.g. the compression before a ``trained`` step).

    Raises:
        ValueError: another model, or a step a recipe cannot redo (``trained``, ``set_experts``).
    """
    from . import compress, models

    if isinstance(data, (str, Path)):
        data = load(data)
    elif not isinstance(data, dict):
        data = recipe(data)
    check_source(model, data)
    todo = data["steps"][:upto] if upto is not None else data["steps"]
    for k, s in enumerate(todo):
        if s["op"] in _UNREPEATABLE:
            raise ValueError(f"step {k} of the recipe {_UNREPEATABLE[s['op']]}: a recipe cannot redo it; "
                             f"apply(model, recipe, upto={k}) rebuilds the model before it")
    out = models.variant(model)
    for s in todo:
        op = s["op"]
        if op == "prune_experts":
            models.prune_experts(out, {int(i): v for i, v in s["keep"].items()})
        elif op == "merge_layer":
            layer = {l.layer_idx: l for l in models.moe_layers(out)}[int(s["layer"])]
            compress._merge_layer_into(out, layer, s["groups"], torch.tensor(s["coeffs"], dtype=torch.float64),
                                       perms={int(m): torch.tensor(p) for m, p in s["perms"].items()},
                                       keep_router=s["keep_router"])
        elif op == "dern_layer":
            layer = {l.layer_idx: l for l in models.moe_layers(out)}[int(s["layer"])]
            compress._dern_layer_into(out, layer, s["kept"], s["dropped"],
                                      torch.tensor(s["importance"], dtype=getattr(torch, s["importance_dtype"])),
                                      **s["options"])
        elif op == "set_num_experts_config":
            models.set_num_experts_config(out, s["n"])
        elif op == "set_expert_counts_config":
            models.set_expert_counts_config(out)
        elif op == "remove_layers":
            models.remove_layers(out, s["layers"])
        elif op == "slice_hidden":
            models.slice_hidden(out, torch.tensor(s["channels"]), allow_unaligned=s["allow_unaligned"])
        elif op == "scale_norm_outputs":
            models.scale_norm_outputs(out, s["factors"])
        elif op == "slice_expert_width":
            models.slice_expert_width(out, {int(i): torch.tensor(v) for i, v in s["keep"].items()},
                                      None if s["shared_keep"] is None
                                      else {int(i): torch.tensor(v) for i, v in s["shared_keep"].items()},
                                      allow_unaligned=s["allow_unaligned"])
        elif op == "low_rank_sparse":
            out, _ = compress.low_rank_sparse_model(out, s["sparsity"], rank=s["rank"], rank_fraction=s["rank_fraction"])
        elif op == "densify":
            out = compress.densify(out)
        else:
            raise ValueError(f"unknown recipe step {op!r} (written by a newer moelab?)")
    return out
