"""Benchmark: seconds of each scaling-critical step on Qwen3-30B-A3B's true MoE shape, before and after.

A random-init Qwen3-MoE with 128 experts of width 768 on hidden 2048 (Qwen3-30B-A3B's MoE layer;
attention and vocabulary cut down, ``--layers`` layers), bf16, on the CPU. Each section times
today's code against the code it replaced, side by side in one process, and writes seconds and
their ratio (before / after; above 1 means faster now) to JSON:

* ``kernels``: one MoE block's forward with transformers' ``eager`` and ``grouped_mm`` experts
  kernels and moelab's sorted kernel (median of interleaved repeats);
* ``ream_sequential``: REAM's sequential observation (every MoE layer observed after the earlier ones
  were edited; a no-op edit, so only observation is timed) by one pass from the embeddings per layer
  (before) and by layer-wise replay (after); and the count of layer forwards each needs at 48 layers;
* ``dern``: DERN's recombination of one layer (keep half the experts) with the k-means that loops
  over clusters in Python (before, read from git history) and the vectorised one (after);
* ``alignment``: one weight-matching alignment of two experts and REAM's PCA features at Qwen3's
  width (768 x 2048) and Mixtral's (14,336 x 4,096): the dense exact assignment against the
  restricted one (speed and cost gap), the exact PCA against randomized subspace iteration.

Speed on a shared machine is noisy: quote the ratios, not the seconds.

    python benchmarks/methods.py [--layers 8] [--sections kernels,ream_sequential,dern,alignment]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moelab import io, kernels, merge, models, observe  # noqa: E402

SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             num_attention_heads=4, num_key_value_heads=1, head_dim=128, vocab_size=4096)
MIXTRAL = (14336, 4096)  # expert width, hidden size
QWEN3 = (768, 2048)
# the k-means before it was vectorised over clusters (commit before 81068fd)
KMEANS_BEFORE_REV = "81068fd~1"


def _model(layers: int):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(num_hidden_layers=layers, intermediate_size=6144, max_position_embeddings=512,
                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **SHAPE)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


EMBEDDED = dict(hidden_size=256, moe_intermediate_size=128, num_experts=32, num_experts_per_tok=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=4096)  # qwen3-moe-15m's MoE


def _kernel_times(shape: dict, dtype, tokens: int, repeats: int, backward: bool) -> dict:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(num_hidden_layers=1, intermediate_size=4 * shape["hidden_size"], max_position_embeddings=512,
                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    kernels.register()
    block = models.moe_layers(model)[0].block
    x = torch.randn(1, tokens, shape["hidden_size"], dtype=dtype, generator=torch.Generator().manual_seed(0))
    impls = ["eager", "grouped_mm", kernels.KERNEL_NAME]
    times = {k: [] for k in impls}

    def step():
        if backward:
            block.zero_grad(set_to_none=True)
            block(x).float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                block(x)

    for r in range(repeats + 1):
        for impl in impls:
            model.set_experts_implementation(impl)
            t = _timed(step)
            if r:  # the first round warms up
                times[impl].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "step": "forward + backward" if backward else "forward",
            "median_s": med, "ratio_vs_eager": {k: med["eager"] / v for k, v in med.items()}}


def kernels_section(args) -> dict:
    rows = []
    for name, shape, dtype in (("Qwen3-30B-A3B MoE", SHAPE, torch.bfloat16), ("embedded qwen3-moe-15m MoE", EMBEDDED, torch.float32)):
        for backward in (False, True):
            rows.append({"shape": name, **_kernel_times(shape, dtype, args.tokens, args.repeats, backward)})
            print(rows[-1], flush=True)
    return {"rows": rows, "repeats": args.repeats,
            "note": "one MoE block on a CPU, median of interleaved repeats; ratio above 1: faster than eager"}


def ream_section(args) -> dict:
    model = _model(args.layers)
    ids = torch.randint(0, SHAPE["vocab_size"], (args.rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    seconds = {}
    seen = {}
    for replay in (False, True):
        seen[replay] = {}
        seconds["replay" if replay else "pass per layer"] = _timed(lambda: seen[replay].update(observe.observe_sequential(
            model, ids, lambda j, st: None, replay=replay, batch_size=args.batch_size, sample_size=256, progress=False)))
    same = all(torch.allclose(seen[False][j].reap_sum, seen[True][j].reap_sum, rtol=1e-3) for j in seen[False])
    L = args.layers
    return {"layers": L, "tokens": args.rows * args.seq_len, "seconds": seconds,
            "ratio_before_over_after": seconds["pass per layer"] / seconds["replay"], "same_reap_sums": same,
            "layer_forwards": {"pass per layer": L * (L + 1) // 2, "replay": 3 * L - 2},
            "layer_forwards_at_48_layers": {"pass per layer": 48 * 49 // 2, "replay": 3 * 48 - 2},
            "note": "layer forwards: a pass per layer runs layers 0..l for each MoE layer l; replay runs one pass "
                    "to the last layer's input (L - 1), one forward per layer to observe (L) and one per edited "
                    "layer to feed the next (L - 1)"}


def _kmeans_before():
    """The weighted spherical k-means as it was before vectorisation, read from git history."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{KMEANS_BEFORE_REV}:moelab/merge.py"], capture_output=True,
                         text=True, check=True).stdout
    mod = types.ModuleType("moelab._merge_before")
    mod.__package__ = "moelab"  # its relative imports resolve to today's package
    exec(compile(src, "merge_before.py", "exec"), mod.__dict__)
    return mod.weighted_spherical_kmeans


def dern_section(args) -> dict:
    model = _model(1)
    layer = models.moe_layers(model)[0]
    weights = layer.expert_weights()
    imp = torch.rand(SHAPE["num_experts"], generator=torch.Generator().manual_seed(0)).double()
    out = {}
    try:
        before = _kmeans_before()
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        before, out["before_unavailable"] = None, f"git history not available: {err}"
    after = merge.weighted_spherical_kmeans
    E = args.dern_experts  # a subset of the layer's experts: the loop-over-clusters code is slow
    sub = {k: v[:E] for k, v in weights.items()}
    kept, dropped = list(range(0, E, 2)), list(range(1, E, 2))
    seconds = {}
    for name, fn in (("before", before), ("after", after)):
        if fn is None:
            continue
        merge.weighted_spherical_kmeans = fn
        try:
            seconds[name] = _timed(lambda: merge.dern_recombine(sub, kept, dropped, imp[:E]))
        finally:
            merge.weighted_spherical_kmeans = after
    out.update({"experts": E, "kept": len(kept), "seconds": seconds})
    if "before" in seconds:
        out["ratio_before_over_after"] = seconds["before"] / seconds["after"]
    # the k-means alone on one kept expert that received as many segments as it has (N = 2I points, k = I)
    g = torch.Generator().manual_seed(0)
    I, D = SHAPE["moe_intermediate_size"], 3 * SHAPE["hidden_size"]
    vecs, wts = torch.randn(2 * I, D, generator=g), torch.rand(2 * I, generator=g)
    km = {}
    for name, fn in (("before", before), ("after", after)):
        if fn is not None:
            km[name] = _timed(lambda: fn(vecs, wts, I, iters=30))
    out["kmeans_one_expert_s"] = km
    if "before" in km:
        out["kmeans_ratio_before_over_after"] = km["before"] / km["after"]
    t0 = time.perf_counter()
    kept_e, dropped_e = list(range(0, 128, 2)), list(range(1, 128, 2))
    merge.assign_segments(weights, kept_e, dropped_e, 0.6)
    out["full_layer_segment_assignment_s"] = time.perf_counter() - t0
    all_kept, all_dropped = kept_e, dropped_e
    out["full_layer_after_s"] = _timed(lambda: merge.dern_recombine(weights, all_kept, all_dropped, imp))
    out["note"] = ("dern_recombine, alpha 0.6, 30 k-means iterations; full layer: 128 -> 64 experts of 768 x 2048; "
                   "the segment assignment (every dropped segment against every kept one) is part of the full layer")
    return out


def _expert_pair(I: int, H: int, seed: int = 0, rank: int = 64):
    """Two related experts whose neuron features have a decaying spectrum (as trained weights do):
    a shared rank-``rank`` structure plus noise; ``other`` is ``ref``'s neurons permuted, half re-drawn."""
    g = torch.Generator().manual_seed(seed)

    def structured(rows, cols):
        scale = torch.linspace(3.0, 0.3, rank)
        return (torch.randn(rows, rank, generator=g) * scale) @ torch.randn(rank, cols, generator=g) / rank ** 0.5

    ref = {"gate": structured(I, H), "up": structured(I, H), "down": structured(H, I)}
    ref = {k: (v + 0.3 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in ref.items()}
    perm = torch.randperm(I, generator=g)
    other = merge.permute_neurons({k: (0.5 * v.float() + 0.5 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
                                   for k, v in ref.items()}, perm)
    return ref, other


def _assignment_rows(cost: torch.Tensor) -> dict:
    I = cost.shape[0]
    exact, restricted = {}, {}
    row = {"dense_assignment_s": _timed(lambda: exact.update(p=merge.hungarian(cost, candidates=I))),
           "restricted_assignment_s": _timed(lambda: restricted.update(
               p=merge.hungarian(cost, candidates=merge.MATCH_CANDIDATES)))}
    total = lambda p: float(cost[torch.arange(I), p].double().sum())
    row["restricted_cost_gap"] = (total(restricted["p"]) - total(exact["p"])) / abs(total(exact["p"]))
    row["same_matches"] = float((restricted["p"] == exact["p"]).float().mean())
    row["ratio_dense_over_restricted"] = row["dense_assignment_s"] / row["restricted_assignment_s"]
    return row


def alignment_section(args) -> dict:
    rows = []
    for I, H in [QWEN3, MIXTRAL][:args.widths]:
        ref, other = _expert_pair(I, H)
        _, unrelated = _expert_pair(I, H, seed=1)
        fr, fo, fu = merge.neuron_features(ref), merge.neuron_features(other), merge.neuron_features(unrelated)
        row = {"width": I, "hidden": H, "default_path": "dense" if I <= merge.DENSE_MATCH_MAX else "restricted"}
        t0 = time.perf_counter()
        cost = -(fr @ fo.T)  # weight matching's cost (align_weights)
        row["cost_matrix_s"] = time.perf_counter() - t0
        row["related pair"] = _assignment_rows(cost)
        del cost
        row["unrelated pair"] = _assignment_rows(-(fr @ fu.T))
        # REAM's PCA features of the two experts' neurons (64 dims)
        saved = merge.EXACT_PCA_MAX
        try:
            merge.EXACT_PCA_MAX = 10 ** 9
            pe = {}
            row["pca_exact_s"] = _timed(lambda: pe.update(z=merge._pca_pair(fr, fo, 64)))
            merge.EXACT_PCA_MAX = 0
            pr = {}
            row["pca_randomized_s"] = _timed(lambda: pr.update(z=merge._pca_pair(fr, fo, 64)))
        finally:
            merge.EXACT_PCA_MAX = saved
        de = torch.cdist(merge._unit_rows(pe["z"][0]), merge._unit_rows(pe["z"][1]))
        dr = torch.cdist(merge._unit_rows(pr["z"][0]), merge._unit_rows(pr["z"][1]))
        row["pca_feature_distance_mean_abs_diff"] = float((de - dr).abs().mean())
        row["pca_feature_distance_max_abs_diff"] = float((de - dr).abs().max())
        row["pca_same_matching"] = float((merge.hungarian(de) == merge.hungarian(dr)).float().mean())
        row["pca_ratio_exact_over_randomized"] = row["pca_exact_s"] / row["pca_randomized_s"]
        rows.append(row)
        print(row, flush=True)
        del ref, other, unrelated, fr, fo, fu
    return {"rows": rows, "note": "one expert pair in bf16 (features and costs in float32) with a decaying spectrum "
                                  "(rank-64 structure plus noise); related: a permuted, half re-drawn copy, "
                                  "unrelated: independent draws; dense = exact linear_sum_assignment, restricted = "
                                  "64 candidates per neuron; PCA distances are between unit-normalised 64-d features "
                                  "(in [0, 2])"}


SECTIONS = {"kernels": kernels_section, "ream_sequential": ream_section, "dern": dern_section,
            "alignment": alignment_section}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the REAM model")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the kernels section")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dern-experts", type=int, default=16)
    ap.add_argument("--widths", type=int, default=2, help="1: Qwen3's expert width only, 2: also Mixtral's")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        result[name] = SECTIONS[name](args)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        result.update({"shape": SHAPE, "dtype": "bfloat16", "torch_threads": torch.get_num_threads(),
                       "versions": io.package_versions(), "git_revision": io.git_revision()})
        io.write_json_atomic(out_path, result)  # after each section: a long run keeps what it measured
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
