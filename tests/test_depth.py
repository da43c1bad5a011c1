"""Depth pruning (SlimQwen, SlimQwen, arXiv 2605.08738): removing decoder layers in every family gives the
model that skips those layers, and the checkpoint reloads with plain from_pretrained."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from moelab import io, models
from moelab.models import FAMILIES, tiny_model


class _Skip(nn.Module):
    """A decoder layer that passes its input through (what removing it should amount to)."""

    def __init__(self, layer):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _layers_kept(model, drop):
    ref = copy.deepcopy(model)
    stack = models.decoder_layers(ref)
    for i in drop:
        stack[i] = _Skip(stack[i])
    return ref


@pytest.mark.parametrize("where", ["last", "first"])
@pytest.mark.parametrize("family", FAMILIES)
def test_remove_layers_equals_skipping_them_and_reloads(family, where, tmp_path):
    model = tiny_model(family)
    n = len(models.decoder_layers(model))
    drop = [n - 1] if where == "last" else [0]
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 12))
    ref = _layers_kept(model, drop)
    edited = copy.deepcopy(model)
    if family == "qwen3_next" and where == "last":  # its only full-attention layer
        with pytest.raises(ValueError, match="full-attention"):
            models.remove_layers(edited, drop)
        return
    models.remove_layers(edited, drop)
    assert len(models.decoder_layers(edited)) == n - len(drop) == edited.config.get_text_config().num_hidden_layers
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, edited(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    path = io.save_checkpoint(edited, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, b, atol=1e-5)
    assert io.checkpoint_bytes(path) > 0


def test_remove_layers_keeps_dense_moe_pattern_and_refuses_bad_input():
    model = tiny_model("qwen3_moe", num_hidden_layers=4, mlp_only_layers=[0])
    edited = copy.deepcopy(model)
    models.remove_layers(edited, [1])
    assert edited.config.mlp_only_layers == [0] and len(models.moe_layers(edited)) == 2
    models.check_consistency(edited)
    for bad, match in (([7], "range"), ([0, 1, 2, 3], "every decoder layer")):
        with pytest.raises(ValueError, match=match):
            models.remove_layers(copy.deepcopy(model), bad)
    edited = copy.deepcopy(model)
    models.remove_layers(edited, [])
    assert len(models.decoder_layers(edited)) == 4
