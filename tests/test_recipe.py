"""Recipes (moelab.recipe): every compression records its decisions, and replaying them on the source
model without calibration rebuilds the same tensors; the recipe travels with the checkpoint."""

import json

import pytest
import torch
from datasets import Dataset

from moelab import compress, data, io, models, observe, prune, recipe, train, zoo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def observed(smoke):
    model, tok = smoke
    calib = data.calibration_set(tok, "1:1:1", tokens=2048, seq_len=64, seed=0)
    return model, tok, calib, observe.observe(model, calib, sample_size=64, progress=False)


def _identical(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


METHODS = {
    "frequency pruning": lambda m, c, o: prune.prune(m, o, "frequency", num_experts=4)[0],
    "NAEE": lambda m, c, o: compress.naee_model(m, o, 4, exhaustive_limit=10)[0],
    "M-SMoE adaptive": lambda m, c, o: compress.msmoe_model(m, o, compress.msmoe_total(m, 0.5))[0],
    "REAM sequential": lambda m, c, o: compress.ream_model(m, c, 4, C=4, sample_size=64)[0],
    "HC-SMoE": lambda m, c, o: compress.hc_smoe_model(m, o, 4)[0],
    "partial preservation, aligned": lambda m, c, o: compress.partial_preservation_model(m, o, 4, 0.5, align="weights")[0],
    "DERN": lambda m, c, o: compress.dern_model(m, o, 4, iters=3)[0],
    "depth + width + experts": lambda m, c, o: compress.slim_model(m, o, remove_layers=1, width_ratio=0.5,
                                                                   num_experts=4)[0],
    "MC-SMoE (low rank + sparse, densified)": lambda m, c, o: compress.densify(
        compress.low_rank_sparse_model(compress.msmoe_model(m, o, compress.msmoe_total(m, 0.5))[0], 0.5, rank=4)[0]),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_a_recipe_rebuilds_the_same_tensors_without_calibration(observed, name, tmp_path):
    model, _, calib, obs = observed
    variant = METHODS[name](model, calib, obs)
    path = recipe.save(variant, tmp_path / "recipe.json")
    data_ = json.loads(path.read_text())
    assert data_["steps"] and data_["source"]["layers"]
    rebuilt = recipe.apply(model, recipe.load(path))  # no observation, no calibration set
    assert _identical(variant, rebuilt), name
    assert recipe.recipe(rebuilt)["steps"] == data_["steps"]  # the replay records the same steps


def test_the_recipe_travels_with_the_checkpoint(observed, tmp_path):
    model, tok, _, obs = observed
    variant = compress.msmoe_model(model, obs, compress.msmoe_total(model, 0.5))[0]  # per-layer counts
    out = io.save_checkpoint(variant, tmp_path / "ck", tok)
    assert (out / recipe.RECIPE_FILE).exists()
    reloaded = models.load_model(out)
    rebuilt = compress.apply_recipe(model, out)  # the checkpoint folder holds its recipe
    mine, theirs = reloaded.state_dict(), rebuilt.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    untouched = io.save_checkpoint(models.variant(model), tmp_path / "plain", tok)
    assert not (untouched / recipe.RECIPE_FILE).exists()  # nothing was done: no recipe


def test_bf16_and_another_family(tmp_path):
    """A bf16 DeepSeek-V3-style model (group-limited routing, score-correction bias): M-SMoE's merges
    and DERN replay to the same bf16 tensors."""
    model = models.tiny_model("deepseek_v3").to(torch.bfloat16)
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    calib = Dataset.from_dict({"input_ids": ids.tolist()})
    obs = observe.observe(model, calib, sample_size=64, progress=False)
    for build in (lambda: compress.msmoe_model(model, obs, compress.msmoe_total(model, 0.25))[0],
                  lambda: compress.dern_model(model, obs, 4, iters=3)[0]):
        variant = build()
        assert io.model_dtype(variant) == torch.bfloat16
        assert _identical(variant, recipe.apply(model, recipe.recipe(variant)))


def test_steps_a_recipe_cannot_redo_are_refused_by_name(observed):
    model, tok, _, obs = observed
    student = prune.prune(model, obs, "frequency", num_experts=4)[0]
    train.recover(student, tok, teacher=model, steps=1, batch_size=1, seq_len=16, kd_weight=1.0, lm_weight=0.0)
    ops = [s["op"] for s in recipe.steps(student)]
    assert ops == ["prune_experts", "trained"]
    with pytest.raises(ValueError, match=r"step 1 .*trained.*upto=1"):
        recipe.apply(model, recipe.recipe(student))
    before = recipe.apply(model, recipe.recipe(student), upto=1)  # the compression before training
    assert _identical(before, prune.prune(model, obs, "frequency", num_experts=4)[0])
    fresh = train.reinitialised(prune.prune(model, obs, "frequency", num_experts=4)[0])
    assert [s["op"] for s in recipe.steps(fresh)] == ["prune_experts", "reinitialised"]
    with pytest.raises(ValueError, match=r"step 1 .*re-initialised"):
        recipe.apply(model, recipe.recipe(fresh))
    hand = models.variant(model)
    layer = models.moe_layers(hand)[0]
    w = {k: v * 0.5 for k, v in layer.expert_weights().items()}
    models.set_experts(hand, layer.layer_idx, w, layer.router_weight())
    with pytest.raises(ValueError, match="outside moelab's recorded methods"):
        recipe.apply(model, recipe.recipe(hand))


def test_a_recipe_refuses_another_model(observed, tmp_path):
    model, _, _, obs = observed
    variant = prune.prune(model, obs, "frequency", num_experts=4)[0]
    other, _ = zoo.load("smoke-mixtral")
    with pytest.raises(ValueError, match="another model"):
        recipe.apply(other, recipe.recipe(variant))
    with pytest.raises(FileNotFoundError, match="no recipe"):
        recipe.load(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"steps": []}))
    with pytest.raises(ValueError, match="not a moelab recipe"):
        recipe.load(tmp_path / "bad.json")
