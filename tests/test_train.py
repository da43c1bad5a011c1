"""Recovery training: the distillation loss's known values, determinism, and that it really trains."""

import copy
import math

import pytest
import torch

from moelab import models, observe, prune, train


def test_kd_loss_known_values():
    logits = torch.randn(2, 3, 11)
    assert float(train.kd_loss(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    # uniform student, one-hot-ish teacher at T=1: KL = log V - H(teacher) ~ log V
    teacher = torch.full((1, 1, 11), -1e4)
    teacher[..., 3] = 0.0
    assert float(train.kd_loss(torch.zeros(1, 1, 11), teacher, 1.0)) == pytest.approx(math.log(11), rel=1e-4)
    # the T^2 factor: KL at temperature T scaled by T^2
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 3, -1), torch.log_softmax(t / 3, -1), log_target=True,
                                    reduction="batchmean")
    assert float(train.kd_loss(s, t, 3.0)) == pytest.approx(9 * float(kl), rel=1e-5)
    # MC-SMoE's reference form: the same KL without the T^2 factor
    assert float(train.kd_loss(s, t, 3.0, t2=False)) == pytest.approx(float(kl), rel=1e-5)
    with pytest.raises(ValueError, match="vocabulary"):
        train.kd_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


def test_recover_rejects_bad_settings(smoke):
    model, tok = smoke
    with pytest.raises(ValueError, match="teacher"):
        train.recover(model, tok, kd_weight=0.5, steps=1)
    with pytest.raises(ValueError, match="not both 0"):
        train.recover(model, tok, lm_weight=0, kd_weight=0, steps=1)
    with pytest.raises(ValueError, match="different model"):
        train.recover(model, tok, teacher=model, kd_weight=1.0, steps=1)


@pytest.fixture(scope="module")
def pruned(smoke):
    model, tok = smoke
    from moelab import data

    calib = data.calibration_set(tok, "1:1:1", tokens=2048, seq_len=128, seed=0)
    obs = observe.observe(model, calib, sample_size=64)
    student, _ = prune.prune(model, obs, "frequency", num_experts=models.moe_layers(model)[0].top_k)
    return student


def test_recovery_lowers_heldout_loss_and_is_deterministic(smoke, pruned):
    model, tok = smoke
    rows = train.heldout_rows(tok, tokens=1024, seq_len=128)
    runs = []
    for _ in range(2):
        student = copy.deepcopy(pruned)
        curve = train.recover(student, tok, teacher=model, steps=12, batch_size=4, seq_len=128, lr=3e-3,
                              lm_weight=0.5, kd_weight=0.5, seed=1, warmup=2, eval_rows=rows, eval_every=6)
        runs.append((student, curve))
    (a, curve), (b, _) = runs
    assert [c["step"] for c in curve] == list(range(-1, 12))
    evals = [c["heldout_nll"] for c in curve if "heldout_nll" in c]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert all(math.isfinite(c["kd_loss"]) and c["kd_loss"] >= 0 for c in curve[1:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not a.training
    # the teacher is never updated
    before = [p.clone() for p in model.parameters()]
    train.recover(copy.deepcopy(pruned), tok, teacher=model, steps=1, batch_size=2, seq_len=64, kd_weight=1.0,
                  lm_weight=0.0)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_distilling_a_copy_starts_at_zero_kd(smoke):
    model, tok = smoke
    student = copy.deepcopy(model)
    curve = train.recover(student, tok, teacher=model, steps=1, batch_size=2, seq_len=64, lm_weight=0.0,
                          kd_weight=1.0, lr=1e-9)
    assert curve[0]["kd_loss"] == pytest.approx(0.0, abs=1e-5)


def test_reinitialised_keeps_the_shape_not_the_weights(pruned):
    fresh = train.reinitialised(pruned, seed=0)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in pruned.parameters()]
    assert not torch.equal(next(iter(fresh.state_dict().values())), next(iter(pruned.state_dict().values())))
    again = train.reinitialised(pruned, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), again.parameters()))


def _changed(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return {n for n in sa if not torch.equal(sa[n], sb[n])}


def test_lora_recovery_of_a_variant_trains_adapters_merges_them_and_keeps_frozen_tensors_shared(smoke, pruned):
    model, tok = smoke
    teacher_before = {n: p.clone() for n, p in model.state_dict().items()}
    student = models.variant(pruned)  # shares every tensor with `pruned`
    curve = train.recover(student, tok, teacher=pruned, steps=3, batch_size=2, seq_len=64, lr=1e-2, kd_weight=1.0,
                          lm_weight=0.0, trainable="lora", lora_rank=4, warmup=1)
    assert len(curve) == 3 and all(math.isfinite(c["loss"]) for c in curve)
    changed = _changed(student, pruned)
    # LoRA reached attention and the fused experts; norms, embeddings and routers stay as they were
    assert any("q_proj" in n for n in changed) and any("experts.gate_up_proj" in n for n in changed)
    assert not any("norm" in n or "embed" in n or n.endswith("mlp.gate.weight") for n in changed)
    # the adapters are gone: same modules, names and shapes as before, no gradients, requires_grad restored
    assert list(student.state_dict()) == list(pruned.state_dict())
    assert all(p.grad is None and p.requires_grad for p in student.parameters())
    assert not any("lora" in n for n, _ in student.named_modules())
    # the teacher never changed, and what LoRA did not touch is still shared with it
    assert all(torch.equal(teacher_before[n], p) for n, p in model.state_dict().items())
    emb = student.get_input_embeddings().weight
    assert emb.untyped_storage().data_ptr() == pruned.get_input_embeddings().weight.untyped_storage().data_ptr()


def test_router_norms_recovery_changes_only_routers_and_norms(smoke, pruned):
    model, tok = smoke
    student = copy.deepcopy(pruned)
    train.recover(student, tok, teacher=model, steps=2, batch_size=2, seq_len=64, lr=1e-2, kd_weight=1.0,
                  lm_weight=0.0, trainable="router_norms", warmup=1)
    changed = _changed(student, pruned)
    assert changed and all("norm" in n or n.endswith("mlp.gate.weight") for n in changed)
    assert any(n.endswith("mlp.gate.weight") for n in changed)


def test_bf16_recovery_steps_float32_masters_and_keeps_the_dtype(smoke, pruned):
    model, tok = smoke
    student = copy.deepcopy(pruned).to(torch.bfloat16)
    start = copy.deepcopy(student)
    curve = train.recover(student, tok, teacher=model, steps=2, batch_size=2, seq_len=64, lr=1e-3, warmup=1)
    assert all(math.isfinite(c["loss"]) for c in curve)
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in student.parameters())
    assert _changed(student, start)
    # the masters: float32 copies for bf16 tensors, the tensor itself for float32 ones
    a, b = torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3)
    m = train._Float32Master([a, b])
    assert m.of(a).dtype == torch.float32 and m.of(a) is not a and m.of(b) is b
    a.grad = torch.full((3,), 1e-3, dtype=torch.bfloat16)
    m.grads_up()
    assert m.of(a).grad.dtype == torch.float32 and a.grad is None
    # an update far below bf16's resolution at 1.0 accumulates in the master instead of rounding away
    one = torch.ones(1, dtype=torch.bfloat16)
    mm = train._Float32Master([one])
    for _ in range(100):
        mm.of(one).data += 1e-4
        mm.weights_down()
    assert float(mm.of(one).detach()) == pytest.approx(1.01, rel=1e-4) and float(one) > 1.0


def test_gradient_checkpointing_gives_the_same_training(smoke, pruned):
    model, tok = smoke
    runs = []
    for ckpt in (False, True):
        student = copy.deepcopy(pruned)
        curve = train.recover(student, tok, teacher=model, steps=2, batch_size=2, seq_len=64, kd_weight=0.5,
                              lm_weight=0.5, gradient_checkpointing=ckpt, warmup=1)
        runs.append((student, curve))
        assert not train._checkpointing(student)
    (a, ca), (b, cb) = runs
    assert [c["loss"] for c in ca] == pytest.approx([c["loss"] for c in cb], rel=1e-5)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_recover_rejects_unknown_trainable(smoke, pruned):
    with pytest.raises(ValueError, match="trainable='adapters'"):
        train.recover(copy.deepcopy(pruned), smoke[1], steps=1, trainable="adapters")


def test_recover_passes_the_t2_choice_to_the_kd_term(smoke, pruned):
    """The first step sees the same student and batch: its KD term without T^2 is the one with T^2 over T^2."""
    model, tok = smoke
    first = {}
    for t2 in (True, False):
        curve = train.recover(copy.deepcopy(pruned), tok, teacher=model, steps=1, batch_size=2, seq_len=32,
                              kd_weight=1.0, lm_weight=0.0, temperature=2.0, kd_t2=t2, warmup=1)
        first[t2] = curve[0]["kd_loss"]
    assert first[False] > 0 and first[True] == pytest.approx(4 * first[False], rel=1e-4)
