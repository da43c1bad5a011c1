"""Upcycling: the zoo's second kind of model, whose experts share an origin in one dense FFN.

The papers' best results come from checkpoints whose experts were initialised from a dense model:
Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B were upcycled from dense Qwen models (DERN keeps 97% on
Qwen2-57B), Mixtral's experts are widely reported to start from Mistral-7B's FFN. The embedded default
is trained from scratch, like OLMoE, DeepSeek and Qwen3-MoE. A recipe with ``dense_steps > 0``
(``zoo.Recipe``) builds the upcycled twin: the same architecture, data, tokenizer and number of
training steps, of which the first ``dense_steps`` train a dense model and the rest the MoE made from it.

Which upcycling. We split the dense FFN's neurons, as Qwen1.5-MoE describes for its fine-grained
experts, rather than copying the whole FFN into each expert (sparse upcycling, Mixtral's reported
origin): our experts are fine-grained (32 of width 128, top-4), so

* the dense model's FFN has width ``top_k * expert_width`` (512), the MoE's active width: a dense step
  costs what an MoE step costs, and "the same training compute" is simply the same number of steps;
* expert ``e`` takes segment ``e mod top_k`` of that FFN (``num_experts / top_k`` replicas of each of
  the ``top_k`` segments), with its neurons in a random order of its own (Qwen1.5-MoE shuffles along
  the intermediate dimension to diversify the replicas; it also makes neuron alignment necessary
  before any weights are averaged, the problem MC-SMoE's and REAM's alignment address);
* each down projection is multiplied by ``top_k``: top-k experts of distinct segments at equal router
  weights ``1/top_k`` (a fresh router's) give back the dense FFN's output exactly.

The router starts fresh (the dense model has none worth keeping); everything else (embeddings,
attention, norms, a shared expert) is the dense model's own tensor.

The dense model is the recipe's own family with one expert of the active width and top-1 routing:
its router weight is 1 for every token (softmax or normalised sigmoid over one expert), so it is a
dense FFN in the family's own classes and every other tensor has the MoE's name and shape.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn


UPCYCLABLE = ("qwen3_moe", "mixtral")


def dense_recipe(recipe):
    """The recipe's dense phase as a recipe of its family: one expert of width ``top_k * expert_width``."""
    if recipe.num_experts % recipe.top_k:
        raise ValueError(f"an upcycled recipe needs num_experts ({recipe.num_experts}) to be a multiple of top_k "
                         f"({recipe.top_k}): each of the top_k segments of the dense FFN gets the same number of "
                         "replicas")
    if recipe.family not in UPCYCLABLE:
        raise ValueError(f"upcycled builds support the families {UPCYCLABLE}, not {recipe.family!r}: the dense phase "
                         "is the family with one expert, and DeepSeek-V3's group-limited router takes the top 2 "
                         "scores of each group, which one expert does not have")
    return replace(recipe, num_experts=1, top_k=1, expert_width=recipe.top_k * recipe.expert_width, dense_steps=0)


def split_ffn(dense: dict[str, Tensor], num_experts: int, top_k: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Fine-grained experts from one dense FFN (uniform layout, see ``models.MoELayer.expert_weights``).

    Args:
        dense: gate/up ``[1, K*I, H]``, down ``[1, H, K*I]`` (biases ``[1, K*I]`` / ``[1, H]`` where the
            family has them).
        num_experts: E, a multiple of ``top_k`` = K.
        generator: draws each expert's neuron order.

    Returns:
        gate/up ``[E, I, H]``, down ``[E, H, I]``: expert e holds segment ``e mod K``'s neurons in its own
        random order, down times K (module docstring); a down bias is divided among the K experts a
        token meets, so it too sums back to the dense one.
    """
    width = dense["gate"].shape[1]
    if width % top_k:
        raise ValueError(f"the dense FFN's width {width} does not split into top_k={top_k} segments")
    I = width // top_k
    out: dict[str, list[Tensor]] = {k: [] for k in dense}
    for e in range(num_experts):
        seg = e % top_k
        idx = seg * I + torch.randperm(I, generator=generator)
        for k, t in dense.items():
            if k in ("gate", "up", "gate_bias", "up_bias"):
                out[k].append(t[0, idx])
            elif k == "down":
                out[k].append(t[0][:, idx] * top_k)
            elif k == "down_bias":
                out[k].append(t[0])
            else:
                raise ValueError(f"split_ffn: unknown expert tensor {k!r}")
    return {k: torch.stack(v) for k, v in out.items()}


def upcycle_into(moe: nn.Module, dense: nn.Module, seed: int) -> dict:
    """Make the freshly initialised ``moe`` the upcycled ``dense`` model, in place.

    Every tensor of the same name and shape is the dense model's (embeddings, attention, norms, a shared
    expert); each MoE layer's experts come from ``split_ffn`` of the dense layer's one expert; routers
    and other expert-indexed tensors keep their fresh values.

    Returns:
        what was copied and what was left fresh (names), for the build's metrics.

    Raises:
        ValueError: a tensor of the MoE that is neither copied, nor an expert, nor a router tensor (the
            two models would not be one architecture).
    """
    from . import models

    dense_state = dense.state_dict()
    copied, fresh = [], []
    with torch.no_grad():
        for name, t in moe.state_dict().items():
            src = dense_state.get(name)
            if src is not None and src.shape == t.shape:
                t.copy_(src)
                copied.append(name)
            else:
                fresh.append(name)
        gen = torch.Generator().manual_seed(seed)
        dense_layers = {layer.layer_idx: layer for layer in models.moe_layers(dense)}
        for layer in models.moe_layers(moe):
            w = split_ffn(dense_layers[layer.layer_idx].expert_weights(), layer.num_experts, layer.top_k, gen)
            models.set_experts(moe, layer.layer_idx, w, layer.router_weight(), layer.expert_indexed())
    expert_like = ("experts", "router", "gate.weight", "e_score_correction_bias", "expert_bias")
    odd = [n for n in fresh if not any(s in n for s in expert_like)]
    if odd:
        raise ValueError(f"upcycling: the MoE's {odd[:4]} have no tensor of the same shape in the dense model; "
                         "the dense recipe must be the MoE's own architecture with one expert")
    return {"copied_tensors": len(copied), "fresh_tensors": sorted(fresh)}
