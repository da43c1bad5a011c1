"""Offline text for training, calibration and evaluation (three domains: general, math, code).

Every byte comes from packages the registries ship, so a notebook runs with no hub and no web:

* general: the Wikipedia sample in gensim's test data (markup stripped with gensim's own
  ``filter_wiki``) plus the Lee news corpus beside it;
* math: GSM8K-style word problems with worked solutions from reasoning-gym's ``gsm_symbolic``
  generator, plus short arithmetic problems from its other generators;
* code: the Python standard library source of the running interpreter.

Documents are split into train / calib / eval by a hash of a stable key, so the splits are
deterministic and disjoint. ``calibration_set`` builds a ``datasets.Dataset`` for any mix
general:math:code by ratio and token budget (the REAM calibration-mix knob) and caches it on disk.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import sysconfig
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

DATA_VERSION = 2  # bump when the text a split yields changes (zoo recipes hash it)
DOMAINS = ("general", "math", "code")
SPLITS = ("train", "calib", "eval")
# Share of documents per split; calib and eval are small because they are only read, not trained on.
SPLIT_SHARES = {"train": 0.90, "calib": 0.05, "eval": 0.05}

# How many generated problems each split gets. Math is synthetic, so its size is a choice: enough
# tokens to match the other domains in training, and held-out problems for the MC/GEN tasks.
MATH_PROBLEMS = {"train": 24000, "calib": 1500, "eval": 1500}
# Seeds per split are far apart so the generators never emit the same instance stream twice.
_MATH_SEEDS = {"train": 1_000, "calib": 2_000_000, "eval": 3_000_000}
# Arithmetic generators mixed into the math domain, with their share of problems.
_ARITH = ("basic_arithmetic", "chain_sum", "products", "leg_counting", "time_intervals", "gcd", "lcm")
_ARITH_SHARE = 0.25


@dataclass(frozen=True)
class Document:
    """One unit of text and where it came from (its text's hash decides its split)."""

    domain: str
    key: str
    text: str


def cache_dir() -> Path:
    """Root of moelab's on-disk cache (``MOELAB_CACHE`` overrides ``~/.cache/moelab``)."""
    root = os.environ.get("MOELAB_CACHE") or os.path.join(Path.home(), ".cache", "moelab")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def split_of(key: str) -> str:
    """Deterministic split for a document key (a stable hash, independent of PYTHONHASHSEED)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += SPLIT_SHARES[split]
        if h < edge:
            return split
    return SPLITS[-1]


# ----------------------------------------------------------------------------- general text
def _gensim_data(name: str) -> Path:
    try:
        import gensim.test.utils as gtu
    except ImportError as exc:  # pragma: no cover - gensim is a declared dependency
        raise ImportError("moelab.data needs gensim for its general-English text: pip install gensim") from exc
    return Path(gtu.datapath(name))


_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _clean_wiki(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes survive filter_wiki
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)  # headings -> plain lines
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # empty parentheses left by removed templates
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n\n", text)
    return text.strip()


def _general_documents() -> list[Document]:
    from gensim.corpora.wikicorpus import extract_pages

    docs = []
    with bz2.open(_gensim_data(_WIKI_FILE)) as fh:
        for title, raw, _pid in extract_pages(fh):
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = _clean_wiki(raw)
            paragraphs = [p.strip() for p in text.split("\n\n") if len(p.split()) >= 8]
            # Articles are long and few (about 200), so split each into ~300-word chunks at paragraph
            # boundaries: that gives enough units for a 5% held-out split to be representative.
            chunk: list[str] = []
            words = 0
            part = 0
            for p in paragraphs:
                chunk.append(p)
                words += len(p.split())
                if words >= 300:
                    docs.append(Document("general", f"wiki/{title}/{part}", "\n\n".join(chunk)))
                    chunk, words, part = [], 0, part + 1
            if chunk:
                docs.append(Document("general", f"wiki/{title}/{part}", "\n\n".join(chunk)))
    lee = _gensim_data("lee_background.cor").read_text(encoding="utf-8", errors="replace")
    for i, line in enumerate(lee.splitlines()):
        if line.strip():
            docs.append(Document("general", f"lee/{i}", line.strip()))
    return docs


# ----------------------------------------------------------------------------- math
def _format_problem(question: str, solution: str, answer: str) -> str:
    return f"Question: {question.strip()}\nAnswer: {solution.strip()}\n#### {answer.strip()}"


def math_problems(split: str, n: int | None = None) -> list[dict]:
    """Generated math problems for one split: dicts with question, solution, answer.

    Args:
        split: one of SPLITS; each split has its own seeds and instances are de-duplicated across
            splits by question text (train drops anything that also appears in calib or eval).
        n: how many (default ``MATH_PROBLEMS[split]``).
    """
    n = MATH_PROBLEMS[split] if n is None else n
    snap = _snapshot()
    if snap is not None:
        if n != MATH_PROBLEMS[split]:
            raise ValueError(f"the data snapshot {os.environ[SNAPSHOT_ENV]} holds the default {MATH_PROBLEMS[split]} "
                             f"{split} problems, not {n}; unset {SNAPSHOT_ENV} to generate them")
        return [dict(p) for p in snap["math_problems"][split]]
    return list(_math_problems(split, n))


@lru_cache(maxsize=8)
def _math_problems(split: str, n: int) -> tuple[dict, ...]:
    import reasoning_gym as rg

    n_arith = int(n * _ARITH_SHARE)
    n_gsm = n - n_arith
    seed = _MATH_SEEDS[split]
    out = []
    for item in rg.create_dataset("gsm_symbolic", size=n_gsm, seed=seed):
        cot = item["metadata"].get("answer_cot", "")
        cot = re.sub(r"\n?####.*$", "", cot.strip(), flags=re.S)  # the answer line is added below
        q = re.sub(r"\s*Give the result as your final answer\.?\s*Do not include units\.?", "", item["question"])
        out.append({"question": q.strip(), "solution": cot.strip(), "answer": str(item["answer"]).strip(),
                    "source": "gsm_symbolic"})
    per = max(1, n_arith // len(_ARITH))
    for j, name in enumerate(_ARITH):
        for item in rg.create_dataset(name, size=per, seed=seed + 17 * (j + 1)):
            out.append({"question": item["question"].strip(), "solution": "",
                        "answer": str(item["answer"]).strip(), "source": name})
    if split == "train":
        held = {p["question"] for s in ("calib", "eval") for p in _math_problems(s, MATH_PROBLEMS[s])}
        out = [p for p in out if p["question"] not in held]
    return tuple(out)


def _math_documents(split: str) -> list[Document]:
    return [Document("math", f"math/{split}/{i}", _format_problem(p["question"], p["solution"], p["answer"]))
            for i, p in enumerate(math_problems(split))]


# ----------------------------------------------------------------------------- code
_CODE_SKIP = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "venv",
              "pydoc_data", "config-3", "tkinter", "__phello__")


def _code_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _CODE_SKIP or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        files.append(path)
    return files


def _code_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in _code_files():
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) < 200:
            continue
        docs.append(Document("code", f"code/{path.relative_to(root).as_posix()}", text))
    return docs


# ----------------------------------------------------------------------------- public API
@lru_cache(maxsize=None)
def _all_documents(domain: str) -> tuple[Document, ...]:
    if domain == "general":
        return tuple(_general_documents())
    if domain == "code":
        return tuple(_code_documents())
    raise ValueError(domain)


def documents(domain: str, split: str) -> list[Document]:
    """All documents of one domain and split, in a fixed order.

    Raises:
        ValueError: for an unknown domain or split (the message lists the valid ones).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    snap = _snapshot()
    if snap is not None:
        return [Document(domain, key, text) for key, text in snap["documents"][domain][split]]
    if domain == "math":
        return _math_documents(split)
    # Split by content, not by key: a text that occurs twice (the Lee corpus repeats some stories)
    # lands in one split only, and duplicates are dropped.
    seen: set[str] = set()
    out = []
    for d in _all_documents(domain):
        if d.text in seen or split_of(d.text) != split:
            continue
        seen.add(d.text)
        out.append(d)
    return out


# ----------------------------------------------------------------------------- snapshots
SNAPSHOT_ENV = "MOELAB_DATA_SNAPSHOT"


def export_snapshot(path) -> Path:
    """Write every document of every domain and split, and the math problems, to one xz-compressed JSON.

    A machine without gensim or reasoning-gym, or with another Python (whose stdlib is the code domain),
    reads the very same text when ``MOELAB_DATA_SNAPSHOT`` names such a file (the GPU check carries one).
    """
    import lzma

    payload = {"data_version": DATA_VERSION,
               "documents": {d: {s: [[doc.key, doc.text] for doc in documents(d, s)] for s in SPLITS}
                             for d in DOMAINS},
               "math_problems": {s: math_problems(s) for s in SPLITS}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=6) as fh:
        json.dump(payload, fh)
    os.replace(tmp, path)
    return path


def corpus_identity() -> str:
    """What decides the text every split yields, beyond moelab's code: the snapshot file's hash when
    ``MOELAB_DATA_SNAPSHOT`` names one, else the Python version (its standard library is the code domain)
    and the versions of the packages whose data and generators give the general and math text."""
    path = os.environ.get(SNAPSHOT_ENV)
    if path:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return f"snapshot:{h.hexdigest()[:16]}"
    from importlib import metadata

    import platform

    parts = [f"python={platform.python_version()}"]
    for name in ("gensim", "reasoning-gym"):
        try:
            parts.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name}=missing")
    return ",".join(parts)


@lru_cache(maxsize=4)
def _read_snapshot(path: str) -> dict:
    import lzma

    with lzma.open(path, "rt", encoding="utf-8") as fh:
        snap = json.load(fh)
    if snap.get("data_version") != DATA_VERSION:
        raise ValueError(f"the data snapshot {path} is of data version {snap.get('data_version')}, this moelab "
                         f"reads version {DATA_VERSION}; export a new one with moelab.data.export_snapshot")
    return snap


def _snapshot() -> dict | None:
    """The snapshot ``MOELAB_DATA_SNAPSHOT`` names, or None (text is then read from the packages)."""
    path = os.environ.get(SNAPSHOT_ENV)
    if not path:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{SNAPSHOT_ENV}={path} names no file; export one with moelab.data.export_snapshot")
    return _read_snapshot(str(Path(path).resolve()))


def texts(domain: str, split: str) -> list[str]:
    """The texts of ``documents(domain, split)``."""
    return [d.text for d in documents(domain, split)]


def parse_mix(mix: str | Sequence[float] | dict) -> dict[str, float]:
    """Normalise a calibration mix to shares per domain that sum to 1.

    Accepts "1:0:0", "general", (0, 0.3, 0.7) or {"math": 0.3, "code": 0.7}; order is general:math:code.
    """
    if isinstance(mix, str):
        if mix in DOMAINS:
            weights = [1.0 if d == mix else 0.0 for d in DOMAINS]
        else:
            try:
                weights = [float(x) for x in mix.split(":")]
            except ValueError:
                weights = []
    elif isinstance(mix, dict):
        unknown = set(mix) - set(DOMAINS)
        if unknown:
            raise ValueError(f"calibration mix names unknown domains {sorted(unknown)}; use {DOMAINS}")
        weights = [float(mix.get(d, 0.0)) for d in DOMAINS]
    else:
        weights = [float(x) for x in mix]
    if (len(weights) != len(DOMAINS) or not all(math.isfinite(w) and w >= 0 for w in weights)
            or not 0 < sum(weights) < math.inf):
        raise ValueError(
            f"calibration mix {mix!r} is not valid: give three non-negative shares general:math:code "
            "that do not all vanish, e.g. '0:0.3:0.7', or a single domain name"
        )
    total = sum(weights)
    return {d: w / total for d, w in zip(DOMAINS, weights)}


def mix_label(mix) -> str:
    """Short label for a mix, e.g. '0:0.3:0.7'."""
    shares = parse_mix(mix)
    return ":".join(f"{shares[d]:.2g}" for d in DOMAINS)


def pack_tokens(token_lists: Iterable[list[int]], seq_len: int, eos_id: int | None) -> list[list[int]]:
    """Concatenate tokenised documents (separated by EOS) and cut them into full rows of seq_len."""
    if not isinstance(seq_len, numbers.Integral) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive whole number of tokens, got {seq_len!r}")
    rows, buf = [], []
    for ids in token_lists:
        buf.extend(ids)
        if eos_id is not None:
            buf.append(eos_id)
        while len(buf) >= seq_len:
            rows.append(buf[:seq_len])
            buf = buf[seq_len:]
    return rows


def tokenizer_key(tokenizer) -> str:
    """A short identity of a tokenizer (its whole vocabulary and class): calibration sets record it, and
    ``zoo.load`` records it on the model, so ``observe`` refuses a set made with another tokenizer."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items())) + type(tokenizer).__name__
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def calibration_set(tokenizer, mix="1:1:1", tokens: int = 32_768, seq_len: int = 256, split: str = "calib",
                    seed: int = 0, cache: bool = True):
    """A tokenised calibration (or evaluation) set for a domain mix, as a ``datasets.Dataset``.

    Rows hold ``input_ids`` and ``attention_mask`` (all ones: rows are packed full) and ``domain``.
    Each domain contributes ``round(share * tokens / seq_len)`` rows taken in a seeded order from
    its split, so the same arguments always give the same set; the result is cached on disk under
    ``cache_dir()/calib`` keyed by every argument and the tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer (the model's own).
        mix: shares general:math:code (see ``parse_mix``).
        tokens: token budget of the whole set.
        seq_len: row length in tokens.
        split: "calib" by default; "eval" gives held-out rows for perplexity.
        seed: order in which documents are drawn.

    The set records the identity of the tokenizer (``tokenizer_key_of``): ``observe`` refuses it for a
    model loaded with another tokenizer. A damaged cache entry is rebuilt (with a warning naming it).

    Raises:
        ValueError: if the budget gives no rows, gives a domain of the mix no row, or a domain lacks
            text for its share.
    """
    import datasets

    shares = parse_mix(mix)
    if not isinstance(seq_len, numbers.Integral) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be a whole number of tokens >= 2, got {seq_len!r}")
    if not isinstance(tokens, numbers.Integral) or isinstance(tokens, bool):
        raise ValueError(f"tokens must be a whole number, got {tokens!r}")
    if tokens < seq_len:
        raise ValueError(f"token budget {tokens} is below one row of seq_len={seq_len}; raise `tokens`")
    counts = _rows_per_domain(shares, tokens, seq_len)
    tok_key = tokenizer_key(tokenizer)
    # The key holds the exact shares (repr of each float), not the rounded label: 0.104:0.896 is not 0.1:0.9.
    key = hashlib.sha256(json.dumps([[repr(shares[d]) for d in DOMAINS], tokens, seq_len, split, seed,
                                     tok_key, CALIB_VERSION]).encode()).hexdigest()[:16]
    if not cache:
        return _build_calibration(tokenizer, counts, seq_len, split, seed, tok_key)
    from filelock import FileLock

    path = cache_dir() / "calib" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    # One writer per set: a second process waits, then reads what the first wrote.
    with FileLock(str(path) + ".lock"):
        for stale in path.parent.glob(f"{key}.tmp*"):  # left by a killed writer (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if path.exists():
            try:
                ds = datasets.load_from_disk(str(path))
                if tokenizer_key_of(ds) == tok_key and len(ds) == sum(counts.values()):
                    return ds
                why = "it holds another set"
            except Exception as exc:  # a damaged entry (killed write, full disk, edited by hand)
                why = f"it does not load ({type(exc).__name__}: {str(exc)[:120]})"
            warnings.warn(f"the cached calibration set {path} is unusable ({why}); rebuilding it")
            shutil.rmtree(path, ignore_errors=True)
        ds = _build_calibration(tokenizer, counts, seq_len, split, seed, tok_key)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        ds.save_to_disk(str(tmp))
        os.replace(tmp, path)
        return datasets.load_from_disk(str(path))


def _rows_per_domain(shares: dict[str, float], tokens: int, seq_len: int) -> dict[str, int]:
    """Rows per domain: ``round(share * rows)``, the rounding difference given to the largest share.

    Raises:
        ValueError: a domain with a positive share would get no row (the budget is too small for the
            mix), naming the smallest budget that gives it one.
    """
    def rows_for(n: int) -> dict[str, int]:
        c = {d: int(round(shares[d] * n)) for d in DOMAINS}
        c[max(shares, key=shares.get)] += n - sum(c.values())
        return c

    def starved(c: dict[str, int]) -> list[str]:
        return [d for d in DOMAINS if shares[d] > 0 and c[d] <= 0]

    n_rows = tokens // seq_len
    counts = rows_for(n_rows)
    if starved(counts):
        smallest = min(shares[d] for d in starved(counts))
        need = max(n_rows + 1, math.floor(0.5 / smallest))  # below this, round() gives the domain 0 rows
        while starved(rows_for(need)):
            need += 1
        raise ValueError(
            f"a budget of {tokens} tokens ({n_rows} row(s) of {seq_len}) gives {starved(counts)} no row although the "
            f"mix {mix_label(shares)} gives them a share; raise `tokens` to at least {need * seq_len}, or give "
            f"{starved(counts)} a share of 0")
    return counts


# Bump when the rows a calibration set holds change for the same arguments (its cache key holds it).
CALIB_VERSION = 2  # 2: math calibration leaves out problems whose question is also held out for evaluation


def calibration_texts(domain: str, split: str = "calib") -> list[str]:
    """The texts a calibration set draws from: ``texts(domain, split)``, except that the calibration
    split of math leaves out every problem whose question is also in the eval split.

    The problem generators are seeded apart per split but can emit the same small problem twice
    (5 of 1,496 here): calibrating on a problem the evaluation then asks would let the compressed model
    be fitted to its own test.
    """
    docs = texts(domain, split)
    if domain != "math" or split != "calib":
        return docs
    held = {f"Question: {p['question'].strip()}" for p in math_problems("eval")}
    return [t for t in docs if t.split("\nAnswer:", 1)[0] not in held]


def _build_calibration(tokenizer, counts: dict[str, int], seq_len: int, split: str, seed: int, tok_key: str):
    import datasets
    import numpy as np

    rows = {"input_ids": [], "attention_mask": [], "domain": []}
    for d in DOMAINS:
        if counts[d] <= 0:
            continue
        docs = calibration_texts(d, split)
        order = np.random.default_rng(seed + DOMAINS.index(d)).permutation(len(docs))
        packed: list[list[int]] = []
        for start in range(0, len(order), 64):
            batch = [docs[i] for i in order[start:start + 64]]
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            packed.extend(pack_tokens(ids, seq_len, tokenizer.eos_token_id))
            if len(packed) >= counts[d]:
                break
        if len(packed) < counts[d]:
            raise ValueError(
                f"the {split} split of {d!r} holds {len(packed)} rows of {seq_len} tokens, fewer than the "
                f"{counts[d]} asked for; lower `tokens` or `seq_len`"
            )
        for r in packed[:counts[d]]:
            rows["input_ids"].append(r)
            rows["attention_mask"].append([1] * seq_len)
            rows["domain"].append(d)
    info = datasets.DatasetInfo(description=json.dumps({TOKENIZER_INFO: tok_key, "vocab_size": len(tokenizer.get_vocab())}))
    return datasets.Dataset.from_dict(rows, info=info)


TOKENIZER_INFO = "moelab_tokenizer"


def tokenizer_key_of(dataset) -> str | None:
    """The identity of the tokenizer a ``calibration_set`` was made with (None for other datasets)."""
    try:
        return json.loads(dataset.info.description or "{}").get(TOKENIZER_INFO)
    except (AttributeError, ValueError, TypeError):
        return None
