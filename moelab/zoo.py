"""The embedded default model: a small Qwen3-MoE trained here, deterministically, on moelab.data.

Nothing comes from the hub: a byte-level BPE tokenizer is trained on the train split, then the
model is trained for a fixed number of steps on a general:math:code mix with the router
load-balancing loss on. The result is a plain Hugging Face checkpoint (``AutoModelForCausalLM`` and
``AutoTokenizer`` load it) cached under ``cache_dir()/zoo/<name>-<recipe hash>``, with the training
curve (``training_curve.json``) and final per-domain metrics (``build_metrics.json``) beside it.

``load(name_or_path)`` takes a zoo name ("qwen3-moe-15m", "smoke", ...), a local checkpoint or a hub id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import data
from .kernels import KERNEL_NAME, register

RECIPE_VERSION = 3  # bump for a change the code fingerprint cannot see (an input file, a dependency's behaviour)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a zoo checkpoint; its hash names the cache entry."""

    family: str = "qwen3_moe"      # qwen3_moe | mixtral | deepseek_v3
    vocab_size: int = 8192         # byte-level BPE trained on the train split
    hidden_size: int = 256
    num_layers: int = 6            # enough depth for SlimQwen's layer-removal experiments
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 32
    top_k: int = 4
    expert_width: int = 128        # moe_intermediate_size
    shared_expert_width: int = 0   # >0 adds a shared expert (deepseek_v3 style)
    router_aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch-style, transformers' own)
    seq_len: int = 256
    batch_size: int = 8            # small batches: more updates in a ten-minute budget
    steps: int = 800               # about 1.6M tokens, sized to a ten-minute build on 2 cores
    lr: float = 4e-3
    warmup: int = 50
    weight_decay: float = 0.1
    mix: tuple = (1.0, 1.0, 1.0)   # training mix general:math:code
    tokenizer_chars: int = 2_000_000  # characters per domain the tokenizer is trained on
    eval_tokens: int = 65_536      # held-out tokens per domain for the final metrics, at most (a domain
                                   # whose eval split holds fewer is scored on all of its full rows)
    dense_steps: int = 0           # >0: an upcycled build: the first dense_steps of `steps` train a dense model of
                                   # the MoE's active width, whose FFN is then split into the experts (moelab.upcycle)
    seed: int = 0                  # init, training order and shuffles; the held-out set does not depend on it
    threads: int = 2               # torch intra-op threads of the build: the sums inside a matmul are split
                                   # by thread, so another count gives other bytes; fixed here, on any machine

    def key(self) -> str:
        """Cache key: the recipe, the version, the fingerprint of the code that builds it, and what
        decides the training text beyond the code (``data.corpus_identity``: the Python version whose
        standard library is the code domain, the packages giving the other domains, or a snapshot)."""
        blob = json.dumps({**asdict(self), "v": RECIPE_VERSION, "data": data.DATA_VERSION,
                           "code": build_fingerprint(upcycled=self.dense_steps > 0), "corpus": _corpus_identity(os.environ.get(data.SNAPSHOT_ENV))},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=4)
def _corpus_identity(_snapshot: str | None) -> str:
    return data.corpus_identity()


# The zoo: short names for recipes. "qwen3-moe-15m" is the embedded default every notebook uses.
RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, recipe: Recipe) -> None:
    """Add a named recipe; refuses a duplicate name (so two recipes never share a cache name)."""
    if name in RECIPES:
        raise ValueError(f"zoo recipe {name!r} already exists; choose another name")
    RECIPES[name] = recipe


register_recipe("qwen3-moe-15m", Recipe())
# Its upcycled twin: same architecture, data, tokenizer and steps (a dense step costs what an MoE step
# costs); half the steps train the dense model, half the MoE upcycled from it.
register_recipe("qwen3-moe-15m-upcycled", Recipe(dense_steps=400))
# Tests: the same architecture family, tiny and trained for seconds (routing still specialises).
register_recipe("smoke", Recipe(vocab_size=2048, hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=1,
                                head_dim=32, num_experts=8, top_k=2, expert_width=32, seq_len=128, batch_size=8,
                                steps=300, lr=5e-3, warmup=20, tokenizer_chars=300_000, eval_tokens=8192))
# Tests of other families and of bf16 checkpoints: the smoke recipe as a Mixtral (tests save it in bf16).
register_recipe("smoke-mixtral", replace(RECIPES["smoke"], family="mixtral"))
register_recipe("smoke-upcycled", replace(RECIPES["smoke"], dense_steps=150))
register_recipe("mixtral-8x-small", Recipe(family="mixtral", num_experts=8, top_k=2, expert_width=256,
                                           num_layers=6))
register_recipe("deepseek-v3-small", Recipe(family="deepseek_v3", num_experts=32, top_k=4, expert_width=128,
                                            shared_expert_width=128, num_layers=6))
DEFAULT_MODEL = "qwen3-moe-15m"


def seed_everything(seed: int) -> None:
    """One seed for python, numpy and torch (STYLE rule 5)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(recipe: Recipe, out_dir: Path):
    """Train a byte-level BPE on the train split (equal characters per domain) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def corpus():
        for d in data.DOMAINS:
            left = recipe.tokenizer_chars
            for text in data.texts(d, "train"):
                yield text[:left]
                left -= len(text)
                if left <= 0:
                    break

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>", model_max_length=4096)
    fast.save_pretrained(out_dir)
    return fast


# ----------------------------------------------------------------------------- model config
def build_config(recipe: Recipe, tokenizer):
    """A transformers config for the recipe's family."""
    common = dict(vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_layers,
                  num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_kv_heads,
                  max_position_embeddings=4096, tie_word_embeddings=True, num_experts_per_tok=recipe.top_k,
                  router_aux_loss_coef=recipe.router_aux_loss_coef, output_router_logits=False,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if recipe.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common, head_dim=recipe.head_dim, num_experts=recipe.num_experts,
                              moe_intermediate_size=recipe.expert_width, intermediate_size=4 * recipe.expert_width,
                              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    if recipe.family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**common, head_dim=recipe.head_dim, num_local_experts=recipe.num_experts,
                             intermediate_size=recipe.expert_width)
    if recipe.family == "deepseek_v3":
        from transformers import DeepseekV3Config

        if recipe.shared_expert_width % recipe.expert_width:
            raise ValueError("deepseek_v3 recipes need shared_expert_width to be a multiple of expert_width")
        return DeepseekV3Config(**common, n_routed_experts=recipe.num_experts, moe_intermediate_size=recipe.expert_width,
                                n_shared_experts=max(1, recipe.shared_expert_width // recipe.expert_width),
                                intermediate_size=4 * recipe.expert_width, first_k_dense_replace=0, n_group=1,
                                topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                                q_lora_rank=None, kv_lora_rank=recipe.head_dim, qk_rope_head_dim=recipe.head_dim // 2,
                                qk_nope_head_dim=recipe.head_dim // 2, v_head_dim=recipe.head_dim)
    raise ValueError(f"unknown recipe family {recipe.family!r}; choose qwen3_moe, mixtral or deepseek_v3")


# ----------------------------------------------------------------------------- what decides a checkpoint
# Everything whose source decides a zoo checkpoint's bytes or its stored metrics. Its fingerprint is
# part of every recipe key, so a change to any of it names a new cache entry: no cache keeps a model
# that today's code would not build. (Data constants are included through their repr.)
_BUILD_CODE = (
    "zoo:Recipe", "zoo:seed_everything", "zoo:train_tokenizer", "zoo:build_config", "zoo:_token_stream",
    "zoo:_Batches", "zoo:_preflight", "zoo:_eval_tasks", "zoo:_domain_metrics", "zoo:train",
    "kernels:",  # the whole module: training runs through moelab's experts kernel
    "zoo:_optimizer", "zoo:_fit",
    "data:DATA_VERSION", "data:DOMAINS", "data:SPLITS", "data:SPLIT_SHARES", "data:MATH_PROBLEMS",
    "data:_MATH_SEEDS", "data:_ARITH", "data:_ARITH_SHARE", "data:_WIKI_FILE", "data:_CODE_SKIP",
    "data:split_of", "data:_clean_wiki", "data:_general_documents", "data:_format_problem", "data:math_problems",
    "data:_math_problems", "data:_math_documents", "data:_code_files", "data:_code_documents",
    "data:_all_documents", "data:documents", "data:texts", "data:parse_mix", "data:pack_tokens",
    "evaluate:_encode", "evaluate:Score", "evaluate:Task", "evaluate:PerplexityTask", "evaluate:perplexity_task",
    "evaluate:evaluate",
)


# What an upcycled recipe's bytes depend on besides: the whole module that makes its experts from the
# dense model (kept out of the other recipes' keys, which it cannot change).
_UPCYCLE_CODE = ("upcycle:",)


@functools.lru_cache(maxsize=None)
def build_fingerprint(upcycled: bool = False) -> str:
    """A hash of the source of everything in ``_BUILD_CODE`` (and ``_UPCYCLE_CODE`` for an upcycled
    recipe) and of the libraries that train the model."""
    import importlib
    import inspect

    import tokenizers
    import transformers

    h = hashlib.sha256()
    for ref in _BUILD_CODE + (_UPCYCLE_CODE if upcycled else ()):
        module_name, _, attr = ref.partition(":")
        module = importlib.import_module(f"moelab.{module_name}")
        obj = getattr(module, attr) if attr else module
        try:
            text = inspect.getsource(obj)
        except TypeError:  # a constant
            text = repr(obj)
        h.update(ref.encode() + b"\0" + text.encode() + b"\0")
    for lib in (torch, transformers, tokenizers):
        h.update(f"{lib.__name__}={lib.__version__}".encode())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------- training
def _token_stream(tokenizer, domain: str, split: str, limit: int | None = None, seed: int | None = None) -> np.ndarray:
    """Token ids of a domain's split, documents separated by EOS, at most ``limit`` tokens.

    With ``seed`` the documents are shuffled first, so a token budget smaller than the split
    samples all of it (files in path order would give only the first packages of the stdlib,
    problems in generator order only one generator).
    """
    ids: list[int] = []
    docs = data.texts(domain, split)
    if seed is not None:
        docs = [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]
    for start in range(0, len(docs), 256):
        for row in tokenizer(docs[start:start + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(row)
            ids.append(tokenizer.eos_token_id)
        if limit is not None and len(ids) >= limit:
            break
    return np.asarray(ids[:limit] if limit else ids, dtype=np.int32)


class _Batches:
    """Deterministic batches: each row is a random window of one domain's token stream, domain
    drawn by the mix, so every batch mixes domains (the router sees all of them at every step)."""

    def __init__(self, streams: dict[str, np.ndarray], mix: dict[str, float], seq_len: int, batch: int, seed: int):
        self.streams, self.seq_len, self.batch = streams, seq_len, batch
        self.domains = [d for d in data.DOMAINS if mix[d] > 0]
        self.p = np.array([mix[d] for d in self.domains])
        self.p /= self.p.sum()
        self.rng = np.random.default_rng(seed)

    def __next__(self) -> torch.Tensor:
        rows = []
        for d in self.rng.choice(len(self.domains), size=self.batch, p=self.p):
            s = self.streams[self.domains[d]]
            i = self.rng.integers(0, len(s) - self.seq_len - 1)
            rows.append(s[i:i + self.seq_len])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def _eval_tasks(recipe: Recipe) -> list:
    """The held-out perplexity tasks of a build: every domain's eval split, up to ``eval_tokens``."""
    from . import evaluate

    # seed 0 whatever the recipe's seed: builds of other seeds are scored on the same held-out rows
    return [evaluate.perplexity_task(d, tokens=None, seq_len=recipe.seq_len, seed=0) for d in data.DOMAINS]


def _preflight(recipe: Recipe, tokenizer, out_dir: Path, streams: dict, tasks: list) -> dict[str, int]:
    """Check, before training, that every step after training has what it needs; fail in seconds.

    The tokenizer reloads from ``out_dir`` with the same ids; every training stream holds more than one
    window; every domain's eval split packs into at least two rows (a standard error needs two); the
    config serialises. Caps each eval task at ``recipe.eval_tokens`` and returns the tokens each
    domain will be scored on.

    Raises:
        ValueError: naming the domain or file that is missing and what to change in the recipe.
    """
    from transformers import AutoTokenizer

    probe = "def f(x):\n    return x + 1  # Question: 12 + 30 = 42"
    again = AutoTokenizer.from_pretrained(out_dir)
    if again(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        raise ValueError(f"the tokenizer saved in {out_dir} does not reload to the same ids; check tokenizer.json")
    for d, stream in streams.items():
        if len(stream) <= recipe.seq_len + 1:
            raise ValueError(f"the train split of {d!r} holds {len(stream)} tokens, not enough for one window of "
                             f"seq_len={recipe.seq_len}; lower seq_len or give {d!r} no share of the training mix")
    eval_tokens = {}
    for task in tasks:
        try:
            rows = task.rows(tokenizer)
        except ValueError as exc:
            raise ValueError(f"cannot evaluate the build on {task.domain!r}: {exc}") from None
        keep = max(2, min(len(rows), recipe.eval_tokens // recipe.seq_len))
        task.tokens = keep * recipe.seq_len
        task._packed_cache = None  # repack at the capped size (the same first rows)
        eval_tokens[task.domain] = task.scored_tokens(tokenizer)
    build_config(recipe, tokenizer).to_json_string()
    return eval_tokens


def _optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW, no weight decay on norms and biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95),
                             fused=True)


def _fit(model, batches: "_Batches", recipe: Recipe, steps: int, phase: str, progress: bool) -> list[dict]:
    """Train ``model`` for ``steps`` on ``batches`` with a fresh optimizer: linear warmup over
    ``recipe.warmup`` steps, cosine decay to 10% of ``recipe.lr``, gradients clipped at 1, the router
    loss at ``recipe.router_aux_loss_coef``. Returns the training curve (one row per step)."""
    from tqdm.auto import tqdm

    opt = _optimizer(model, recipe)

    def lr_at(step):
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    curve = []
    model.train()
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"training embedded {phase}", disable=not progress, mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = next(batches)
        out = model(input_ids=x, labels=x, output_router_logits=recipe.router_aux_loss_coef > 0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        aux = float(out.aux_loss.detach()) if getattr(out, "aux_loss", None) is not None else 0.0
        lm = float(out.loss.detach()) - recipe.router_aux_loss_coef * aux
        curve.append({"step": step, "phase": phase, "lm_loss": lm, "aux_loss": aux, "lr": lr_at(step),
                      "seconds": time.time() - t0})
        if step % 10 == 0:
            bar.set_postfix(loss=f"{lm:.3f}", tok_s=f"{(step + 1) * x.numel() / (time.time() - t0):.0f}")
    model.eval()
    return curve


def _domain_metrics(table, eval_tokens: dict) -> dict:
    out = {}
    for d in data.DOMAINS:
        rows = table[table.domain == d]
        out[d] = {r.metric: r.value for r in rows.itertuples()}
        out[d].update({f"{r.metric}_stderr": r.stderr for r in rows.itertuples()})
        out[d]["tokens"] = eval_tokens[d]
    return out


def train(recipe: Recipe, out_dir: Path, progress: bool = True) -> Path:
    """Build the recipe's tokenizer and model into ``out_dir`` (which must not exist yet).

    Steps: tokenizer, training streams, a preflight of everything needed after training
    (``_preflight``), training, held-out evaluation on each domain's eval split (up to
    ``recipe.eval_tokens`` tokens; ``build_metrics.json`` says how many), save. An upcycled recipe
    (``dense_steps > 0``) trains its dense model first, scores it, upcycles it (``moelab.upcycle``) and
    trains the MoE for the remaining steps on the same stream of batches.
    """
    import platform

    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM

    from . import evaluate

    if not 0 <= recipe.dense_steps < recipe.steps:
        raise ValueError(f"dense_steps={recipe.dense_steps} must lie in [0, steps={recipe.steps}): the MoE needs steps too")
    t0 = time.time()
    torch.set_num_threads(recipe.threads)  # the caller (build) restores its own count
    seed_everything(recipe.seed)
    out_dir.mkdir(parents=True)
    tokenizer = train_tokenizer(recipe, out_dir)
    t_tok = time.time() - t0
    config = build_config(recipe, tokenizer)
    mix = data.parse_mix(recipe.mix)
    need = recipe.steps * recipe.batch_size * recipe.seq_len
    streams = {d: _token_stream(tokenizer, d, "train", limit=int(need * mix[d] * 1.5) + 4 * recipe.seq_len,
                                seed=recipe.seed)
               for d in data.DOMAINS if mix[d] > 0}
    tasks = _eval_tasks(recipe)
    eval_tokens = _preflight(recipe, tokenizer, out_dir, streams, tasks)
    register()
    config._experts_implementation = KERNEL_NAME
    batches = _Batches(streams, mix, recipe.seq_len, recipe.batch_size, recipe.seed)
    curve, extra = [], {}
    t_train = time.time()
    if recipe.dense_steps:
        from . import upcycle

        dense_config = build_config(upcycle.dense_recipe(recipe), tokenizer)
        dense_config._experts_implementation = KERNEL_NAME
        seed_everything(recipe.seed)
        dense = AutoModelForCausalLM.from_config(dense_config)
        dense.set_experts_implementation(KERNEL_NAME)
        curve += _fit(dense, batches, recipe, recipe.dense_steps, "dense", progress)
        extra["dense_eval"] = _domain_metrics(evaluate.evaluate(dense, tokenizer, tasks, progress=False), eval_tokens)
        extra["dense_parameters"] = sum(p.numel() for p in dense.parameters())
    seed_everything(recipe.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.set_experts_implementation(KERNEL_NAME)
    if recipe.dense_steps:
        extra["upcycle"] = upcycle.upcycle_into(model, dense, seed=recipe.seed)
        del dense
    curve += _fit(model, batches, recipe, recipe.steps - recipe.dense_steps, "moe", progress)
    train_seconds = time.time() - t_train
    metrics = {"recipe": asdict(recipe), "recipe_key": recipe.key(),
               "parameters": sum(p.numel() for p in model.parameters()),
               "tokens_trained": recipe.steps * recipe.batch_size * recipe.seq_len,
               "train_seconds": train_seconds, "tokenizer_seconds": t_tok,
               "tokens_per_second": recipe.steps * recipe.batch_size * recipe.seq_len / train_seconds,
               "torch_threads": torch.get_num_threads(),
               "code_fingerprint": build_fingerprint(upcycled=recipe.dense_steps > 0),
               # what decides the bytes beyond the code: the text's sources and the training libraries
               "corpus": _corpus_identity(os.environ.get(data.SNAPSHOT_ENV)),
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
               "eval_tokens": eval_tokens, **extra}
    # Held-out metrics with the same task the notebooks use (moelab.evaluate), so the figures agree.
    metrics["eval"] = _domain_metrics(evaluate.evaluate(model, tokenizer, tasks, progress=False), eval_tokens)
    metrics["build_seconds"] = time.time() - t0
    model.config._experts_implementation = None  # a saved checkpoint must not need moelab to load
    model.save_pretrained(out_dir)
    (out_dir / "training_curve.json").write_text(json.dumps(curve))
    (out_dir / "build_metrics.json").write_text(json.dumps(metrics, indent=1))
    return out_dir


_SEED_MARK = "@seed"


def parse_name(name: str, seed: int | None = None) -> tuple[str, Recipe]:
    """A zoo name, optionally ``<recipe>@seed<N>``, and an optional seed, as (name, recipe).

    The name comes back in its canonical form: ``<recipe>`` at the recipe's own seed, else
    ``<recipe>@seed<N>``; so ``"smoke@seed0"``, ``("smoke", seed=0)`` and ``"smoke"`` are one model.

    Raises:
        KeyError: no recipe of that name (the known ones are listed).
        ValueError: a seed that is no integer >= 0, or two different seeds (the name's and ``seed``).
    """
    base, mark, tail = str(name).partition(_SEED_MARK)
    if base not in RECIPES:
        raise KeyError(f"no zoo model named {base!r}; known: {sorted(RECIPES)} (any of them at another seed: "
                       f"'<name>@seed1' or seed=1)")
    if mark:
        if not tail.isdigit():
            raise ValueError(f"zoo name {name!r}: the seed after '@seed' must be a whole number >= 0, e.g. "
                             f"'{base}@seed1'")
        if seed is not None and int(seed) != int(tail):
            raise ValueError(f"zoo name {name!r} names seed {int(tail)} but seed={seed} was given; give one of them")
        seed = int(tail)
    recipe = RECIPES[base]
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r}: a zoo model's seed is a whole number >= 0")
        recipe = replace(recipe, seed=int(seed))
    canonical = base if recipe.seed == RECIPES[base].seed else f"{base}{_SEED_MARK}{recipe.seed}"
    return canonical, recipe


def is_zoo_name(name) -> bool:
    """Whether ``name`` names a zoo model (a recipe, at its own seed or ``@seed<N>``)."""
    base, mark, tail = str(name).partition(_SEED_MARK)
    return base in RECIPES and (not mark or tail.isdigit())


def path_of(name: str, seed: int | None = None) -> Path:
    """Cache directory of a zoo model (built or not): named by its recipe and seed, and the recipe's key."""
    name, recipe = parse_name(name, seed)
    return data.cache_dir() / "zoo" / f"{name}-{recipe.key()}"


def build(name: str = DEFAULT_MODEL, progress: bool = True, force: bool = False, seed: int | None = None) -> Path:
    """Build a zoo model on first use and return its directory (cached; ``force`` rebuilds).

    ``seed`` (or a name ``"<recipe>@seed<N>"``) builds the recipe for another seed: another
    initialisation, training order and shuffle of the training text; the held-out set is the same.
    Builds into a temporary directory and renames it into place, so an interrupted build never
    leaves a half checkpoint behind.
    """
    name, recipe = parse_name(name, seed)
    final = path_of(name)
    if final.exists() and not force and not _damaged(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder per recipe: a second process (another notebook) waits for the first, then reuses it.
    from filelock import FileLock

    with FileLock(str(final.with_name(final.name + ".lock"))):  # portable (Windows and macOS too)
        for stale in final.parent.glob(final.name + ".building-*"):  # a killed build's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists() and not force:
            why = _damaged(final)
            if not why:
                return final
            import warnings

            warnings.warn(f"the cached zoo model {final} is damaged ({why}); rebuilding it")
        return _build_locked(recipe, final, progress)


_ENTRY_FILES = ("config.json", "tokenizer.json", "build_metrics.json")


def _damaged(entry: Path) -> str | None:
    """Why a cached zoo entry cannot be used (a file missing, a weights file damaged), or None."""
    from .models import check_weight_files

    missing = [f for f in _ENTRY_FILES if not (entry / f).is_file()]
    if missing:
        return f"{missing} missing"
    if not list(entry.glob("*.safetensors")):
        return "no weights file"
    try:
        check_weight_files(entry)
        json.loads((entry / "config.json").read_text())
    except ValueError as exc:
        return str(exc)
    return None


def _build_locked(recipe: Recipe, final: Path, progress: bool) -> Path:
    tmp = final.with_name(final.name + f".building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    torch_threads = torch.get_num_threads()
    try:
        train(recipe, tmp, progress=progress)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        torch.set_num_threads(torch_threads)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(name_or_path: str, seed: int | None = None) -> str:
    """A zoo name becomes its (built) cache directory; local checkpoints and hub ids pass through.

    ``seed`` applies to zoo names only (see ``build``); with a checkpoint it is an error.

    Raises:
        FileNotFoundError: a path (absolute, relative with ./ ../ or ~, or with more than one "/")
            where nothing exists, or a bare name that is neither a zoo model nor a folder (hub ids
            read "org/name"), named with what to give instead, before any hub look-up.
    """
    name_or_path = str(name_or_path)
    if is_zoo_name(name_or_path):
        return str(build(name_or_path, seed=seed))
    if _SEED_MARK in name_or_path and name_or_path.partition(_SEED_MARK)[0] in RECIPES:
        parse_name(name_or_path)  # raises with what is wrong with the seed
    if seed is not None:
        raise ValueError(f"seed={seed} builds a zoo model at another seed; {name_or_path!r} is no zoo name "
                         f"({', '.join(sorted(RECIPES))}), so there is nothing to build: drop seed")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no config.json: it is not a Hugging Face checkpoint folder")
        return str(path)
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"no checkpoint at {name_or_path}: the folder does not exist")
    if "/" not in name_or_path:
        raise FileNotFoundError(f"{name_or_path!r} is no zoo model ({', '.join(sorted(RECIPES))}), no local folder, "
                                "and no hub id (those read 'org/name', e.g. 'Qwen/Qwen3-30B-A3B')")
    return name_or_path


def load(name_or_path: str = DEFAULT_MODEL, *, seed: int | None = None, device_map=None, dtype=None,
         fast_kernel: bool = False, **kwargs):
    """Load a model and its tokenizer by zoo name, local path or hub id.

    Args:
        name_or_path: a zoo name (built on first use; ``"<recipe>@seed<N>"`` for another seed), a local
            checkpoint, or a hub id.
        seed: a zoo recipe's seed (``load("qwen3-moe-15m", seed=1)``); None keeps the recipe's own.
        device_map, dtype: handed to ``from_pretrained`` through ``models.load_model``
            (``device_map="auto"`` spreads a large model over GPUs, CPU memory and disk; None puts
            the model on the GPU when there is one, else on the CPU; ``dtype=None`` keeps the
            checkpoint's own dtype, e.g. bf16 for hub checkpoints);
            other keyword arguments (``max_memory``, ``offload_folder`` ...) go the same way.
        fast_kernel: use moelab's sorted experts kernel on a CPU for every forward (outputs are
            the same as transformers' eager kernel). Off by default: transformers' own default
            (``grouped_mm``) measured as fast in a forward and faster in training on a CPU, at the
            embedded model's shape and at Qwen3-30B-A3B's (benchmarks/results/methods.json); moelab's
            kernel is switched on by ``observe`` alone, where it records expert outputs.

    Returns:
        (model in eval mode, tokenizer)
    """
    from transformers import AutoTokenizer

    from .models import load_model

    path = resolve(name_or_path, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device_map is None and torch.cuda.is_available():
        # A GPU is at hand: use it (the whole model on one device; "auto" spreads a larger one).
        device_map = "cuda"
    model = load_model(path, device_map=device_map, dtype=dtype, **kwargs)
    from .models import input_device

    # calibration sets record their tokenizer; observe compares it with this one
    model.moelab_tokenizer_key = data.tokenizer_key(tokenizer)

    # observation switches to moelab's kernel on its own, wherever the model is
    if fast_kernel and model._can_set_experts_implementation() and input_device(model).type == "cpu":
        register()
        model.set_experts_implementation(KERNEL_NAME)
    return model, tokenizer


def build_metrics(name_or_path: str) -> dict:
    """The training metrics stored beside a zoo checkpoint."""
    return json.loads((Path(resolve(name_or_path)) / "build_metrics.json").read_text())


def training_curve(name_or_path: str) -> list | None:
    """The training curve stored beside a zoo checkpoint (None for models moelab did not train)."""
    path = Path(resolve(name_or_path)) / "training_curve.json"
    return json.loads(path.read_text()) if path.exists() else None


def model_card(model) -> dict:
    """Key facts of a loaded MoE model: family, layers, experts, top-k, widths, parameter count."""
    from . import models

    layers = models.moe_layers(model)
    first = layers[0]
    return {"family": model.config.model_type, "class": type(model).__name__,
            "decoder layers": model.config.num_hidden_layers, "MoE layers": len(layers),
            "experts per layer": first.num_experts, "top-k": first.top_k, "hidden size": first.hidden_size,
            "expert width": first.intermediate_size, "routing": first.routing,
            "parameters (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
