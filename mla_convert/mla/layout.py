"""Lay the MLA form of one layer out as stock DeepSeek-V3 tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .exact import MLAForm
from .factorize import Factors
from .latent_norm import LATENT_NORM_EPS, SAFETY, epsilon_regime_scale


@dataclass
class LayerTensors:
    tensors: dict[str, torch.Tensor]  # suffix under model.layers.{i}.self_attn. -> tensor
    latent_scale: float


def attention_tensors(
    form: MLAForm,
    factors: Factors,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    input_bound: float,
    keep_bias: bool,
    o_proj: torch.Tensor,
    latent_width: int = 0,
    o_bias: torch.Tensor | None = None,
) -> LayerTensors:
    """DeepSeek-V3 attention tensors; with keep_bias the query bias rides on a pass-through q latent, and the
    output projection carries o_bias (zeros when the source has none).

    A latent_width above the factors' rank pads the latent with zeros (zero rows of the down-projection,
    zero columns of kv_b_proj): an engine that only runs certain widths then computes the same scores.
    """
    feats = form.q.shape[-1]
    n = feats - 1
    group = num_heads // num_kv_heads
    root_eps = math.sqrt(LATENT_NORM_EPS)
    s = epsilon_regime_scale(factors.down, input_bound)
    factors = pad_latent(factors, latent_width)
    out: dict[str, torch.Tensor] = {}

    q = form.q.reshape(-1, feats)
    if keep_bias:
        s_q = SAFETY * root_eps * math.sqrt(feats) / input_bound
        out["q_a_proj.weight"] = s_q * torch.eye(feats, n, dtype=q.dtype, device=q.device)
        bias = q.new_zeros(feats)
        bias[-1] = s_q
        out["q_a_proj.bias"] = bias
        out["q_a_layernorm.weight"] = q.new_full((feats,), root_eps / s_q)
        out["q_b_proj.weight"] = q
    else:
        out["q_proj.weight"] = q[:, :n]

    kv_a = torch.cat([s * factors.down, form.k_rope], dim=0)
    out["kv_a_proj_with_mqa.weight"] = kv_a[:, :n]
    if keep_bias:
        out["kv_a_proj_with_mqa.bias"] = kv_a[:, n]
    rank = factors.down.shape[0]
    out["kv_a_layernorm.weight"] = kv_a.new_full((rank,), root_eps / s)

    kv_rows = num_kv_heads * head_dim
    k_up = factors.up[:kv_rows].view(num_kv_heads, head_dim, rank)
    v_up = factors.up[kv_rows:].view(num_kv_heads, head_dim, rank)
    per_head = torch.cat([k_up, v_up], dim=1).repeat_interleave(group, dim=0)  # [H, 2d, r]
    out["kv_b_proj.weight"] = per_head.reshape(num_heads * 2 * head_dim, rank)
    out["o_proj.weight"] = o_proj
    if keep_bias:
        out["o_proj.bias"] = o_bias if o_bias is not None else o_proj.new_zeros(o_proj.shape[0])
    return LayerTensors(tensors=out, latent_scale=s)


def pad_latent(factors: Factors, width: int) -> Factors:
    """The same map with a latent `width` wide: the extra latent values are always zero."""
    rank = factors.down.shape[0]
    if width <= rank:
        return factors
    down = torch.cat([factors.down, factors.down.new_zeros(width - rank, factors.down.shape[1])])
    up = torch.cat([factors.up, factors.up.new_zeros(factors.up.shape[0], width - rank)], dim=1)
    return replace(factors, down=down, up=up)
