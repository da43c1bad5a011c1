"""Upcycled zoo builds (moelab.upcycle) and the expert-similarity measures (moelab.similarity)."""

import json
from dataclasses import replace

import pytest
import torch

from moelab import merge, models, similarity, upcycle, zoo


def _dense(K=4, I=8, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"gate": torch.randn(1, K * I, H, generator=g), "up": torch.randn(1, K * I, H, generator=g),
            "down": torch.randn(1, H, K * I, generator=g)}


def test_split_ffn_gives_permuted_segments_that_sum_back_to_the_dense_ffn():
    dense, K, E = _dense(), 4, 8
    w = upcycle.split_ffn(dense, E, K, torch.Generator().manual_seed(1))
    assert w["gate"].shape == (E, 8, 16) and w["down"].shape == (E, 16, 8)
    x = torch.randn(5, 16)
    want = merge.expert_forward({k: v[0] for k, v in dense.items()}, x)
    # one expert of each segment at equal weights 1/K (a fresh router's): the dense output exactly
    for first in (range(K), range(K, 2 * K), [0, 5, 2, 7]):
        got = sum(merge.expert_forward(merge.get_expert(w, e), x) for e in first) / K
        assert torch.allclose(got, want, atol=1e-5)
    # replicas of one segment hold the same neurons in different orders
    a, b = w["up"][0], w["up"][K]
    assert not torch.equal(a, b)
    assert torch.equal(a[a[:, 0].argsort()], b[b[:, 0].argsort()])


def test_split_ffn_and_dense_recipe_refuse_what_does_not_split():
    with pytest.raises(ValueError, match="multiple of top_k"):
        upcycle.dense_recipe(replace(zoo.RECIPES["smoke"], num_experts=7, top_k=2))
    with pytest.raises(ValueError, match="DeepSeek-V3"):
        upcycle.dense_recipe(replace(zoo.RECIPES["smoke"], family="deepseek_v3"))
    with pytest.raises(ValueError, match="does not split"):
        upcycle.split_ffn(_dense(K=3, I=5), 8, 4, torch.Generator())
    dense = upcycle.dense_recipe(zoo.RECIPES["qwen3-moe-15m-upcycled"])
    assert (dense.num_experts, dense.top_k, dense.expert_width) == (1, 1, 4 * 128)


def test_a_dense_step_costs_an_moe_step():
    """The dense model's FFN has the MoE's active width: same per-token expert parameters."""
    r = zoo.RECIPES["qwen3-moe-15m-upcycled"]
    d = upcycle.dense_recipe(r)
    assert d.top_k * d.expert_width == r.top_k * r.expert_width
    assert replace(r, dense_steps=0) == zoo.RECIPES["qwen3-moe-15m"]  # the twin differs in nothing else


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_upcycle_into_keeps_the_dense_tensors_and_makes_experts_of_its_ffn(family):
    moe = models.tiny_model(family, num_experts=8, top_k=2, seed=0)
    width = 2 * models.moe_layers(moe)[0].intermediate_size  # top_k experts' width
    cfg = models.tiny_config(family, num_experts=1, top_k=1,
                             **{"intermediate_size" if family == "mixtral" else "moe_intermediate_size": width})
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    info = upcycle.upcycle_into(moe, dense, seed=0)
    d_state, m_state = dense.state_dict(), moe.state_dict()
    assert info["copied_tensors"] == sum(1 for k in m_state if k in d_state and d_state[k].shape == m_state[k].shape)
    assert torch.equal(m_state["model.embed_tokens.weight"], d_state["model.embed_tokens.weight"])
    dl, ml = models.moe_layers(dense)[0], models.moe_layers(moe)[0]
    dw, mw = dl.expert_weights(), ml.expert_weights()
    seg0 = dw["up"][0, :width // 2]
    assert torch.equal(mw["up"][0][mw["up"][0][:, 0].argsort()], seg0[seg0[:, 0].argsort()])
    assert torch.allclose(mw["down"][0].abs().sum(), 2 * dw["down"][0][:, :width // 2].abs().sum())


@pytest.mark.slow
def test_an_upcycled_build_is_deterministic_and_scores_its_dense_model(tmp_path):
    from safetensors.torch import load_file

    recipe = replace(zoo.RECIPES["smoke-upcycled"], steps=6, dense_steps=3, warmup=1, tokenizer_chars=50_000,
                     eval_tokens=1024)
    a = zoo.train(recipe, tmp_path / "a", progress=False)
    b = zoo.train(recipe, tmp_path / "b", progress=False)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    m = json.loads((a / "build_metrics.json").read_text())
    assert set(m["dense_eval"]) == set(m["eval"]) and m["dense_parameters"] < m["parameters"]
    assert m["code_fingerprint"] == zoo.build_fingerprint(upcycled=True) != zoo.build_fingerprint()
    curve = json.loads((a / "training_curve.json").read_text())
    assert [r["phase"] for r in curve] == ["dense"] * 3 + ["moe"] * 3
    model, _ = zoo.load(str(a))
    assert models.moe_layers(model)[0].num_experts == recipe.num_experts


def test_only_upcycled_keys_follow_the_upcycling_code(monkeypatch):
    before = {n: zoo.RECIPES[n].key() for n in ("smoke", "smoke-upcycled")}
    import inspect

    src = inspect.getsource

    def patched(obj):
        text = src(obj)
        return text + "# changed" if getattr(obj, "__name__", "") == "moelab.upcycle" else text

    monkeypatch.setattr(inspect, "getsource", patched)
    zoo.build_fingerprint.cache_clear()
    try:
        assert zoo.RECIPES["smoke"].key() == before["smoke"]
        assert zoo.RECIPES["smoke-upcycled"].key() != before["smoke-upcycled"]
    finally:
        monkeypatch.undo()
        zoo.build_fingerprint.cache_clear()


# ----------------------------------------------------------------------------- similarity
def test_aligned_cosine_sees_a_reordered_copy_as_the_same_expert():
    dense = _dense(K=2, I=8)
    w = upcycle.split_ffn(dense, 4, 2, torch.Generator().manual_seed(0))  # experts 0, 2 replicas; 1, 3 too
    cos = similarity.aligned_cosine(w)
    assert cos["aligned"][0, 2] == pytest.approx(1.0) and cos["aligned"][1, 3] == pytest.approx(1.0)
    assert cos["plain"][0, 2] < 0.5  # the same neurons in another order look unrelated
    assert abs(cos["aligned"][0, 1]) < 0.5  # different segments stay apart after alignment
    assert similarity.segment_share(w, kept=[0, 1], dropped=[2, 3]) == 1.0
    noise = {k: torch.randn_like(v) for k, v in w.items()}
    assert similarity.segment_share(noise, kept=[0, 1], dropped=[2, 3]) < 0.1


def test_layer_report_on_the_smoke_model(smoke):
    from moelab import data, observe

    model, tok = smoke
    calib = data.calibration_set(tok, "1:1:1", tokens=3 * 1024, seq_len=128)
    obs = observe.observe(model, calib, progress=False, outputs=False, cosines=False)
    rows = similarity.layer_report(model, obs)
    assert [r["layer"] for r in rows] == [layer.layer_idx for layer in models.moe_layers(model)]
    for r in rows:
        assert -1 <= r["plain_cosine"] <= r["aligned_cosine"] <= r["aligned_cosine_best"] <= 1
        assert 0 <= r["segment_share"] <= 1 and 1 / 3 <= r["main_domain_share"] <= 1


def test_the_readme_shows_the_committed_similarity_report():
    """README.md's similarity table is the one benchmarks/similarity.py wrote last (not typed by hand)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    begin, end = "<!-- similarity:begin (benchmarks/similarity.py writes this) -->\n", "<!-- similarity:end -->"
    block = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert block == (root / "benchmarks/results/similarity.md").read_text()
