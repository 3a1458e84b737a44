"""Choose how to spend a KV budget (rotary width, which frequencies, latent width) by measurement.

Each candidate split is converted layer by layer on a few calibration windows and scored by how far its
attention output lands from the source's on the same inputs (after the same o_proj refit as the real
run). With a long calibration window the error at its far positions (rows spread over its second half,
attention_rows.py) is scored too, and a
candidate counts by the worse of the two: a ladder that wins over a few hundred tokens and loses far away
(a rotary key that aliases, components that lost their rotation) loses the selection. The lowest mean
relative error wins; the table of all candidates goes into the report.
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
from .attention_rows import far_rows, rows_output
from .calibrator import SourceWalk, o_proj_inputs, refit_output_projection
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
    far_error: float | None = None  # ... at the far positions of the long calibration window, if any

    @property
    def score(self) -> float:
        """What the selection ranks by: the worse of the near and the far error."""
        worst = self.error if self.far_error is None else max(self.error, self.far_error)
        return worst if math.isfinite(worst) else math.inf

    def describe(self) -> str:
        far = "" if self.far_error is None else f" (far {self.far_error:.4f})"
        return f"{ladder_name(self.plan)} + latent {self.plan.kv_rank}: {self.error:.4f}{far}"


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
    long_ids: torch.Tensor | None = None,
) -> list[Scored]:
    """Run every candidate on the source's own activations, layer by layer (and on long_ids [1, long_len], the
    long calibration window, whose far half is scored on its own)."""
    walk = SourceWalk(source, ids[:SELECTION_WINDOWS], device)
    far_walk = SourceWalk(source, long_ids[:1], device) if long_ids is not None else None
    runtimes = []
    for plan in plans:
        config = deepseek_runtime_config(plan, source.config)
        embedding = DeepseekV3RotaryEmbedding(config)
        far_pos = rotary(embedding, far_walk.h[:1], far_walk.h.shape[1]) if far_walk is not None else None
        runtimes.append((config, rotary(embedding, walk.h[:1], ids.shape[1]), far_pos))
    totals = [0.0] * len(plans)
    far_totals = [0.0] * len(plans)
    rows = far_rows(far_walk.h.shape[1]) if far_walk is not None else None
    layers = plans[0].geometry.layers
    for i in range(layers):
        x, ref = walk.step(i)
        cov = second_moment(x)
        far_x, far_ref = far_walk.step(i) if far_walk is not None else (None, None)
        if far_x is not None:  # the real run's statistics count the long window's tokens too
            short, long = x[..., 0].numel(), far_x[..., 0].numel()
            cov = (cov * short + second_moment(far_x) * long) / (short + long)
        root = psd_root(cov)[0]
        for c, (plan, (config, pos, far_pos)) in enumerate(zip(plans, runtimes, strict=True)):
            tensors, _ = layer_tensors(source, plan, i, cov, device, cov_root=root)
            attn = build_attention(config, i, tensors, device)
            target = ref * plan.residual_scale
            far = None
            if far_x is not None and far_ref is not None:  # the far rows only: linear in the window's length
                far = (rows_output(attn, far_x, far_pos, rows), far_ref[:, rows] * plan.residual_scale)
            if plan.refit_output:
                parts = [(o_proj_inputs(attn, x, pos), target)] + ([far] if far is not None else [])
                refit_output_projection(attn, parts, tensors, i)
            out = batched(lambda t, a=attn, p=pos: a(t, p, None)[0], x)
            totals[c] += relative(out, target)
            if far is not None:
                with torch.no_grad():
                    far_totals[c] += relative(attn.o_proj(far[0]), far[1])
        if on_layer:
            on_layer(i)
    return [
        Scored(plan, total / layers, far / layers if far_walk is not None else None)
        for plan, total, far in zip(plans, totals, far_totals, strict=True)
    ]


def pick(scored: list[Scored]) -> tuple[Plan, str]:
    best = min(scored, key=lambda s: s.score)
    table = "; ".join(s.describe() for s in sorted(scored, key=lambda s: s.score))
    far = scored[0].far_error is not None
    ranked = " (ranked by the worse of it and the far error, on the long window's second half)" if far else ""
    reason = (
        f"measured on calibration windows, mean relative attention-output error per layer{ranked}: {table}; "
        f"chose {ladder_name(best.plan)} + latent {best.plan.kv_rank}"
    )
    return best.plan, reason
