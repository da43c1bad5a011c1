"""lm-evaluation-harness as an evaluation backend: the papers' benchmarks in moelab's tidy table.

The compression papers report MMLU, ARC, HellaSwag, GSM8K and the like through lm-evaluation-harness
(lm-eval). ``lm_eval_task("arc_easy")`` is a moelab ``Task``, so

    evaluate.evaluate(variant, tokenizer, [evaluate.perplexity_task("general"), lmeval.lm_eval_task("arc_easy")])

scores the in-memory variant (nothing is saved) on moelab's own tasks and on lm-eval's in one table
(task, kind, domain, metric, value, stderr, n), with lm-eval's per-item scores kept in
``attrs["units"]``, so ``evaluate.paired_difference`` pairs two variants item by item as it does for
moelab's tasks. lm-eval's own task names need its datasets (the hub, or a local ``HF_DATASETS_CACHE``);
a task of your own can be a YAML file in ``include_path`` with ``dataset_path: json`` and local files,
which runs offline (the tests do this).

Install with ``pip install "lm-eval[hf]"`` (plain ``lm-eval`` lacks accelerate for its hf backend).

The BOS convention: moelab starts every input with the tokenizer's BOS token (EOS when it has none,
``evaluate._prefix_ids``). lm-eval's hf backend adds whatever the tokenizer's own special tokens are,
only when ``add_bos_token=True``, and by default (for most models) nothing, so the same item gets
log-likelihoods 0.01-1 nats apart between the two. lm-eval also encodes context and continuation as
one string and splits it, where moelab tokenises them apart. ``bos="moelab"`` (the default here)
makes lm-eval prefix and tokenise as moelab does, so its per-item log-likelihoods equal moelab's
``ChoiceTask`` on the same items (tested, to 1e-4 nats); ``bos="lm-eval"`` keeps lm-eval's own
behaviour, for numbers comparable with a paper's table.

A task of your own in moelab's JSONL layout (choices that start with their own space) needs
``target_delimiter: ""`` in its YAML: lm-eval puts a space between context and choice by default.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from . import evaluate

__all__ = ["LMEvalTask", "lm_eval_task", "named_tasks", "available", "INSTALL_HINT"]

INSTALL_HINT = 'lm-evaluation-harness is not installed: pip install "lm-eval[hf]" (plain lm-eval lacks accelerate)'

# lm-eval output types -> moelab task kinds (what summary_score and paired_difference read)
_KIND = {"multiple_choice": "mc", "generate_until": "gen", "loglikelihood_rolling": "ppl", "loglikelihood": "mc"}


def available() -> bool:
    """Whether lm-evaluation-harness (with its hf backend) can be imported."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        return False
    return True


def _require():
    if not available():
        raise ImportError(INSTALL_HINT)


def _moelab_lm_class():
    """HFLM with moelab's input convention (one BOS, or EOS, token before every context)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class MoelabLM(HFLM):
        def __init__(self, *args, prefix: list[int] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._moelab_prefix = prefix

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            if self._moelab_prefix is None:
                return super().tok_encode(string, add_special_tokens=add_special_tokens,
                                          left_truncate_len=left_truncate_len, **kwargs)
            ids = self.tokenizer.encode(string, add_special_tokens=False)
            if add_special_tokens is not False:  # a context: moelab's prefix, exactly once
                ids = list(self._moelab_prefix) + ids
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _encode_pair(self, context, continuation):
            if self._moelab_prefix is None:
                return super()._encode_pair(context, continuation)
            # moelab's convention: trailing whitespace moves to the continuation, and the two parts are
            # tokenised apart, so every choice follows the same context tokens (lm-eval splits one encoding)
            context, continuation = evaluate._split_trailing_ws(context, continuation)
            return self.tok_encode(context), self.tok_encode(continuation, add_special_tokens=False)

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            if self._moelab_prefix is None:
                return super().tok_batch_encode(strings, padding_side=padding_side,
                                                left_truncate_len=left_truncate_len, truncation=truncation)
            rows = [self.tok_encode(s, left_truncate_len=left_truncate_len) for s in strings]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            left = padding_side == "left"
            ids = [([pad] * (width - len(r)) + r) if left else (r + [pad] * (width - len(r))) for r in rows]
            mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r)))
                    for r in rows]
            return torch.tensor(ids), torch.tensor(mask)

    return MoelabLM


class LMEvalTask(evaluate.Task):
    """One lm-evaluation-harness task, scored on an in-memory model through lm-eval's hf backend.

    Its kind follows lm-eval's output type: ``multiple_choice`` -> "mc" (metrics acc and acc_norm),
    ``generate_until`` -> "gen" (exact_match, under the task's first filter unless ``filter`` names
    another), ``loglikelihood_rolling`` -> "ppl" (bits_per_byte). Every metric lm-eval reports
    becomes a row; the per-item values behind the headline metric become the paired units.

    Args:
        task: lm-eval task name (``arc_easy``, ``gsm8k``, or one defined in ``include_path``).
        include_path: folder (or list) of extra task YAML files, e.g. local JSON tasks.
        limit: score only the first ``limit`` documents (lm-eval's ``limit``).
        num_fewshot: lm-eval's few-shot count (None: the task's default).
        bos: "moelab" (prefix contexts as moelab does; per-item scores match moelab's own tasks) or
            "lm-eval" (lm-eval's own default, as papers report).
        filter: the filter whose exact_match is the headline of a generation task.
        name, domain: moelab's name for the task (default ``lm_eval:<task>``) and its domain label.
    """

    def __init__(self, task: str, *, include_path=None, limit: int | None = None, num_fewshot: int | None = None,
                 bos: str = "moelab", filter: str | None = None, name: str | None = None, domain: str | None = None,
                 seed: int = 0):
        if bos not in ("moelab", "lm-eval"):
            raise ValueError(f"bos must be 'moelab' or 'lm-eval', got {bos!r}")
        super().__init__(name or f"lm_eval:{task}", domain, description=f"lm-evaluation-harness task {task}")
        self.task = task
        paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
        self.include_path = [str(Path(p)) for p in paths]
        for p in self.include_path:
            if not Path(p).exists():
                raise FileNotFoundError(f"include_path {p} does not exist (a folder of lm-eval task YAML files)")
        self.limit, self.num_fewshot, self.bos, self.filter, self.seed = limit, num_fewshot, bos, filter, seed
        self._kind: str | None = None
        self.members: list[str] = [task]  # the lm-eval tasks whose items this task scores (a group's members)
        self._task_manager = None
        self.results: dict = {}

    def _manager(self):
        """lm-eval's task index (built once per task: indexing every YAML takes seconds)."""
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            self._task_manager = TaskManager(include_path=self.include_path or None)
        return self._task_manager

    @property
    def kind(self) -> str:
        if self._kind is None:
            _require()
            manager = self._manager()
            if self.task not in manager.all_tasks:
                raise ValueError(f"lm-eval knows no task {self.task!r}; give its YAML folder as include_path, "
                                 f"or pick one of `lm_eval --tasks list`")
            loaded = manager.load([self.task])
            # a group (MMLU's 57 subjects): one moelab task whose items are every member's
            self.members = sorted(loaded["tasks"]) if self.task not in loaded["tasks"] else [self.task]
            kinds = set()
            for name in self.members:
                found = loaded["tasks"][name]
                out = getattr(found, "OUTPUT_TYPE", None) or found.config.output_type
                if out not in _KIND:
                    raise ValueError(f"lm-eval task {name!r} has output type {out!r}; moelab reads {sorted(_KIND)}")
                kinds.add(_KIND[out])
            if len(kinds) > 1:
                raise ValueError(f"lm-eval's group {self.task!r} mixes task kinds {sorted(kinds)}; give its members "
                                 "as separate tasks")
            self._kind = kinds.pop()
        return self._kind

    def score(self, model, tokenizer, *, batch_size: int = 8, progress: bool = False) -> list[evaluate.Score]:
        _require()
        import lm_eval

        kind = self.kind
        prefix = evaluate._prefix_ids(tokenizer) if self.bos == "moelab" else None
        lm = _moelab_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, prefix=prefix,
                                max_length=evaluate._max_length(model))
        level = logging.getLogger("lm-eval").level  # simple_evaluate's verbosity sets it; put it back
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[self.task], task_manager=self._manager(), limit=self.limit,
                                          num_fewshot=self.num_fewshot, log_samples=True, random_seed=self.seed,
                                          numpy_random_seed=self.seed, torch_random_seed=self.seed,
                                          fewshot_random_seed=self.seed, verbosity="ERROR")
        finally:
            logging.getLogger("lm-eval").setLevel(level)
        group = self.members != [self.task]
        samples = [dict(s, member=m) for m in self.members for s in sorted(out["samples"][m], key=lambda s: s["doc_id"])]
        # a group's figure: lm-eval's own aggregate where the group defines one, else the mean over all
        # its items (the size-weighted mean of its members)
        self.results = dict(out["results"].get(self.task) or {}) if group else out["results"][self.task]
        filters = list(dict.fromkeys(s.get("filter", "none") for s in samples))
        chosen = self.filter or filters[0]
        if chosen not in filters:
            raise ValueError(f"lm-eval task {self.task!r} has filters {filters}, not {self.filter!r}")
        samples = [s for s in samples if s.get("filter", "none") == chosen]
        n = len(samples)
        self.details = [self._detail(s, kind) for s in samples]
        if group and not any("," in k and "_stderr," not in k for k in self.results):
            for metric in sorted({k for s in samples for k, v in s.items()
                                  if k not in ("doc_id", "target", "filter") and isinstance(v, (int, float))}):
                self.results[f"{metric},{chosen}"] = float(np.mean([float(s[metric]) for s in samples]))
        scores = []
        for key, value in self.results.items():
            if "," not in key or "_stderr," in key or key.startswith("alias"):
                continue
            metric, flt = key.split(",", 1)
            if not isinstance(value, (int, float)):
                continue
            label = metric if flt == chosen else f"{metric} ({flt})"
            se = self.results.get(f"{metric}_stderr,{flt}")
            if not isinstance(se, (int, float)) or not math.isfinite(se):
                per = [s.get(metric) for s in samples]
                per = [float(v) for v in per if isinstance(v, (int, float))]
                se = float(np.std(per, ddof=1) / math.sqrt(len(per))) if len(per) > 1 else float("nan")
            scores.append(evaluate.Score(self.name, label, float(value), float(se), n))
        return scores

    @staticmethod
    def _detail(sample: dict, kind: str) -> dict:
        doc = {"doc": None, "doc_id": sample["doc_id"]}
        if kind == "mc":
            ll = [float(r[0]) for r in sample["filtered_resps"]]
            acc = float(sample.get("acc", float("nan")))
            return {**doc, "loglik": ll, "label": sample.get("target"), "acc": acc,
                    "acc_norm": float(sample.get("acc_norm", acc))}
        if kind == "gen":
            em = sample.get("exact_match")
            return {**doc, "pred": sample["filtered_resps"][0] if sample.get("filtered_resps") else None,
                    "correct": float(em) if isinstance(em, (int, float)) else float("nan")}
        bpb = sample.get("bits_per_byte")  # lm-eval keeps (loglikelihood, bytes) per document
        ll, nbytes = (bpb if isinstance(bpb, (list, tuple)) else (float("nan"), 1))
        return {**doc, "bits_per_byte": -float(ll) / (max(1, float(nbytes)) * math.log(2))}


def lm_eval_task(task: str, **kwargs) -> LMEvalTask:
    """An lm-evaluation-harness task as a moelab Task (``LMEvalTask``; keyword arguments as there)."""
    return LMEvalTask(task, **kwargs)


def named_tasks(names, *, limit: int | None = None, seed: int = 0, bos: str = "lm-eval") -> list[LMEvalTask]:
    """lm-eval tasks from a notebook's ``LM_EVAL_TASKS``: each entry an lm-eval task name (``"arc_easy"``)
    or the path of a task YAML file of your own (its folder becomes the include path, its ``task:`` the
    name). ``bos="lm-eval"`` by default: lm-eval's own input convention, so the figures compare with the
    papers' tables. ``limit``: items per task (lm-eval's first ``limit``; None: all)."""
    if isinstance(names, str):
        raise TypeError(f"LM_EVAL_TASKS must be a list of task names or YAML paths, got the string {names!r}; "
                        f"write [{names!r}]")
    names = list(names or [])
    if not names:
        return []
    _require()
    out = []
    for entry in names:
        path = Path(str(entry)).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise FileNotFoundError(f"LM_EVAL_TASKS names the task file {path}, which does not exist")
            import yaml

            task = (yaml.safe_load(path.read_text()) or {}).get("task")
            if not isinstance(task, str):
                raise ValueError(f"{path} has no 'task:' name; an lm-eval task YAML starts with 'task: <name>'")
            out.append(LMEvalTask(task, include_path=path.parent, limit=limit, seed=seed, bos=bos))
        else:
            out.append(LMEvalTask(str(entry), limit=limit, seed=seed, bos=bos))
    return out
