"""Shared fixtures. The zoo cache defaults to .cache/moelab in the repository, so the smoke model is
built once (about a minute) and reused by every later test run; MOELAB_CACHE overrides it."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MOELAB_CACHE", str(ROOT / ".cache" / "moelab"))
# Two cores: keep torch from oversubscribing them when tests run beside other work.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_at_once(code: str, processes: int, cache, timeout: int = 600) -> list[str]:
    """Start ``processes`` Python processes running ``code`` together (MOELAB_CACHE=``cache``); wait for
    all, assert they succeeded, and return the last line each printed."""
    import subprocess
    import sys

    env = {**os.environ, "MOELAB_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(processes)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-800:] for _, err in outs]
    return [out.strip().splitlines()[-1] for out, _ in outs]


@pytest.fixture
def one_thread():
    """Seed torch and use one intra-op thread: on a busy 2-core machine tiny models run faster that way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke():
    """The smoke zoo model and its tokenizer (built on first use)."""
    from moelab import zoo

    return zoo.load("smoke")


def write_mc_task(folder, task: str, items: list[dict], metrics=("acc", "acc_norm")):
    """An lm-evaluation-harness multiple-choice task on local JSONL (``dataset_path: json``, offline):
    ``folder/<task>.jsonl`` and ``folder/<task>.yaml``; returns the YAML's path. Items are moelab's JSONL
    layout (context, choices that carry their own leading space, label), hence ``target_delimiter: ""``."""
    import json
    from pathlib import Path

    folder = Path(folder)
    data_file = folder / f"{task}.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in items))
    metric_list = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    yaml = folder / f"{task}.yaml"
    yaml.write_text(f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
{metric_list}""")
    return yaml
