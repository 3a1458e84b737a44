"""Choose how to spend a KV budget (rotary width, which frequencies, latent width) by measurement.

Each candidate split is converted layer by layer on a few calibration windows and scored by how far its
attention output lands from the source's on the same inputs (after the same o_proj refit as the real
run). The lowest mean relative error wins; the table of all candidates goes into the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from ..errors import ConversionError
from ..mla.activation import psd_root
from ..plan.plan import Plan
from ..source.checkpoint import Source
from .calibrator import SourceWalk, refit_output_projection
from .driver import layer_tensors
from .layer_fit import batched, build_attention, deepseek_runtime_config, relative, rotary, second_moment

ROPE_CHOICES = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
STRIDES = (1, 2)
DENSITIES = (2, 3)  # ladders with several slots per source frequency (see rotary.near_slots)
SELECTION_WINDOWS = 8


@dataclass
class Scored:
    plan: Plan
    error: float  # mean over layers of the relative attention-output error

    def describe(self) -> str:
        return f"{ladder_name(self.plan)} + latent {self.plan.kv_rank}: {self.error:.4f}"


def ladder_name(plan: Plan) -> str:
    """How the report names a rotary ladder: its width and how it spaces the source frequencies."""
    spacing = f"density {plan.density}" if plan.density > 1 else f"stride {plan.stride}"
    return f"rope {plan.rope_dim} ({spacing})"


def budget_candidates(
    make: Callable[..., Plan], total: int, rotary_dim: int, max_rope: int, portable: bool
) -> list[Plan]:
    """Valid (rope width, ladder) splits of `total` cache elements; the latent takes the rest.

    The portable profile also tries dense ladders (several slots per source frequency, up to
    density * rotary_dim wide), which give more mixed rotary components a near frequency."""
    plans = []
    for rope in ROPE_CHOICES:
        if rope >= total:
            continue
        if rope <= max_rope:
            for stride in STRIDES if portable else (1,):
                if (rope // 2 - 1) * stride > rotary_dim // 2 - 1:
                    continue
                try:
                    plans.append(make(rope_dim=rope, kv_rank=total - rope, stride=stride))
                except ConversionError:
                    continue
        for density in DENSITIES if portable else ():
            # a dense ladder narrower than half its reach covers only the fastest frequencies: on SmolLM2 at
            # budget 0.5 every such candidate measured worse than the plain ladder of the same width
            if density * rotary_dim // 2 <= rope <= density * rotary_dim:
                try:
                    plans.append(make(rope_dim=rope, kv_rank=total - rope, stride=1, density=density))
                except ConversionError:
                    continue
    if not plans:
        raise ConversionError(f"no valid split of {total} cache elements between rotary key and latent")
    return plans


def stride_candidates(make: Callable[..., Plan], rope_dim: int, kv_rank: int, rotary_dim: int) -> list[Plan]:
    """A rotary key of fixed width over every ladder stride the source's frequencies allow (at least stride 1)."""
    plans = [make(rope_dim=rope_dim, kv_rank=kv_rank, stride=1)]  # wider than rotary_dim: already dense
    for stride in STRIDES[1:]:
        if (rope_dim // 2 - 1) * stride <= rotary_dim // 2 - 1:
            try:
                plans.append(make(rope_dim=rope_dim, kv_rank=kv_rank, stride=stride))
            except ConversionError:  # e.g. a latent wider than this ladder's lossless rank
                continue
    for density in DENSITIES:
        if density > plans[0].density:
            try:
                plans.append(make(rope_dim=rope_dim, kv_rank=kv_rank, stride=1, density=density))
            except ConversionError:
                continue
    return plans


def full_size_candidates(make: Callable[..., Plan], plan: Plan, rotary_dim: int, kv_heads: int) -> list[Plan]:
    """The same cache at full size spent on denser ladders: each extra slot per source frequency takes
    rotary_dim elements from the latent, which then needs that many fewer. A ladder whose latent would no
    longer be lossless (a latent capped by the hidden size) is not a candidate."""
    plans = [plan]
    for density in DENSITIES:
        if density > kv_heads:
            continue
        rope = density * rotary_dim
        try:
            dense = make(rope_dim=rope, kv_rank=plan.kv_rank + plan.rope_dim - rope, stride=1, density=density)
        except ConversionError:
            continue
        if not dense.compressed:
            plans.append(dense)
    return plans


@torch.no_grad()
def score_candidates(
    source: Source,
    plans: list[Plan],
    ids: torch.Tensor,
    on_layer: Callable[[int], None] | None = None,
    device: str = "cpu",
) -> list[Scored]:
    """Run every candidate on the source's own activations, layer by layer."""
    walk = SourceWalk(source, ids[:SELECTION_WINDOWS], device)
    runtimes = []
    for plan in plans:
        config = deepseek_runtime_config(plan, source.config)
        runtimes.append((config, rotary(DeepseekV3RotaryEmbedding(config), walk.h[:1], ids.shape[1])))
    totals = [0.0] * len(plans)
    layers = plans[0].geometry.layers
    for i in range(layers):
        x, ref = walk.step(i)
        cov = second_moment(x)
        root = psd_root(cov)[0]
        for c, (plan, (config, pos)) in enumerate(zip(plans, runtimes, strict=True)):
            tensors, _ = layer_tensors(source, plan, i, cov, device, cov_root=root)
            attn = build_attention(config, i, tensors, device)
            target = ref * plan.residual_scale
            if plan.refit_output:
                refit_output_projection(attn, x, pos, target, tensors, i)
            out = batched(lambda t, a=attn, p=pos: a(t, p, None)[0], x)
            totals[c] += relative(out, target)
        if on_layer:
            on_layer(i)
    return [Scored(plan, total / layers) for plan, total in zip(plans, totals, strict=True)]


def pick(scored: list[Scored]) -> tuple[Plan, str]:
    best = min(scored, key=lambda s: s.error if math.isfinite(s.error) else math.inf)
    table = "; ".join(s.describe() for s in sorted(scored, key=lambda s: s.error))
    reason = (
        f"measured on calibration windows, mean relative attention-output error per layer: {table}; "
        f"chose {ladder_name(best.plan)} + latent {best.plan.kv_rank}"
    )
    return best.plan, reason
