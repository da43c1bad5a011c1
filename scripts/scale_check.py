"""The scale check: observation and one variant of each method on a random-init Qwen3-30B-A3B of full shape.

Qwen3-30B-A3B's config (48 layers, 128 experts of width 768 on hidden 2048, top-8, 32 query and 4
key-value heads, vocabulary 151,936; about 57 GiB in bf16) with random weights, built directly on the
device in bf16, so no hub and no download. It observes a calibration set of random token ids, then
builds, runs one batch through, and drops one variant per method (one alive at a time), and writes
seconds and peak device memory per step, as multiples of the model's bytes, to JSON:

    python scripts/scale_check.py                                  # on the GPU machine: full shape
    python scripts/scale_check.py --layers 2 --device cpu --out /tmp/scale.json   # the same code, small, on a CPU

Random weights decide nothing about quality; the figures are memory and time only. ``--shape tiny``
(the tests) uses a tiny config of the same family.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QWEN3_30B = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                 intermediate_size=6144, max_position_embeddings=4096)
TINY = dict(hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, intermediate_size=128, max_position_embeddings=512)


def build(shape: dict, layers: int, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(num_hidden_layers=layers, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                         **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def methods(target: int):
    from moelab import compress, prune

    return {
        "frequency pruning": lambda m, o, c: prune.prune(m, o, "frequency", num_experts=target)[0],
        "REAP pruning": lambda m, o, c: prune.prune(m, o, "reap", num_experts=target)[0],
        "M-SMoE merge (weight matching)": lambda m, o, c: compress.merge_into_nearest_model(m, o, target, align="weights")[0],
        "HC-SMoE": lambda m, o, c: compress.hc_smoe_model(m, o, target)[0],
        "REAM (sequential, replay)": lambda m, o, c: compress.ream_model(m, c, target, sample_size=256)[0],
        "DERN": lambda m, o, c: compress.dern_model(m, o, target)[0],
        "depth (1 layer)": lambda m, o, c: prune.remove_layers(m, o, 1)[0],
        "width 0.75": lambda m, o, c: prune.slice_width(m, o, 0.75)[0],
        "MC-SMoE low rank + sparse": lambda m, o, c: compress.low_rank_sparse_model(m, 0.9, rank_fraction=0.25)[0],
    }


def main(argv=None) -> int:
    import torch

    from moelab import io, models, observe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--shape", choices=("qwen3-30b-a3b", "tiny"), default="qwen3-30b-a3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--target", type=int, default=None, help="experts kept per layer (default 3/4 of them)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_check.json"))
    args = ap.parse_args(argv)
    shape = QWEN3_30B if args.shape == "qwen3-30b-a3b" else TINY
    cuda = args.device.startswith("cuda")

    def peak_reset():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak() -> float | None:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return None

    t0 = time.perf_counter()
    model = build(shape, args.layers, args.device, torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"shape": shape, "layers": args.layers, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "dtype": "bfloat16", "model_GiB": model_bytes / 2**30, "build_s": time.perf_counter() - t0,
           "rows": args.rows, "seq_len": args.seq_len, "versions": io.package_versions(),
           "git_revision": io.git_revision(ROOT), "steps": []}
    ids = torch.randint(0, shape["vocab_size"], (args.rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = ids[:4].to(models.input_device(model))
    base = torch.cuda.memory_allocated() if cuda else 0

    def record(name, fn):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        peak_reset()
        t = time.perf_counter()
        rec = {"step": name}
        try:
            result = fn()
            rec["ok"] = True
        except Exception as exc:  # noqa: BLE001 - the record says what failed
            result, rec["ok"] = None, False
            rec["error"] = f"{type(exc).__name__}: {exc}"[:1500]
            rec["traceback"] = traceback.format_exc()[-3000:]
        rec["seconds"] = time.perf_counter() - t
        p = peak()
        if p is not None:
            rec["peak_above_model_x"] = (p - base) / model_bytes
            rec["peak_GiB"] = p / 2**30
        out["steps"].append(rec)
        print(f"{name}: {'ok' if rec['ok'] else 'FAILED ' + rec['error']} {rec['seconds']:.1f} s"
              + (f", peak {rec['peak_GiB']:.1f} GiB ({rec['peak_above_model_x']:.2f}x model above it)" if p else ""),
              flush=True)
        io.write_json_atomic(args.out, out)
        return result

    with torch.no_grad():
        record("plain forward (4 rows)", lambda: model(input_ids=batch).logits.shape)
    obs = record("observe", lambda: observe.observe(model, ids, batch_size=4, sample_size=256, progress=False))
    if obs is None:
        return 1
    E = models.moe_layers(model)[0].num_experts
    target = args.target or (3 * E) // 4
    chosen = methods(target)
    if args.methods:
        chosen = {k: v for k, v in chosen.items() if k in args.methods.split(",")}
    for name, fn in chosen.items():
        def step(fn=fn):
            v = fn(model, obs, ids)
            with torch.no_grad():
                v(input_ids=batch)
            own = sum(p.numel() * p.element_size() for p in v.parameters()) - models.shared_bytes(model, v)
            return own
        own = record(name, step)
        if own is not None:
            out["steps"][-1]["variant_own_x_model"] = own / model_bytes
        io.write_json_atomic(args.out, out)
    failed = sum(not s["ok"] for s in out["steps"])
    print(f"wrote {args.out}: {len(out['steps']) - failed}/{len(out['steps'])} steps ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
