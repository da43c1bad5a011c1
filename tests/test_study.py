"""The claims matrix (moelab.study): every claim's variants build and are judged on each model."""

import pytest

from moelab import claims, plots, study, zoo


def test_every_claim_names_variants_the_study_builds():
    for paper, c in study.CLAIMS:
        assert paper in {"REAM", "DERN", "MC-SMoE", "SlimQwen"}
        assert c.a in study.VARIANTS and c.b in study.VARIANTS and c.metric == "bits_per_byte"
    assert len({c.claim for _, c in study.CLAIMS}) == len(study.CLAIMS)


def test_model_kinds():
    assert study.model_kind("qwen3-moe-15m") == study.model_kind("qwen3-moe-15m@seed2") == "from scratch"
    assert study.model_kind("qwen3-moe-15m-upcycled@seed1") == "upcycled"
    assert study.model_kind("/some/checkpoint") == "checkpoint"


@pytest.mark.slow
def test_the_study_judges_every_claim_on_a_model_and_counts_them(one_thread):
    sizes = dict(calib_tokens=3 * 1024, eval_tokens=2048, seq_len=128, progress=False)
    full = study.run_model("smoke", **sizes)
    assert [r["claim"] for r in full["rows"]] == [c.claim for _, c in study.CLAIMS]
    assert all(r["verdict"] in claims.VERDICTS and r["n"] > 0 for r in full["rows"])
    assert {"aligned_cosine", "segment_share", "main_domain_share"} <= set(full["similarity"])
    one = [c for c in study.CLAIMS if c[1].claim == "DERN beats frequency pruning at 50%"]
    other = study.run_model("smoke@seed1", claim_list=one, mc_n=4, **sizes)  # MC scored: judged on it too
    assert other["kind"] == "from scratch" and other["bits_per_byte"] != full["bits_per_byte"]
    assert [r["metric"] for r in other["rows"]] == ["bits_per_byte", "mc_acc"] and 0 <= other["mc_acc"] <= 1
    assert "mc_acc" not in full and {r["metric"] for r in full["rows"]} == {"bits_per_byte"}
    m = study.matrix([full, other])
    row = m[(m.claim == one[0][1].claim) & (m.metric == "bits_per_byte")].iloc[0]
    assert row.models == 2 and sum(row[v] for v in claims.VERDICTS) == 2
    assert row["holds on"] == f"{row['holds']} of 2"
    assert len(m[m.metric == "mc_acc"]) == 1
    e = study.effects([full, other])
    assert len(e) == len(study.CLAIMS) + 1 and (e.lo <= e.advantage).all() and (e.advantage <= e.hi).all()
    fig = plots.claim_effects(e)
    assert len(fig.axes[0].get_yticklabels()) == len(study.CLAIMS)
    table = study.model_table([full, other])
    assert list(table.model) == ["smoke", "smoke@seed1"] and table["original MC accuracy"].isna().tolist() == [True, False]
    fig = plots.model_measures(table, list(study.SIMILARITY_COLUMNS.values()))
    assert len(fig.axes[0].get_yticklabels()) == len(study.SIMILARITY_COLUMNS)
    v = study.verdicts([full, other])
    assert list(v.claim) == [c.claim for _, c in study.CLAIMS] and v["smoke@seed1 (from scratch)"].notna().sum() == 1
    head = study.headline([full, other], m)
    assert head["models"] == head["models_from_scratch"] == 2 and head["study_seconds"] > 0
    with pytest.raises(ValueError, match="cannot build"):
        study.run_model("smoke", claim_list=[("x", claims.Claim("c", "p", "nope", "REAP 25%"))], **sizes)
    assert zoo.path_of("smoke@seed1").is_dir()


def test_models_to_study_lists_each_recipe_at_each_seed_and_refuses_what_cannot_be_studied():
    got = study.models_to_study("smoke", "smoke-upcycled", [0, 2], {"smoke-mixtral": "upcycled", "org/ckpt": "upcycled"})
    assert got == [("smoke", "from scratch"), ("smoke@seed2", "from scratch"), ("smoke-upcycled", "upcycled"),
                   ("smoke-upcycled@seed2", "upcycled"), ("smoke-mixtral", "from scratch"), ("org/ckpt", "upcycled")]
    # a zoo name with its seed is that model alone; a checkpoint has no seeds; a recipe keeps its own kind
    assert study.models_to_study("smoke@seed1", "/ckpt/up", [0, 1]) == [("smoke@seed1", "from scratch"),
                                                                         ("/ckpt/up", "upcycled")]
    assert study.models_to_study(None, "smoke", [3]) == [("smoke@seed3", "from scratch")]
    for args, match in ((("smoke", None, []), "SEEDS"), (("smoke", None, [-1]), "SEEDS"), ((None, None, [0]), "no model"),
                        (("smoke", "smoke@seed0", [0]), "twice"), (("smoke", None, [0], {"x/y": "dense"}), "kind 'dense'")):
        with pytest.raises(ValueError, match=match):
            study.models_to_study(*args)


def _result(model, kind, verdicts):
    rows = [{"paper": "P", "claim": f"claim {i}", "metric": "bits_per_byte", "verdict": v, "advantage": 0.0,
             "stderr": 0.1, "z": 0.0} for i, v in enumerate(verdicts)]
    return {"model": model, "kind": kind, "rows": rows}


def test_reading_says_which_claims_replicate_on_which_kind():
    H, O, C, D = "holds", "opposite holds", "cannot tell", "does not hold"
    results = [_result("s0", "from scratch", [H, O, H, C, C, O]), _result("s1", "from scratch", [H, O, H, C, D, O]),
               _result("s2", "from scratch", [C, O, H, H, C, C]),
               _result("u0", "upcycled", [H, O, O, C, C, C]), _result("u1", "upcycled", [H, O, O, D, C, C])]
    read = study.reading(study.matrix(results))
    assert list(read["from scratch"]) == ["2 of 3 (mostly holds)", "0 of 3 (opposite)", "3 of 3 (holds)",
                                          "1 of 3 (unclear)", "0 of 3 (unclear)", "0 of 3 (mostly opposite)"]
    assert list(read.reading) == [study.READINGS[k] for k in ("replicates", "fails", "depends", "unsettled",
                                                              "unsettled", "opposite on some")]
    text = study.reading_markdown(read)
    assert text.index("**Holds on every kind of model** (1 of 6)") < text.index("claim 0") < text.index("**The opposite")
    assert "claim 2: from scratch: 3 of 3 (holds); upcycled: 0 of 2 (opposite)" in text
