"""lm-evaluation-harness as a backend of moelab.evaluate (moelab.lmeval), offline on local JSON tasks.

lm-eval's `dataset_path: json` tasks read local files, so these run without the hub. They check that
the backend returns moelab's tidy table with paired units, that its per-item log-likelihoods equal
moelab's own MC scorer's once the BOS convention is aligned, and that lm-eval's default convention
really differs (so the alignment is what makes them agree)."""

import json

import numpy as np
import pytest

from moelab import data, evaluate, lmeval, observe, prune

pytestmark = pytest.mark.skipif(not lmeval.available(), reason=lmeval.INSTALL_HINT)

ITEMS = [
    {"context": "The cat sat on the", "choices": [" mat.", " sat cat.", " the on."], "label": 0},
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " b a +", " + a b"], "label": 0},
    {"context": "Two plus two equals", "choices": [" four.", " five.", " equals two."], "label": 0},
    {"context": "In the morning we", "choices": [" went to school.", " school to went.", " to went school."], "label": 0},
    {"context": "x = [1, 2, 3]\nprint(len(", "choices": ["x))", "x)(", ")x)"], "label": 0},
    {"context": "She opened the door and", "choices": [" walked in.", " in walked.", " and door."], "label": 0},
]
QA = [{"question": "Say the word yes:", "answer": "yes"}, {"question": "2 + 2 =", "answer": "4"},
      {"question": "The colour of the sky is", "answer": "blue"}, {"question": "def f():\n    return", "answer": "1"}]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """Two local lm-eval tasks: word-order MC (moelab's JSONL layout) and a short generation task."""
    from conftest import write_mc_task

    root = tmp_path_factory.mktemp("lm_eval_tasks")
    mc = write_mc_task(root, "moelab_local_mc", ITEMS).with_suffix(".jsonl")
    write_mc_task(root, "moelab_local_mc2", ITEMS[:3])  # a second task on the first three items
    gen = root / "qa.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in QA))
    (root / "gen.yaml").write_text(f"""task: moelab_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""")
    # a group of both (how lm-eval ships MMLU's subjects)
    (root / "group.yaml").write_text("""group: moelab_local_group
task:
  - moelab_local_mc
  - moelab_local_mc2
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
""")
    return root, mc


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_lm_eval_per_item_loglikelihoods_equal_moelab_s_once_bos_is_aligned(smoke, tasks_dir):
    model, tok = smoke
    root, mc = tasks_dir
    own = evaluate.jsonl_mc_task(mc)
    own.score(model, tok)
    aligned = lmeval.lm_eval_task("moelab_local_mc", include_path=root)
    aligned.score(model, tok)
    ours = np.array([d["loglik"] for d in own.details])
    theirs = np.array([d["loglik"] for d in aligned.details])
    assert theirs.shape == ours.shape == (len(ITEMS), 3)
    assert np.abs(theirs - ours).max() < 1e-4, np.abs(theirs - ours).max()
    assert [d["acc"] for d in aligned.details] == [d["acc"] for d in own.details]
    # lm-eval's own default (no BOS for this tokenizer) scores the same items differently
    default = lmeval.lm_eval_task("moelab_local_mc", include_path=root, bos="lm-eval")
    default.score(model, tok)
    gap = np.abs(np.array([d["loglik"] for d in default.details]) - ours)
    assert gap.min() > 1e-3, gap


def test_lm_eval_tasks_fill_moelab_s_table_and_pair_like_moelab_s_own(smoke, tasks_dir):
    model, tok = smoke
    root, mc = tasks_dir
    tasks = [lmeval.lm_eval_task("moelab_local_mc", include_path=root, name="mc_lm_eval"),
             lmeval.lm_eval_task("moelab_local_gen", include_path=root, name="gen_lm_eval")]
    df = evaluate.evaluate(model, tok, tasks, progress=False)
    assert set(df.columns) >= {"task", "kind", "domain", "metric", "value", "stderr", "n"}
    mc_rows = df[df.task == "mc_lm_eval"].set_index("metric")
    assert set(mc_rows.index) >= {"acc", "acc_norm"} and (mc_rows.kind == "mc").all() and (mc_rows.n == len(ITEMS)).all()
    gen_rows = df[df.task == "gen_lm_eval"]
    assert (gen_rows.kind == "gen").all() and "exact_match" in set(gen_rows.metric)
    units = df.attrs["units"]
    assert units["mc_lm_eval"]["kind"] == "mc" and len(units["mc_lm_eval"]["values"]) == len(ITEMS)
    assert units["gen_lm_eval"]["kind"] == "gen" and len(units["gen_lm_eval"]["values"]) == len(QA)
    s = evaluate.summary_score(df)
    assert s["mc_acc"] == pytest.approx(mc_rows.loc["acc_norm", "value"])
    # a variant scored on the same lm-eval items pairs item by item, without a checkpoint on disk
    calib = data.calibration_set(tok, "1:1:1", tokens=1024, seq_len=64, seed=0)
    obs = observe.observe(model, calib, progress=False)
    pruned, _ = prune.prune(model, obs, "frequency", num_experts=max(2, obs[min(obs.layers)].num_experts // 2))
    other = evaluate.evaluate(pruned, tok, tasks, progress=False)
    same = evaluate.paired_difference(df, df, "mc_acc")
    assert same["diff"] == 0 and same["n"] == len(ITEMS)
    d = evaluate.paired_difference(other, df, "mc_acc")
    assert d["n"] == len(ITEMS) and np.isfinite(d["diff"])


def test_bad_lm_eval_input_names_the_fix(tmp_path, smoke):
    with pytest.raises(FileNotFoundError, match="include_path"):
        lmeval.lm_eval_task("x", include_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="bos"):
        lmeval.lm_eval_task("x", bos="sometimes")
    with pytest.raises(ValueError, match="knows no task"):
        lmeval.lm_eval_task("no_such_task_here", include_path=tmp_path).kind


_OUTSIDE_LM_EVAL = r"""
import sys
sys.modules["moelab"] = None  # a user without moelab
import json, lm_eval
from lm_eval.tasks import TaskManager
path, include, task = sys.argv[1:4]
out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},trust_remote_code=True,dtype=float32",
                              tasks=[task], task_manager=TaskManager(include_path=include), log_samples=True,
                              batch_size=4, device="cpu", verbosity="ERROR")
samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
print(json.dumps({"loglik": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
                  "acc": out["results"][task]["acc,none"]}))
"""


def test_lm_eval_runs_a_nonuniform_checkpoint_without_moelab(tasks_dir, tmp_path):
    """MC-SMoE's per-layer counts through `lm_eval --model hf` in a process without moelab: the
    checkpoint's modeling file loads it (trust_remote_code=True) and lm-eval's per-item
    log-likelihoods equal those of the in-memory model scored through moelab's backend."""
    import os
    import subprocess
    import sys

    import torch

    from moelab import io, models, zoo

    model, tok = zoo.load("smoke")  # its own copy: the session's smoke model is not edited
    for j, layer in enumerate(models.moe_layers(model)):
        if j % 2 == 0:
            continue
        idx = torch.arange(layer.num_experts - 2 * j if layer.num_experts - 2 * j > layer.top_k else layer.top_k + 1)
        models.set_experts(model, layer.layer_idx, {k: v[idx] for k, v in layer.expert_weights().items()},
                           layer.router_weight()[idx], {k: v[idx] for k, v in layer.expert_indexed().items()})
    counts = models.set_expert_counts_config(model)
    assert len(set(counts.values())) > 1, counts
    path = io.save_checkpoint(model, tmp_path / "nonuniform", tok)
    root, _ = tasks_dir
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _OUTSIDE_LM_EVAL, str(path), str(root), "moelab_local_mc"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = lmeval.lm_eval_task("moelab_local_mc", include_path=root, bos="lm-eval")
    ours.score(model, tok)
    a, b = np.array(theirs["loglik"]), np.array([d["loglik"] for d in ours.details])
    assert a.shape == b.shape == (len(ITEMS), 3)
    print(f"max per-item |loglik diff| outside moelab vs in memory: {np.abs(a - b).max():.3g} nats")
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()


def test_a_group_is_one_task_over_all_its_members_items(smoke, tasks_dir):
    model, tok = smoke
    root, _ = tasks_dir
    group = lmeval.lm_eval_task("moelab_local_group", include_path=root)
    assert group.kind == "mc" and group.members == ["moelab_local_mc", "moelab_local_mc2"]
    df = evaluate.evaluate(model, tok, [group], progress=False)
    acc = df[df.metric == "acc"].iloc[0]
    assert acc["n"] == len(ITEMS) + 3 and len(df.attrs["units"][group.name]["values"]) == len(ITEMS) + 3
    assert acc["value"] == pytest.approx(np.mean([d["acc"] for d in group.details]))  # size-weighted


def test_notebook_tasks_take_lm_eval_names_and_task_files(tasks_dir):
    root, _ = tasks_dir
    tasks = evaluate.notebook_tasks(("ppl",), ppl_tokens=512, seq_len=64, mc_n=4, seed=0,
                                    lm_eval=[str(root / "moelab_local_mc.yaml"), str(root / "gen.yaml")], lm_eval_limit=2)
    assert [t.kind for t in tasks] == ["ppl"] * 3 + ["mc", "gen"]
    assert tasks[3].task == "moelab_local_mc" and tasks[3].limit == 2 and tasks[3].bos == "lm-eval"
    with pytest.raises(TypeError, match="list of task names"):
        evaluate.notebook_tasks(("ppl",), ppl_tokens=512, seq_len=64, mc_n=4, lm_eval="arc_easy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.notebook_tasks((), ppl_tokens=512, seq_len=64, mc_n=4, lm_eval=[str(root / "missing.yaml")])
    with pytest.raises(ValueError, match="unknown kinds"):
        evaluate.notebook_tasks(("ppx",), ppl_tokens=512, seq_len=64, mc_n=4)
