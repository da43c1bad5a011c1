import re

import pytest
import torch

from moelab import data


def test_splits_are_disjoint_and_deterministic():
    for domain in data.DOMAINS:
        keys = {s: [d.key for d in data.documents(domain, s)] for s in data.SPLITS}
        texts = {s: set(data.texts(domain, s)) for s in data.SPLITS}
        for s in data.SPLITS:
            assert keys[s], f"{domain}/{s} is empty"
        assert not set(keys["train"]) & set(keys["eval"])
        assert not set(keys["train"]) & set(keys["calib"])
        assert not set(keys["calib"]) & set(keys["eval"])
        # no held-out text appears verbatim in training
        assert not texts["train"] & texts["eval"]
        assert not texts["train"] & texts["calib"]
    assert data.split_of("wiki/Anarchism/0") == data.split_of("wiki/Anarchism/0")


def test_domains_have_expected_content():
    general = data.texts("general", "eval")
    math = data.texts("math", "eval")
    code = data.texts("code", "eval")
    assert sum(len(t) for t in general) > 50_000 and "'''" not in "".join(general)
    assert all(t.startswith("Question:") and "\n#### " in t for t in math[:50])
    assert any("def " in t for t in code)
    probs = data.math_problems("eval", 20)
    assert all(p["answer"] for p in probs)


def test_math_splits_do_not_share_questions():
    train = {p["question"] for p in data.math_problems("train")}
    held = {p["question"] for s in ("calib", "eval") for p in data.math_problems(s)}
    assert not train & held


@pytest.mark.parametrize("mix,expected", [
    ("1:1:1", {"general": 1 / 3, "math": 1 / 3, "code": 1 / 3}),
    ("0:0.3:0.7", {"general": 0.0, "math": 0.3, "code": 0.7}),
    ("math", {"general": 0.0, "math": 1.0, "code": 0.0}),
    ((2, 0, 2), {"general": 0.5, "math": 0.0, "code": 0.5}),
    ({"code": 1}, {"general": 0.0, "math": 0.0, "code": 1.0}),
])
def test_parse_mix(mix, expected):
    got = data.parse_mix(mix)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["1:2", "a:b:c", (0, 0, 0), (-1, 1, 1), {"poetry": 1}])
def test_parse_mix_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="mix"):
        data.parse_mix(bad)


def test_calibration_set_mix_budget_and_cache(smoke, tmp_path, monkeypatch):
    _, tok = smoke
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    ds = data.calibration_set(tok, "0:0.25:0.75", tokens=4096, seq_len=128)
    assert len(ds) == 32
    assert all(len(r) == 128 for r in ds["input_ids"])
    counts = {d: ds["domain"].count(d) for d in data.DOMAINS}
    assert counts == {"general": 0, "math": 8, "code": 24}
    again = data.calibration_set(tok, "0:0.25:0.75", tokens=4096, seq_len=128)
    assert again["input_ids"] == ds["input_ids"]
    assert list((tmp_path / "calib").iterdir()), "calibration set was not cached"
    other = data.calibration_set(tok, "0:0.25:0.75", tokens=4096, seq_len=128, seed=1)
    assert other["input_ids"] != ds["input_ids"]


def test_calibration_set_errors(smoke):
    _, tok = smoke
    with pytest.raises(ValueError, match="token budget"):
        data.calibration_set(tok, "1:1:1", tokens=10, seq_len=128)
    with pytest.raises(ValueError, match="fewer than"):
        data.calibration_set(tok, "general", tokens=50_000_000, seq_len=128, cache=False)


@pytest.mark.parametrize("bad", [(float("nan"), 1, 1), (float("inf"), 1, 1), (1e308, 1e308, 1e308), "nan:1:1"])
def test_parse_mix_rejects_nan_inf_and_overflow(bad):
    with pytest.raises(ValueError, match="mix"):
        data.parse_mix(bad)


@pytest.mark.parametrize("seq_len", [-1, 0, 1, 2.5])
def test_calibration_set_refuses_a_bad_row_length(smoke, seq_len):
    """A negative seq_len once looped forever (memory exhausted), 0 raised ZeroDivisionError."""
    _, tok = smoke
    with pytest.raises(ValueError, match="seq_len must be a whole number"):
        data.calibration_set(tok, "1:1:1", tokens=4096, seq_len=seq_len, cache=False)
    with pytest.raises(ValueError, match="seq_len must be a positive whole number"):
        data.pack_tokens([[1, 2, 3]], -1, 0)


def test_calibration_cache_keeps_mixes_apart(smoke, tmp_path, monkeypatch):
    """0.104:0.896:0 once returned the cached 0.1:0.9:0 set (the key rounded the shares)."""
    _, tok = smoke
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    a = data.calibration_set(tok, "0.1:0.9:0", tokens=128 * 50, seq_len=128)
    b = data.calibration_set(tok, "0.104:0.896:0", tokens=128 * 50, seq_len=128)
    assert a["domain"].count("general") == 5 and b["domain"].count("general") == 5  # the same counts here ...
    assert len([p for p in (tmp_path / "calib").iterdir() if p.is_dir()]) == 2  # ... but two entries, not one reused


@pytest.mark.parametrize("mix,tokens,starved", [("1:1:1", 100 * 1, ["math", "code"]), ("1:1:1", 256, ["general"]),
                                                 ("1:0.01:1", 128 * 20, ["math"])])
def test_a_budget_that_gives_a_domain_of_the_mix_no_row_is_refused(smoke, mix, tokens, starved):
    """100 tokens of 1:1:1 once gave one row, all general; 1:0.01:1 silently dropped math."""
    _, tok = smoke
    seq_len = 100 if tokens == 100 else 128
    with pytest.raises(ValueError, match=rf"gives {re.escape(str(starved))} no row.*at least (\d+)") as info:
        data.calibration_set(tok, mix, tokens=tokens, seq_len=seq_len, cache=False)
    need = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    ds = data.calibration_set(tok, mix, tokens=need, seq_len=seq_len, cache=False)  # the named budget works
    assert all(ds["domain"].count(d) > 0 for d in starved)


def test_calibration_set_records_its_tokenizer_and_observe_checks_it(smoke, tmp_path, monkeypatch):
    from moelab import observe

    model, tok = smoke
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    ds = data.calibration_set(tok, "1:1:1", tokens=128 * 6, seq_len=128)
    assert data.tokenizer_key_of(ds) == data.tokenizer_key(tok) == model.moelab_tokenizer_key
    monkeypatch.setattr(model, "moelab_tokenizer_key", "0123456789ab")  # as if loaded with another tokenizer
    with pytest.raises(ValueError, match="another tokenizer"):
        observe.observe(model, ds, progress=False)
    monkeypatch.undo()
    too_big = torch.full((4, 32), model.get_input_embeddings().num_embeddings + 5)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        observe.observe(model, too_big, progress=False)


def test_calibration_cache_rebuilds_damaged_entries_and_clears_killed_writes(smoke, tmp_path, monkeypatch):
    """A racing or killed writer once left <key>.tmpPID folders (29 of 30 races); a damaged entry raised
    ArrowInvalid without naming the path."""
    _, tok = smoke
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    want = [list(r) for r in data.calibration_set(tok, "1:2:1", tokens=128 * 8, seq_len=128)["input_ids"]]
    entry = next(p for p in (tmp_path / "calib").iterdir() if p.is_dir())
    (entry.parent / f"{entry.name}.tmp99999").mkdir()
    for f in entry.glob("*.arrow"):
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=f"{entry}.*unusable.*rebuilding"):
        again = data.calibration_set(tok, "1:2:1", tokens=128 * 8, seq_len=128)
    assert [list(r) for r in again["input_ids"]] == want
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, entry.name + ".lock"])


def test_calibration_writers_racing_leave_one_entry(smoke, tmp_path):
    """Four processes ask for the same new set at once: one builds, the others wait and read it, and
    no temporary is left (racing writers once left <key>.tmpPID folders behind)."""
    from conftest import run_at_once

    from moelab import zoo

    code = ("from transformers import AutoTokenizer; from moelab import data; "
            f"t = AutoTokenizer.from_pretrained({str(zoo.path_of('smoke'))!r}); "
            "print(len(data.calibration_set(t, '1:1:1', tokens=128 * 12, seq_len=128)))")
    assert run_at_once(code, 4, tmp_path, timeout=300) == ["12"] * 4
    left = sorted(p.name for p in (tmp_path / "calib").iterdir())
    assert len(left) == 2 and left[1] == left[0] + ".lock"
