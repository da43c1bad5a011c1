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
