import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelab import zoo


def test_smoke_model_is_a_plain_hf_checkpoint(smoke):
    model, tok = smoke
    path = zoo.path_of("smoke")
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    metrics = json.loads((path / "build_metrics.json").read_text())
    curve = json.loads((path / "training_curve.json").read_text())
    assert len(curve) == zoo.RECIPES["smoke"].steps
    assert set(metrics["eval"]) == {"general", "math", "code"}
    assert all(v["ppl"] < 1000 for v in metrics["eval"].values())
    # training lowered the loss
    assert sum(c["lm_loss"] for c in curve[-10:]) < sum(c["lm_loss"] for c in curve[:10])
    # loads with plain transformers, no moelab kernel registered in the config
    cfg = json.loads((path / "config.json").read_text())
    assert cfg.get("model_type") == "qwen3_moe"
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    tok2 = AutoTokenizer.from_pretrained(path)
    ids = tok2("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = plain(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_save_reload_gives_identical_logits(smoke, tmp_path):
    from moelab import io

    model, tok = smoke
    out = io.save_checkpoint(model, tmp_path / "copy", tok)
    again, _ = zoo.load(str(out))
    ids = torch.arange(5, 69).reshape(2, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_build_is_deterministic_whatever_the_callers_thread_count(tmp_path):
    """The same recipe trains the same weights, built under 1 and under 2 torch threads (the recipe's
    thread count decides, not the machine's: 1 and 2 threads once gave different weights under one name)."""
    from dataclasses import replace

    from safetensors.torch import load_file

    recipe = replace(zoo.RECIPES["smoke"], steps=6, tokenizer_chars=50_000, eval_tokens=1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = zoo.train(recipe, tmp_path / "a", progress=False)
        torch.set_num_threads(2)
        b = zoo.train(recipe, tmp_path / "b", progress=False)
    finally:
        torch.set_num_threads(threads)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_recipe_key_holds_the_corpus(monkeypatch):
    """Another Python (its standard library is the code text) or a data snapshot names another entry."""
    from moelab import data

    before = zoo.RECIPES["smoke"].key()
    monkeypatch.setattr(data, "corpus_identity", lambda: "python=3.99.0,gensim=x,reasoning-gym=y")
    zoo._corpus_identity.cache_clear()
    try:
        assert zoo.RECIPES["smoke"].key() != before
    finally:
        monkeypatch.undo()
        zoo._corpus_identity.cache_clear()
    assert zoo.RECIPES["smoke"].key() == before


def test_damaged_entries_are_rebuilt_and_killed_builds_cleared(tmp_path, monkeypatch):
    """A cached entry missing its weights once failed in from_pretrained; a killed build left .building-PID."""
    import os
    import shutil
    from dataclasses import replace

    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    monkeypatch.setitem(zoo.RECIPES, "tiny-test", replace(zoo.RECIPES["smoke"], steps=2, warmup=1,
                                                          tokenizer_chars=50_000, eval_tokens=1024))
    path = zoo.build("tiny-test", progress=False)
    stale = path.with_name(path.name + ".building-99999")
    shutil.copytree(path, stale)
    (path / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match="damaged.*rebuilding"):
        again = zoo.build("tiny-test", progress=False)
    assert again == path and (path / "model.safetensors").is_file() and not stale.exists()
    f = path / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.warns(UserWarning, match="model.safetensors is damaged"):
        zoo.load("tiny-test")


def test_unknown_name_and_duplicate_recipe():
    with pytest.raises(KeyError, match="no zoo model"):
        zoo.build("no-such-model")
    with pytest.raises(ValueError, match="already exists"):
        zoo.register_recipe("smoke", zoo.RECIPES["smoke"])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_recipe_trains_other_families(family, tmp_path):
    from dataclasses import replace

    recipe = replace(zoo.RECIPES["smoke"], family=family, steps=4, tokenizer_chars=50_000, eval_tokens=1024,
                     shared_expert_width=32 if family == "deepseek_v3" else 0)
    out = zoo.train(recipe, tmp_path / family, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == family


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.RECIPES))
def test_every_recipe_builds_end_to_end(name, tmp_path):
    """Each registered recipe as it is, its training cut to two steps: tokenizer, preflight, held-out
    evaluation on what each eval split holds, save, and a reload with identical logits."""
    from dataclasses import replace

    from moelab import data

    recipe = replace(zoo.RECIPES[name], steps=2, warmup=1, dense_steps=min(1, zoo.RECIPES[name].dense_steps))
    out = zoo.train(recipe, tmp_path / name, progress=False)
    metrics = json.loads((out / "build_metrics.json").read_text())
    assert metrics["code_fingerprint"] == zoo.build_fingerprint(upcycled=recipe.dense_steps > 0)
    assert metrics["corpus"] == data.corpus_identity() and metrics["versions"]["python"]
    for d in data.DOMAINS:
        tokens = metrics["eval"][d]["tokens"]
        assert tokens == metrics["eval_tokens"][d] and tokens % recipe.seq_len == 0
        assert 2 * recipe.seq_len <= tokens <= max(recipe.eval_tokens, 2 * recipe.seq_len)
        assert np.isfinite(metrics["eval"][d]["bits_per_byte"]) and metrics["eval"][d]["ppl_stderr"] > 0
    model, tok = zoo.load(str(out))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("Question: 2 + 3 =", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


def test_build_fails_before_training_when_eval_data_is_missing(tmp_path, monkeypatch):
    """A recipe whose evaluation would fail stops in the preflight: no training step runs."""
    from dataclasses import replace

    from moelab import evaluate

    build = evaluate.PerplexityTask._build
    monkeypatch.setattr(evaluate.PerplexityTask, "_build",
                        lambda self: [] if self.domain == "code" else build(self))
    steps = []
    monkeypatch.setattr(zoo._Batches, "__next__", lambda self: steps.append(1) or 1 / 0)
    recipe = replace(zoo.RECIPES["smoke"], tokenizer_chars=50_000)
    with pytest.raises(ValueError, match="cannot evaluate the build on 'code'.*eval split of 'code' holds 0 rows"):
        zoo.train(recipe, tmp_path / "m", progress=False)
    assert not steps and not (tmp_path / "m" / "model.safetensors").exists()


def test_recipe_key_follows_the_build_code(monkeypatch):
    """Editing any code that decides a checkpoint names a new cache entry (no stale cached model)."""
    import importlib
    import inspect

    for ref in zoo._BUILD_CODE:  # every listed name still exists
        module, _, attr = ref.partition(":")
        mod = importlib.import_module(f"moelab.{module}")
        assert not attr or hasattr(mod, attr), ref
    before = zoo.RECIPES["smoke"].key()
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource",
                        lambda obj: real(obj) + ("# edited" if obj is zoo._Batches else ""))
    zoo.build_fingerprint.cache_clear()
    try:
        assert zoo.RECIPES["smoke"].key() != before
    finally:
        monkeypatch.undo()
        zoo.build_fingerprint.cache_clear()
    assert zoo.RECIPES["smoke"].key() == before


def test_two_processes_building_one_recipe_build_it_once(tmp_path):
    """The build lock (filelock, so it works on every OS): the second process waits, then reuses."""
    from conftest import run_at_once

    code = ("from dataclasses import replace; from moelab import zoo; "
            "zoo.register_recipe('lock-test', replace(zoo.RECIPES['smoke'], steps=2, warmup=1, "
            "tokenizer_chars=50_000, eval_tokens=1024)); p = zoo.build('lock-test', progress=False); "
            "print(p, (p / 'build_metrics.json').stat().st_mtime_ns)")
    lines = run_at_once(code, 2, tmp_path)
    assert lines[0] == lines[1]  # the same entry, written once (same modification time)
    left = sorted(p.name for p in (tmp_path / "zoo").iterdir())
    assert len(left) == 2 and left[1] == left[0] + ".lock"


def test_zoo_names_with_seeds():
    """``<recipe>@seed<N>`` and ``seed=N`` name one model; its own seed is the plain name; bad seeds are refused."""
    assert zoo.parse_name("smoke")[0] == zoo.parse_name("smoke@seed0")[0] == zoo.parse_name("smoke", seed=0)[0] == "smoke"
    name, recipe = zoo.parse_name("smoke", seed=2)
    assert name == "smoke@seed2" and recipe.seed == 2 and recipe == zoo.parse_name("smoke@seed2")[1]
    assert zoo.path_of("smoke@seed0") == zoo.path_of("smoke")
    assert zoo.path_of("smoke", seed=1) == zoo.path_of("smoke@seed1") != zoo.path_of("smoke")
    assert zoo.path_of("smoke@seed1").name.startswith("smoke@seed1-")
    assert zoo.is_zoo_name("qwen3-moe-15m@seed3") and not zoo.is_zoo_name("qwen3-moe-15m@seedx")
    assert not zoo.is_zoo_name("Qwen/Qwen3-30B-A3B")
    with pytest.raises(ValueError, match="whole number"):
        zoo.parse_name("smoke@seedx")
    with pytest.raises(ValueError, match="give one of them"):
        zoo.parse_name("smoke@seed1", seed=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="whole number"):
            zoo.parse_name("smoke", seed=bad)
    with pytest.raises(KeyError, match="no zoo model named 'nope'"):
        zoo.parse_name("nope@seed1")
    with pytest.raises(ValueError, match="whole number"):
        zoo.resolve("smoke@seed-1")
    with pytest.raises(ValueError, match="drop seed"):
        zoo.resolve("org/some-model", seed=1)


@pytest.mark.slow
def test_a_recipe_builds_for_another_seed_deterministically(tmp_path, monkeypatch):
    """``zoo.build(name, seed=1)`` trains another model (init and order) scored on the same held-out
    rows, cached under its own name; the same seed twice gives the same bytes."""
    from dataclasses import replace

    from safetensors.torch import load_file

    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.RECIPES, "tiny-seeds", replace(zoo.RECIPES["smoke"], steps=4, warmup=1,
                                                           tokenizer_chars=50_000, eval_tokens=1024))
    base = zoo.build("tiny-seeds", progress=False)
    one = zoo.build("tiny-seeds@seed1", progress=False)
    assert one != base and one == zoo.path_of("tiny-seeds", seed=1)
    again = zoo.train(zoo.parse_name("tiny-seeds", seed=1)[1], tmp_path / "again", progress=False)
    w0, w1, w1b = (load_file(p / "model.safetensors") for p in (base, one, again))
    assert all(torch.equal(w1[k], w1b[k]) for k in w1)
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)
    m0, m1 = zoo.build_metrics(str(base)), zoo.build_metrics("tiny-seeds@seed1")
    assert m1["recipe"]["seed"] == 1 and m0["recipe"]["seed"] == 0
    assert m0["eval_tokens"] == m1["eval_tokens"]  # the same held-out rows
    assert m0["eval"]["math"]["bits_per_byte"] != m1["eval"]["math"]["bits_per_byte"]
    model, _ = zoo.load("tiny-seeds", seed=1)
    assert torch.equal(dict(model.named_parameters())["model.embed_tokens.weight"].detach(),
                       w1["model.embed_tokens.weight"])
