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
    other = study.run_model("smoke@seed1", claim_list=one, **sizes)
    assert other["kind"] == "from scratch" and other["bits_per_byte"] != full["bits_per_byte"]
    m = study.matrix([full, other])
    row = m[m.claim == one[0][1].claim].iloc[0]
    assert row.models == 2 and sum(row[v] for v in claims.VERDICTS) == 2
    assert row["holds on"] == f"{row['holds']} of 2"
    e = study.effects([full, other])
    assert len(e) == len(study.CLAIMS) + 1 and (e.lo <= e.advantage).all() and (e.advantage <= e.hi).all()
    fig = plots.claim_effects(e)
    assert len(fig.axes[0].get_yticklabels()) == len(study.CLAIMS)
    with pytest.raises(ValueError, match="cannot build"):
        study.run_model("smoke", claim_list=[("x", claims.Claim("c", "p", "nope", "REAP 25%"))], **sizes)
    assert zoo.path_of("smoke@seed1").is_dir()
