"""A sorted-token experts kernel for CPU, registered with transformers' ExpertsInterface.

transformers 5.x routes every fused experts module (``@use_experts_implementation``) through
``config._experts_implementation``. Its default on CPU, ``grouped_mm``, falls back to a slow path,
and ``eager`` indexes ``gate_up_proj[e]`` per expert, which in training makes autograd build one
full-size zero gradient per expert. This kernel sorts the (token, expert) pairs by expert once,
splits them into contiguous runs, and runs each expert's two matmuls on its run; weights are
``unbind``-ed so the backward stacks one gradient tensor. Outputs are those of ``eager``
(same operations, same per-token summation order: experts in ascending order).

The kernel is also where moelab observes experts: when a module carries a ``_moelab_recorder``,
the kernel calls ``recorder(module, token_idx, expert_idx, out, weight)`` once per forward with the
un-gated expert outputs ``out`` [S, H] of all (token, expert) pairs it has computed anyway (sorted
by expert), so REAP/EAN statistics cost a norm and a few scatters, not a second expert pass
(see moelab.observe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNEL_NAME = "moelab_sorted"


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    # Families store [out, in] (F.linear) or, when transposed (GPT-OSS, Llama4), [in, out].
    y = x @ w if transposed else F.linear(x, w)
    return y if b is None else y + b


def sorted_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward over tokens grouped by expert (a drop-in for transformers' eager kernel).

    Args:
        hidden_states: [T, H] tokens entering the experts.
        top_k_index: [T, K] experts chosen per token (an index >= num_experts is skipped, as in
            transformers' expert-parallel sentinel).
        top_k_weights: [T, K] routing weights.

    Returns:
        [T, H] sum over the K chosen experts of weight * f_e(x).
    """
    num_tokens, hidden = hidden_states.shape
    k = top_k_index.shape[-1]
    n_exp = self.num_experts
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_exp)[:n_exp].tolist()
    valid = sum(counts)
    order = order[:valid]
    token_idx = order // k
    x_sorted = hidden_states[token_idx]
    w_sorted = top_k_weights.reshape(-1)[order]

    has_gate = getattr(self, "has_gate", True)
    transposed = getattr(self, "is_transposed", False)
    has_bias = getattr(self, "has_bias", False)
    w_in = self.gate_up_proj if has_gate else self.up_proj
    b_in = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    b_out = self.down_proj_bias if has_bias else None
    w_in_e = w_in.unbind(0)
    w_out_e = self.down_proj.unbind(0)
    recorder = getattr(self, "_moelab_recorder", None)

    # split (not slicing) so the backward is one concatenation, not a full-size zero tensor per expert
    x_runs = x_sorted.split(counts)
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xs = x_runs[e]
        h = _project(xs, w_in_e[e], None if b_in is None else b_in[e], transposed)
        h = self._apply_gate(h) if has_gate else self.act_fn(h)
        y = _project(h, w_out_e[e], None if b_out is None else b_out[e], transposed)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        outs.append(y)
        start += n
    out = torch.zeros_like(hidden_states)
    if outs:
        y_all = torch.cat(outs)
        if recorder is not None:
            recorder(self, token_idx, flat[order], y_all, w_sorted)
        out.index_add_(0, token_idx, (y_all * w_sorted.unsqueeze(-1).to(y_all.dtype)).to(out.dtype))
    return out


def register() -> str:
    """Register the kernel with transformers (idempotent) and return its name."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(KERNEL_NAME, sorted_experts_forward)
    return KERNEL_NAME


def use_sorted_kernel(model) -> None:
    """Switch a loaded model's experts to this kernel (observation needs it; saving is unaffected)."""
    register()
    model.set_experts_implementation(KERNEL_NAME)
