"""moelab.models: one adapter over the transformers MoE families, checked on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from moelab import models as M
from moelab.io import checkpoint_bytes, save_checkpoint
from moelab.models import (
    UnsupportedModelError,
    check_consistency,
    check_target,
    family_of,
    moe_layers,
    prune_experts,
    set_experts,
    set_num_experts_config,
    slice_expert_width,
    slice_hidden,
    tiny_model,
)

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

FAMILIES = list(M.FAMILIES)
SLICE_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]
KEEP = [0, 2, 5, 7]
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7)]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(vocab=128, seed=0):
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids=None):
    return model(_ids() if ids is None else ids).logits


def _reload(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hidden(layer, n=24, seed=1):
    return torch.randn(n, layer.hidden_size, generator=torch.Generator().manual_seed(seed))


# ---- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_shapes_and_config_rule(family):
    model = tiny_model(family)
    spec = family_of(model)
    layers = moe_layers(model)
    n_layers = model.config.num_hidden_layers
    assert [l.layer_idx for l in layers] == [i for i in range(n_layers) if spec.sparse_rule(model.config, i)]
    for l in layers:
        E, K, H, I = l.num_experts, l.top_k, l.hidden_size, l.intermediate_size
        assert (E, K, H, I) == (8, 2, 32, 16)
        assert l.router_weight().shape == (E, H)
        w = l.expert_weights()
        assert w["gate"].shape == (E, I, H) and w["up"].shape == (E, I, H) and w["down"].shape == (E, H, I)
        if spec.gate_up_bias:
            assert w["gate_bias"].shape == (E, I) and w["up_bias"].shape == (E, I) and w["down_bias"].shape == (E, H)
        for name, t in l.expert_indexed().items():
            assert t.shape[0] == E, name
        assert isinstance(l.routing, str) and isinstance(l.norm_topk_prob, bool)
        assert l.experts_module() is getattr(l.block, spec.experts_attr)
        assert (l.shared_expert() is not None) == (spec.shared_attr is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_route_reproduces_block(family):
    """route() + expert_forward() + shared expert rebuild the block; route() picks what the family picks."""
    model = tiny_model(family)
    for l in moe_layers(model):
        h = _hidden(l)
        seen = {}

        def grab(mod, args):
            seen["args"] = args

        handle = l.experts_module().register_forward_pre_hook(grab)
        with torch.no_grad():
            ref = l.block_forward(h)
            rec = l.moe_forward(h)
        handle.remove()
        assert (ref - rec).abs().max().item() <= TOL
        r = l.route(h)
        T, E, K = h.shape[0], l.num_experts, l.top_k
        assert r.router_logits.shape == (T, E) and r.probs.shape == (T, E)
        assert r.topk_idx.shape == (T, K) and r.topk_weight.shape == (T, K)
        if l.spec.weight_on_input:  # Llama4 hands the experts pre-scaled copies of the input
            continue
        _, idx, w = seen["args"][:3]
        # same experts with the same weights (order within a token may differ with sorted=False)
        o1, o2 = r.topk_idx.sort(dim=-1), idx.sort(dim=-1)
        assert torch.equal(o1.values, o2.values)
        w1 = r.topk_weight.gather(1, o1.indices)
        w2 = w.gather(1, o2.indices)
        assert (w1 - w2).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_forward_matches_experts_module(family):
    model = tiny_model(family)
    l = moe_layers(model)[0]
    ex = l.experts_module()
    h = _hidden(l, n=5)
    E = l.num_experts
    with torch.no_grad():
        for e in range(E):
            mine = l.expert_forward(e, h)
            if l.spec.weight_on_input:  # Llama4: experts run on [E, T, H] slabs
                slab = torch.zeros(E, h.shape[0], h.shape[1])
                slab[e] = h
                theirs = ex(slab.reshape(-1, h.shape[1])).reshape(E, h.shape[0], -1)[e]
            else:
                idx = torch.full((h.shape[0], 1), e, dtype=torch.long)
                theirs = ex(h, idx, torch.ones(h.shape[0], 1))
            assert (mine - theirs).abs().max().item() <= TOL, e


# ---- editing: prune / merge round trips -------------------------------------------------------


def _check_new_storage(model, before: dict):
    """Edited tensors own fresh storage (no views of the old full tensors)."""
    for name, t in model.state_dict().items():
        old = before.get(name)
        if old is not None and old.shape != t.shape:
            assert t.untyped_storage().data_ptr() != old.untyped_storage().data_ptr(), name
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_round_trip(family, tmp_path):
    model = tiny_model(family)
    orig = save_checkpoint(model, tmp_path / "orig")
    before_w = {l.layer_idx: (l.expert_weights(), l.router_weight(), l.expert_indexed()) for l in moe_layers(model)}
    before_sd = dict(model.state_dict())
    dtypes = {k: v.dtype for k, v in before_sd.items()}

    prune_experts(model, {l.layer_idx: KEEP for l in moe_layers(model)})

    spec = family_of(model)
    assert getattr(model.config, spec.num_experts_field) == 4
    for l in moe_layers(model):
        w0, r0, x0 = before_w[l.layer_idx]
        assert l.num_experts == 4
        assert torch.equal(l.router_weight(), r0[KEEP])
        for k, v in l.expert_weights().items():
            assert torch.equal(v, w0[k][KEEP]), k
        for k, v in l.expert_indexed().items():
            assert torch.equal(v, x0[k][KEEP]), k
        h = _hidden(l)
        assert (l.block_forward(h) - l.moe_forward(h)).abs().max().item() <= TOL
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes
    _check_new_storage(model, before_sd)

    out = save_checkpoint(model, tmp_path / "pruned")
    reloaded = _reload(out)
    assert (_logits(model) - _logits(reloaded)).abs().max().item() <= TOL
    assert [l.num_experts for l in moe_layers(reloaded)] == [4] * len(moe_layers(model))
    assert checkpoint_bytes(out) < checkpoint_bytes(orig)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_round_trip(family, tmp_path):
    model = tiny_model(family)
    orig = save_checkpoint(model, tmp_path / "orig")
    firsts = [a for a, _ in PAIRS]
    layers = moe_layers(model)
    for l in layers:
        w = l.expert_weights()
        merged = {k: torch.stack([(v[a] + v[b]) / 2 for a, b in PAIRS]) for k, v in w.items()}
        indexed = {k: v[firsts] for k, v in l.expert_indexed().items()}
        set_experts(model, l.layer_idx, merged, l.router_weight()[firsts], indexed)
        assert l.num_experts == 4
        for k, v in l.expert_weights().items():
            assert torch.allclose(v, merged[k]), k
    assert getattr(model.config, family_of(model).num_experts_field) == 4
    for l in moe_layers(model):
        h = _hidden(l)
        assert (l.block_forward(h) - l.moe_forward(h)).abs().max().item() <= TOL
    out = save_checkpoint(model, tmp_path / "merged")
    reloaded = _reload(out)
    assert (_logits(model) - _logits(reloaded)).abs().max().item() <= TOL
    assert checkpoint_bytes(out) < checkpoint_bytes(orig)


def test_set_experts_one_layer_at_a_time():
    model = tiny_model("qwen3_moe")
    a, b = moe_layers(model)
    w = a.expert_weights()
    set_experts(model, a.layer_idx, {k: v[:6] for k, v in w.items()}, a.router_weight()[:6])
    # counts differ between layers: the config still says 8 and the model is not saveable yet
    assert model.config.num_experts == 8 and a.num_experts == 6 and b.num_experts == 8
    with pytest.raises(ValueError, match="inconsistent"):
        check_consistency(model)
    w = b.expert_weights()
    set_experts(model, b.layer_idx, {k: v[2:] for k, v in w.items()}, b.router_weight()[2:])
    assert model.config.num_experts == 6
    check_consistency(model)


def test_set_experts_needs_indexed_tensors_when_count_changes():
    model = tiny_model("deepseek_v3")
    l = moe_layers(model)[0]
    w = l.expert_weights()
    with pytest.raises(ValueError, match="score_correction_bias"):
        set_experts(model, l.layer_idx, {k: v[:4] for k, v in w.items()}, l.router_weight()[:4])
    # same count: the existing tensors are kept
    set_experts(model, l.layer_idx, w, l.router_weight())


def test_prune_validates_keep():
    model = tiny_model("mixtral")
    idx = [l.layer_idx for l in moe_layers(model)]
    with pytest.raises(ValueError, match="every MoE layer"):
        prune_experts(model, {idx[0]: KEEP})
    with pytest.raises(ValueError, match="same number"):
        prune_experts(model, {idx[0]: KEEP, idx[1]: [0, 1, 2]})
    with pytest.raises(ValueError, match="twice"):
        prune_experts(model, {i: [0, 0, 1, 2] for i in idx})
    with pytest.raises(ValueError, match="indices"):
        prune_experts(model, {i: [0, 1, 2, 8] for i in idx})
    assert moe_layers(model)[0].num_experts == 8  # nothing changed


def test_prune_keeps_bf16_dtypes(tmp_path):
    model = tiny_model("ernie4_5_moe").to(torch.bfloat16)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    prune_experts(model, {l.layer_idx: KEEP for l in moe_layers(model)})
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes


# ---- targets and unsupported models -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_check_target_bounds(family):
    model = tiny_model(family)
    with pytest.raises(ValueError, match="below top_k"):
        check_target(model, 1)
    with pytest.raises(ValueError, match="not below the current count 8"):
        check_target(model, 8)
    with pytest.raises(ValueError, match="not below the current count 8"):
        check_target(model, 12)
    check_target(model, 4)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_check_target_groups(family):
    model = tiny_model(family)  # n_group=2, topk_group=1, top_k=2
    with pytest.raises(ValueError, match=r"not divisible by n_group=2.*Counts that work: \[4, 6\]"):
        check_target(model, 3)
    with pytest.raises(ValueError, match=r"1 expert\(s\) per group.*\[4, 6\]"):
        check_target(model, 2)
    with pytest.raises(ValueError, match="n_group"):
        prune_experts(model, {l.layer_idx: [0, 1, 2] for l in moe_layers(model)})
    assert M.valid_expert_counts(model) == [4, 6]
    check_target(model, 6)


def test_check_target_groups_deepseek_v2():
    model = tiny_model("deepseek_v2")  # group_limited_greedy, n_group=4, topk_group=2
    with pytest.raises(ValueError, match="not divisible by n_group=4"):
        check_target(model, 6)
    check_target(model, 4)


def test_no_moe_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, intermediate_size=16))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*no MoE layers") as err:
        moe_layers(model)
    assert not isinstance(err.value, UnsupportedModelError)


def test_unsupported_moe_family():
    from transformers import JetMoeConfig, JetMoeForCausalLM

    model = JetMoeForCausalLM(JetMoeConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, kv_channels=8,
                                           intermediate_size=16, num_local_experts=4, num_experts_per_tok=2))
    with pytest.raises(UnsupportedModelError, match="JetMoeForCausalLM.*no FamilySpec"):
        moe_layers(model)
    with pytest.raises(UnsupportedModelError, match="JetMoeForCausalLM"):
        prune_experts(model, {0: [0, 1]})


def test_layout_mismatch_is_reported():
    model = tiny_model("mixtral")
    del moe_layers(model)[0].experts_module().gate_up_proj
    with pytest.raises(UnsupportedModelError, match="MixtralForCausalLM.*gate_up_proj"):
        moe_layers(model)


# ---- width and hidden slicing -----------------------------------------------------------------


def _width_keep(model, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        l.layer_idx: torch.stack(
            [torch.randperm(l.intermediate_size, generator=g)[:width].sort().values for _ in range(l.num_experts)]
        )
        for l in moe_layers(model)
    }


@pytest.mark.parametrize("family", SLICE_FAMILIES + ["qwen2_moe", "ernie4_5_moe", "glm4_moe"])
def test_slice_expert_width_round_trip(family, tmp_path):
    model = tiny_model(family)
    orig = save_checkpoint(model, tmp_path / "orig")
    keep = _width_keep(model)
    before = {l.layer_idx: l.expert_weights() for l in moe_layers(model)}
    shared_before = {l.layer_idx: l.shared_expert().state_dict() if l.shared_expert() else None for l in moe_layers(model)}
    slice_expert_width(model, keep)
    for l in moe_layers(model):
        assert l.intermediate_size == 8
        w, w0, k = l.expert_weights(), before[l.layer_idx], keep[l.layer_idx]
        for e in (0, 5):
            assert torch.equal(w["gate"][e], w0["gate"][e][k[e]])
            assert torch.equal(w["down"][e], w0["down"][e][:, k[e]])
            if "up_bias" in w:
                assert torch.equal(w["up_bias"][e], w0["up_bias"][e][k[e]])
        if shared_before[l.layer_idx] is not None:  # shared experts are left intact
            for name, t in l.shared_expert().state_dict().items():
                assert torch.equal(t, shared_before[l.layer_idx][name])
        h = _hidden(l)
        assert (l.block_forward(h) - l.moe_forward(h)).abs().max().item() <= TOL
    out = save_checkpoint(model, tmp_path / "narrow")
    reloaded = _reload(out)
    assert (_logits(model) - _logits(reloaded)).abs().max().item() <= TOL
    assert checkpoint_bytes(out) < checkpoint_bytes(orig)


def test_slice_expert_width_llama4_needs_shared_keep(tmp_path):
    model = tiny_model("llama4_text")
    keep = _width_keep(model)
    with pytest.raises(ValueError, match="shared_keep"):
        slice_expert_width(model, keep)
    slice_expert_width(model, keep, shared_keep={i: torch.arange(8) for i in keep})
    assert model.config.intermediate_size == 8
    out = save_checkpoint(model, tmp_path / "narrow")
    assert (_logits(model) - _logits(_reload(out))).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_slice_hidden_identity_is_noop(family):
    model = tiny_model(family)
    before = _logits(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    slice_hidden(model, torch.arange(model.config.hidden_size))
    assert torch.equal(_logits(model), before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


SLICE_HIDDEN_OK = [f for f in FAMILIES if f != "olmoe"]


@pytest.mark.parametrize("family", SLICE_HIDDEN_OK)
def test_slice_hidden_round_trip(family, tmp_path):
    model = tiny_model(family)
    orig = save_checkpoint(model, tmp_path / "orig")
    channels = torch.randperm(32, generator=torch.Generator().manual_seed(3))[:24].sort().values
    router_before = {l.layer_idx: l.router_weight() for l in moe_layers(model)}
    slice_hidden(model, channels)
    assert model.config.hidden_size == 24
    for l in moe_layers(model):
        assert l.hidden_size == 24
        assert torch.equal(l.router_weight(), router_before[l.layer_idx][:, channels])
        h = _hidden(l)
        assert (l.block_forward(h) - l.moe_forward(h)).abs().max().item() <= TOL
    out = save_checkpoint(model, tmp_path / "thin")
    reloaded = _reload(out)
    assert (_logits(model) - _logits(reloaded)).abs().max().item() <= TOL
    assert checkpoint_bytes(out) < checkpoint_bytes(orig)


@pytest.mark.parametrize("family", SLICE_HIDDEN_OK)
def test_norm_outputs_scale_on_a_variant(family):
    """scale_norm_outputs multiplies every residual norm's output by its factor, whichever way the family
    applies the weight (Qwen3-Next: 1 + w), and leaves the model the variant came from as it was."""
    from moelab.models import residual_norms, scale_norm_outputs, variant

    model = tiny_model(family)
    norms = residual_norms(model)
    assert norms and all(n.weight.shape[0] == model.config.hidden_size for n in norms.values())
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = {k: n(x) for k, n in norms.items()}
        v = variant(model)
        scale_norm_outputs(v, {k: 1.5 + 0.25 * i for i, k in enumerate(norms)})
        for i, (k, n) in enumerate(residual_norms(v).items()):
            torch.testing.assert_close(n(x), (1.5 + 0.25 * i) * before[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(norms[k](x), before[k])


def test_slice_hidden_unsupported_leaves_model_intact():
    model = tiny_model("olmoe")  # its q/k norms are sized from hidden_size, not head_dim
    before = _logits(model)
    with pytest.raises(UnsupportedModelError, match="cannot express hidden size 24.*nothing was changed"):
        slice_hidden(model, torch.arange(24))
    assert torch.equal(_logits(model), before)
    assert model.config.hidden_size == 32


def test_slice_hidden_then_prune(tmp_path):
    model = tiny_model("deepseek_v3")
    slice_hidden(model, torch.arange(0, 32, 2))
    slice_expert_width(model, _width_keep(model, width=4))
    prune_experts(model, {l.layer_idx: KEEP for l in moe_layers(model)})
    out = save_checkpoint(model, tmp_path / "small")
    assert (_logits(model) - _logits(_reload(out))).abs().max().item() <= TOL


def test_set_num_experts_config_updates_model_caches():
    model = tiny_model("qwen2_moe")
    set_num_experts_config(model, 5)
    assert model.config.num_experts == 5 and model.num_experts == 5


# ---- loading with accelerate offload (stretch) ------------------------------------------------


def test_offloaded_model_reads_but_refuses_edits(tmp_path):
    src = tiny_model("deepseek_v3")
    path = save_checkpoint(src, tmp_path / "ck")
    model = M.load_model(path, device_map="auto", max_memory={"cpu": 90_000}, offload_folder=tmp_path / "off")
    assert M.is_offloaded(model)
    assert any(v == "disk" for v in model.hf_device_map.values())
    ref = _reload(path)
    for a, b in zip(moe_layers(model), moe_layers(ref)):
        assert a.router.weight.device.type == "meta"
        h = _hidden(b)
        ra, rb = a.route(h), b.route(h)
        assert torch.equal(ra.topk_idx, rb.topk_idx) and torch.equal(ra.topk_weight, rb.topk_weight)
        wa, wb = a.expert_weights(), b.expert_weights()
        assert all(torch.equal(wa[k], wb[k]) for k in wb)
        assert torch.equal(a.expert_indexed()["score_correction_bias"], b.expert_indexed()["score_correction_bias"])
        assert (a.moe_forward(h) - b.block_forward(h)).abs().max().item() <= TOL
    assert (_logits(model) - _logits(ref)).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="offload.*without offload"):
        prune_experts(model, {l.layer_idx: KEEP for l in moe_layers(model)})


# ---- odds and ends ------------------------------------------------------------------------------


def test_tied_embeddings_slice_and_prune(tmp_path):
    model = tiny_model("qwen3_moe", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    slice_hidden(model, torch.arange(8, 32))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prune_experts(model, {l.layer_idx: KEEP for l in moe_layers(model)})
    out = save_checkpoint(model, tmp_path / "tied")
    assert (_logits(model) - _logits(_reload(out))).abs().max().item() <= TOL


def test_prune_warns_when_groups_mix():
    model = tiny_model("deepseek_v3")  # groups {0..3}, {4..7}
    with pytest.warns(UserWarning, match="mix old"):
        prune_experts(model, {l.layer_idx: [0, 1, 2, 3] for l in moe_layers(model)})


@pytest.mark.parametrize("family,E,K", [("mixtral", 4, 1), ("deepseek_v3", 6, 2), ("glm4_moe", 12, 3), ("gpt_oss", 5, 2)])
def test_tiny_model_sizes(family, E, K):
    model = tiny_model(family, num_experts=E, top_k=K, seed=4)
    for l in moe_layers(model):
        assert (l.num_experts, l.top_k) == (E, K)
        h = _hidden(l)
        assert (l.block_forward(h) - l.moe_forward(h)).abs().max().item() <= TOL


def test_set_experts_rejects_wrong_keys():
    model = tiny_model("mixtral")
    l = moe_layers(model)[0]
    w = l.expert_weights()
    with pytest.raises(ValueError, match="no \\['down_bias'\\]"):
        set_experts(model, l.layer_idx, {**w, "down_bias": torch.zeros(8, 32)}, l.router_weight())
    g = moe_layers(tiny_model("gpt_oss"))[0]
    with pytest.raises(ValueError, match="missing 'down_bias'"):
        set_experts(g.model, g.layer_idx, {k: v for k, v in g.expert_weights().items() if k != "down_bias"},
                    g.router_weight())


def test_slice_expert_width_with_shared_keep(tmp_path):
    model = tiny_model("deepseek_v3")  # shared width = moe_intermediate_size * n_shared_experts = 16
    keep = _width_keep(model, width=4)
    slice_expert_width(model, keep, shared_keep={i: torch.arange(3, 11) for i in keep})
    assert model.config.moe_intermediate_size == 4 and model.config.n_shared_experts == 2
    assert moe_layers(model)[0].shared_expert().down_proj.weight.shape == (32, 8)
    out = save_checkpoint(model, tmp_path / "narrow")
    assert (_logits(model) - _logits(_reload(out))).abs().max().item() <= TOL


def test_unaligned_widths_are_refused():
    model = tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match="grouped_mm.*multiple of 4"):
        slice_expert_width(model, _width_keep(model, width=6))
    with pytest.raises(ValueError, match="grouped_mm"):
        slice_hidden(model, torch.arange(30))
    assert model.config.moe_intermediate_size == 16 and model.config.hidden_size == 32
    # an explicit opt-out with the eager kernel works (16 is not a multiple of 6: shared_keep needed)
    model.set_experts_implementation("eager")
    with pytest.raises(ValueError, match="shared_keep"):
        slice_expert_width(model, _width_keep(model, width=6), allow_unaligned=True)
    slice_expert_width(model, _width_keep(model, width=6), {i: torch.arange(12) for i in (1, 2)},
                       allow_unaligned=True)
    l = moe_layers(model)[0]
    h = _hidden(l)
    assert (l.block_forward(h) - l.moe_forward(h)).abs().max().item() <= TOL
