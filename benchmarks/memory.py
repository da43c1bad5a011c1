"""Benchmark: peak memory of each method's variant on a model with Qwen3-30B-A3B's true expert shape.

A random-init Qwen3-MoE with 128 experts of width 768 on hidden 2048 (Qwen3-30B-A3B's MoE layer; its
attention and vocabulary are cut down, and it has only ``--layers`` layers), in bf16 on the CPU. Each
method runs in a fresh process: load the model, observe a small calibration set, build one variant,
evaluate one batch on it. The figure is the process's peak resident memory above what it held after
loading and observing, as a multiple of the model's bytes (1.0 = a whole second model). ``--copy deep``
builds every variant as a whole-model ``copy.deepcopy`` (the code before variants shared tensors), so
the two columns are before and after.

    python benchmarks/memory.py [--layers 2] [--methods NAME,...] [--out benchmarks/results/memory.json]

The recovery rows train a pruned student (a variant) for one step beside its teacher, with each of
``train.recover``'s ``trainable`` modes; their figure includes the student's own tensors, the tensors
recovery copies before writing, gradients, float32 masters and AdamW state.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moelab import compress, io, models, observe, prune  # noqa: E402

SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             num_attention_heads=4, num_key_value_heads=1, head_dim=128, vocab_size=4096)
TARGET = 96  # REAM's 128 -> 96

def _recovery(trainable: str, checkpointing: bool = False, lora_experts: bool = True):
    """One recovery step of a pruned student (a variant) beside its teacher: what training adds."""
    def run(model, obs):
        from moelab import train, zoo

        tok = zoo.load("smoke")[1]  # any tokenizer whose ids fit the vocabulary feeds the batches
        student = models.variant(prune.prune(model, obs, "frequency", num_experts=TARGET)[0])
        train.recover(student, tok, teacher=model, steps=1, batch_size=1, seq_len=128, lm_weight=0.5, kd_weight=0.5,
                      trainable=trainable, lora_rank=16, warmup=1, gradient_checkpointing=checkpointing, lora_experts=lora_experts)
        return student
    return run


RECOVERY = {
    "recovery step: full fine-tuning": _recovery("all"),
    "recovery step: LoRA rank 16": _recovery("lora"),
    "recovery step: LoRA rank 16 + gradient checkpointing": _recovery("lora", True),
    "recovery step: LoRA rank 16 on Linear layers only": _recovery("lora", lora_experts=False),
    "recovery step: full fine-tuning + gradient checkpointing": _recovery("all", True),
    "recovery step: routers and norms": _recovery("router_norms"),
}

METHODS = {
    "frequency pruning": lambda m, o: prune.prune(m, o, "frequency", num_experts=TARGET)[0],
    "M-SMoE merge (weight matching)": lambda m, o: compress.merge_into_nearest_model(m, o, TARGET, align="weights")[0],
    "HC-SMoE": lambda m, o: compress.hc_smoe_model(m, o, TARGET)[0],
    "depth (1 layer)": lambda m, o: prune.remove_layers(m, o, 1)[0],
    "width 0.75": lambda m, o: prune.slice_width(m, o, 0.75)[0],
    **RECOVERY,
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(layers: int):
    from transformers import Qwen3MoeConfig, AutoModelForCausalLM

    cfg = Qwen3MoeConfig(num_hidden_layers=layers, intermediate_size=6144, max_position_embeddings=512,
                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **SHAPE)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def one(method: str, layers: int, deep: bool) -> dict:
    torch.set_num_threads(2)
    if deep:  # the code before: every variant a whole-model copy
        models.variant = copy.deepcopy
    model = _model(layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, SHAPE["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(0))
    obs = observe.observe(model, ids, batch_size=4, sample_size=256, progress=False)
    base = _rss_mib()
    t0 = time.perf_counter()
    v = METHODS[method](model, obs)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        v(input_ids=ids[:2])
    peak = _rss_mib()
    own = sum(p.numel() * p.element_size() for p in v.parameters()) - models.shared_bytes(model, v)
    return {"method": method, "copy": "deepcopy" if deep else "variant", "model_MiB": model_bytes / 2**20,
            "peak_above_model_MiB": peak - base, "peak_x_model": (peak - base) * 2**20 / model_bytes,
            "variant_own_x_model": own / model_bytes, "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "COPY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.layers, args.one[1] == "deep")))
        return 0
    rows = []
    chosen = args.methods.split(",") if args.methods else list(METHODS)
    for method in chosen:
        for how in (("variant",) if method in RECOVERY else ("deep", "variant")):
            out = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--one", method, how],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{method:32s} {r['copy']:8s} peak {r['peak_x_model']:.2f}x model "
                  f"(variant's own tensors {r['variant_own_x_model']:.2f}x)", flush=True)
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if old.get("layers") == args.layers:  # a subset run keeps the other methods' rows of the same model
        fresh = {(r["method"], r["copy"]) for r in rows}
        rows = [r for r in old.get("rows", []) if (r["method"], r["copy"]) not in fresh] + rows
    io.write_json_atomic(args.out, {"shape": SHAPE, "layers": args.layers, "dtype": "bfloat16",
                                    "versions": io.package_versions(), "git_revision": io.git_revision(),
                                    "note": "peak resident memory above the loaded and observed model, per process",
                                    "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
