"""moelab.claims: verdicts with known answers on synthetic paired scores."""

import numpy as np
import pandas as pd
import pytest

from moelab import claims


def frame(values, kind="ppl", metric="bits_per_byte"):
    """A table as evaluate.evaluate returns it: one task, per-unit values in attrs."""
    v = np.asarray(values, dtype=float)
    df = pd.DataFrame([{"task": "t", "kind": kind, "domain": "general", "metric": metric, "value": v.mean(),
                        "stderr": v.std(ddof=1) / np.sqrt(len(v)), "n": len(v)}])
    df.attrs["units"] = {"t": {"kind": kind, "values": v.tolist()}}
    return df


rng = np.random.default_rng(0)
BASE = rng.normal(2.0, 0.5, 400)  # per-row bits per byte: rows differ a lot, variants little
NOISE = rng.normal(0, 0.01, 400)


def scores(shift):
    return {"a": frame(BASE + shift + NOISE), "b": frame(BASE)}


@pytest.mark.parametrize("shift,test,margin,verdict", [
    (-0.02, "better", 0.0, "holds"),             # a lower bpb by 0.02, se ~0.0005: z ~ 40
    (+0.02, "better", 0.0, "opposite holds"),
    (0.0, "better", 0.0, "cannot tell"),         # noise only: no evidence either way
    (0.0, "better", 0.01, "does not hold"),      # interval inside +-0.01: no advantage worth the margin
    (+0.002, "not_worse", 0.01, "holds"),
    (+0.05, "not_worse", 0.01, "does not hold"),
    (0.0, "equivalent", 0.01, "holds"),
    (+0.05, "equivalent", 0.01, "does not hold"),
    (-0.05, "equivalent", 0.01, "does not hold"),
])
def test_verdicts_with_known_answers(shift, test, margin, verdict):
    c = claims.Claim("a vs b", "-", "a", "b", test=test, margin=margin)
    row = claims.judge(c, scores(shift))
    assert row["verdict"] == verdict, row
    assert row["advantage"] == pytest.approx(-shift, abs=0.002)


def test_the_pairing_decides_not_the_spread_of_the_rows():
    """A 0.02 gap is 40 paired SE but far below the unpaired 2*sqrt(2)*SE of one variant (~0.07)."""
    row = claims.judge(claims.Claim("a better", "-", "a", "b"), scores(-0.02))
    unpaired_bound = 2 * 2 ** 0.5 * frame(BASE)["stderr"].iloc[0]
    assert row["verdict"] == "holds" and 0.02 < unpaired_bound and row["z"] > 20


def test_rows_of_one_document_count_once():
    """A gap that lives in a few documents: clustered, its z is far smaller than with independent rows."""
    docs = [f"d{i // 40}" for i in range(400)]  # ten documents of forty rows
    per_doc = np.repeat(rng.normal(0, 0.02, 10), 40)
    a, b = frame(BASE - 0.01 + per_doc + NOISE), frame(BASE)
    for f in (a, b):
        f.attrs["units"]["t"]["clusters"] = docs
    row = claims.judge(claims.Claim("a better", "-", "a", "b"), {"a": a, "b": b})
    assert row["documents"] == 10 and row["n"] == 400
    assert abs(row["z"]) < abs(row["z if units were independent"]) / 3
    assert "10 documents" in row["our figure"]


def test_identical_variants_do_not_make_a_claim_hold():
    same = {"a": frame(BASE), "b": frame(BASE)}
    assert claims.judge(claims.Claim("a better", "-", "a", "b"), same)["verdict"] == "does not hold"


def test_accuracy_is_higher_is_better_and_missing_or_chance_metrics_cannot_tell():
    hits_b = (rng.random(300) < 0.5).astype(float)
    hits_a = hits_b.copy()
    hits_a[np.flatnonzero(hits_b == 0)[:60]] = 1  # a answers 60 more items right
    s = {"a": frame(hits_a, "mc", "acc_norm"), "b": frame(hits_b, "mc", "acc_norm")}
    assert claims.judge(claims.Claim("a better", "-", "a", "b", metric="mc_acc"), s)["verdict"] == "holds"
    assert claims.judge(claims.Claim("x", "-", "a", "c"), s)["verdict"] == "cannot tell"
    chance = frame((rng.random(100) < 0.25).astype(float), "mc", "acc_norm")
    why = claims.informative(chance, "mc_acc", chance=0.25)
    assert why and "chance" in why
    assert claims.informative(s["b"], "mc_acc", chance=0.25) is None
    row = claims.judge(claims.Claim("a better", "-", "a", "b", metric="mc_acc"), s, signal={"mc_acc": why})
    assert row["verdict"] == "cannot tell" and "chance" in row["our figure"]


def test_table_mixes_judged_and_observed_rows_and_bad_claims_are_refused():
    t = claims.table([claims.Claim("a better", "p", "a", "b"),
                      claims.observed("faster", "x1.5", "ratio 0.9", True, "time ratio < 1")], scores(-0.02))
    assert list(t.verdict) == ["holds", "holds"] and set(t.verdict) <= set(claims.VERDICTS)
    with pytest.raises(ValueError, match="test must be one of"):
        claims.Claim("c", "p", "a", "b", test="beats")
    with pytest.raises(ValueError, match="metric must be one of"):
        claims.Claim("c", "p", "a", "b", metric="ppl")


def test_trend_verdicts_with_known_answers():
    x = np.arange(10.0)
    noise = np.random.default_rng(1).normal(0, 0.1, 10)
    rises, falls, flat = 0.5 * x + noise, -0.5 * x + noise, noise
    kw = dict(x_name="share", y_name="score")
    assert claims.trend("rises", "r ~ +0.9", x, rises, direction=+1, **kw)["verdict"] == "holds"
    assert claims.trend("rises", "r ~ +0.9", x, falls, direction=+1, **kw)["verdict"] == "opposite holds"
    assert claims.trend("falls", "r ~ -0.8", x, falls, direction=-1, **kw)["verdict"] == "holds"
    row = claims.trend("rises", "r ~ +0.9", x, flat, direction=+1, **kw)
    assert row["verdict"] == "cannot tell" and row["p"] > 0.05
    const = claims.trend("rises", "r ~ +0.9", x, np.full(10, 0.25), direction=+1, **kw)
    assert const["verdict"] == "cannot tell" and "constant" in const["our figure"]
    quiet = claims.trend("rises", "r ~ +0.9", x, rises, direction=+1, no_signal="at chance", **kw)
    assert quiet["verdict"] == "cannot tell" and quiet["our figure"] == "at chance"
    with pytest.raises(ValueError, match="direction"):
        claims.trend("rises", "", x, rises, direction=2, **kw)
    df = claims.table([claims.trend("rises", "r ~ +0.9", x, rises, direction=+1, **kw)], {})
    assert list(df.columns[:5]) == ["claim", "paper figure", "our figure", "verdict", "test"]
