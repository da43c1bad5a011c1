"""A variant shares every tensor it does not edit with the original, and editing it never changes the original."""

import pytest
import torch

from moelab import compress, data, models, observe, prune


@pytest.fixture(scope="module")
def observed(smoke):
    model, tok = smoke
    calib = data.calibration_set(tok, "1:1:1", tokens=2048, seq_len=128)
    return model, observe.observe(model, calib, sample_size=64, progress=False)


def _bytes(m):
    seen, total = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


METHODS = {
    "prune": lambda m, o: prune.prune(m, o, "frequency", num_experts=4)[0],
    "merge": lambda m, o: compress.merge_into_nearest_model(m, o, 4)[0],
    "dern": lambda m, o: compress.dern_model(m, o, 4, iters=3)[0],
    "naee": lambda m, o: compress.naee_model(m, o, 4, exhaustive_limit=10)[0],
    "depth": lambda m, o: prune.remove_layers(m, o, 1)[0],
    "width": lambda m, o: prune.slice_width(m, o, 0.5)[0],
    "low_rank_sparse": lambda m, o: compress.low_rank_sparse_model(m, 0.9, rank_fraction=0.25)[0],
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_variant_shares_what_it_does_not_edit(observed, name, one_thread):
    model, obs = observed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v = METHODS[name](model, obs)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "editing the variant changed the original"
    own = _bytes(v) - models.shared_bytes(model, v)
    if name != "width":  # width slicing edits every tensor: nothing left to share
        assert models.shared_bytes(model, v) > 0
    assert own < _bytes(model), (name, own, _bytes(model))
    ids = torch.arange(5, 37).reshape(1, 32)
    with torch.no_grad():
        assert torch.isfinite(v(input_ids=ids).logits).all()
        assert torch.equal(model(input_ids=ids).logits, models.variant(model)(input_ids=ids).logits)


def test_recovering_a_variant_never_changes_the_teacher(observed, smoke):
    from moelab import train

    model, obs = observed
    before = {n: p.clone() for n, p in model.state_dict().items()}
    v = prune.prune(model, obs, "frequency", num_experts=4)[0]
    shared = models.shared_bytes(model, v)
    assert shared > 0
    train.recover(v, smoke[1], teacher=model, steps=1, batch_size=1, seq_len=16, kd_weight=1.0, lm_weight=0.0)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    # full fine-tuning writes every parameter: each one was copied first (buffers stay shared)
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(p.untyped_storage().data_ptr() in ptrs for p in v.parameters())
