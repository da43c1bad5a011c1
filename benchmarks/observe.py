"""Benchmark: cost of moelab.observe against a plain forward pass on the same tokens.

Runs a plain forward (moelab's experts kernel, no recorder), the observed forward (all statistics
of moelab.observe) and a lean observed forward (``outputs=False, cosines=False``: no [E, H] output
sums, no per-layer cosines, what notebooks that use neither can switch off) alternately, ``--repeats`` times each, on one calibration set, and
writes tokens/s (median of the repeats), their ratio and peak memory to JSON. The ratio is the
figure to quote: both are measured side by side in one process, so CPU steal bursts hit both.

    python benchmarks/observe.py [--model qwen3-moe-15m] [--tokens 32768] [--out benchmarks/results/observe.json]
    python benchmarks/observe.py --true-shape 2 --tokens 4096 --out benchmarks/results/observe_true_shape.json

``--true-shape L`` runs a random-init bf16 model of L layers with Qwen3-30B-A3B's MoE shape (as in
benchmarks/methods.py) on random token ids instead of the embedded model.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moelab import data, io, kernels, observe, zoo  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def plain_pass(model, ids: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        model(input_ids=ids[i:i + batch_size], use_cache=False)
    return time.perf_counter() - t0


def observed_pass(model, ds, batch_size: int, **flags) -> float:
    t0 = time.perf_counter()
    observe.observe(model, ds, batch_size=batch_size, progress=False, **flags)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=zoo.DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--true-shape", type=int, default=0, metavar="LAYERS")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "observe.json"))
    args = ap.parse_args(argv)

    if args.true_shape:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from methods import SHAPE, _model

        model = _model(args.true_shape)
        kernels.use_sorted_kernel(model)
        ids = torch.randint(0, SHAPE["vocab_size"], (args.tokens // args.seq_len, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
        ds = ids
        args.model = f"random-init Qwen3-30B-A3B MoE shape, {args.true_shape} layers, bf16"
    else:
        model, tok = zoo.load(args.model)
        kernels.use_sorted_kernel(model)
        ds = data.calibration_set(tok, "1:1:1", tokens=args.tokens, seq_len=args.seq_len)
        ids = torch.as_tensor(ds["input_ids"])
    n_tokens = ids.numel()
    plain_pass(model, ids[: args.batch_size], args.batch_size)  # warm-up
    rss_before = _peak_rss_mib()
    plain, observed, lean = [], [], []
    for _ in range(args.repeats):
        plain.append(plain_pass(model, ids, args.batch_size))
        rss_plain = _peak_rss_mib()
        observed.append(observed_pass(model, ds, args.batch_size))
        lean.append(observed_pass(model, ds, args.batch_size, outputs=False, cosines=False))
    rss_observed = _peak_rss_mib()
    ratios = [o / p for o, p in zip(observed, plain)]
    lean_ratios = [o / p for o, p in zip(lean, plain)]
    result = {
        "model": args.model,
        "tokens": n_tokens,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "plain_tokens_per_s_median": n_tokens / statistics.median(plain),
        "observed_tokens_per_s_median": n_tokens / statistics.median(observed),
        "time_ratio_median": statistics.median(ratios),
        "time_ratio_per_repeat": ratios,
        "lean_time_ratio_median": statistics.median(lean_ratios),
        "lean_time_ratio_per_repeat": lean_ratios,
        "lean": "outputs=False, cosines=False",
        "peak_rss_mib_before": rss_before,
        "peak_rss_mib_after_plain": rss_plain,
        "peak_rss_mib_after_observed": rss_observed,
        "versions": io.package_versions(),
        "git_revision": io.git_revision(ROOT),
    }
    io.write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
