"""Per-layer expert counts in stock transformers: the modeling file a non-uniform checkpoint carries.

A transformers config holds one routed-expert count for all layers, so a model whose MoE layers keep
different counts (MC-SMoE's adaptive merging, arXiv 2310.01334, Sec. 3.2) cannot be rebuilt by a
family's own class. ``moelab.io.save_checkpoint`` writes such a model with this file beside its
weights, as ``modeling_moelab_nonuniform.py``, and points ``auto_map`` in config.json at the two
classes below, so that any transformers-based tool loads it with ``trust_remote_code=True``::

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True ...

The classes are the family's own config and causal-LM classes with two changes:

* the config's ``model_type`` is ``moelab_nonuniform_<family>``, which no transformers release
  knows, so loading without ``trust_remote_code=True`` stops with transformers' own message asking for
  it, instead of building every layer at the largest count;
* ``__init__`` builds the family's model and then gives each MoE layer its own count: every tensor
  the config's ``moelab_expert_tensors`` plan names is cut to the layer's count along its expert
  dimension, and every cached count attribute it names is set to it (``moelab_experts_per_layer``
  holds one count per decoder layer, ``null`` for a dense one); ``from_pretrained`` then loads the
  weights strictly (any missing, unexpected or mismatched tensor is an error).

Everything else (the forward pass, generation, ``device_map="auto"``, dtypes) is the family's own
code. This file is run wherever the checkpoint goes and so imports nothing from moelab; moelab writes
it unchanged except for :data:`BASE_MODEL_TYPE`, and uses :func:`classes_for` itself to reload.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

# the family (transformers model_type) of the checkpoint; moelab writes it when it saves one
BASE_MODEL_TYPE = "qwen3_moe"

COUNTS_KEY = "moelab_experts_per_layer"
PLAN_KEY = "moelab_expert_tensors"
BASE_KEY = "moelab_base_model_type"
MODEL_TYPE_PREFIX = "moelab_nonuniform_"
_STRICT = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")


def resize_layers(model: nn.Module, config) -> None:
    """Cut each MoE layer of a freshly built ``model`` to its own expert count (its first experts).

    ``config.moelab_expert_tensors`` = ``{"tensors": [[name, dim], ...], "attributes": [[module, attr],
    ...]}``, names relative to a decoder layer: the tensors indexed by expert along ``dim`` and the
    attributes that cache the count. Under transformers' meta-device loading this allocates nothing;
    the loaded weights replace the cut tensors.
    """
    counts, plan = getattr(config, COUNTS_KEY), getattr(config, PLAN_KEY)
    layers = model.model.layers
    if len(counts) != len(layers):
        raise ValueError(f"config.{COUNTS_KEY} must list one entry per decoder layer ({len(layers)}); it lists "
                         f"{len(counts)}")
    for i, n in enumerate(counts):
        if n is None:  # a dense layer
            continue
        layer = layers[i]
        for name, dim in plan["tensors"]:
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            old = getattr(owner, attr)
            if old.shape[dim] < n:
                raise ValueError(f"layer {i}: {name} has {old.shape[dim]} experts, fewer than its count {n}")
            new = old.detach().narrow(dim, 0, int(n)).clone()
            if isinstance(old, nn.Parameter):
                setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                owner.register_buffer(attr, new, persistent=attr not in owner._non_persistent_buffers_set)
        for owner_name, attr in plan["attributes"]:
            setattr(layer.get_submodule(owner_name), attr, int(n))


def classes_for(base_model_type: str):
    """The (config class, causal-LM class) pair for a checkpoint of family ``base_model_type``."""
    base_config = CONFIG_MAPPING[base_model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]

    class MoelabNonUniformConfig(base_config):
        model_type = MODEL_TYPE_PREFIX + base_model_type

    class MoelabNonUniformForCausalLM(base_model):
        config_class = MoelabNonUniformConfig

        def __init__(self, config):
            super().__init__(config)
            resize_layers(self, config)

        # transformers decides whether a class may switch its attention / experts kernel by reading
        # the source of the class's module; this module is not the family's, so ask the family's class
        # (else a fresh process would run the experts with the slow eager loop)
        @classmethod
        def _can_set_attn_implementation(cls) -> bool:
            return base_model._can_set_attn_implementation()

        @classmethod
        def _can_set_experts_implementation(cls) -> bool:
            return base_model._can_set_experts_implementation()

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            wants_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
            bad = {k: sorted(map(str, info[k]))[:5] for k in _STRICT if info.get(k)}
            if bad:
                raise ValueError(f"the checkpoint's tensors do not match its per-layer expert counts: {bad}")
            return (model, info) if wants_info else model

    for c in (MoelabNonUniformConfig, MoelabNonUniformForCausalLM):
        c.__qualname__ = c.__name__
        c.__module__ = __name__
    return MoelabNonUniformConfig, MoelabNonUniformForCausalLM


MoelabNonUniformConfig, MoelabNonUniformForCausalLM = classes_for(BASE_MODEL_TYPE)
