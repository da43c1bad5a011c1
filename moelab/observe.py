"""One calibration pass that collects every statistic the compression methods need.

Per MoE layer (the importance criteria of ``moelab.scores``):

* ``counts[e]``: |X_e|, the tokens whose top-k contains e (and ``counts_by_group`` per domain);
* ``soft_mass[e]``: sum over all tokens of g_e(x) (softmax or sigmoid over all experts, the
  family's own scores); ``soft_mass_routed[e]``: the same over routed tokens only;
* ``reap_sum[e]``: sum over X_e of g_e(x) * ||f_e(x)||_2 (REAP saliency, g not renormalised);
  ``reap_topk_sum[e]``: the same with the weight the model really applies (renormalised top-k);
* ``ean_sum[e]``: sum over X_e of ||f_e(x)||_2 (EAN);
* ``dern_sum[e]``: sum over X_e of the router weight renormalised over the top-k (DERN importance);
* ``out_sum[e]`` and ``gated_out_sum[e]``: sums of f_e(x) and g_e(x) f_e(x) over X_e (mean-output
  similarity, REAM's ybar);
* ``logit_gram`` / ``prob_gram`` [E, E]: sums of z z^T and g g^T over tokens (cosine and Euclidean
  distances between router-logit columns follow from a Gram matrix, without keeping T x E);
* ``input_sample`` [n, H]: a uniform bounded sample of the layer's MoE inputs (any expert's neuron
  activations on shared tokens are computed from it on demand, for alignment, DERN and NAEE);
* ``hidden_abs_sum`` [H]: sum of |normalised hidden| per channel (SlimQwen width pruning).

Per decoder layer: ``layer_cos``, the mean cosine between its input and output hidden states
(SlimQwen depth pruning).

Per residual norm (``models.residual_norms``): ``norm_energy[name]`` [H], the mean over tokens of
x_c^2 / mean_c'(x_c'^2) of the norm's input (centred first for a LayerNorm). Slicing the hidden width
to channels K changes the norm's denominator by sqrt(mean_{c in K} norm_energy[c]) on average;
``prune.slice_width`` divides that out.

Expert outputs are never recomputed: moelab's experts kernel (moelab.kernels) hands each expert's
activations and outputs to a recorder as it computes them, only for the (token, expert) pairs the
router chose. Memory is bounded: sums are [E], [E, H] or [E, E], samples are capped.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import kernels, models


@dataclass
class LayerStats:
    """Statistics of one MoE layer over a calibration set (sums; see the module docstring)."""

    layer: int
    num_experts: int
    top_k: int
    tokens: int = 0
    counts: torch.Tensor = None
    soft_mass: torch.Tensor = None
    soft_mass_routed: torch.Tensor = None
    reap_sum: torch.Tensor = None
    reap_topk_sum: torch.Tensor = None
    ean_sum: torch.Tensor = None
    dern_sum: torch.Tensor = None
    out_sum: torch.Tensor = None
    gated_out_sum: torch.Tensor = None
    logit_gram: torch.Tensor = None
    prob_gram: torch.Tensor = None
    hidden_abs_sum: torch.Tensor = None
    input_sample: torch.Tensor = None
    counts_by_group: dict = field(default_factory=dict)
    _sample_keys: torch.Tensor = None

    def init(self, hidden: int, outputs: bool = True) -> None:
        E, f64 = self.num_experts, torch.float64
        for name in ("counts", "soft_mass", "soft_mass_routed", "reap_sum", "reap_topk_sum", "ean_sum", "dern_sum"):
            setattr(self, name, torch.zeros(E, dtype=f64))
        self.out_sum = torch.zeros(E, hidden, dtype=f64) if outputs else None
        self.gated_out_sum = torch.zeros(E, hidden, dtype=f64) if outputs else None
        self.logit_gram = torch.zeros(E, E, dtype=f64)
        self.prob_gram = torch.zeros(E, E, dtype=f64)
        self.hidden_abs_sum = torch.zeros(hidden, dtype=f64)

    @property
    def frequency(self) -> torch.Tensor:
        """freq_e = |X_e| / (K T) (the frequency criterion of MC-SMoE and REAP)."""
        return self.counts / max(1, self.top_k * self.tokens)

    def group_share(self) -> tuple[list, torch.Tensor]:
        """Where each expert's tokens come from: (group names, [G, E] shares that sum to 1 per expert).

        Needs a calibration set with a ``domain`` column. Experts that saw no token get zeros.
        """
        if not self.counts_by_group:
            raise ValueError("no per-domain counts: observe a calibration set that has a `domain` column")
        names = sorted(self.counts_by_group)
        m = torch.stack([self.counts_by_group[g] for g in names])
        return names, m / m.sum(0, keepdim=True).clamp_min(1)

    def main_group_share(self) -> float:
        """Mean over used experts of the share of its tokens that come from its main domain.

        1/G means no specialisation, 1 means every expert serves one domain only.
        """
        _, share = self.group_share()
        used = self.counts > 0
        return float(share.max(0).values[used].mean())


@dataclass
class Observation:
    """What one calibration pass saw: per MoE layer ``LayerStats``, per decoder layer ``layer_cos``."""

    layers: dict
    layer_cos: dict
    tokens: int
    groups: list
    model_key: dict | None = None  # {layer: what identifies the observed layer}, see ``model_key``
    calibration: dict | None = None  # what identifies the calibration set, see ``calibration_identity``
    norm_energy: dict | None = None  # {residual norm name: [H] mean normalised input energy}; None if not observed

    def __getitem__(self, layer: int) -> LayerStats:
        return self.layers[layer]

    def check_model(self, model) -> None:
        """Raise ValueError unless ``model``'s MoE layers are the ones observed: same expert counts,
        widths and router weights (an observation of another model, or of this one before it was
        pruned, merged or trained, would pair experts with statistics that are not theirs)."""
        if self.model_key is None:
            return
        now = model_key(model, self.model_key)
        for idx, then in self.model_key.items():
            if idx not in now:
                raise ValueError(f"this observation covers MoE layer {idx}, which the model does not have: it was made on "
                                 "another model; observe this one (moelab.observe.observe(model, calibration_set))")
            for field_name, before in then.items():
                after = now[idx][field_name]
                if before is not None and after is not None and before != after:
                    raise ValueError(
                        f"this observation was made on another model, or on this one before it was edited or trained: "
                        f"layer {idx}'s {field_name} was {before}, is {after}; observe the model as it is now "
                        "(moelab.observe.observe(model, calibration_set))")

    def check_finite(self) -> None:
        """Raise if any statistic holds NaN or Inf (a broken model or calibration set)."""
        for idx, st in self.layers.items():
            for name, val in vars(st).items():
                if isinstance(val, torch.Tensor) and val.is_floating_point() and not torch.isfinite(val).all():
                    raise FloatingPointError(
                        f"observation of layer {idx}: statistic {name!r} holds NaN or Inf; check the model's "
                        "weights (moelab.io.check_finite) and that the calibration rows are valid token ids"
                    )
        for name, val in (self.norm_energy or {}).items():
            if not torch.isfinite(val).all():
                raise FloatingPointError(f"observation of norm {name!r}: its input energy holds NaN or Inf; check the "
                                         "model's weights (moelab.io.check_finite)")


def layer_stats(obs, model=None):
    """The per-layer statistics of an ``Observation`` (first checked to be ``model``'s,
    ``Observation.check_model``) or of a plain {layer: LayerStats} dict."""
    if isinstance(obs, Observation):
        if model is not None:
            obs.check_model(model)
        return obs.layers
    return obs


def model_key(model, layers=None) -> dict:
    """What identifies each MoE layer of ``model`` for ``Observation.check_model``: expert count, top-k,
    hidden size, expert width and a float32 checksum of the router weight (None where it cannot be read)."""
    wanted = None if layers is None else set(layers)
    out = {}
    for layer in models.moe_layers(model):
        if wanted is not None and layer.layer_idx not in wanted:
            continue
        try:
            w = layer._router_weight()
            checksum = None if w.device.type == "meta" else round(float(w.detach().float().abs().sum()), 3)
            width = layer.intermediate_size
        except Exception:  # offloaded or unusual layouts: the sizes still identify the layer
            checksum, width = None, None
        out[layer.layer_idx] = {"experts": layer.num_experts, "top_k": layer.top_k, "hidden": layer.hidden_size,
                                "expert_width": width, "router_checksum": checksum}
    return out


class _Recorder:
    """Accumulates one layer's statistics; called by the experts kernel once per expert run."""

    def __init__(self, layer: models.MoELayer, stats: LayerStats, sample_size: int, generator: torch.Generator,
                 group_ids: list, outputs: bool = True):
        self.layer, self.stats, self.sample_size, self.gen = layer, stats, sample_size, generator
        self.outputs = outputs
        self.group_ids = group_ids
        self.group_counts = torch.zeros(len(group_ids), stats.num_experts, dtype=torch.float64)
        self.probs = None      # [T, E] of the current batch (set by the block pre-hook)
        self.all_valid = True  # the batch has no padding (skips masking in the kernel callback)
        self.valid = None      # [T] bool, attention mask of the current batch
        self.topk_denom = None
        self.token_group = None

    def finish(self) -> LayerStats:
        """The statistics, with the per-domain counts filled in and the sampling keys dropped."""
        self.stats._sample_keys = None
        self.stats.counts_by_group = {g: self.group_counts[i] for i, g in enumerate(self.group_ids)}
        return self.stats

    # -- block pre-hook: routing statistics for every token of the batch
    def before_block(self, hidden: torch.Tensor, valid: torch.Tensor, token_group: torch.Tensor) -> None:
        st = self.stats
        h = hidden.reshape(-1, hidden.shape[-1])
        if st.counts is None:
            st.init(h.shape[-1], self.outputs)
        route = self.layer.route(h)
        probs = route.probs.float()
        self.probs, self.valid, self.token_group = probs, valid, token_group
        self.topk_denom = probs.gather(1, route.topk_idx).sum(-1).clamp_min(1e-20)
        all_valid = self.all_valid = bool(valid.all())
        hv = h if all_valid else h[valid]
        pv = probs if all_valid else probs[valid]
        lv = route.router_logits.float() if all_valid else route.router_logits.float()[valid]
        hv = hv.float()
        st.tokens += hv.shape[0]
        # Per-batch sums in float32 (fast), accumulated across batches in float64 (exact enough).
        st.soft_mass += pv.sum(0).double().cpu()
        st.logit_gram += (lv.T @ lv).double().cpu()
        st.prob_gram += (pv.T @ pv).double().cpu()
        st.hidden_abs_sum += hv.abs().sum(0).double().cpu()
        if self.sample_size:
            keys = torch.rand(hv.shape[0], generator=self.gen)
            hv = hv.cpu()  # statistics live on the CPU whatever device the layer runs on
            pool = hv if st.input_sample is None else torch.cat([st.input_sample, hv])
            pkeys = keys if st._sample_keys is None else torch.cat([st._sample_keys, keys])
            keep = torch.topk(pkeys, min(self.sample_size, len(pkeys)), largest=False).indices
            # bottom-k random keys over all tokens seen so far: a uniform sample of bounded size
            st.input_sample, st._sample_keys = pool[keep], pkeys[keep]

    # -- experts kernel callback: all routed (token, expert) pairs of this forward, sorted by expert
    def __call__(self, module, token_idx, expert_idx, out, weight) -> None:
        st = self.stats
        if not self.all_valid:
            keep = self.valid[token_idx]
            token_idx, expert_idx, out, weight = token_idx[keep], expert_idx[keep], out[keep], weight[keep]
        if token_idx.numel() == 0:
            return
        E = st.num_experts
        outf = out.float()
        g = self.probs[token_idx, expert_idx]
        norms = torch.linalg.vector_norm(outf, dim=-1)
        per_pair = torch.stack([g, g * norms, weight.float() * norms, norms, g / self.topk_denom[token_idx]], dim=1)
        dev = out.device
        sums = torch.zeros(E, per_pair.shape[1], device=dev).index_add_(0, expert_idx, per_pair).double().cpu()
        st.counts += torch.bincount(expert_idx, minlength=E).double().cpu()
        st.soft_mass_routed += sums[:, 0]
        st.reap_sum += sums[:, 1]
        st.reap_topk_sum += sums[:, 2]
        st.ean_sum += sums[:, 3]
        st.dern_sum += sums[:, 4]
        if self.outputs:
            st.out_sum += torch.zeros(E, outf.shape[1], device=dev).index_add_(0, expert_idx, outf).double().cpu()
            st.gated_out_sum += (torch.zeros(E, outf.shape[1], device=dev)
                                 .index_add_(0, expert_idx, g.unsqueeze(-1) * outf).double().cpu())
        if self.token_group is not None:
            G = len(self.group_ids)
            flat = self.token_group[token_idx] * E + expert_idx
            self.group_counts += torch.bincount(flat, minlength=G * E).reshape(G, E).double().cpu()


def _decoder_layers(model):
    return models.decoder_layers(model)


class _StopForward(Exception):
    pass


def _norm_hooks(model, energy: dict, batch_state: dict) -> list:
    """Pre-hooks on every residual norm adding up x_c^2 / mean(x^2) of its valid input tokens into
    ``energy[name] = [sum [H] float64, tokens]``; none for a family whose norms moelab cannot map."""
    try:
        norms = models.residual_norms(model)
    except models.UnsupportedModelError:
        return []
    handles = []
    for name, norm in norms.items():
        centred = isinstance(norm, torch.nn.LayerNorm) or isinstance(getattr(norm, "bias", None), torch.Tensor)

        def pre(mod, args, kwargs, name=name, centred=centred):
            x = args[0] if args else kwargs["hidden_states"]
            z = x.reshape(-1, x.shape[-1]).float()
            if not batch_state["all_valid"]:
                z = z[batch_state["valid"].to(z.device)]
            if centred:
                z = z - z.mean(-1, keepdim=True)
            sq = z.pow(2)
            ratio = sq / sq.mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            acc = energy.setdefault(name, [torch.zeros(z.shape[-1], dtype=torch.float64), 0])
            acc[0] += ratio.sum(0).double().cpu()
            acc[1] += z.shape[0]
        handles.append(norm.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


@contextmanager
def _observing(model, recorders: dict, layer_cos: dict | None, stop_after: int | None, batch_state: dict,
               cosines: bool = True, norm_energy: dict | None = None):
    """Install the block pre-hooks, kernel recorders, (unless ``layer_cos`` is None) decoder-layer hooks
    and (with ``norm_energy``) the residual norms' pre-hooks."""
    handles = [] if norm_energy is None else _norm_hooks(model, norm_energy, batch_state)
    previous_impl = model.config._experts_implementation
    kernels.use_sorted_kernel(model)
    try:
        for idx, rec in recorders.items():
            def pre(mod, args, kwargs, rec=rec):
                hidden = args[0] if args else kwargs["hidden_states"]
                group = batch_state["group"]
                rec.before_block(hidden, batch_state["valid"].to(hidden.device),
                                 None if group is None else group.to(hidden.device))
            handles.append(rec.layer.block.register_forward_pre_hook(pre, with_kwargs=True))
            rec.layer.experts_module()._moelab_recorder = rec
        for i, dec in enumerate(_decoder_layers(model) if layer_cos is not None else []):
            def cos_hook(mod, args, kwargs, output, i=i):
                if not cosines:
                    if stop_after is not None and i >= stop_after:
                        raise _StopForward
                    return
                x = args[0] if args else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output
                x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
                if not batch_state["all_valid"]:
                    v = batch_state["valid"].to(x.device)
                    x, y = x[v], y[v]
                c = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
                s, n = layer_cos.get(i, (0.0, 0))
                layer_cos[i] = (s + float(c.double().sum()), n + int(c.numel()))
                if stop_after is not None and i >= stop_after:
                    raise _StopForward
            handles.append(dec.register_forward_hook(cos_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for rec in recorders.values():
            mod = rec.layer.experts_module()
            if hasattr(mod, "_moelab_recorder"):
                del mod._moelab_recorder
        if previous_impl != kernels.KERNEL_NAME and previous_impl is not None:
            model.set_experts_implementation(previous_impl)


def _rows(dataset):
    """Normalise a calibration set to (input_ids [N, L] tensor, attention_mask, group names per row)."""
    if isinstance(dataset, torch.Tensor):
        return dataset, torch.ones_like(dataset), None
    if isinstance(dataset, dict):
        ids = torch.as_tensor(dataset["input_ids"])
        return ids, torch.as_tensor(dataset.get("attention_mask", torch.ones_like(ids))), dataset.get("domain")
    cols = [c for c in ("input_ids", "attention_mask") if c in dataset.column_names]
    tensors = dataset.with_format("torch", columns=cols)[:]
    ids = tensors["input_ids"]
    mask = tensors["attention_mask"] if "attention_mask" in cols else torch.ones_like(ids)
    groups = list(dataset["domain"]) if "domain" in dataset.column_names else None
    return ids, mask, groups


@torch.no_grad()
def observe(model, dataset, *, batch_size: int = 8, sample_size: int = 512, layers=None, seed: int = 0,
            progress: bool = True, min_tokens: int = 64, outputs: bool = True, cosines: bool = True) -> Observation:
    """Run the calibration set through the model once and collect the statistics of every MoE layer.

    Args:
        model: a loaded transformers MoE model (any family moelab.models supports).
        dataset: a ``datasets.Dataset`` with ``input_ids`` (and optionally ``attention_mask`` and
            ``domain``, which gives per-domain counts), or an [N, L] tensor of token ids.
        batch_size: rows per forward pass.
        sample_size: size of the uniform sample of MoE inputs kept per layer (0 keeps none).
        layers: decoder-layer indices of the MoE layers to observe (default all). With a single
            layer the forward pass stops after that layer (used by ``observe_sequential``).
        seed: seeds the input sample.
        min_tokens: refuse calibration sets with fewer valid tokens than this.
        outputs: collect ``out_sum`` and ``gated_out_sum`` (output similarity, HC-SMoE); off, they
            are None and the methods that need them say so.
        cosines: collect ``layer_cos`` (SlimQwen's depth pruning by input-output similarity); off, it
            is empty.

    Returns:
        An ``Observation``.

    Raises:
        ValueError: empty or too-small calibration set, or a model with no MoE layers.
    """
    from tqdm.auto import tqdm

    ids, mask, groups, n_valid = _checked_rows(dataset, min_tokens, model)
    moe = models.moe_layers(model)
    if layers is not None:
        wanted = set(layers)
        moe = [l for l in moe if l.layer_idx in wanted]
        if not moe:
            raise ValueError(f"none of layers {sorted(wanted)} is an MoE layer of this model")
    group_names = sorted(set(groups)) if groups else []
    gen = torch.Generator().manual_seed(seed)
    recorders = {}
    for layer in moe:
        st = LayerStats(layer.layer_idx, layer.num_experts, layer.top_k)
        recorders[layer.layer_idx] = _Recorder(layer, st, sample_size, gen, group_names, outputs)
    layer_cos: dict = {}
    stop_after = moe[-1].layer_idx if layers is not None and len(moe) == 1 else None
    # Inputs go where the embeddings are (accelerate moves activations between the devices of a
    # dispatched model itself); weights offloaded to disk sit on the meta device, so use the CPU.
    device = models.input_device(model)
    state = {"valid": None, "all_valid": True, "group": None}
    was_training = model.training
    model.eval()
    energy = {} if layers is None else None  # the norms' statistics come from a pass over the whole model
    with _observing(model, recorders, layer_cos, stop_after, state, cosines, energy):
        for i in tqdm(range(0, len(ids), batch_size), desc="observing", disable=not progress, mininterval=2):
            x, m = ids[i:i + batch_size], mask[i:i + batch_size]
            _batch_state(state, m, groups, group_names, i, batch_size, device)
            try:
                model(input_ids=x.to(device), attention_mask=m.to(device), use_cache=False)
            except _StopForward:
                pass
    model.train(was_training)
    out = Observation(layers={k: r.finish() for k, r in recorders.items()},
                      layer_cos={k: s / max(1, n) for k, (s, n) in sorted(layer_cos.items())},
                      tokens=n_valid, groups=group_names, model_key=model_key(model, recorders),
                      calibration=calibration_identity(dataset),
                      norm_energy=None if not energy else {k: s / max(1, n) for k, (s, n) in energy.items()})
    out.check_finite()
    return out


def _checked_rows(dataset, min_tokens: int, model=None):
    """The rows of a calibration set, checked against ``model``: ids within its vocabulary, rows no longer
    than its positions, and (for a ``data.calibration_set``) made with the tokenizer it was loaded with."""
    from . import data

    ids, mask, groups = _rows(dataset)
    n_valid = int(mask.sum()) if ids.numel() else 0
    if n_valid < min_tokens:
        raise ValueError(f"calibration set has {n_valid} valid tokens, fewer than min_tokens={min_tokens}; "
                         "build a larger one with moelab.data.calibration_set(tokens=...)")
    if model is None:
        return ids, mask, groups, n_valid
    made_with, loaded_with = data.tokenizer_key_of(dataset), getattr(model, "moelab_tokenizer_key", None)
    if made_with and loaded_with and made_with != loaded_with:
        raise ValueError(f"the calibration set was tokenised by another tokenizer ({made_with}) than the model's "
                         f"({loaded_with}); build it with the model's own: data.calibration_set(tokenizer, ...)")
    emb = model.get_input_embeddings()
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"the calibration set holds token ids in [{int(ids.min())}, {int(ids.max())}], outside the "
                         f"model's vocabulary of {vocab}: it was tokenised for another model; build it with this "
                         "model's tokenizer (data.calibration_set(tokenizer, ...))")
    if ids.ndim == 2:
        models.check_positions(model, ids.shape[1], "calibration rows")
    return ids, mask, groups, n_valid


def _batch_state(state: dict, m: torch.Tensor, groups, group_names: list, i: int, batch_size: int, device) -> None:
    """Set the valid-token mask and domain ids of rows i .. i + batch_size for the block pre-hooks."""
    state["valid"] = m.reshape(-1).bool().to(device)
    state["all_valid"] = bool(state["valid"].all())
    if groups:
        g = torch.tensor([group_names.index(s) for s in groups[i:i + batch_size]])
        state["group"] = g.repeat_interleave(m.shape[1]).to(device)


def observe_sequential(model, dataset, edit, *, replay: bool = True, batch_size: int = 8, sample_size: int = 512,
                       seed: int = 0, progress: bool = True, min_tokens: int = 64) -> dict:
    """Observe and edit MoE layers one at a time, front to back (REAM's sequential merging).

    Layer l is observed after the layers before it were edited, so its calibration inputs pass
    through the already-compressed earlier layers.

    ``replay=True`` keeps the calibration hidden states at the input of the current layer: one
    forward pass up to the last MoE layer records every decoder layer's call (masks, positions) and
    the first MoE layer's inputs; then each layer is observed by one forward of that layer alone,
    edited, and run once more (edited) to give the next layer its inputs. The whole job costs about
    three forward passes of the calibration set, against about (L + 1) / 2 when each layer is observed
    by a pass from the embeddings (``replay=False``, stopping after the observed layer). Both see the
    same inputs and give the same statistics. The kept hidden states take rows x length x hidden
    elements in the model's dtype (128 MiB for 32,768 tokens at hidden 2048 in bf16).

    Args:
        model: the model to compress in place.
        dataset: the calibration set (as for ``observe``).
        edit: ``edit(layer_idx, LayerStats)`` compresses that layer in place.
        replay: layer-wise replay (default) or one pass from the embeddings per layer.
        batch_size, sample_size, seed, progress, min_tokens: as for ``observe`` (each layer's input
            sample is drawn with a generator seeded by ``seed``).

    Returns:
        {layer_idx: LayerStats seen before that layer was edited}.
    """
    kwargs = dict(batch_size=batch_size, sample_size=sample_size, seed=seed, progress=progress, min_tokens=min_tokens)
    if not replay:
        seen = {}
        for layer in [l.layer_idx for l in models.moe_layers(model)]:
            obs = observe(model, dataset, layers=[layer], **kwargs)
            seen[layer] = obs[layer]
            edit(layer, obs[layer])
        return seen
    return _replay(model, dataset, edit, **kwargs)


def _split_call(args: tuple, kwargs: dict):
    """(hidden states, the other positional arguments, the other keyword arguments) of a decoder-layer call."""
    if args:
        return args[0], args[1:], dict(kwargs)
    kw = dict(kwargs)
    return kw.pop("hidden_states"), (), kw


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _replay(model, dataset, edit, *, batch_size: int, sample_size: int, seed: int, progress: bool,
            min_tokens: int) -> dict:
    from tqdm.auto import tqdm

    ids, mask, groups, _ = _checked_rows(dataset, min_tokens, model)
    moe_idx = [l.layer_idx for l in models.moe_layers(model)]
    if not moe_idx:
        raise ValueError("the model has no MoE layers to observe")
    first, last = moe_idx[0], moe_idx[-1]
    decs = _decoder_layers(model)
    group_names = sorted(set(groups)) if groups else []
    device = models.input_device(model)
    was_training = model.training
    model.eval()

    # 1. one pass up to the last MoE layer: every decoder layer's call arguments and the first MoE layer's input
    batches = []
    for i in range(0, len(ids), batch_size):
        x, m = ids[i:i + batch_size], mask[i:i + batch_size]
        rec = {"mask": m, "start": i, "calls": {}}

        def capture(mod, args, kw, j):
            hidden, rest, other = _split_call(args, kw)
            rec["calls"][j] = (rest, other)
            if j == first:
                rec["hidden"] = hidden
            if j == last:
                raise _StopForward

        handles = [decs[j].register_forward_pre_hook(lambda mod, a, k, j=j: capture(mod, a, k, j), with_kwargs=True)
                   for j in range(first, last + 1)]
        try:
            model(input_ids=x.to(device), attention_mask=m.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        batches.append(rec)

    # 2. layer by layer: observe (one layer forward), edit, run the edited layer to feed the next one
    seen, state = {}, {"valid": None, "all_valid": True, "group": None}
    for j in tqdm(range(first, last + 1), desc="observing layer by layer", disable=not progress, mininterval=2):
        dec = _decoder_layers(model)[j]
        if j in moe_idx:
            layer = next(l for l in models.moe_layers(model) if l.layer_idx == j)
            st = LayerStats(j, layer.num_experts, layer.top_k)
            recorder = _Recorder(layer, st, sample_size, torch.Generator().manual_seed(seed), group_names)
            with _observing(model, {j: recorder}, None, None, state):
                for b in batches:
                    hidden = b["hidden"]
                    _batch_state(state, b["mask"], groups, group_names, b["start"], batch_size, hidden.device)
                    rest, other = b["calls"][j]
                    dec(hidden, *rest, **other)
            stats = recorder.finish()
            Observation({j: stats}, {}, stats.tokens, group_names).check_finite()
            seen[j] = stats
            edit(j, stats)
            dec = _decoder_layers(model)[j]
        if j < last:
            for b in batches:
                rest, other = b["calls"][j]
                b["hidden"] = _layer_output(dec(b["hidden"], *rest, **other))
    model.train(was_training)
    return seen


# ---------------------------------------------------------------------------------------------
# Observe once, compress many times: an observation on disk
# ---------------------------------------------------------------------------------------------
OBSERVATION_FORMAT = "moelab-observation/2"  # 2: with the residual norms' input energy
_SCALARS = ("layer", "num_experts", "top_k", "tokens")


def calibration_identity(dataset) -> dict:
    """What identifies a calibration set: rows, valid tokens, its tokenizer (for a ``data.calibration_set``)
    and a hash of its token ids and mask."""
    import hashlib

    from . import data

    ids, mask, groups = _rows(dataset)
    h = hashlib.sha256()
    h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(mask.to(torch.int8).contiguous().numpy().tobytes())
    if groups:
        h.update("\0".join(groups).encode())
    return {"rows": int(ids.shape[0]), "tokens": int(mask.sum()), "tokenizer": data.tokenizer_key_of(dataset),
            "ids_sha256": h.hexdigest()[:16]}


def save(obs: Observation, path, *, model=None, dataset=None, extra: dict | None = None):
    """Write ``obs`` to one safetensors file (statistics as tensors, the rest as JSON metadata).

    The file records the observed layers' identity (``Observation.model_key``: expert counts, widths,
    router checksums), so ``load(path, model)`` refuses another model; with ``model`` the model's name or
    path, with ``dataset`` the calibration set's identity (``calibration_identity``), and ``extra`` (e.g.
    the mix) go in too. Written to a temporary file and renamed into place.

    Returns:
        The path written.
    """
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    import moelab

    path = Path(path)
    tensors, layers = {}, {}
    for idx, st in obs.layers.items():
        rec = {k: getattr(st, k) for k in _SCALARS}
        for name, val in vars(st).items():
            if isinstance(val, torch.Tensor) and name != "_sample_keys":
                tensors[f"layers.{idx}.{name}"] = val.detach().cpu().contiguous()
        for g, val in st.counts_by_group.items():
            tensors[f"layers.{idx}.counts_by_group.{g}"] = val.detach().cpu().contiguous()
        rec["groups"] = sorted(st.counts_by_group)
        layers[str(idx)] = rec
    for name, val in (obs.norm_energy or {}).items():
        tensors[f"norms.{name}"] = val.detach().cpu().contiguous()
    meta = {"format": OBSERVATION_FORMAT, "moelab": getattr(moelab, "__version__", None), "tokens": obs.tokens,
            "groups": obs.groups, "layer_cos": {str(k): float(v) for k, v in obs.layer_cos.items()},
            "model_key": {str(k): v for k, v in (obs.model_key or {}).items()}, "layers": layers,
            "calibration": calibration_identity(dataset) if dataset is not None else obs.calibration,
            "model": None if model is None else str(getattr(model, "name_or_path", None) or
                                                     getattr(model.config, "_name_or_path", "")),
            "extra": extra or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"moelab_observation": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load(path, model=None) -> Observation:
    """Read an observation written by ``save``; with ``model``, check that it is the observed one
    (``Observation.check_model``: expert counts, widths and router checksums).

    Raises:
        ValueError: not an observation file, a damaged one, or (with ``model``) another model's.
    """
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("moelab_observation")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable observation file ({type(exc).__name__}: {exc}); "
                         "observe the model again and save it with moelab.observe.save") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a moelab observation (no 'moelab_observation' "
                         "metadata); write observations with moelab.observe.save")
    meta = json.loads(raw)
    if meta.get("format") != OBSERVATION_FORMAT:
        raise ValueError(f"{path} holds observation format {meta.get('format')!r}; this moelab reads "
                         f"{OBSERVATION_FORMAT!r}: observe the model again")
    layers = {}
    for key, rec in meta["layers"].items():
        st = LayerStats(**{k: rec[k] for k in _SCALARS})
        prefix = f"layers.{key}."
        for name, t in tensors.items():
            if name.startswith(prefix) and "." not in name[len(prefix):]:
                setattr(st, name[len(prefix):], t)
        st.counts_by_group = {g: tensors[f"{prefix}counts_by_group.{g}"] for g in rec["groups"]}
        layers[int(key)] = st
    obs = Observation(layers=layers, layer_cos={int(k): v for k, v in meta["layer_cos"].items()},
                      tokens=meta["tokens"], groups=meta["groups"],
                      model_key={int(k): v for k, v in meta["model_key"].items()} or None,
                      calibration=meta.get("calibration"),
                      norm_energy={k[len("norms."):]: t for k, t in tensors.items() if k.startswith("norms.")} or None)
    if model is not None:
        obs.check_model(model)
    return obs


def observe_cached(model, dataset, folder, **kwargs) -> Observation:
    """``observe(model, dataset, **kwargs)`` once per model, calibration set and arguments: the result is
    kept in ``folder`` under a name hashing the three, and read back from there on the next call."""
    import hashlib
    import json
    from pathlib import Path

    key = json.dumps({"model": {str(k): v for k, v in model_key(model).items()},
                      "calibration": calibration_identity(dataset),
                      "kwargs": {k: kwargs[k] for k in sorted(kwargs) if k != "progress"}}, sort_keys=True, default=str)
    path = Path(folder) / f"observation-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.exists():
        try:
            return load(path, model)
        except ValueError as exc:
            import warnings

            warnings.warn(f"{exc}; observing again")
    obs = observe(model, dataset, **kwargs)
    save(obs, path, model=model, dataset=dataset)
    return obs
