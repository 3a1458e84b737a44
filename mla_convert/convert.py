"""Drive the conversion layer by layer: read source tensors, apply the math, emit DeepSeek tensors.

Tensors flow one way, source -> math -> sink, one layer at a time, so memory is bounded by a layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .families import EMBED, FINAL_NORM, LAYER_TENSORS, LM_HEAD
from .mla.exact import SourceAttention, augment, mla_form, rotary_components
from .mla.factorize import relative_error, weight_svd
from .mla.latent_norm import attention_input_bound
from .mla.layout import attention_tensors
from .plan import Geometry, Plan
from .source import Source

Sink = Callable[[str, torch.Tensor], None]


@dataclass
class LayerStats:
    index: int
    k_rel_error: float
    v_rel_error: float
    rope_energy_kept: float
    latent_scale: float


def _layer_name(key: str, i: int) -> str:
    return LAYER_TENSORS[key].format(i=i)


def read_attention(source: Source, geo: Geometry, i: int, keep_bias: bool, device: str = "cpu") -> SourceAttention:
    """One source attention layer in float64; biases dropped unless keep_bias."""

    def aug(key: str) -> torch.Tensor:
        base = _layer_name(key, i)
        weight = source.get(f"{base}.weight").to(device=device, dtype=torch.float64)
        bias = None
        if keep_bias and source.has(f"{base}.bias"):
            bias = source.get(f"{base}.bias").to(device=device, dtype=torch.float64)
        return augment(weight, bias)

    return SourceAttention(
        q=aug("q"), k=aug("k"), v=aug("v"), num_heads=geo.heads, num_kv_heads=geo.kv_heads, head_dim=geo.head_dim
    )


def key_energies(source: Source, geo: Geometry, keep_bias: bool) -> torch.Tensor:
    """Per layer, per frequency, the query-weighted energy of each mixed KV-head rotary component."""
    return torch.stack([rotary_components(read_attention(source, geo, i, keep_bias)).energy for i in range(geo.layers)])


def convert_layer(source: Source, plan: Plan, i: int, sink: Sink, device: str = "cpu") -> LayerStats:
    geo = plan.geometry
    src = read_attention(source, geo, i, plan.keep_bias, device)
    form = mla_form(src, plan.slots, plan.q_scale)
    factors = weight_svd(form.kv, plan.kv_rank)
    input_norm = source.get(f"{_layer_name('input_norm', i)}.weight").to(torch.float64)
    o_proj = source.get(f"{_layer_name('o', i)}.weight").to(torch.float64) * plan.residual_scale
    layer = attention_tensors(
        form,
        factors,
        num_heads=geo.heads,
        num_kv_heads=geo.kv_heads,
        head_dim=geo.head_dim,
        input_bound=attention_input_bound(input_norm),
        keep_bias=plan.keep_bias,
        o_proj=o_proj,
    )
    prefix = f"model.layers.{i}."
    for suffix, tensor in layer.tensors.items():
        sink(f"{prefix}self_attn.{suffix}", tensor)
    sink(f"{prefix}input_layernorm.weight", input_norm)
    sink(f"{prefix}post_attention_layernorm.weight", source.get(f"{_layer_name('post_norm', i)}.weight"))
    for key in ("gate", "up"):
        sink(f"{prefix}mlp.{key}_proj.weight", source.get(f"{_layer_name(key, i)}.weight"))
    down = source.get(f"{_layer_name('down', i)}.weight").to(torch.float64) * plan.residual_scale
    sink(f"{prefix}mlp.down_proj.weight", down)

    rec = factors.up @ factors.down
    rows = geo.kv_heads * geo.head_dim
    return LayerStats(
        index=i,
        k_rel_error=_part_error(src.k, form.kv[:rows], rec[:rows]),
        v_rel_error=relative_error(form.kv[rows:], rec[rows:]),
        rope_energy_kept=form.rope_energy_kept,
        latent_scale=layer.latent_scale,
    )


def _part_error(reference: torch.Tensor, exact: torch.Tensor, approx: torch.Tensor) -> float:
    """Error of the reconstructed keys relative to the whole source key map (the rotary part is exact)."""
    norm = float(torch.linalg.matrix_norm(reference))
    return float(torch.linalg.matrix_norm(exact - approx)) / norm if norm > 0 else 0.0


def convert(
    source: Source,
    plan: Plan,
    sink: Sink,
    on_layer: Callable[[LayerStats], None] | None = None,
    device: str = "cpu",
) -> list[LayerStats]:
    """Emit every tensor of the DeepSeek-V3 checkpoint through `sink`; return per-layer statistics."""
    lam = plan.residual_scale
    embed = source.get(EMBED)
    sink(EMBED, embed.to(torch.float64) * lam if lam != 1.0 else embed)
    stats = []
    for i in range(plan.geometry.layers):
        layer = convert_layer(source, plan, i, sink, device)
        stats.append(layer)
        if on_layer:
            on_layer(layer)
    # The output head is always written untied: vLLM and SGLang ignore tie_word_embeddings for DeepSeek,
    # and the embedding carries the residual scale while the head must not.
    sink(FINAL_NORM, source.get(FINAL_NORM))
    sink(LM_HEAD, embed if plan.geometry.tied or not source.has(LM_HEAD) else source.get(LM_HEAD))
    return stats
