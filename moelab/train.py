"""Recovery training of a compressed model: language modelling, knowledge distillation, or a mix.

SlimQwen (arXiv 2605.08738) recovers a pruned student with lambda * KD + (1 - lambda) * LM and
compares it with the same architecture trained from random init with KD; MC-SMoE (section 4)
fine-tunes its merged and compressed models with CE + 0.2 * KL at temperature 2. Both are
``recover(student, tokenizer, teacher=..., lm_weight=..., kd_weight=...)``:

    loss = lm_weight * CE(student) + kd_weight * [T^2] * KL(softmax(teacher / T) || softmax(student / T))

averaged over every predicted token; the T^2 factor is on by default (``kd_t2``) and off in MC-SMoE's
reference form. Batches are random windows of the train split of
``moelab.data`` drawn by the mix, the same way the embedded model was trained (``zoo``), from a
stream seeded by ``seed``; so the same seed gives the same student.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from . import data, models, recipe, zoo

__all__ = ["recover", "recover_new", "TRAINABLE", "kd_loss", "reinitialised", "heldout_rows", "heldout_nll"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
            t2: bool = True) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) at temperature T, averaged over tokens (Hinton et al., 2015).

    The T^2 factor keeps the gradient scale comparable across temperatures. ``t2=False`` leaves it out,
    as MC-SMoE's reference code does (KL with batchmean reduction, times the KD weight only).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}; they must share the tokenizer and vocabulary")
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, V).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, V).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (temperature ** 2 if t2 else 1.0)


def reinitialised(model, seed: int = 0):
    """The same architecture as ``model`` (its config, experts kernel included) with fresh random weights.

    SlimQwen's "random init + KD" baseline: the compressed shape without the compressed weights.
    """
    from transformers import AutoModelForCausalLM

    zoo.seed_everything(seed)
    fresh = AutoModelForCausalLM.from_config(model.config)
    kernel = getattr(model.config, "_experts_implementation", None)
    if kernel and hasattr(fresh, "set_experts_implementation"):
        fresh.set_experts_implementation(kernel)
    ref = next(model.parameters())
    recipe.inherit(fresh, model)
    recipe.note(fresh, "reinitialised", seed=seed)
    return fresh.to(device=ref.device, dtype=ref.dtype)  # the same device and dtype as the model it twins


def heldout_rows(tokenizer, tokens: int = 8192, seq_len: int = 256, mix="1:1:1", seed: int = 0) -> torch.Tensor:
    """Fixed held-out rows (eval split, the given mix) for a validation-loss curve: LongTensor [n, seq_len]."""
    ds = data.calibration_set(tokenizer, mix, tokens=tokens, seq_len=seq_len, split="eval", seed=seed)
    return torch.tensor(ds["input_ids"], dtype=torch.long)


@torch.no_grad()
def heldout_nll(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) of ``model`` on ``rows``."""
    was = model.training
    model.eval()
    device = models.input_device(model)
    total, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = rows[i:i + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        n += x[:, 1:].numel()
    model.train(was)
    return total / n


_STREAMS: dict = {}


def _stream(tokenizer, domain: str, limit: int, seed: int):
    """Train-split token stream of a domain, kept for later runs (notebooks run many short recoveries)."""
    key = (id(tokenizer), domain, seed)
    hit = _STREAMS.get(key)
    if hit is None or hit[0] is not tokenizer or len(hit[1]) < limit:
        if len(_STREAMS) > 16:
            _STREAMS.clear()
        _STREAMS[key] = (tokenizer, zoo._token_stream(tokenizer, domain, "train", limit=limit, seed=seed))
    return _STREAMS[key][1][:limit]


TRAINABLE = ("all", "lora", "router_norms")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _modules_with(model, tensor_ids: set) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(module, attribute, parameter) for every parameter of ``model`` whose id is in ``tensor_ids``."""
    out = []
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and id(p) in tensor_ids:
                out.append((mod, name, p))
    return out


def _unshare(student, others, params: list[torch.Tensor]) -> int:
    """Give ``student`` its own copy of each of ``params`` that shares storage with a model in ``others``.

    A student built by ``models.variant`` shares every tensor it did not edit with the original; the
    ones recovery will write (trained parameters, or base weights a LoRA adapter is merged into) are
    copied first, so the teacher never changes. Frozen tensors stay shared. Returns the bytes copied.
    """
    ptrs = {t.untyped_storage().data_ptr() for m in others if m is not None
            for t in list(m.parameters()) + list(m.buffers()) if t.device.type != "meta"}
    if not ptrs:
        return 0
    shared = {id(p) for p in params if p.device.type != "meta" and p.untyped_storage().data_ptr() in ptrs}
    copies: dict[int, torch.nn.Parameter] = {}  # one copy per tensor, so tied weights stay tied
    for mod, name, p in _modules_with(student, shared):
        if id(p) not in copies:
            copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        mod._parameters[name] = copies[id(p)]
    return sum(p.numel() * p.element_size() for p in copies.values())


def _router_norm_params(student) -> list[torch.Tensor]:
    """The routers' parameters and every normalisation weight (SlimQwen-style cheap recovery)."""
    keep = {id(p) for layer in models.moe_layers(student) for p in layer.router.parameters()}
    keep |= {id(p) for n, p in student.named_parameters() if "norm" in n.lower()}
    return [p for p in student.parameters() if id(p) in keep]


def _lora_targets(student) -> tuple[list[str], list[str]]:
    """LoRA targets: every nn.Linear but the output head, and the fused expert tensors where they are 3-D.

    Returns (target_modules, target_parameters) for ``peft.LoraConfig``. The fused experts of
    transformers 5 families are parameters, not Linear modules; peft adapts them through
    ``target_parameters`` (one low-rank update per expert).
    """
    head = student.get_output_embeddings()
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in student.named_modules()
                     if isinstance(m, torch.nn.Linear) and m is not head})
    fused = set()
    for layer in models.moe_layers(student):
        mod = layer.experts_module()
        for attr in (layer.spec.gate_up, layer.spec.down):
            t = getattr(mod, attr, None)
            if isinstance(t, torch.nn.Parameter) and t.dim() == 3:
                fused.add(f"{layer.spec.experts_attr}.{attr}")
    return linear, sorted(fused)


def _checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class _Float32Master:
    """AdamW on float32 master copies of low-precision (bf16 / fp16) parameters.

    torch's AdamW keeps its moments in the parameter's dtype; on bf16 weights small updates round
    away. Each low-precision parameter gets a float32 master that the optimizer steps; the gradient is
    copied up after backward and the master copied down after the step. float32 parameters are their
    own master (no copy).
    """

    def __init__(self, params: list[torch.Tensor]):
        self.pairs = [(p, torch.nn.Parameter(p.detach().float()) if p.dtype in _LOW_PRECISION else p) for p in params]
        self.master = {id(p): m for p, m in self.pairs}

    def of(self, p):
        return self.master[id(p)]

    def grads_up(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def weights_down(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                p.copy_(m)


def recover(student, tokenizer, *, teacher=None, steps: int = 100, batch_size: int = 8, seq_len: int = 256,
            lr: float = 1e-3, lm_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 2.0,
            kd_t2: bool = True, mix="1:1:1", seed: int = 0, warmup: int = 10, weight_decay: float = 0.1,
            eval_rows: torch.Tensor | None = None, eval_every: int = 0, progress: bool = False,
            trainable: str = "all", lora_rank: int = 16, lora_alpha: float | None = None,
            gradient_checkpointing: bool = False, protect=(), lora_experts: bool = True) -> list[dict]:
    """Train ``student`` in place on lm_weight * LM + kd_weight * KD (module docstring).

    Args:
        student: the model to train (left in eval mode afterwards). It may be a ``models.variant`` of
            the teacher: every tensor recovery writes is copied first when the teacher uses it too, so
            the teacher never changes and frozen tensors stay shared.
        tokenizer: its tokenizer (the teacher must share it).
        teacher: the uncompressed model, needed when ``kd_weight > 0`` (never updated).
        steps, batch_size, seq_len: the token budget, steps * batch_size * seq_len.
        lr: peak learning rate of AdamW (betas 0.9, 0.95); linear warmup over ``warmup`` steps, then
            cosine decay to 10%.
        lm_weight, kd_weight: the loss mix; SlimQwen's lambda is ``kd_weight=lam, lm_weight=1 - lam``,
            MC-SMoE's reference is ``lm_weight=1, kd_weight=0.2``.
        temperature: distillation temperature T.
        kd_t2: multiply the KL term by T^2 (Hinton et al.; the default, used for SlimQwen); MC-SMoE's
            reference leaves the factor out (``kd_t2=False``).
        mix: the general:math:code mix of the training batches.
        seed: seeds torch and the batch stream.
        eval_rows: optional held-out rows (``heldout_rows``) scored every ``eval_every`` steps and at
            the end, as ``heldout_nll`` in the curve.
        progress: show a tqdm bar.
        trainable: what is trained. ``"all"`` (full fine-tuning, the embedded default); ``"lora"``:
            LoRA adapters (peft) of rank ``lora_rank`` on every Linear but the output head and on the
            fused expert tensors, merged into the weights at the end (the student keeps its
            architecture and size); ``"router_norms"``: the routers and the normalisation weights only.
            The last two fit a 30B student beside its teacher on one GPU.
        lora_rank, lora_alpha: LoRA rank and scale (alpha defaults to 2 * rank).
        lora_experts: also adapt the fused expert tensors (peft's ``target_parameters``); False adapts
            the Linear layers only (attention, shared experts), which costs less memory
            (benchmarks/results/memory.json).
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass
            (transformers' gradient checkpointing) instead of keeping them.
        protect: other models whose tensors recovery must not write (the teacher always is): a student
            that is ``models.variant(m)`` of some compressed ``m`` is trained without changing ``m``.

    Bf16 or fp16 weights are stepped through float32 master copies (``_Float32Master``), so the
    optimizer state is float32 whatever the weights' dtype. No gradient is kept after training.

    Returns:
        The curve: one dict per step with step, loss, lm_loss, kd_loss (NaN when unused), lr, seconds,
        and heldout_nll on evaluated steps (step -1 is the start).
    """
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and seq_len >= 2; got {steps}, {batch_size}, {seq_len}")
    if lm_weight < 0 or kd_weight < 0 or lm_weight + kd_weight == 0:
        raise ValueError(f"lm_weight and kd_weight must be >= 0 and not both 0; got {lm_weight}, {kd_weight}")
    if kd_weight > 0 and teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher model (the uncompressed original)")
    if teacher is not None and teacher is student:
        raise ValueError("the teacher must be a different model object from the student")
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r}: choose one of {', '.join(TRAINABLE)}")
    if trainable == "lora" and lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1; got {lora_rank}")
    zoo.seed_everything(seed)
    mixd = data.parse_mix(mix)
    need = steps * batch_size * seq_len
    streams = {d: _stream(tokenizer, d, int(need * mixd[d] * 1.5) + 4 * seq_len, seed)
               for d in data.DOMAINS if mixd[d] > 0}
    batches = zoo._Batches(streams, mixd, seq_len, batch_size, seed)
    device = models.input_device(student)

    requires = {n: p.requires_grad for n, p in student.named_parameters()}
    peft_model = None
    if trainable == "lora":
        from peft import LoraConfig, get_peft_model

        linear, fused = _lora_targets(student)
        fused = fused if lora_experts else []
        targeted = {id(p) for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)
                    and n.rsplit(".", 1)[-1] in linear for p in m.parameters(recurse=False)}
        targeted |= {id(p) for n, p in student.named_parameters() if any(n.endswith(f) for f in fused)}
        _unshare(student, [teacher, *protect], [p for p in student.parameters() if id(p) in targeted])
        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, lora_dropout=0.0, bias="none",
                         target_modules=linear or None, target_parameters=fused or None)
        peft_model = get_peft_model(student, cfg)  # adapters in float32 (peft casts them up)
        named = list(peft_model.named_parameters())
    else:
        pick = (lambda: list(student.parameters())) if trainable == "all" else (lambda: _router_norm_params(student))
        _unshare(student, [teacher, *protect], pick())
        chosen = {id(p) for p in pick()}  # after _unshare: the student's own copies
        for n, p in student.named_parameters():
            p.requires_grad_(requires.get(n, True) and id(p) in chosen)
        named = list(student.named_parameters())
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError(f"trainable={trainable!r} leaves no parameter of this model to train")
    master = _Float32Master([p for _, p in named])
    decay_ids = {id(p) for n, p in named if p.ndim >= 2 and "norm" not in n}
    opt = torch.optim.AdamW([{"params": [master.of(p) for _, p in named if id(p) in decay_ids], "weight_decay": weight_decay},
                             {"params": [master.of(p) for _, p in named if id(p) not in decay_ids], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    opt_params = [m for _, m in master.pairs]
    net = peft_model if peft_model is not None else student
    checkpointing_was = _checkpointing(student)
    if gradient_checkpointing and not checkpointing_was:
        # transformers >= 5.20 names it activation checkpointing; older 5.x gradient checkpointing
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    curve: list[dict] = []
    if eval_rows is not None:
        curve.append({"step": -1, "heldout_nll": heldout_nll(net, eval_rows), "seconds": 0.0})
    if teacher is not None:
        teacher.eval()
    net.train()
    t0 = time.time()
    try:
        for step in tqdm(range(steps), desc="recovery", disable=not progress, mininterval=2):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            x = next(batches).to(device)
            logits = net(input_ids=x).logits[:, :-1]
            V = logits.shape[-1]
            lm = F.cross_entropy(logits.reshape(-1, V).float(), x[:, 1:].reshape(-1))
            loss = lm_weight * lm
            kd = torch.tensor(float("nan"))
            if kd_weight > 0:
                with torch.no_grad():
                    t_logits = teacher(input_ids=x.to(models.input_device(teacher))).logits[:, :-1].to(logits.device)
                kd = kd_loss(logits, t_logits, temperature, t2=kd_t2)
                loss = loss + kd_weight * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            master.grads_up()
            torch.nn.utils.clip_grad_norm_(opt_params, 1.0)
            opt.step()
            master.weights_down()
            rec = {"step": step, "loss": float(loss.detach()), "lm_loss": float(lm.detach()), "kd_loss": float(kd.detach()), "lr": lr_at(step),
                   "seconds": time.time() - t0}
            if eval_rows is not None and ((eval_every and (step + 1) % eval_every == 0) or step == steps - 1):
                rec["heldout_nll"] = heldout_nll(net, eval_rows)
            curve.append(rec)
    finally:
        opt.zero_grad(set_to_none=True)
        for p in student.parameters():
            p.grad = None  # nothing keeps gradients after training
        del opt, master
        if peft_model is not None:
            peft_model.merge_and_unload()  # the adapters go into the (unshared) base weights, in place
            for name in ("peft_config", "_hf_peft_config_loaded"):
                if name in vars(student):
                    delattr(student, name)
        for n, p in student.named_parameters():
            p.requires_grad_(requires.get(n, True))
        if gradient_checkpointing and not checkpointing_was:
            (getattr(student, "activation_checkpointing_disable", None) or student.gradient_checkpointing_disable)()
        student.eval()
    recipe.note(student, "trained", steps=steps, seed=seed, lm_weight=lm_weight, kd_weight=kd_weight, mix=str(mix),
                trainable=trainable)
    return curve


def recover_new(build, tokenizer, *, teacher=None, from_scratch: bool = False, seed: int = 0, **kwargs):
    """Build a student, recover it, return ``(student, curve)``: one student alive per run.

    ``build()`` returns a fresh compressed model (a ``models.variant`` of the teacher, or of a model in
    ``protect``, is fine: recovery copies the tensors it writes). ``from_scratch=True`` trains the same architecture from random
    init seeded by ``seed`` (``reinitialised``; SlimQwen's "random init + KD" baseline) and drops the
    built weights first. The same ``build``, seed and settings give the same student again, so a
    notebook can rebuild the one it saves instead of keeping every recovered model.
    """
    student = build()
    if from_scratch:
        fresh = reinitialised(student, seed=seed)
        del student
        student = fresh
    curve = recover(student, tokenizer, teacher=teacher, seed=seed, **kwargs)
    return student, curve
