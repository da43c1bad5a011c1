"""One adapter over every supported transformers Mixture-of-Experts family.

transformers 5.x stores the routed experts of a sparse block as fused 3-D tensors, but each family
differs in where the block lives, what the router is called, how the fused tensors are laid out,
which config fields hold the counts and how a token picks its experts. All of that is written down
in one table, :data:`FAMILIES` (a :class:`FamilySpec` per ``config.model_type``). Everything else in
moelab goes through :class:`MoELayer` views and the editing functions below, and so only ever sees
uniform expert-first tensors:

* ``gate`` / ``up``: ``[E, I, H]``, ``down``: ``[E, H, I]`` (``f_e(x) = down_e(act(gate_e x) * up_e x)``);
* ``gate_bias`` / ``up_bias``: ``[E, I]``, ``down_bias``: ``[E, H]`` where the family has biases;
* the router weight ``[E, H]`` and the other expert-indexed tensors (``router_bias``,
  ``score_correction_bias``) as ``[E]``.

Edits (``prune_experts``, ``set_experts``, ``slice_expert_width``, ``slice_hidden``) replace the
edited tensors by new ``nn.Parameter`` objects (no views into the old storage) with the old dtype
and device, update every cached count (module attributes, ``nn.Linear`` features, config fields),
and are checked against a reference model built on the meta device from the edited config, so that
``save_pretrained`` + ``from_pretrained`` rebuild exactly the edited model.

Per-layer expert counts (MC-SMoE's adaptive merging, MC-SMoE, arXiv 2310.01334). A transformers config
holds one routed-expert count for all layers, so the family's own class cannot rebuild a model whose
MoE layers keep different counts (it fails on the shape mismatch, and with
``ignore_mismatched_sizes=True`` it silently re-initialises the mismatched experts).
``moelab.io.save_checkpoint`` writes such a model as a checkpoint that carries its own modeling file,
which stock transformers runs with ``trust_remote_code=True``:

* ``config.json``: the family's config with its count field (``num_experts``, ``num_local_experts``,
  ``n_routed_experts`` ...) set to the LARGEST per-layer count, plus ``moelab_experts_per_layer``
  (:data:`NONUNIFORM_KEY`): one entry per decoder layer, the routed-expert count of a MoE layer and
  ``null`` for a dense layer (:func:`set_expert_counts_config` writes both from the modules);
  ``moelab_expert_tensors`` (:data:`NONUNIFORM_PLAN_KEY`, :func:`expert_tensor_plan`): which tensors
  of a decoder layer are indexed by expert and which attributes cache the count; ``model_type``
  ``moelab_nonuniform_<family>`` with the family in ``moelab_base_model_type``, and ``auto_map``
  pointing at the modeling file;
* ``modeling_moelab_nonuniform.py`` (:data:`NONUNIFORM_MODELING`, the source of
  ``moelab.nonuniform_modeling``): the family's classes, whose ``__init__`` cuts each MoE layer to its
  count and whose ``from_pretrained`` loads strictly. It imports nothing from moelab;
* ``model.safetensors`` (sharded as ``save_pretrained`` shards): the state dict under its in-memory
  names (fused expert tensors, tied tensors once);
* ``generation_config.json`` and the tokenizer files as usual.

Without ``trust_remote_code=True``, transformers does not know the model_type and stops with its own
message asking for the flag, so nothing ever builds the wrong shapes. :func:`load_model` (and so
``zoo.load``) reloads the checkpoint with moelab's own copy of the classes (it never runs the file in
the checkpoint) through ``from_pretrained`` (every placement option works), returns the family's own
class with each layer at its count, and checks it against the config; the logits are those of the
saved model. Checkpoints of moelab's earlier form (the weights in ``moelab-nonuniform-experts.safetensors``,
:data:`NONUNIFORM_WEIGHTS`, and no modeling file) still load, on one device. A model whose layers all
have the same count is always saved as a plain ``from_pretrained`` checkpoint.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import recipe

__all__ = [
    "FAMILIES",
    "NONUNIFORM_KEY",
    "NONUNIFORM_MODELING",
    "NONUNIFORM_PLAN_KEY",
    "NONUNIFORM_WEIGHTS",
    "FamilySpec",
    "MoELayer",
    "RouteOut",
    "UnsupportedModelError",
    "check_consistency",
    "check_layer_counts",
    "check_target",
    "decoder_layers",
    "expert_counts",
    "expert_tensor_plan",
    "nonuniform_classes",
    "shape_problems",
    "experts_per_layer",
    "family_of",
    "is_offloaded",
    "load_model",
    "moe_layers",
    "prune_experts",
    "set_expert_counts_config",
    "set_experts",
    "set_num_experts_config",
    "slice_expert_width",
    "slice_hidden",
    "tiny_config",
    "tiny_model",
    "tiny_nonuniform_model",
    "valid_expert_counts",
]


class UnsupportedModelError(ValueError):
    """The model is a Mixture-of-Experts model that this adapter does not describe."""


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexedRef:
    """An expert-indexed tensor of a sparse block other than the router weight and the experts.

    ``path`` is relative to the sparse block, ``dim`` is the tensor's expert dimension. Its uniform
    view moves that dimension first and drops the other size-1 dimensions (``[1, E]`` -> ``[E]``).
    """

    path: str
    dim: int = 0


@dataclass(frozen=True)
class FamilySpec:
    """How one transformers MoE family stores and uses its router and experts.

    Layout of the fused experts: ``gate_up`` is ``[E, 2I, H]`` with the gate rows first
    (``transposed=False, interleaved=False``), or ``[E, H, 2I]`` (``transposed``), with gate/up
    columns alternating (``interleaved``); ``down`` is ``[E, H, I]`` or ``[E, I, H]`` (``transposed``).
    """

    model_type: str
    # where things are
    block_attr: str = "mlp"  # attribute of a decoder layer holding the sparse block
    router_attr: str = "gate"  # attribute of the block holding the router
    router_weight: str = "weight"  # parameter of the router, [E, H]
    router_is_linear: bool = False  # the router is an nn.Linear(H, E) (out_features caches E)
    experts_attr: str = "experts"  # attribute of the block holding the fused experts module
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    gate_up_bias: str | None = None
    down_bias: str | None = None
    transposed: bool = False
    interleaved: bool = False
    # uniform name -> tensor (relative to the block) for the other expert-indexed tensors
    indexed: tuple[tuple[str, IndexedRef], ...] = ()
    # expert function: "glu" = down(act_fn(gate x) * up x); "gpt_oss_glu" = clamped swiglu with alpha
    activation: str = "glu"
    # config fields
    num_experts_field: str = "num_local_experts"
    top_k_field: str = "num_experts_per_tok"
    intermediate_field: str = "intermediate_size"
    # routing: kind, and a (config field, {value: kind}) switch where the config picks it
    routing: str = "softmax_topk"
    routing_switch: tuple[str, tuple[tuple[Any, str], ...]] | None = None
    norm_topk_attr: str | None = None  # router/config attribute saying whether top-k is renormalised
    norm_topk_fixed: bool | None = None  # when the family always / never renormalises
    fixed_top_k: int | None = None  # a family whose router ignores the configured top-k
    logits_fp32: bool = False  # the router computes logits from float32 copies of input and weight
    # uniform router parameter name -> router attribute (read live), e.g. "scaling" -> routed_scaling_factor
    router_params: tuple[tuple[str, str], ...] = ()
    weight_on_input: bool = False  # routing weights scale the expert input, not its output (Llama4)
    # shared expert(s)
    shared_attr: str | None = None
    shared_gate_attr: str | None = None  # sigmoid gate Linear(H, 1) on the shared expert's output
    # how the config fixes the shared expert's width: ("field", name) its own field;
    # ("multiple", name): moe_intermediate_size * config.<name>; ("same", "") equal to the expert width
    shared_width: tuple[str, str] | None = None
    # group-limited routing: ("sum_top2", ...) needs >= 2 experts per group, ("max", ...) >= 1
    group_scoring: str | None = None
    # which decoder layers are sparse, from the config (cross-checked against the modules)
    sparse_rule: Callable[[Any, int], bool] = field(default=lambda config, i: True, compare=False)
    notes: str = ""

    def indexed_refs(self) -> dict[str, IndexedRef]:
        return dict(self.indexed)

    def router_param_names(self) -> dict[str, str]:
        return dict(self.router_params)


def _qwen_sparse(config, i: int) -> bool:
    return (
        i not in (config.mlp_only_layers or [])
        and config.num_experts > 0
        and (i + 1) % config.decoder_sparse_step == 0
    )


def _first_k_dense(config, i: int) -> bool:
    return i >= (config.first_k_dense_replace or 0)


def _ernie_sparse(config, i: int) -> bool:
    return (
        (i + 1) % config.moe_layer_interval == 0
        and i >= config.moe_layer_start_index
        and i <= config.moe_layer_end_index
    )


_SCORE_BIAS = "score_correction_bias"
_ROUTER_BIAS = "router_bias"

_QWEN2_MOE = FamilySpec(
    "qwen2_moe",
    num_experts_field="num_experts",
    intermediate_field="moe_intermediate_size",
    norm_topk_attr="norm_topk_prob",
    shared_attr="shared_expert",
    shared_gate_attr="shared_expert_gate",
    shared_width=("field", "shared_expert_intermediate_size"),
    sparse_rule=_qwen_sparse,
)

_DEEPSEEK_V3 = FamilySpec(
    "deepseek_v3",
    num_experts_field="n_routed_experts",
    intermediate_field="moe_intermediate_size",
    routing="sigmoid_bias_group",
    norm_topk_attr="norm_topk_prob",
    logits_fp32=True,
    indexed=((_SCORE_BIAS, IndexedRef("gate.e_score_correction_bias")),),
    router_params=(("scaling", "routed_scaling_factor"), ("n_group", "num_group"), ("topk_group", "topk_group")),
    shared_attr="shared_experts",
    shared_width=("multiple", "n_shared_experts"),
    group_scoring="sum_top2",
    sparse_rule=_first_k_dense,
)

FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in [
        FamilySpec(
            "mixtral",
            routing="softmax_topk_norm",
            norm_topk_fixed=True,
        ),
        _QWEN2_MOE,
        FamilySpec(
            "qwen3_moe",
            num_experts_field="num_experts",
            intermediate_field="moe_intermediate_size",
            norm_topk_attr="norm_topk_prob",
            sparse_rule=_qwen_sparse,
        ),
        replace(_QWEN2_MOE, model_type="qwen3_next", notes="hybrid token mixers (linear_attn / self_attn) per layer"),
        FamilySpec(
            "olmoe",
            num_experts_field="num_experts",
            norm_topk_attr="norm_topk_prob",
        ),
        FamilySpec(
            "deepseek_v2",
            num_experts_field="n_routed_experts",
            intermediate_field="moe_intermediate_size",
            routing="softmax_topk",
            routing_switch=("topk_method", (("greedy", "softmax_topk"), ("group_limited_greedy", "softmax_group_limited"))),
            norm_topk_fixed=False,  # the V2 router ignores config.norm_topk_prob
            logits_fp32=True,
            router_params=(("scaling", "routed_scaling_factor"), ("n_group", "num_group"), ("topk_group", "topk_group")),
            shared_attr="shared_experts",
            shared_width=("multiple", "n_shared_experts"),
            group_scoring="max",
            sparse_rule=_first_k_dense,
        ),
        _DEEPSEEK_V3,
        replace(_DEEPSEEK_V3, model_type="glm4_moe"),  # GLM4-MoE routes exactly like DeepSeek-V3
        FamilySpec(
            "gpt_oss",
            router_attr="router",
            gate_up_bias="gate_up_proj_bias",
            down_bias="down_proj_bias",
            transposed=True,
            interleaved=True,
            indexed=((_ROUTER_BIAS, IndexedRef("router.bias")),),
            activation="gpt_oss_glu",
            routing="topk_softmax",
            norm_topk_fixed=True,
        ),
        FamilySpec(
            "granitemoe",
            block_attr="block_sparse_moe",
            router_attr="router",
            routing="topk_softmax",
            norm_topk_fixed=True,
        ),
        FamilySpec(
            "phimoe",
            router_attr="router",
            router_is_linear=True,
            routing="sparsemixer",
            norm_topk_fixed=False,
            fixed_top_k=2,
            router_params=(("jitter_eps", "router_jitter_noise"),),
            notes="sparsemixer routing always picks 2 experts (eval mode)",
        ),
        FamilySpec(
            "llama4_text",
            block_attr="feed_forward",
            router_attr="router",
            router_is_linear=True,
            transposed=True,
            routing="topk_sigmoid",
            norm_topk_fixed=False,
            weight_on_input=True,
            shared_attr="shared_expert",
            shared_width=("same", ""),
            sparse_rule=lambda config, i: i in config.moe_layers,
            notes="experts compute f_e(w * x); shared expert width = config.intermediate_size",
        ),
        FamilySpec(
            "ernie4_5_moe",
            num_experts_field="moe_num_experts",
            top_k_field="moe_k",
            intermediate_field="moe_intermediate_size",
            routing="softmax_bias_topk_norm",
            norm_topk_fixed=True,
            logits_fp32=True,
            indexed=((_SCORE_BIAS, IndexedRef("gate.moe_statics.e_score_correction_bias", dim=1)),),
            router_params=(("norm_min", "norm_min"),),
            shared_attr="shared_experts",
            shared_width=("multiple", "moe_num_shared_experts"),
            sparse_rule=_ernie_sparse,
        ),
    ]
}

# module attributes that cache the routed-expert count / the expert width / the hidden size
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
_WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim", "ffn_dim")
_HIDDEN_ATTRS = ("hidden_size", "hidden_dim", "input_size", "embed_dim")


# --------------------------------------------------------------------------------------------
# Reading tensors (also through accelerate's offload hooks)
# --------------------------------------------------------------------------------------------


def _get(module: nn.Module, name: str) -> Tensor:
    """The tensor ``module.<name>`` with its real data, also when accelerate offloaded it."""
    t = getattr(module, name)
    if t is not None and t.device.type == "meta":
        hook = getattr(module, "_hf_hook", None)
        weights_map = getattr(hook, "weights_map", None) if hook is not None else None
        if weights_map is not None and name in weights_map:
            real = weights_map[name]
            exec_device = getattr(hook, "execution_device", None)
            return real.to(exec_device) if exec_device is not None else real
    return t  # a real tensor, or a meta tensor of a model built on the meta device (shapes only)


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``"gate.moe_statics.e_score_correction_bias"`` -> (the moe_statics module, attribute name)."""
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def is_offloaded(model: nn.Module) -> bool:
    """True when accelerate offloaded some weights (they sit on the meta device behind hooks)."""
    return any(p.device.type == "meta" for p in model.parameters())


def _ensure_editable(model: nn.Module) -> None:
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} was dispatched with offloaded weights (some parameters live on "
            "the meta device behind accelerate hooks); editing it is not supported. Load it without "
            "offload (load_model(path) with device_map=None, or a device_map that keeps every weight "
            "on a real device) to prune, merge or slice it."
        )


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace a parameter or buffer by a fresh tensor (old dtype/device, own storage)."""
    old = getattr(module, name)
    value = value.detach().to(dtype=old.dtype, device=old.device)
    # copy only when needed: a view, a non-contiguous tensor, or storage shared with the old tensor
    storage = value.untyped_storage()
    if (
        not value.is_contiguous()
        or storage.nbytes() != value.numel() * value.element_size()
        or (old.device.type != "meta" and storage.data_ptr() == old.untyped_storage().data_ptr())
    ):
        value = value.clone(memory_format=torch.contiguous_format)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:  # a buffer; keep its persistence
        persistent = name not in module._non_persistent_buffers_set
        module.register_buffer(name, value, persistent=persistent)


def _select(t: Tensor, dim: int, idx: Tensor) -> Tensor:
    return t.index_select(dim, idx.to(t.device))


# --------------------------------------------------------------------------------------------
# Finding the layers
# --------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (``model.model.layers`` for every supported family)."""
    for cand in (getattr(model, "model", None), getattr(model, "base_model", None), model):
        layers = getattr(cand, "layers", None) if cand is not None else None
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UnsupportedModelError(f"{type(model).__name__}: no decoder layer list (model.model.layers) found")


def _looks_moe(model: nn.Module) -> str | None:
    """Name of the first module that looks like a MoE block or experts container, if any."""
    from transformers import PreTrainedModel

    mods = [(n, m) for n, m in model.named_modules() if n and not isinstance(m, PreTrainedModel)]
    for name, m in mods:
        if "expert" in type(m).__name__.lower() or isinstance(getattr(m, "experts", None), nn.Module):
            return f"{name} ({type(m).__name__})"
    for name, m in mods:
        if "moe" in type(m).__name__.lower():
            return f"{name} ({type(m).__name__})"
    cfg = getattr(model, "config", None)
    for f in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if cfg is not None and (getattr(cfg, f, None) or 0) > 1:
            return f"config.{f}={getattr(cfg, f)}"
    return None


def _family_type(config) -> str | None:
    """The family's model_type; a non-uniform checkpoint loaded through its own modeling file
    (``trust_remote_code=True``) names its family in ``moelab_base_model_type``."""
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type.startswith(NONUNIFORM_TYPE_PREFIX):
        return getattr(config, NONUNIFORM_BASE_KEY, None) or model_type[len(NONUNIFORM_TYPE_PREFIX):]
    return model_type


def family_of(model: nn.Module) -> FamilySpec:
    """The :class:`FamilySpec` describing ``model``; clear errors for other models."""
    cfg = getattr(model, "config", None)
    model_type = _family_type(cfg)
    cls = type(model).__name__
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    hint = _looks_moe(model)
    if hint is None:
        raise ValueError(
            f"{cls} (model_type={model_type!r}) has no MoE layers: no experts module and no expert "
            "count in its config. moelab edits Mixture-of-Experts models only."
        )
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else None
    extra = ""
    if text_cfg is not None and text_cfg is not cfg and getattr(text_cfg, "model_type", None) in FAMILIES:
        extra = (
            f" Its text model ({text_cfg.model_type!r}) is supported: load the causal LM alone "
            "(e.g. AutoModelForCausalLM with its text config)."
        )
    raise UnsupportedModelError(
        f"{cls} (model_type={model_type!r}) is a Mixture-of-Experts model (found {hint}) but moelab has "
        f"no FamilySpec for it: moelab.models.FAMILIES lacks an entry saying where its sparse block, "
        f"router and fused experts live, their layout, its count/top-k config fields and its routing. "
        f"Supported model types: {', '.join(sorted(FAMILIES))}.{extra}"
    )


def _check_structure(spec: FamilySpec, block: nn.Module, where: str, cls: str) -> None:
    missing = []
    router = getattr(block, spec.router_attr, None)
    experts = getattr(block, spec.experts_attr, None)
    if router is None:
        missing.append(f"router '{spec.router_attr}'")
    elif not isinstance(getattr(router, spec.router_weight, None), Tensor):
        missing.append(f"router weight '{spec.router_attr}.{spec.router_weight}'")
    if experts is None:
        missing.append(f"experts '{spec.experts_attr}'")
    else:
        for n in (spec.gate_up, spec.down, spec.gate_up_bias, spec.down_bias):
            if n is not None and not isinstance(getattr(experts, n, None), Tensor):
                missing.append(f"fused tensor '{spec.experts_attr}.{n}'")
    if experts is not None:
        # experts classes decorated with @use_experts_implementation declare their layout
        for flag, want in (("is_transposed", spec.transposed), ("is_concatenated", not spec.interleaved),
                           ("has_bias", spec.gate_up_bias is not None)):
            have = getattr(experts, flag, None)
            if isinstance(have, bool) and have != want:
                missing.append(f"layout flag experts.{flag}={want} (the module says {have})")
    for uname, ref in spec.indexed:
        try:
            mod, n = _resolve(block, ref.path)
            if not isinstance(getattr(mod, n, None), Tensor):
                raise AttributeError
        except AttributeError:
            missing.append(f"{uname} '{ref.path}'")
    if missing:
        raise UnsupportedModelError(
            f"{cls}: the sparse block at {where} ({type(block).__name__}) does not match the "
            f"{spec.model_type!r} FamilySpec: missing {', '.join(missing)} (a transformers version with a "
            "different layout?)"
        )


def moe_layers(model: nn.Module) -> list["MoELayer"]:
    """Views over the sparse MoE blocks of ``model``, in layer order (dense layers are skipped)."""
    spec = family_of(model)
    cls = type(model).__name__
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, spec.block_attr, None)
        if block is None or not hasattr(block, spec.experts_attr):
            continue
        _check_structure(spec, block, f"layers.{i}.{spec.block_attr}", cls)
        out.append(MoELayer(model, i, block, spec))
    expected = [i for i in range(len(decoder_layers(model))) if spec.sparse_rule(model.config, i)]
    found = [m.layer_idx for m in out]
    if found != expected:
        raise UnsupportedModelError(
            f"{cls}: sparse layers found in the modules {found} differ from those its config implies "
            f"{expected}; the {spec.model_type!r} FamilySpec does not describe this model"
        )
    if not out:
        raise ValueError(f"{cls} (model_type={spec.model_type!r}) has no MoE layers under this config")
    return out


# --------------------------------------------------------------------------------------------
# The view
# --------------------------------------------------------------------------------------------


@dataclass
class RouteOut:
    router_logits: Tensor  # [T, E] raw logits
    probs: Tensor  # [T, E] per-expert probability (softmax over all experts, or sigmoid)
    topk_idx: Tensor  # [T, K] selected experts, exactly as the family selects
    topk_weight: Tensor  # [T, K] the weights the family multiplies expert outputs (Llama4: inputs) by


class MoELayer:
    """A view over one sparse MoE block of one decoder layer (reads live from the modules)."""

    def __init__(self, model: nn.Module, layer_idx: int, block: nn.Module, spec: FamilySpec):
        self.model = model
        self.layer_idx = layer_idx
        self.block = block
        self.spec = spec

    def __repr__(self) -> str:
        return (
            f"MoELayer({self.spec.model_type}, layer={self.layer_idx}, E={self.num_experts}, "
            f"K={self.top_k}, H={self.hidden_size}, I={self.intermediate_size}, routing={self.routing})"
        )

    # -- modules ---------------------------------------------------------------------------
    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.spec.router_attr)

    def experts_module(self) -> nn.Module:
        return getattr(self.block, self.spec.experts_attr)

    def shared_expert(self) -> nn.Module | None:
        return getattr(self.block, self.spec.shared_attr) if self.spec.shared_attr else None

    def shared_expert_gate(self) -> nn.Module | None:
        """The Linear(H, 1) whose sigmoid scales the shared expert's output (Qwen2-MoE, Qwen3-Next)."""
        return getattr(self.block, self.spec.shared_gate_attr) if self.spec.shared_gate_attr else None

    # -- sizes -----------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return getattr(self.router, self.spec.router_weight).shape[0]

    @property
    def hidden_size(self) -> int:
        return getattr(self.router, self.spec.router_weight).shape[1]

    @property
    def intermediate_size(self) -> int:
        gu = getattr(self.experts_module(), self.spec.gate_up)
        return (gu.shape[2] if self.spec.transposed else gu.shape[1]) // 2

    @property
    def top_k(self) -> int:
        if self.spec.fixed_top_k is not None:
            return self.spec.fixed_top_k
        for m in (self.router, self.block):
            k = getattr(m, "top_k", None)
            if isinstance(k, int):
                return k
        return int(getattr(self.model.config, self.spec.top_k_field))

    @property
    def norm_topk_prob(self) -> bool:
        """Whether the top-k weights are renormalised to sum to 1 (before any routed scaling)."""
        if self.spec.norm_topk_fixed is not None:
            return self.spec.norm_topk_fixed
        attr = self.spec.norm_topk_attr
        for src in (self.router, self.model.config):
            v = getattr(src, attr, None)
            if v is not None:
                return bool(v)
        return False

    @property
    def routing(self) -> str:
        spec = self.spec
        kind = spec.routing
        if spec.routing_switch is not None:
            fld, table = spec.routing_switch
            val = getattr(self.model.config, fld)
            table = dict(table)
            if val not in table:
                raise UnsupportedModelError(f"{spec.model_type}: config.{fld}={val!r} is not a known routing mode")
            kind = table[val]
        if kind == "softmax_topk" and self.norm_topk_prob:
            kind = "softmax_topk_norm"
        return kind

    def router_param(self, name: str, default: Any = None) -> Any:
        """A routing hyper-parameter by its uniform name (scaling, n_group, topk_group, norm_min, jitter_eps)."""
        attr = self.spec.router_param_names().get(name)
        if attr is None:
            return default
        return getattr(self.router, attr, default)

    @property
    def group_limited(self) -> bool:
        return self.routing in ("sigmoid_bias_group", "softmax_group_limited")

    # -- tensors ---------------------------------------------------------------------------
    def _router_weight(self) -> Tensor:
        return _get(self.router, self.spec.router_weight)

    def router_weight(self) -> Tensor:
        """The router weight ``[E, H]`` (a copy)."""
        return self._router_weight().detach().clone()

    def _indexed(self) -> dict[str, Tensor]:
        out = {}
        E = self.num_experts
        for uname, ref in self.spec.indexed:
            mod, n = _resolve(self.block, ref.path)
            t = _get(mod, n).detach()
            out[uname] = t.movedim(ref.dim, 0).reshape(E, -1).squeeze(-1) if t.dim() > 1 else t
        return out

    def expert_indexed(self) -> dict[str, Tensor]:
        """Other expert-indexed tensors, uniform ``[E, ...]``: router_bias, score_correction_bias."""
        return {k: v.clone() for k, v in self._indexed().items()}

    def _uniform(self) -> dict[str, Tensor]:
        """Uniform views (no copies where the layout allows) of the expert weights."""
        spec, ex = self.spec, self.experts_module()
        gu = _get(ex, spec.gate_up).detach()
        dn = _get(ex, spec.down).detach()
        if spec.transposed:
            gu = gu.transpose(1, 2)  # [E, 2I, H]
            dn = dn.transpose(1, 2)  # [E, H, I]
        if spec.interleaved:
            gate, up = gu[:, 0::2], gu[:, 1::2]
        else:
            I = gu.shape[1] // 2
            gate, up = gu[:, :I], gu[:, I:]
        w = {"gate": gate, "up": up, "down": dn}
        if spec.gate_up_bias:
            b = _get(ex, spec.gate_up_bias).detach()
            if spec.interleaved:
                w["gate_bias"], w["up_bias"] = b[:, 0::2], b[:, 1::2]
            else:
                I = b.shape[1] // 2
                w["gate_bias"], w["up_bias"] = b[:, :I], b[:, I:]
        if spec.down_bias:
            w["down_bias"] = _get(ex, spec.down_bias).detach()
        return w

    def expert_weights(self) -> dict[str, Tensor]:
        """Uniform copies: gate/up ``[E, I, H]``, down ``[E, H, I]`` (+ gate_bias/up_bias ``[E, I]``, down_bias ``[E, H]``)."""
        return {k: v.contiguous().clone() for k, v in self._uniform().items()}

    # -- compute ---------------------------------------------------------------------------
    def _act(self, gate: Tensor, up: Tensor) -> Tensor:
        ex = self.experts_module()
        if self.spec.activation == "glu":
            return ex.act_fn(gate) * up
        if self.spec.activation == "gpt_oss_glu":
            limit, alpha = ex.limit, ex.alpha
            gate = gate.clamp(min=None, max=limit)
            up = up.clamp(min=-limit, max=limit)
            return (up + 1) * (gate * torch.sigmoid(gate * alpha))
        raise UnsupportedModelError(f"unknown activation kind {self.spec.activation!r}")

    def expert_forward(self, e: int, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """``f_e(x)`` un-gated, ``[n, H] -> [n, H]``, from the uniform weights (``weights`` overrides them)."""
        w = self._uniform() if weights is None else weights
        g = F.linear(x, w["gate"][e], w["gate_bias"][e] if "gate_bias" in w else None)
        u = F.linear(x, w["up"][e], w["up_bias"][e] if "up_bias" in w else None)
        return F.linear(self._act(g, u), w["down"][e], w["down_bias"][e] if "down_bias" in w else None)

    def router_logits(self, hidden: Tensor, router_weight: Tensor | None = None) -> Tensor:
        W = self._router_weight() if router_weight is None else router_weight
        bias = self._indexed().get(_ROUTER_BIAS)
        if self.spec.logits_fp32:
            return F.linear(hidden.float(), W.float(), None if bias is None else bias.float())
        return F.linear(hidden, W, bias)

    def route(self, hidden: Tensor, router_weight: Tensor | None = None) -> RouteOut:
        """Route ``hidden`` ``[T, H]`` (the input of the sparse block) exactly as the family does (eval mode)."""
        hidden = hidden.reshape(-1, self.hidden_size)
        logits = self.router_logits(hidden, router_weight)
        return _route(self, hidden, logits)

    def shared_output(self, hidden: Tensor) -> Tensor | None:
        """The shared expert's contribution (gated where the family gates it), or None."""
        sh = self.shared_expert()
        if sh is None:
            return None
        y = sh(hidden)
        g = self.shared_expert_gate()
        if g is not None:
            y = torch.sigmoid(g(hidden)) * y
        return y

    def moe_forward(self, hidden: Tensor) -> Tensor:
        """The block's output rebuilt from route() + expert_forward() + the shared expert, ``[T, H]``."""
        hidden = hidden.reshape(-1, self.hidden_size)
        r = self.route(hidden)
        w = self._uniform()
        out = torch.zeros_like(hidden)
        for e in r.topk_idx.unique().tolist():
            tok, pos = torch.where(r.topk_idx == e)
            gw = r.topk_weight[tok, pos, None].to(hidden.dtype)
            if self.spec.weight_on_input:
                y = self.expert_forward(e, hidden[tok] * gw, w)
            else:
                y = self.expert_forward(e, hidden[tok], w) * gw
            out.index_add_(0, tok, y.to(out.dtype))
        sh = self.shared_output(hidden)
        if sh is not None:
            out = out + sh
        return out

    def block_forward(self, hidden: Tensor) -> Tensor:
        """Run the family's own sparse block on ``hidden`` ``[T, H]`` and return ``[T, H]``."""
        out = self.block(hidden.reshape(1, -1, self.hidden_size))
        if isinstance(out, tuple):
            out = out[0]
        return out.reshape(-1, self.hidden_size)

    # -- editing (internal; see the module-level functions) ---------------------------------
    def _set_count(self, n: int) -> None:
        skip = set()
        sh = self.shared_expert()
        if sh is not None:
            skip = {id(m) for m in sh.modules()}
        for m in self.block.modules():
            if id(m) in skip:
                continue
            for a in _COUNT_ATTRS:
                if isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool):
                    setattr(m, a, n)
        if self.spec.router_is_linear:
            self.router.out_features = n

    def _write_indexed(self, values: Mapping[str, Tensor], n: int) -> None:
        for uname, ref in self.spec.indexed:
            mod, name = _resolve(self.block, ref.path)
            old = getattr(mod, name)
            v = values[uname]
            if v.shape[0] != n:
                raise ValueError(f"{uname} has {v.shape[0]} rows, expected {n}")
            if old.dim() > 1:  # back to the stored layout, e.g. [E] -> [1, E]
                rest = [s for d, s in enumerate(old.shape) if d != ref.dim]
                v = v.reshape(n, *rest).movedim(0, ref.dim)
            _replace(mod, name, v)

    def _write_experts(self, w: Mapping[str, Tensor]) -> None:
        spec, ex = self.spec, self.experts_module()
        gate, up, down = w["gate"], w["up"], w["down"]
        E, I, H = gate.shape
        if up.shape != (E, I, H) or down.shape != (E, H, I):
            raise ValueError(
                f"expert weights must be gate/up [E, I, H] and down [E, H, I]; got gate {tuple(gate.shape)}, "
                f"up {tuple(up.shape)}, down {tuple(down.shape)}"
            )
        if spec.interleaved:
            gu = torch.stack([gate, up], dim=2).reshape(E, 2 * I, H)
        else:
            gu = torch.cat([gate, up], dim=1)
        if spec.transposed:
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)
        _replace(ex, spec.gate_up, gu)
        _replace(ex, spec.down, down)
        if spec.gate_up_bias:
            gb, ub = w.get("gate_bias"), w.get("up_bias")
            if gb is None or ub is None:
                raise ValueError(f"{spec.model_type} experts have biases: pass gate_bias and up_bias [E, I]")
            b = torch.stack([gb, ub], dim=2).reshape(E, 2 * I) if spec.interleaved else torch.cat([gb, ub], dim=1)
            _replace(ex, spec.gate_up_bias, b)
        if spec.down_bias:
            if w.get("down_bias") is None:
                raise ValueError(f"{spec.model_type} experts have biases: pass down_bias [E, H]")
            _replace(ex, spec.down_bias, w["down_bias"])

    def _select_experts(self, idx: Tensor) -> None:
        """Keep experts ``idx`` (in that order): router rows, expert-indexed tensors, fused weights."""
        spec, ex = self.spec, self.experts_module()
        n = int(idx.numel())
        _replace(self.router, spec.router_weight, _select(getattr(self.router, spec.router_weight), 0, idx))
        for uname, ref in spec.indexed:
            mod, name = _resolve(self.block, ref.path)
            _replace(mod, name, _select(getattr(mod, name), ref.dim, idx))
        for name in (spec.gate_up, spec.down, spec.gate_up_bias, spec.down_bias):
            if name:
                _replace(ex, name, _select(getattr(ex, name), 0, idx))
        self._set_count(n)


# --------------------------------------------------------------------------------------------
# Routing kinds
# --------------------------------------------------------------------------------------------


def _route(layer: MoELayer, hidden: Tensor, logits: Tensor) -> RouteOut:
    kind, K = layer.routing, layer.top_k
    E = logits.shape[-1]
    if kind in ("softmax_topk", "softmax_topk_norm") and not layer.spec.logits_fp32:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        w, idx = torch.topk(probs, K, dim=-1)
        if kind == "softmax_topk_norm":
            w = w / w.sum(dim=-1, keepdim=True)
        return RouteOut(logits, probs, idx, w.to(logits.dtype))
    if kind in ("softmax_topk", "softmax_group_limited"):  # DeepSeek-V2
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        scores = probs
        if kind == "softmax_group_limited":
            G, TG = layer.router_param("n_group"), layer.router_param("topk_group")
            group_scores = scores.view(-1, G, E // G).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=TG, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            mask = mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            scores = scores.masked_fill(~mask.bool(), 0.0)
        w, idx = torch.topk(scores, k=K, dim=-1, sorted=False)
        return RouteOut(logits, probs, idx, w * layer.router_param("scaling", 1.0))
    if kind == "sigmoid_bias_group":  # DeepSeek-V3, GLM4-MoE
        probs = logits.sigmoid()
        choice = probs + layer._indexed()[_SCORE_BIAS]
        G, TG = layer.router_param("n_group"), layer.router_param("topk_group")
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=TG, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        mask = mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        choice = choice.masked_fill(~mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=K, dim=-1, sorted=False)[1]
        w = probs.gather(1, idx)
        if layer.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return RouteOut(logits, probs, idx, w * layer.router_param("scaling", 1.0))
    if kind == "topk_softmax":  # GPT-OSS, GraniteMoe
        lg = logits.float() if layer.spec.model_type == "granitemoe" else logits
        top, idx = torch.topk(lg, K, dim=-1)
        w = torch.softmax(top, dim=-1, dtype=top.dtype)
        if layer.spec.model_type == "granitemoe":
            w = w.type_as(hidden)
        return RouteOut(logits, torch.softmax(logits, dim=-1, dtype=torch.float), idx, w)
    if kind == "topk_sigmoid":  # Llama4
        top, idx = torch.topk(logits, K, dim=1)
        w = torch.sigmoid(top.float()).to(logits.dtype)
        return RouteOut(logits, torch.sigmoid(logits.float()), idx, w)
    if kind == "softmax_bias_topk_norm":  # ERNIE-4.5-MoE
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        idx = torch.topk(probs + layer._indexed()[_SCORE_BIAS].float(), K, dim=-1)[1]
        w = torch.gather(probs, dim=-1, index=idx)
        w = w / torch.clamp(w.sum(dim=-1, keepdim=True), min=layer.router_param("norm_min", 1e-12))
        return RouteOut(logits, probs, idx, w.to(hidden.dtype))
    if kind == "sparsemixer":  # PhiMoE, eval mode (top-2)
        idx, w = _sparsemixer_eval(logits, layer.router_param("jitter_eps", 0.0))
        return RouteOut(logits, torch.softmax(logits, dim=-1, dtype=torch.float), idx, w)
    raise UnsupportedModelError(f"unknown routing kind {kind!r}")


def _sparsemixer_eval(scores: Tensor, jitter_eps: float) -> tuple[Tensor, Tensor]:
    """PhiMoE's sparsemixer in eval mode: the top expert, then the best of the rest, each weighted
    by a softmax over the logits within a relative-margin window of that expert."""
    thr, first = scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=thr)
    masked = scores.masked_fill(((thr - scores) / factor) > (2 * jitter_eps), float("-inf"))
    w1 = torch.softmax(masked, dim=-1).gather(dim=-1, index=first)
    rest = torch.scatter(scores, -1, first, float("-inf"))
    thr2, second = rest.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=thr2)
    masked2 = rest.masked_fill(((thr2 - scores) / factor) > (2 * jitter_eps), float("-inf"))
    w2 = torch.softmax(masked2, dim=-1).gather(dim=-1, index=second)
    return torch.cat([first, second], dim=-1), torch.cat([w1, w2], dim=-1)


# --------------------------------------------------------------------------------------------
# Counts and checks
# --------------------------------------------------------------------------------------------


def _count_ok(layer: MoELayer, n: int) -> str | None:
    """Why ``n`` experts would not work for this layer's routing (None if it works)."""
    if n < layer.top_k:
        return f"{n} is below top_k={layer.top_k}"
    if layer.group_limited:
        G, TG = layer.router_param("n_group"), layer.router_param("topk_group")
        per = 2 if layer.spec.group_scoring == "sum_top2" else 1
        if n % G:
            return f"{n} is not divisible by n_group={G}"
        if n // G < per:
            return f"{n} gives {n // G} expert(s) per group; this routing scores each group by its top-{per}"
        if TG * (n // G) < layer.top_k:
            return f"{n} leaves topk_group*({n}/n_group)={TG * (n // G)} candidate experts, below top_k={layer.top_k}"
    return None


def valid_expert_counts(model: nn.Module, upto: int | None = None) -> list[int]:
    """Expert counts below the current one (or ``upto``) that the routing of ``model`` accepts."""
    layers = moe_layers(model)
    cur = max(l.num_experts for l in layers) if upto is None else upto
    return [n for n in range(1, cur) if all(_count_ok(l, n) is None for l in layers)]


def check_target(model: nn.Module, num_experts: int) -> None:
    """Raise a clear ValueError when ``num_experts`` is not a valid reduced expert count (TypeError when
    it is not a whole number)."""
    from .checks import whole

    whole(num_experts, "num_experts")
    layers = moe_layers(model)
    counts = sorted({l.num_experts for l in layers})
    cur = counts[-1]
    name = type(model).__name__
    if len(counts) > 1:
        raise ValueError(f"{name}: MoE layers have different expert counts {counts}; make them equal first")
    K = layers[0].top_k
    if num_experts < K:
        raise ValueError(
            f"{name}: target of {num_experts} experts is below top_k={K} (every token uses {K} experts)"
        )
    if num_experts >= cur:
        raise ValueError(
            f"{name}: target of {num_experts} experts is not below the current count {cur}; "
            "pruning/merging must reduce the count"
        )
    for l in layers:
        why = _count_ok(l, num_experts)
        if why is not None:
            ok = valid_expert_counts(model)
            raise ValueError(
                f"{name}: target of {num_experts} experts breaks {l.routing} routing: {why}. "
                f"Counts that work: {ok}"
            )


def check_layer_counts(model: nn.Module, counts: Mapping[int, int]) -> None:
    """Raise a clear ValueError unless ``counts`` (``{layer_idx: n}``, every MoE layer) are per-layer
    expert counts each layer's routing accepts, none above the layer's current count."""
    from .checks import whole

    layers = _layer_map(model)
    _check_keys("check_layer_counts", counts, layers)
    for i, n in sorted(counts.items()):
        whole(n, f"the expert count of layer {i}")
        l = layers[i]
        if n > l.num_experts:
            raise ValueError(f"layer {i}: {n} experts is more than its current {l.num_experts}")
        why = _count_ok(l, int(n))
        if why is not None:
            raise ValueError(f"layer {i}: {n} experts breaks {l.routing} routing: {why}")


@recipe.records("set_num_experts_config", lambda n: {"n": int(n)})
def set_num_experts_config(model: nn.Module, n: int) -> None:
    """Write the routed-expert count into the config (and the model-level cached copies).

    A per-layer count list (:data:`NONUNIFORM_KEY`) is removed: one count now holds for every layer.
    """
    spec = family_of(model)
    setattr(model.config, spec.num_experts_field, int(n))
    if NONUNIFORM_KEY in vars(model.config):
        delattr(model.config, NONUNIFORM_KEY)
    base = getattr(model, "model", None)
    for obj in (model, base):
        if obj is None:
            continue
        for a in _COUNT_ATTRS:
            v = getattr(obj, a, None)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(obj, a, int(n))


# ---- per-layer expert counts (the non-uniform form; see the module docstring) ----------------

NONUNIFORM_KEY = "moelab_experts_per_layer"
NONUNIFORM_PLAN_KEY = "moelab_expert_tensors"
NONUNIFORM_BASE_KEY = "moelab_base_model_type"
NONUNIFORM_TYPE_PREFIX = "moelab_nonuniform_"
NONUNIFORM_MODELING = "modeling_moelab_nonuniform.py"
NONUNIFORM_WEIGHTS = "moelab-nonuniform-experts.safetensors"  # the earlier form's weights file


def expert_counts(model: nn.Module) -> dict[int, int]:
    """The routed-expert count of every MoE layer, ``{decoder layer index: count}``."""
    return {l.layer_idx: l.num_experts for l in moe_layers(model)}


def experts_per_layer(config) -> dict[int, int] | None:
    """The per-layer counts a config records (:data:`NONUNIFORM_KEY`), or None for a uniform config.

    Raises ValueError when the list does not have one entry per decoder layer or disagrees with the
    family's count field (which holds the largest count).
    """
    counts = getattr(config, NONUNIFORM_KEY, None)
    if counts is None:
        return None
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(counts, (list, tuple)) or len(counts) != n_layers:
        raise ValueError(f"config.{NONUNIFORM_KEY} must list one entry per decoder layer ({n_layers}); got {counts!r}")
    out = {i: int(c) for i, c in enumerate(counts) if c is not None}
    if not out or min(out.values()) < 1:
        raise ValueError(f"config.{NONUNIFORM_KEY} needs a count >= 1 for every MoE layer; got {counts!r}")
    spec = FAMILIES.get(_family_type(config))
    if spec is not None and getattr(config, spec.num_experts_field, None) != max(out.values()):
        raise ValueError(
            f"config.{spec.num_experts_field}={getattr(config, spec.num_experts_field, None)} must be the largest "
            f"per-layer count {max(out.values())} of config.{NONUNIFORM_KEY}")
    return out


@recipe.records("set_expert_counts_config", lambda: {})
def set_expert_counts_config(model: nn.Module) -> dict[int, int]:
    """Write the MoE layers' own expert counts into the config (after editing layers one at a time).

    Equal counts: the family's count field, exactly as :func:`set_num_experts_config` (a plain
    ``from_pretrained`` checkpoint). Different counts: the count field holds the largest and
    :data:`NONUNIFORM_KEY` lists every decoder layer's count (``None`` for dense layers), the form
    ``moelab.io.save_checkpoint`` writes and :func:`load_model` reloads (module docstring).

    Returns:
        ``{layer_idx: count}``.
    """
    counts = expert_counts(model)
    set_num_experts_config(model, max(counts.values()))
    if len(set(counts.values())) > 1:
        n_layers = len(decoder_layers(model))
        setattr(model.config, NONUNIFORM_KEY, [counts.get(i) for i in range(n_layers)])
    return counts


def _apply_expert_counts(model: nn.Module, counts: Mapping[int, int]) -> None:
    """Shrink each MoE layer of a freshly built model to ``counts[layer]`` experts (its first ones)."""
    layers = _layer_map(model)
    if set(counts) != set(layers):
        raise ValueError(f"per-layer expert counts name layers {sorted(counts)}, but the MoE layers are {sorted(layers)}")
    for i, l in layers.items():
        n = int(counts[i])
        if n > l.num_experts:
            raise ValueError(f"layer {i}: {n} experts exceed the config's count {l.num_experts}")
        if n < l.num_experts:
            l._select_experts(torch.arange(n))


def _meta_reference(model: nn.Module, config=None) -> nn.Module:
    """The model class built from ``config`` (default: the model's own) on the meta device, with the
    per-layer expert counts the config records, if any."""
    config = copy.deepcopy(model.config if config is None else config)
    counts = experts_per_layer(config)
    with torch.device("meta"):
        ref = type(model)(config)
    if counts is not None:
        _apply_expert_counts(ref, counts)
    return ref


# attributes that legitimately change at run time (dynamic RoPE caches, training switches)
_IGNORED_ATTRS = {"training", "gradient_checkpointing", "max_seq_len_cached", "original_max_seq_len"}


def check_consistency(model: nn.Module, config=None) -> None:
    """Raise when ``model`` is not what ``from_pretrained`` would rebuild from its config.

    Builds the model class on the meta device from the config and compares every parameter and
    buffer shape and every cached scalar attribute (counts, widths, in/out features ...).
    """
    problems = shape_problems(model, _meta_reference(model, config))
    if problems:
        more = f" (+{len(problems) - 12} more)" if len(problems) > 12 else ""
        raise ValueError(
            f"{type(model).__name__} is inconsistent with its config (from_pretrained would not rebuild it): "
            + "; ".join(problems[:12])
            + more
        )


def shape_problems(model: nn.Module, ref: nn.Module) -> list[str]:
    """How ``model`` differs from ``ref`` (a model built from a config, e.g. on the meta device): every
    parameter and buffer shape and every cached scalar attribute (counts, widths, in/out features ...)."""
    problems = []
    mine = dict(model.named_parameters(remove_duplicate=False))
    mine.update(dict(model.named_buffers(remove_duplicate=False)))
    theirs = dict(ref.named_parameters(remove_duplicate=False))
    theirs.update(dict(ref.named_buffers(remove_duplicate=False)))
    for k in sorted(set(mine) | set(theirs)):
        a, b = mine.get(k), theirs.get(k)
        if a is None or b is None:
            problems.append(f"{k}: {'missing in the model' if a is None else 'not built by the config'}")
        elif tuple(a.shape) != tuple(b.shape):
            problems.append(f"{k}: shape {tuple(a.shape)}, config builds {tuple(b.shape)}")
    ref_mods = dict(ref.named_modules())
    for name, m in model.named_modules():
        r = ref_mods.get(name)
        if r is None:
            continue
        for a, v in vars(m).items():
            if a in _IGNORED_ATTRS or a.startswith("_") or not isinstance(v, (int, float, tuple)):
                continue
            rv = getattr(r, a, None)
            if isinstance(v, float) and isinstance(rv, float):
                if not math.isclose(v, rv, rel_tol=1e-9) and not (math.isnan(v) and math.isnan(rv)):
                    problems.append(f"{name}.{a} = {v}, config gives {rv}")
            elif rv is not None and v != rv and type(v) is type(rv):
                problems.append(f"{name}.{a} = {v}, config gives {rv}")
    return problems


def _warn_group_mix(layer: MoELayer, idx: Tensor) -> None:
    """Group-limited routing regroups experts contiguously; say so when a pruning mixes groups."""
    if not layer.group_limited:
        return
    G, E, n = layer.router_param("n_group"), layer.num_experts, int(idx.numel())
    old_group = (idx // (E // G)).tolist()
    per = n // G
    new_groups = [set(old_group[j * per:(j + 1) * per]) for j in range(G)]
    if any(len(g) != 1 for g in new_groups) or len({next(iter(g)) for g in new_groups}) != G:
        warnings.warn(
            f"layer {layer.layer_idx}: {layer.routing} routing puts experts in {G} contiguous groups; the "
            f"kept experts {idx.tolist()} come from old groups {old_group}, so the new groups mix old "
            f"ones (keep {per} experts from each old group, in group order, to preserve them)",
            stacklevel=3,
        )


def _counts_equal(layers: Sequence[MoELayer]) -> bool:
    return len({l.num_experts for l in layers}) == 1


# --------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------


def _layer_map(model: nn.Module) -> dict[int, MoELayer]:
    return {l.layer_idx: l for l in moe_layers(model)}


def _check_keys(name: str, given: Mapping[int, Any], layers: Mapping[int, MoELayer]) -> None:
    if set(given) != set(layers):
        raise ValueError(
            f"{name}: give an entry for every MoE layer {sorted(layers)}; got {sorted(given)}"
        )


@recipe.records("prune_experts", lambda keep: {"keep": {int(i): [int(e) for e in v] for i, v in keep.items()}})
@torch.no_grad()
def prune_experts(model: nn.Module, keep: Mapping[int, Sequence[int]]) -> None:
    """Keep ``keep[layer_idx]`` experts (same count in every MoE layer), in the given order."""
    _ensure_editable(model)
    layers = _layer_map(model)
    _check_keys("prune_experts", keep, layers)
    idx = {i: torch.as_tensor(list(v) if not isinstance(v, Tensor) else v, dtype=torch.long).flatten() for i, v in keep.items()}
    sizes = {int(t.numel()) for t in idx.values()}
    if len(sizes) != 1:
        raise ValueError(f"prune_experts: keep the same number of experts in every layer; got {sorted(sizes)}")
    n = sizes.pop()
    for i, t in idx.items():
        E = layers[i].num_experts
        if t.unique().numel() != t.numel():
            raise ValueError(f"prune_experts: layer {i} keeps an expert twice: {t.tolist()}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= E):
            raise ValueError(f"prune_experts: layer {i} has {E} experts; got indices {t.tolist()}")
    check_target(model, n)
    for i, t in idx.items():
        _warn_group_mix(layers[i], t)
    for i, t in idx.items():
        layers[i]._select_experts(t)
    set_num_experts_config(model, n)
    check_consistency(model)


@recipe.records("set_experts", lambda layer_idx, *a, **k: {"layer": int(layer_idx)})
@torch.no_grad()
def set_experts(
    model: nn.Module,
    layer_idx: int,
    weights: Mapping[str, Tensor],
    router_weight: Tensor,
    expert_indexed: Mapping[str, Tensor] | None = None,
) -> None:
    """Replace layer ``layer_idx``'s experts by new ones given in uniform layout (the count may change).

    ``weights``: gate/up ``[n, I, H]``, down ``[n, H, I]`` (+ the family's biases); ``router_weight``:
    ``[n, H]``; ``expert_indexed``: the family's other expert-indexed tensors (``expert_indexed()``
    names), required when the count changes. Once every MoE layer has the same count the config is
    updated (and checked); otherwise call :func:`set_num_experts_config` after the last layer, or
    :func:`set_expert_counts_config` to keep different counts per layer (the non-uniform form).
    """
    _ensure_editable(model)
    layers = _layer_map(model)
    if layer_idx not in layers:
        raise ValueError(f"set_experts: layer {layer_idx} is not a MoE layer; MoE layers: {sorted(layers)}")
    layer = layers[layer_idx]
    n, H = router_weight.shape
    if H != layer.hidden_size:
        raise ValueError(f"set_experts: router_weight is [{n}, {H}], hidden size is {layer.hidden_size}")
    allowed = set(layer._uniform())
    for k in sorted(allowed):
        if k not in weights:
            raise ValueError(f"set_experts: {layer.spec.model_type} weights need {sorted(allowed)} (uniform layout); missing {k!r}")
    extra = sorted(set(weights) - allowed)
    if extra:
        raise ValueError(f"set_experts: {layer.spec.model_type} experts have no {extra}; expected {sorted(allowed)}")
    if weights["gate"].shape[0] != n:
        raise ValueError(f"set_experts: {weights['gate'].shape[0]} experts in weights but {n} router rows")
    if weights["gate"].shape[1] != layer.intermediate_size or weights["gate"].shape[2] != H:
        raise ValueError(
            f"set_experts: gate must be [n, {layer.intermediate_size}, {H}], got {tuple(weights['gate'].shape)} "
            "(change the expert width with slice_expert_width)"
        )
    if n < layer.top_k:
        raise ValueError(f"set_experts: {n} experts is below top_k={layer.top_k}")
    names = [u for u, _ in layer.spec.indexed]
    if expert_indexed is None:
        if names and n != layer.num_experts:
            raise ValueError(
                f"set_experts: {layer.spec.model_type} has expert-indexed tensors {names}; pass "
                f"expert_indexed={{name: [{n}] tensor}} when the count changes"
            )
        expert_indexed = layer._indexed() if names else {}
    missing = [u for u in names if u not in expert_indexed]
    unknown = [u for u in expert_indexed if u not in names]
    if missing or unknown:
        raise ValueError(f"set_experts: expert_indexed must have exactly {names}; missing {missing}, unknown {unknown}")
    why = _count_ok(layer, n)
    if why is not None:
        raise ValueError(f"set_experts: {why}")
    # gate/up are concatenated into new tensors anyway; copy the rest so the model never aliases
    # tensors the caller still holds
    weights = {k: (v.detach().clone() if k.startswith("down") else v) for k, v in weights.items()}
    layer._write_experts(weights)
    _replace(layer.router, layer.spec.router_weight, router_weight.detach().clone())
    layer._write_indexed({k: v.detach().clone() for k, v in expert_indexed.items()}, n)
    layer._set_count(n)
    all_layers = list(layers.values())
    if _counts_equal(all_layers):
        set_num_experts_config(model, n)
        check_consistency(model)


def _shared_keep_resolution(model, layers, new_I: int, shared_keep) -> tuple[str, Any]:
    """How the shared experts follow an expert-width change: ("none"|"field"|"multiple"|"slice", arg)."""
    spec = family_of(model)
    sw = spec.shared_width
    if sw is None or all(l.shared_expert() is None for l in layers.values()):
        return "none", None
    kind, fld = sw
    if kind == "field":
        return "field", None
    old_I = next(iter(layers.values())).intermediate_size
    if kind == "multiple":
        S = old_I * getattr(model.config, fld)
        if shared_keep is None:
            if S % new_I:
                raise ValueError(
                    f"slice_expert_width: {spec.model_type} sizes its shared experts as "
                    f"{spec.intermediate_field} * {fld} = {S}; {S} is not a multiple of the new width "
                    f"{new_I}, so pass shared_keep={{layer: LongTensor}} with the shared neurons to keep "
                    f"(a multiple of {new_I})"
                )
            return "multiple", S // new_I
        return "slice_multiple", None
    if kind == "same":
        if shared_keep is None:
            raise ValueError(
                f"slice_expert_width: {spec.model_type} sizes its shared expert with the expert width "
                f"(config.{spec.intermediate_field}); pass shared_keep={{layer: LongTensor [{new_I}]}} "
                "choosing the shared expert's neurons too"
            )
        return "slice_same", None
    raise UnsupportedModelError(f"unknown shared_width kind {kind!r}")


def _check_alignment(layer: MoELayer, what: str, size: int, allow_unaligned: bool) -> None:
    """transformers' default experts kernel (torch grouped_mm) needs 16-byte-aligned strides."""
    es = getattr(layer.experts_module(), layer.spec.gate_up).element_size()
    if (size * es) % 16 and not allow_unaligned:
        step = 16 // math.gcd(16, es)
        raise ValueError(
            f"{what} {size} with {es}-byte weights breaks transformers' grouped_mm experts kernel (the "
            f"default; it needs strides that are multiples of 16 bytes), so the edited and the reloaded "
            f"model would fail at inference. Use a multiple of {step} (a multiple of 8 suits bf16 and "
            f"fp32), or pass allow_unaligned=True if you will run it with "
            f"set_experts_implementation('eager')."
        )


def _slice_mlp_width(mlp: nn.Module, idx: Tensor) -> None:
    """Keep neurons ``idx`` of a dense gate/up/down MLP (nn.Linear modules)."""
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        _replace(lin, "weight", _select(lin.weight, 0, idx))
        if lin.bias is not None:
            _replace(lin, "bias", _select(lin.bias, 0, idx))
        lin.out_features = int(idx.numel())
    down = mlp.down_proj
    _replace(down, "weight", _select(down.weight, 1, idx))
    down.in_features = int(idx.numel())
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = int(idx.numel())


@recipe.records("slice_expert_width", lambda keep, shared_keep=None, *, allow_unaligned=False: {
    "keep": keep, "shared_keep": shared_keep, "allow_unaligned": allow_unaligned})
@torch.no_grad()
def slice_expert_width(
    model: nn.Module,
    keep: Mapping[int, Tensor],
    shared_keep: Mapping[int, Tensor] | None = None,
    *,
    allow_unaligned: bool = False,
) -> None:
    """Keep, per expert, the neurons ``keep[layer_idx][e]`` (a LongTensor ``[E, I']``, same I' everywhere).

    A neuron n of expert e is row n of gate and up and column n of down. Updates the family's width
    field (``config.moe_intermediate_size`` / ``intermediate_size``). Families whose config ties the
    shared expert's width to the expert width (DeepSeek/GLM4/ERNIE: width * n_shared; Llama4: equal)
    keep the shared expert intact by adjusting the multiplier when it divides, else need
    ``shared_keep[layer_idx]`` (LongTensor of shared-expert neurons to keep). The new width must
    keep 16-byte-aligned rows (a multiple of 8 is always safe) unless ``allow_unaligned``.
    """
    _ensure_editable(model)
    layers = _layer_map(model)
    _check_keys("slice_expert_width", keep, layers)
    spec = family_of(model)
    idx = {i: torch.as_tensor(v, dtype=torch.long) for i, v in keep.items()}
    widths = set()
    for i, t in idx.items():
        l = layers[i]
        if t.dim() != 2 or t.shape[0] != l.num_experts:
            raise ValueError(f"slice_expert_width: layer {i} needs a LongTensor [E={l.num_experts}, I'], got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= l.intermediate_size):
            raise ValueError(f"slice_expert_width: layer {i} neuron index out of range [0, {l.intermediate_size})")
        widths.add(int(t.shape[1]))
    if len(widths) != 1:
        raise ValueError(f"slice_expert_width: keep the same width in every layer; got {sorted(widths)}")
    new_I = widths.pop()
    if new_I < 1:
        raise ValueError("slice_expert_width: keep at least one neuron per expert")
    _check_alignment(next(iter(layers.values())), "slice_expert_width: expert width", new_I, allow_unaligned)
    shared_mode, shared_arg = _shared_keep_resolution(model, layers, new_I, shared_keep)
    if shared_mode.startswith("slice"):
        _check_keys("slice_expert_width(shared_keep)", shared_keep, layers)
    for i, t in idx.items():
        l = layers[i]
        w = l._uniform()
        old_I = l.intermediate_size
        t = t.to(w["gate"].device)
        rows = t.unsqueeze(-1)  # [E, I', 1]
        new = {
            "gate": torch.gather(w["gate"], 1, rows.expand(-1, -1, w["gate"].shape[2])),
            "up": torch.gather(w["up"], 1, rows.expand(-1, -1, w["up"].shape[2])),
            "down": torch.gather(w["down"], 2, t.unsqueeze(1).expand(-1, w["down"].shape[1], -1)),
        }
        for b in ("gate_bias", "up_bias"):
            if b in w:
                new[b] = torch.gather(w[b], 1, t)
        if "down_bias" in w:
            new["down_bias"] = w["down_bias"]
        l._write_experts(new)
        for m in (l.experts_module(), l.block):
            for a in _WIDTH_ATTRS:
                if getattr(m, a, None) == old_I:
                    setattr(m, a, new_I)
        if shared_mode.startswith("slice"):
            _slice_mlp_width(l.shared_expert(), torch.as_tensor(shared_keep[i], dtype=torch.long).flatten())
    setattr(model.config, spec.intermediate_field, new_I)
    if shared_mode == "multiple":
        setattr(model.config, spec.shared_width[1], shared_arg)
    elif shared_mode == "slice_multiple":
        S = {int(torch.as_tensor(v).numel()) for v in shared_keep.values()}
        if len(S) != 1 or next(iter(S)) % new_I:
            raise ValueError(f"slice_expert_width: shared_keep must keep the same multiple of {new_I} neurons in every layer")
        setattr(model.config, spec.shared_width[1], next(iter(S)) // new_I)
    check_consistency(model)


# ---- hidden size ---------------------------------------------------------------------------

# Linear layers of a token mixer (attention / linear attention) that read the residual stream
_MIXER_READERS = {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa", "in_proj_qkvz", "in_proj_ba"}
# ... and that write it
_MIXER_WRITERS = {"o_proj", "out_proj"}
# Linear layers of an MLP / shared expert
_MLP_READERS = {"gate_proj", "up_proj", "shared_expert_gate"}
_MLP_WRITERS = {"down_proj"}


def _slice_linear(lin: nn.Linear, idx: Tensor, side: str) -> None:
    if side == "in":
        _replace(lin, "weight", _select(lin.weight, 1, idx))
        lin.in_features = int(idx.numel())
    else:
        _replace(lin, "weight", _select(lin.weight, 0, idx))
        if lin.bias is not None:
            _replace(lin, "bias", _select(lin.bias, 0, idx))
        lin.out_features = int(idx.numel())


def _slice_norm(norm: nn.Module, idx: Tensor) -> None:
    for pname in ("weight", "bias"):
        t = getattr(norm, pname, None)
        if isinstance(t, Tensor):
            _replace(norm, pname, _select(t, 0, idx))
    if isinstance(getattr(norm, "normalized_shape", None), tuple):
        norm.normalized_shape = (int(idx.numel()),)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(m).__name__.lower()


def _plan_hidden_slice(model: nn.Module, H: int) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, action) for every module that touches the residual stream."""
    spec = family_of(model)
    moe_blocks = {id(l.block) for l in moe_layers(model)}
    plan: list[tuple[str, nn.Module, str]] = []
    emb = model.get_input_embeddings()
    plan.append(("input_embeddings", emb, "embedding"))
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        plan.append(("lm_head", head, "linear_in"))
    base = decoder_layers(model)
    base_owner = model.model if hasattr(model, "model") else model
    for cname, child in base_owner.named_children():
        if _is_norm(child) and getattr(child, "weight", None) is not None and child.weight.shape[0] == H:
            plan.append((cname, child, "norm"))
    for i, layer in enumerate(base):
        for cname, child in layer.named_children():
            q = f"layers.{i}.{cname}"
            if _is_norm(child):
                w = getattr(child, "weight", None)
                if w is not None and w.shape[0] == H:
                    plan.append((q, child, "norm"))
                continue
            if cname == spec.block_attr and id(child) in moe_blocks:
                plan.append((q, child, "moe"))
                for sname in (spec.shared_attr, spec.shared_gate_attr):
                    sub = getattr(child, sname, None) if sname else None
                    if sub is not None:
                        plan.extend(_plan_linears(f"{q}.{sname}", sub, _MLP_READERS | {sname}, _MLP_WRITERS, H))
                continue
            if isinstance(child, nn.Module) and any(isinstance(m, nn.Linear) for m in child.modules()):
                readers, writers = (_MLP_READERS, _MLP_WRITERS) if hasattr(child, "down_proj") else (_MIXER_READERS, _MIXER_WRITERS)
                plan.extend(_plan_linears(q, child, readers, writers, H))
    return plan


def _plan_linears(prefix: str, root: nn.Module, readers: set, writers: set, H: int):
    out = []
    mods = [("", root)] if isinstance(root, nn.Linear) else list(root.named_modules())
    for name, m in mods:
        if not isinstance(m, nn.Linear):
            continue
        leaf = name.rpartition(".")[2] or prefix.rpartition(".")[2]
        q = f"{prefix}.{name}" if name else prefix
        if leaf in readers:
            out.append((q, m, "linear_in"))
        elif leaf in writers:
            out.append((q, m, "linear_out"))
        elif m.in_features == H or m.out_features == H:
            raise UnsupportedModelError(
                f"slice_hidden: {q} ({m.in_features}->{m.out_features}) touches a size-{H} dimension but is "
                "not a known residual reader/writer; moelab cannot tell whether to slice it"
            )
    return out


def _apply_hidden_plan(model: nn.Module, plan, idx: Tensor, H: int) -> None:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is emb.weight
    for q, m, action in plan:
        if action == "embedding":
            _replace(m, "weight", _select(m.weight, 1, idx))
            m.embedding_dim = int(idx.numel())
        elif action == "linear_in":
            _slice_linear(m, idx, "in")
        elif action == "linear_out":
            _slice_linear(m, idx, "out")
        elif action == "norm":
            _slice_norm(m, idx)
        elif action == "moe":
            pass  # handled below through MoELayer
    if tied:
        head.weight = emb.weight
        head.in_features = int(idx.numel())
    for l in moe_layers(model):
        w = l._uniform()
        new = {
            "gate": _select(w["gate"], 2, idx),
            "up": _select(w["up"], 2, idx),
            "down": _select(w["down"], 1, idx),
        }
        for b in ("gate_bias", "up_bias"):
            if b in w:
                new[b] = w[b]
        if "down_bias" in w:
            new["down_bias"] = _select(w["down_bias"], 1, idx)
        l._write_experts(new)
        _replace(l.router, l.spec.router_weight, _select(getattr(l.router, l.spec.router_weight), 1, idx))
        if l.spec.router_is_linear:
            l.router.in_features = int(idx.numel())
    for m in model.modules():
        for a in _HIDDEN_ATTRS:
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool) and v == H:
                setattr(m, a, int(idx.numel()))


def _hidden_config(model: nn.Module, new_H: int):
    cfg = copy.deepcopy(model.config)
    head_dim = None
    attn = None
    for layer in decoder_layers(model):
        for cand in ("self_attn", "attention"):
            attn = getattr(layer, cand, None)
            if attn is not None:
                break
        if attn is not None:
            break
    if attn is not None and isinstance(getattr(attn, "head_dim", None), int):
        head_dim = attn.head_dim
    if head_dim is not None and getattr(cfg, "head_dim", None) is None:
        cfg.head_dim = head_dim  # pin it: attention falls back to hidden_size // num_heads otherwise
    cfg.hidden_size = int(new_H)
    return cfg


def residual_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The norms whose width is the hidden size, by qualified name (``layers.3.input_layernorm``,
    ``norm``): the ones ``slice_hidden`` slices. Names stay the same after slicing.

    Raises:
        UnsupportedModelError: a family whose residual stream moelab cannot map (as ``slice_hidden``).
    """
    return {q: m for q, m, action in _plan_hidden_slice(model, model.config.hidden_size) if action == "norm"}


def _norm_form(norm: nn.Module) -> str:
    """How a norm applies its weight: ``"scale"`` (w * x_hat, as Llama, Qwen3-MoE, Mixtral) or
    ``"offset"`` ((1 + w) * x_hat, as Qwen3-Next), told apart by running a CPU copy with a zero weight."""
    probe = copy.deepcopy(norm)
    try:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(probe)
    except ImportError:
        pass
    width = norm.weight.shape[0]
    probe = probe.to_empty(device="cpu").float()
    with torch.no_grad():
        for pname in ("weight", "bias"):
            if isinstance(getattr(probe, pname, None), Tensor):
                getattr(probe, pname).zero_()
        y = probe(torch.randn(4, width, generator=torch.Generator().manual_seed(0)))
    if torch.all(y == 0):
        return "scale"
    if torch.allclose(y.pow(2).mean(-1), torch.ones(4), rtol=1e-2):
        return "offset"
    raise UnsupportedModelError(f"{type(norm).__name__} applies its weight neither as w * x_hat nor as (1 + w) * x_hat; "
                                "moelab cannot rescale its output through the weight")


@recipe.records("scale_norm_outputs", lambda factors: {"factors": {k: float(v) for k, v in factors.items()}})
@torch.no_grad()
def scale_norm_outputs(model: nn.Module, factors: Mapping[str, float]) -> None:
    """Multiply the output of residual norms by a factor each, through their weights (new tensors, so a
    ``variant``'s original is untouched): w becomes f w, or f (1 + w) - 1 for norms that apply 1 + w.
    A bias (LayerNorm) scales with the weight.

    Args:
        model: the model whose norms are scaled (``residual_norms`` names them).
        factors: qualified norm name -> factor.
    """
    _ensure_editable(model)
    norms = residual_norms(model)
    unknown = sorted(set(factors) - set(norms))
    if unknown:
        raise ValueError(f"scale_norm_outputs: no residual norm named {unknown}; the model has {sorted(norms)}")
    for name, f in factors.items():
        norm = norms[name]
        w = norm.weight
        wf = w.float()
        _replace(norm, "weight", wf * f if _norm_form(norm) == "scale" else (1 + wf) * f - 1)
        if isinstance(getattr(norm, "bias", None), Tensor):
            _replace(norm, "bias", norm.bias.float() * f)


@recipe.records("slice_hidden", lambda channels, *, allow_unaligned=False: {"channels": channels,
                                                                         "allow_unaligned": allow_unaligned})
@torch.no_grad()
def slice_hidden(model: nn.Module, channels: Tensor, *, allow_unaligned: bool = False) -> None:
    """Keep hidden channels ``channels`` everywhere the residual stream is read or written.

    Embeddings, residual norms, token-mixer input/output projections, routers, experts, shared
    experts, dense MLPs and the LM head are sliced; ``config.hidden_size`` is updated and
    ``config.head_dim`` pinned so the attention shapes stay as they are. A dry run on a meta copy
    checks first that the config can express the result; families that cannot raise
    UnsupportedModelError before anything is changed.
    """
    _ensure_editable(model)
    family_of(model)
    H = model.config.hidden_size
    idx = torch.as_tensor(channels, dtype=torch.long).flatten()
    if idx.numel() < 1 or idx.unique().numel() != idx.numel() or int(idx.min()) < 0 or int(idx.max()) >= H:
        raise ValueError(f"slice_hidden: channels must be distinct indices in [0, {H})")
    new_H = int(idx.numel())
    _check_alignment(moe_layers(model)[0], "slice_hidden: hidden size", new_H, allow_unaligned)
    new_cfg = _hidden_config(model, new_H)
    # dry run on a meta copy: does a model built from the new config have the sliced shapes?
    dry = _meta_reference(model)
    _apply_hidden_plan(dry, _plan_hidden_slice(dry, H), idx.to("meta"), H)
    dry.config = new_cfg
    try:
        if hasattr(new_cfg, "validate"):
            new_cfg.validate()
        check_consistency(dry, new_cfg)
    except (ValueError, TypeError) as err:
        raise UnsupportedModelError(
            f"slice_hidden: the {type(model).__name__} config cannot express hidden size {new_H} with every "
            f"other shape kept (its modules derive some sizes from hidden_size); nothing was changed. {err}"
        ) from err
    _apply_hidden_plan(model, _plan_hidden_slice(model, H), idx, H)
    model.config.hidden_size = new_H
    if getattr(new_cfg, "head_dim", None) is not None:
        model.config.head_dim = new_cfg.head_dim
    check_consistency(model)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------- depth (SlimQwen)
# config fields that list layer indices (remapped) and that hold one entry per layer (subset)
_LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")
_SPARSE_PATTERN_FIELDS = ("decoder_sparse_step", "first_k_dense_replace", "moe_layer_start_index",
                          "moe_layer_end_index", "moe_layer_interval", "interleave_moe_layer_step")


@recipe.records("remove_layers", lambda layers: {"layers": [int(i) for i in layers]})
def remove_layers(model: nn.Module, layers: Sequence[int]) -> None:
    """Remove whole decoder layers in place (SlimQwen depth pruning; SlimQwen, arXiv 2605.08738).

    The remaining layers are renumbered (attention ``layer_idx``, so KV caches index them right) and
    the config follows: ``num_hidden_layers``, per-layer lists such as ``layer_types`` and
    ``no_rope_layers`` (subset), layer-index lists such as ``mlp_only_layers`` (remapped), and
    ``first_k_dense_replace`` (dense layers kept). When the dense/MoE pattern can only be written as
    a list (Qwen's ``decoder_sparse_step`` > 1), it is rewritten as ``decoder_sparse_step = 1`` plus
    ``mlp_only_layers``. A pattern the config cannot express raises and leaves the model untouched.

    Args:
        model: a causal LM whose decoder layers are ``model.model.layers``.
        layers: indices of the layers to remove (current numbering).
    """
    _ensure_editable(model)
    stack = decoder_layers(model)
    n = len(stack)
    drop = sorted({int(i) for i in layers})
    if not drop:
        return
    if any(not 0 <= i < n for i in drop):
        raise ValueError(f"layer indices must be in range(0, {n}), got {drop}")
    if len(drop) == n:
        raise ValueError("cannot remove every decoder layer; keep at least one")
    keep = [i for i in range(n) if i not in set(drop)]
    new_index = {old: new for new, old in enumerate(keep)}
    cfg = getattr(model.config, "text_config", None) or model.config
    dense = [i for i in range(n) if not _is_moe_block(stack[i])]
    new_dense = [new_index[i] for i in dense if i in new_index]
    changes: dict[str, Any] = {"num_hidden_layers": len(keep)}
    for name, value in vars(cfg).items():
        if isinstance(value, (list, tuple)) and len(value) == n and name not in _LAYER_INDEX_LISTS:
            changes[name] = type(value)(value[i] for i in keep)
    if getattr(cfg, "first_k_dense_replace", None) is not None:
        changes["first_k_dense_replace"] = len(new_dense)
    if getattr(cfg, "mlp_only_layers", None) is not None or getattr(cfg, "decoder_sparse_step", None) not in (None, 1):
        if hasattr(cfg, "decoder_sparse_step"):
            changes["decoder_sparse_step"] = 1
        changes["mlp_only_layers"] = new_dense
    if isinstance(getattr(cfg, "moe_layers", None), list):
        changes["moe_layers"] = [new_index[i] for i in cfg.moe_layers if i in new_index]
    new_moe = [i for i in range(len(keep)) if i not in set(new_dense)]
    if getattr(cfg, "moe_layer_start_index", None) is not None and new_moe and getattr(cfg, "moe_layer_interval", 1) == 1:
        changes["moe_layer_start_index"], changes["moe_layer_end_index"] = new_moe[0], new_moe[-1]
    types = changes.get("layer_types")
    if types is not None and "linear_attention" in types and not any("full" in t for t in types):
        raise ValueError(f"removing layers {drop} leaves only linear-attention layers, which transformers' cache "
                         "cannot run; keep at least one full-attention layer")
    # check the new config against a rebuild before touching the model
    config = copy.deepcopy(model.config)
    _update_config(getattr(config, "text_config", None) or config, changes)
    ref_layers = decoder_layers(_meta_reference(model, config))
    for new, old in enumerate(keep):
        if _is_moe_block(ref_layers[new]) != _is_moe_block(stack[old]):
            raise ValueError(
                f"{type(model).__name__}: after removing layers {drop}, the config cannot make layer {new} "
                f"(old {old}) {'an MoE' if _is_moe_block(stack[old]) else 'a dense'} layer; this family's "
                "dense/MoE layer pattern does not allow that removal")
    kept_modules = [stack[i] for i in keep]
    for new, mod in enumerate(kept_modules):
        for sub in mod.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new
    getattr(model, "model", model).layers = nn.ModuleList(kept_modules)
    _update_config(cfg, changes)  # in place: every module holding the config sees the change
    check_consistency(model)


def _update_config(cfg, changes: Mapping[str, Any]) -> None:
    # all fields at once: configs validate on assignment (layer_types must match num_hidden_layers)
    vars(cfg).update(changes)
    if hasattr(cfg, "validate"):
        cfg.validate()


def _is_moe_block(layer: nn.Module) -> bool:
    return any(isinstance(getattr(m, "experts", None), nn.Module) for m in layer.modules())


def variant(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules and config that shares every parameter and buffer with it.

    moelab's edits (``set_experts``, ``prune_experts``, ``slice_hidden``, ``remove_layers``, ...) put new
    tensors in place of old ones and never write into a tensor, so editing a variant leaves ``model``
    untouched and costs only the bytes of what it edits: a variant that prunes the experts of every layer
    adds the kept experts, not a second model. Do not train a variant in place (its unedited tensors are
    the original's): train a ``copy.deepcopy`` of it.
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def shared_bytes(a: nn.Module, b: nn.Module) -> int:
    """Bytes of the tensors two models share (the same storage), counted once."""
    ptrs = {t.untyped_storage().data_ptr() for t in list(a.parameters()) + list(a.buffers()) if t.device.type != "meta"}
    seen, total = set(), 0
    for t in list(b.parameters()) + list(b.buffers()):
        if t.device.type == "meta":
            continue
        p = t.untyped_storage().data_ptr()
        if p in ptrs and p not in seen:
            seen.add(p)
            total += t.untyped_storage().nbytes()
    return total


def input_device(model) -> torch.device:
    """Where a model's input ids go: the device of its input embeddings (the CPU when they are offloaded)."""
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def checkpoint_dtype(path_or_id):
    """The dtype a checkpoint's config.json declares (``dtype`` or the older ``torch_dtype``), or None."""
    import json
    from pathlib import Path

    p = Path(str(path_or_id)).expanduser()
    try:
        if (p / "config.json").is_file():
            cfg = json.loads((p / "config.json").read_text())
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(str(path_or_id)).to_dict()
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    value = getattr(torch, str(name).replace("torch.", ""), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def load_model(path_or_id, device_map=None, dtype=None, max_memory=None, offload_folder=None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with accelerate's placement options, in eval mode.

    With ``device_map="auto"`` and a ``max_memory`` that does not fit, layers are offloaded to the
    CPU or to ``offload_folder`` on disk; moe_layers()/route()/expert_weights() still read such a
    model (through the offload hooks), but editing it raises: load without offload to edit.

    A local checkpoint with per-layer expert counts (module docstring) is loaded with moelab's own copy
    of the classes its modeling file defines (it never runs the checkpoint's code) and comes back as the
    family's own class, each MoE layer at its count; every option above works for it too.
    """
    from transformers import AutoModelForCausalLM

    check_weight_files(path_or_id)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if dtype is not None:
        kwargs["dtype"] = dtype
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    if _is_nonuniform_checkpoint(path_or_id):
        model = _load_nonuniform(path_or_id, **kwargs)
        model.moelab_source_dtype = checkpoint_dtype(path_or_id)
        check_routing(model, path_or_id)
        return model
    source_dtype = checkpoint_dtype(path_or_id)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
    # The dtype the checkpoint is stored in: moelab.io saves a compressed model in it again.
    model.moelab_source_dtype = source_dtype
    check_routing(model, path_or_id)
    return model.eval()


def check_weight_files(path_or_id) -> None:
    """Raise ValueError naming the file when a local checkpoint's safetensors file is damaged
    (truncated by a full disk or an interrupted copy), before any weight is read."""
    from pathlib import Path

    from safetensors import safe_open

    p = Path(str(path_or_id)).expanduser()
    if not p.is_dir():
        return
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as exc:
            raise ValueError(f"the weights file {f} is damaged ({type(exc).__name__}: {exc}); the checkpoint is "
                             "incomplete: save, copy or download it again") from None


def check_positions(model: nn.Module, length: int, what: str) -> None:
    """Raise ValueError when rows of ``length`` tokens are longer than the model's positions
    (``config.max_position_embeddings``); ``what`` names the rows in the message."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise ValueError(f"{what} of {length} tokens are longer than the model's max_position_embeddings="
                         f"{positions}; use seq_len <= {positions}")


def check_routing(model: nn.Module, where="the model") -> None:
    """Raise ValueError when a MoE config routes each token to more experts than a layer has."""
    try:
        layers = moe_layers(model)
    except (UnsupportedModelError, ValueError):
        return  # not a MoE model moelab reads: transformers decides
    for layer in layers:
        if layer.top_k > layer.num_experts:
            field = layer.spec.top_k_field or "top_k"
            raise ValueError(f"{where}: layer {layer.layer_idx} routes each token to top_k={layer.top_k} experts but "
                             f"has {layer.num_experts}; fix config.json ({field} <= the expert count)")


def _is_nonuniform_checkpoint(path_or_id) -> bool:
    """True for a local directory with per-layer expert counts; raises when it is half of one."""
    import json
    from pathlib import Path

    p = Path(str(path_or_id)).expanduser()
    if not (p / "config.json").is_file():
        return False
    cfg = json.loads((p / "config.json").read_text())
    if NONUNIFORM_KEY not in cfg:
        if (p / NONUNIFORM_WEIGHTS).is_file() or str(cfg.get("model_type", "")).startswith(NONUNIFORM_TYPE_PREFIX):
            raise ValueError(f"{p} is a broken moelab non-uniform checkpoint: config.json lacks {NONUNIFORM_KEY}, "
                             "the per-layer expert counts; save the model again")
        return False
    if (p / NONUNIFORM_WEIGHTS).is_file():  # the earlier form: moelab's own weights file
        return True
    missing = [f for f, ok in ((NONUNIFORM_MODELING, (p / NONUNIFORM_MODELING).is_file()),
                               (f"{NONUNIFORM_PLAN_KEY} in config.json", NONUNIFORM_PLAN_KEY in cfg),
                               ("model.safetensors (or its index)", (p / "model.safetensors").is_file()
                                or (p / "model.safetensors.index.json").is_file())) if not ok]
    if missing:
        raise ValueError(f"{p} is a broken moelab non-uniform checkpoint: config.json lists {NONUNIFORM_KEY} but "
                         f"{', '.join(missing)} is missing; save the model again")
    return True


def nonuniform_classes(base_model_type: str):
    """moelab's own copy of the (config, causal-LM) classes a non-uniform checkpoint's modeling file
    defines (``moelab.nonuniform_modeling``), for family ``base_model_type``; built once per family."""
    if base_model_type not in _NONUNIFORM_CLASSES:
        from . import nonuniform_modeling

        _NONUNIFORM_CLASSES[base_model_type] = nonuniform_modeling.classes_for(base_model_type)
    return _NONUNIFORM_CLASSES[base_model_type]


_NONUNIFORM_CLASSES: dict[str, tuple] = {}


def _load_nonuniform(path, device_map=None, dtype=None, **kwargs) -> nn.Module:
    """Rebuild a checkpoint with per-layer expert counts (module docstring), in eval mode.

    moelab loads it with its own copy of the checkpoint's classes (it never runs the checkpoint's
    code) through transformers' ``from_pretrained``, so ``device_map="auto"``, ``max_memory`` and
    offloading work as for any checkpoint. The model comes back as the family's own class with each
    MoE layer at its count: the checkpoint's subclass differs from it only in how it is built.
    """
    import json
    from pathlib import Path

    path = Path(str(path)).expanduser().resolve()
    if (path / NONUNIFORM_WEIGHTS).is_file():
        if kwargs:
            raise ValueError(f"{path} is in moelab's earlier non-uniform form (one {NONUNIFORM_WEIGHTS}); it loads with "
                             f"dtype and a single-device device_map only (got {sorted(kwargs)}); save it again to "
                             "write the current form")
        return _load_nonuniform_earlier(path, device_map, dtype)
    base = json.loads((path / "config.json").read_text())[NONUNIFORM_BASE_KEY]
    config_class, model_class = nonuniform_classes(base)
    config = config_class.from_pretrained(path)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = model_class.from_pretrained(path, config=config, **kwargs)
    # the family's own classes again (the subclasses add no state): moelab and save_pretrained see the
    # family's model, whose layers happen to keep different counts
    model.__class__ = model_class.__mro__[1]
    model.config.__class__ = config_class.__mro__[1]
    for key in ("auto_map", "model_type", NONUNIFORM_BASE_KEY, NONUNIFORM_PLAN_KEY):
        model.config.__dict__.pop(key, None)
    model.config.architectures = [model.__class__.__name__]
    check_consistency(model)
    return model.eval()


def _load_nonuniform_earlier(path, device_map=None, dtype=None) -> nn.Module:
    """The earlier non-uniform form: the state dict in :data:`NONUNIFORM_WEIGHTS`, no modeling file."""
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    if isinstance(device_map, dict) or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"{path} is in moelab's earlier non-uniform form: it loads on one device (device_map=None, 'cpu', "
            f"'cuda:0', ...), not with device_map={device_map!r}; save it again to write the current form")
    config = AutoConfig.from_pretrained(path)
    counts = experts_per_layer(config)
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with no_init_weights():  # every tensor is loaded below; skip the random initialisation
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights skips init_weights, which is where transformers ties them
    _apply_expert_counts(model, counts)
    check_consistency(model)
    load_safetensors(model, str(path / NONUNIFORM_WEIGHTS), strict=True)  # refuses missing or extra tensors
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config._name_or_path = str(path)
    if device_map is not None:
        model.to(device_map)
    return model.eval()


def _base_class(model: nn.Module) -> type:
    """The family's causal-LM class of ``model`` (past the subclass a non-uniform checkpoint defines)."""
    for cls in type(model).__mro__:
        if cls.__name__ != "MoelabNonUniformForCausalLM":
            return cls
    raise TypeError(type(model).__name__)


def expert_tensor_plan(model: nn.Module) -> dict:
    """What a non-uniform checkpoint's modeling file must cut to build each layer at its own count.

    Compares ``model`` with its family's model built on the meta device at the config's (largest)
    count: the tensors of a decoder layer whose expert dimension differs, ``[name, dim]``, and the
    integer attributes that cache the count, ``[module, attribute]``, both relative to the decoder
    layer. Every MoE layer with fewer experts than the largest count must give the same plan.
    """
    counts = expert_counts(model)
    top = max(counts.values())
    config = copy.deepcopy(model.config)
    if NONUNIFORM_KEY in vars(config):
        delattr(config, NONUNIFORM_KEY)
    with torch.device("meta"):
        ref = _base_class(model)(config)
    mine, theirs = decoder_layers(model), decoder_layers(ref)
    plans = {}
    for i, n in counts.items():
        if n == top:
            continue
        a, b = mine[i], theirs[i]
        ref_tensors = dict(b.named_parameters()) | dict(b.named_buffers())
        tensors = []
        for name, t in list(a.named_parameters()) + list(a.named_buffers()):
            r = ref_tensors[name]
            if tuple(t.shape) == tuple(r.shape):
                continue
            dims = [d for d in range(t.dim()) if t.shape[d] != r.shape[d]]
            if len(dims) != 1 or r.shape[dims[0]] != top or t.shape[dims[0]] != n:
                raise ValueError(f"layer {i}: {name} is {tuple(t.shape)} against {tuple(r.shape)} at {top} experts; "
                                 "only the expert dimension may differ between layers")
            owner = a.get_submodule(name.rpartition(".")[0])
            if name.rpartition(".")[2] in owner._non_persistent_buffers_set:
                raise ValueError(f"layer {i}: {name} is an expert-indexed buffer the checkpoint does not store")
            tensors.append([name, dims[0]])
        ref_modules = dict(b.named_modules())
        attributes = []
        for mname, m in a.named_modules():
            for attr, v in vars(m).items():
                rv = getattr(ref_modules[mname], attr, None)
                if type(v) is int and type(rv) is int and (v, rv) == (n, top):
                    attributes.append([mname, attr])
        plans[i] = {"tensors": sorted(tensors), "attributes": sorted(attributes)}
    if not plans:
        raise ValueError("every MoE layer keeps the same count: the model is a plain checkpoint, with no plan")
    first = next(iter(plans.values()))
    for i, plan in plans.items():
        if plan != first:
            raise ValueError(f"layer {i} stores its experts differently from layer {next(iter(plans))}: {plan} "
                             f"against {first}")
    return first


# --------------------------------------------------------------------------------------------
# Tiny random models for tests and notebooks
# --------------------------------------------------------------------------------------------

_ALIASES = {
    "llama4": "llama4_text",
    "ernie": "ernie4_5_moe",
    "ernie4_5": "ernie4_5_moe",
    "glm4": "glm4_moe",
    "granite": "granitemoe",
    "deepseek": "deepseek_v3",
    "qwen2": "qwen2_moe",
    "qwen3": "qwen3_moe",
    "gptoss": "gpt_oss",
    "gpt-oss": "gpt_oss",
}

TINY_FAMILIES = tuple(FAMILIES)


def tiny_config(family: str, num_experts: int = 8, top_k: int = 2, **overrides):
    """A tiny config (hidden 32, 2-3 layers, vocab 128, expert width 16) of ``family`` (a model_type)."""
    import transformers as T

    fam = _ALIASES.get(family, family)
    if fam not in FAMILIES:
        raise ValueError(f"tiny_config: unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    E, K = num_experts, top_k
    base = dict(
        vocab_size=128,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
    moe_dims = dict(intermediate_size=32, moe_intermediate_size=16)
    if fam == "mixtral":
        kw = dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=E, num_experts_per_tok=K, head_dim=8)
        cls = T.MixtralConfig
    elif fam == "qwen2_moe":
        kw = dict(num_hidden_layers=3, **moe_dims, shared_expert_intermediate_size=24, num_experts=E,
                  num_experts_per_tok=K, mlp_only_layers=[0], norm_topk_prob=False)
        cls = T.Qwen2MoeConfig
    elif fam == "qwen3_moe":
        kw = dict(num_hidden_layers=3, **moe_dims, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
                  mlp_only_layers=[1], head_dim=8)
        cls = T.Qwen3MoeConfig
    elif fam == "qwen3_next":
        kw = dict(num_hidden_layers=2, **moe_dims, shared_expert_intermediate_size=16, num_experts=E,
                  num_experts_per_tok=K, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                  linear_num_key_heads=2, linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])
        cls = T.Qwen3NextConfig
    elif fam == "olmoe":
        kw = dict(num_hidden_layers=2, intermediate_size=16, num_experts=E, num_experts_per_tok=K)
        cls = T.OlmoeConfig
    elif fam == "deepseek_v2":
        kw = dict(num_hidden_layers=3, **moe_dims, **mla, n_routed_experts=E, num_experts_per_tok=K,
                  first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=None, topk_method="group_limited_greedy",
                  n_group=4 if E % 4 == 0 and E >= 8 else 1, topk_group=2 if E % 4 == 0 and E >= 8 else 1,
                  routed_scaling_factor=1.5)
        cls = T.DeepseekV2Config
    elif fam == "deepseek_v3":
        kw = dict(num_hidden_layers=3, **moe_dims, **mla, n_routed_experts=E, num_experts_per_tok=K,
                  first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=24, n_group=2 if E % 2 == 0 and E >= 4 else 1,
                  topk_group=1,
                  routed_scaling_factor=2.5, rope_interleave=True)
        cls = T.DeepseekV3Config
    elif fam == "glm4_moe":
        kw = dict(num_hidden_layers=3, **moe_dims, n_routed_experts=E, num_experts_per_tok=K, first_k_dense_replace=1,
                  n_shared_experts=1, n_group=2 if E % 2 == 0 and E >= 4 else 1, topk_group=1, head_dim=8, use_qk_norm=True, routed_scaling_factor=1.5)
        cls = T.Glm4MoeConfig
    elif fam == "gpt_oss":
        kw = dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=E, num_experts_per_tok=K, head_dim=8,
                  sliding_window=8)
        cls = T.GptOssConfig
    elif fam == "granitemoe":
        kw = dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=E, num_experts_per_tok=K,
                  embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.3)
        cls = T.GraniteMoeConfig
    elif fam == "phimoe":
        if K != 2:
            raise ValueError("phimoe routes to exactly 2 experts (sparsemixer); use top_k=2")
        kw = dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=E, num_experts_per_tok=2,
                  attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01)
        cls = T.PhimoeConfig
    elif fam == "llama4_text":
        kw = dict(num_hidden_layers=3, intermediate_size=16, intermediate_size_mlp=32, num_local_experts=E,
                  num_experts_per_tok=K, head_dim=8, moe_layers=[0, 2], attention_chunk_size=16)
        cls = T.Llama4TextConfig
    elif fam == "ernie4_5_moe":
        kw = dict(num_hidden_layers=3, **moe_dims, moe_num_experts=E, moe_k=K, moe_num_shared_experts=1,
                  moe_layer_start_index=1, tie_word_embeddings=False)
        cls = T.Ernie4_5_MoeConfig
    else:  # pragma: no cover - the table and this factory are kept in step
        raise ValueError(f"tiny_config has no recipe for {fam!r}")
    kw = {**base, **kw, **overrides}
    return cls(**kw)


def tiny_model(family: str, num_experts: int = 8, top_k: int = 2, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random-init causal LM of ``family`` in eval mode, float32, with every expert-indexed
    tensor (router biases, score-correction biases, expert biases) randomised so tests exercise them."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, num_experts, top_k, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for l in moe_layers(model):
            for uname, ref in l.spec.indexed:
                mod, name = _resolve(l.block, ref.path)
                t = getattr(mod, name)
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            ex = l.experts_module()
            for name in (l.spec.gate_up_bias, l.spec.down_bias):
                if name:
                    t = getattr(ex, name)
                    t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


def tiny_nonuniform_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """:func:`tiny_model` with 8 experts whose MoE layers then keep different counts (the first all 8,
    the others the family's valid counts in turn; alternate layers keep their first or last experts),
    recorded with :func:`set_expert_counts_config`: the shape of an adaptive MC-SMoE model."""
    model = tiny_model(family, num_experts=8, seed=seed, **overrides)
    options = sorted(set(valid_expert_counts(model)) | {8}, reverse=True)
    for j, layer in enumerate(moe_layers(model)):
        n = options[j % len(options)]
        if n == 8:
            continue
        idx = torch.arange(8 - n, 8) if j % 2 else torch.arange(n)
        set_experts(model, layer.layer_idx, {k: v[idx] for k, v in layer.expert_weights().items()},
                    layer.router_weight()[idx], {k: v[idx] for k, v in layer.expert_indexed().items()})
    counts = set_expert_counts_config(model)
    if len(set(counts.values())) < 2:
        raise ValueError(f"{family}: no two MoE layers could keep different counts ({counts})")
    return model
