"""Recovery training of a compressed model: language modelling, knowledge distillation, or a mix.

SlimQwen (METHODS.md section 1) recovers a pruned student with lambda * KD + (1 - lambda) * LM and
compares it with the same architecture trained from random init with KD; MC-SMoE (section 4)
fine-tunes its merged and compressed models with CE + 0.2 * KL at temperature 2. Both are
``recover(student, tokenizer, teacher=..., lm_weight=..., kd_weight=...)``:

    loss = lm_weight * CE(student) + kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over every predicted token. Batches are random windows of the train split of
``moelab.data`` drawn by the mix, the same way the embedded model was trained (``zoo``), from a
stream seeded by ``seed``; so the same seed gives the same student.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from . import data, models, zoo

__all__ = ["recover", "kd_loss", "reinitialised", "heldout_rows", "heldout_nll"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) at temperature T, averaged over tokens (Hinton et al., 2015).

    The T^2 factor keeps the gradient scale comparable across temperatures.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}; they must share the tokenizer and vocabulary")
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, V).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, V).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


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


def recover(student, tokenizer, *, teacher=None, steps: int = 100, batch_size: int = 8, seq_len: int = 256,
            lr: float = 1e-3, lm_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 2.0,
            mix="1:1:1", seed: int = 0, warmup: int = 10, weight_decay: float = 0.1,
            eval_rows: torch.Tensor | None = None, eval_every: int = 0, progress: bool = False) -> list[dict]:
    """Train ``student`` in place on lm_weight * LM + kd_weight * KD (module docstring).

    Args:
        student: the model to train (left in eval mode afterwards).
        tokenizer: its tokenizer (the teacher must share it).
        teacher: the uncompressed model, needed when ``kd_weight > 0`` (never updated).
        steps, batch_size, seq_len: the token budget, steps * batch_size * seq_len.
        lr: peak learning rate of AdamW (betas 0.9, 0.95); linear warmup over ``warmup`` steps, then
            cosine decay to 10%.
        lm_weight, kd_weight: the loss mix; SlimQwen's lambda is ``kd_weight=lam, lm_weight=1 - lam``,
            MC-SMoE's reference is ``lm_weight=1, kd_weight=0.2``.
        temperature: distillation temperature T.
        mix: the general:math:code mix of the training batches.
        seed: seeds torch and the batch stream.
        eval_rows: optional held-out rows (``heldout_rows``) scored every ``eval_every`` steps and at
            the end, as ``heldout_nll`` in the curve.
        progress: show a tqdm bar.

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
    if teacher is not None and models.shared_bytes(teacher, student):
        raise ValueError("the student shares tensors with the teacher (a models.variant): training it would change "
                         "the teacher too; train copy.deepcopy(student) instead")
    zoo.seed_everything(seed)
    mixd = data.parse_mix(mix)
    need = steps * batch_size * seq_len
    streams = {d: _stream(tokenizer, d, int(need * mixd[d] * 1.5) + 4 * seq_len, seed)
               for d in data.DOMAINS if mixd[d] > 0}
    batches = zoo._Batches(streams, mixd, seq_len, batch_size, seed)
    device = models.input_device(student)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim >= 2 and "norm" not in n]
    ids = {id(p) for p in decay}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    curve: list[dict] = []
    if eval_rows is not None:
        curve.append({"step": -1, "heldout_nll": heldout_nll(student, eval_rows), "seconds": 0.0})
    if teacher is not None:
        teacher.eval()
    student.train()
    t0 = time.time()
    try:
        for step in tqdm(range(steps), desc="recovery", disable=not progress, mininterval=2):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            x = next(batches).to(device)
            logits = student(input_ids=x).logits[:, :-1]
            V = logits.shape[-1]
            lm = F.cross_entropy(logits.reshape(-1, V).float(), x[:, 1:].reshape(-1))
            loss = lm_weight * lm
            kd = torch.tensor(float("nan"))
            if kd_weight > 0:
                with torch.no_grad():
                    t_logits = teacher(input_ids=x.to(models.input_device(teacher))).logits[:, :-1].to(logits.device)
                kd = kd_loss(logits, t_logits, temperature)
                loss = loss + kd_weight * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            rec = {"step": step, "loss": float(loss.detach()), "lm_loss": float(lm.detach()), "kd_loss": float(kd.detach()), "lr": lr_at(step),
                   "seconds": time.time() - t0}
            if eval_rows is not None and ((eval_every and (step + 1) % eval_every == 0) or step == steps - 1):
                rec["heldout_nll"] = heldout_nll(student, eval_rows)
            curve.append(rec)
    finally:
        student.eval()
    return curve
