"""Choosing how to spend the cache by measurement: which splits of a KV budget (rotary width, ladder, latent
width) are candidates, how they rank, and the choice, with its reason for the report.

The measurement itself reads weights and runs attention layers, so it lives in conversion/ and comes in as a
`SplitMeasure`: each candidate converted layer by layer on calibration windows and scored by how far its
attention output lands from the source's (conversion/budget.py). With a long calibration window a candidate
also has a far error, and counts by the worse of the two: a ladder that wins over a few hundred tokens and
loses far away (a rotary key that aliases, components that lost their rotation) loses the selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from ..errors import ConversionError
from ..hooks import Hooks
from ..options import Options
from .plan import KeyEnergy, Plan, plan_for

ROPE_CHOICES = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
STRIDES = (1, 2)
DENSITIES = (2, 3)  # ladders with several slots per source frequency (see rotary.near_slots)


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


class SplitMeasure(Protocol):
    """What choosing a split needs from the weights and the calibration text (conversion/budget.py)."""

    def rotary_covariances(self) -> list[torch.Tensor]:
        """Per layer, the second moment of the attention inputs on a few calibration windows."""
        ...

    def key_energy(self, covariances: list[torch.Tensor] | None) -> KeyEnergy:
        """The key energies of the mixed rotary components, weighted by these input moments."""
        ...

    def score(self, plans: list[Plan], on_layer: Callable[[int], None]) -> list[Scored]:
        """Each candidate's near (and far) attention-output error, averaged over layers."""
        ...


def calibrated_plan(config: Any, options: Options, plan: Plan, measure: SplitMeasure, hooks: Hooks) -> Plan:
    """The plan redone with activation statistics: the transformers profile's rotary components and, for a
    budget, fixed widths or full size, the measured split (the data-free plan when there is nothing to choose)."""
    covariances = None
    rules = plan.profile
    if rules.exact_rotary and plan.compressed:
        hooks.on_stage("measuring rotary energy on calibration text")
        covariances = measure.rotary_covariances()
        plan = plan_for(config, options, measure.key_energy(covariances))
    geo = plan.geometry
    max_rope = rules.max_rope(geo.rotary_dim, geo.kv_heads)

    def make(rope_dim: int, kv_rank: int, stride: int, density: int = 1) -> Plan:
        ranks = replace(options, kv_budget=None, kv_rank=kv_rank, rope_dim=rope_dim)
        return plan_for(config, ranks, measure.key_energy(covariances), stride, density)

    fixed_width = options.engine is not None or (rules.ladder and options.rope_dim is not None)
    if fixed_width:  # the widths are fixed: measure which source frequencies the ladder holds
        candidates = stride_candidates(make, plan.rope_dim, plan.kv_rank, geo.rotary_dim)
        flag = f"--engine {options.engine}" if options.engine is not None else f"--rope-dim {plan.rope_dim}"
        why = f"measuring {len(candidates)} rotary ladders for {flag}"
        prefix = plan.split_reason
    elif rules.ladder and not plan.compressed and options.kv_rank is None:
        # full size: a denser ladder gives more rotary components a slot in the same cache
        candidates = full_size_candidates(make, plan, geo.rotary_dim, geo.kv_heads)
        why = f"measuring {len(candidates)} rotary ladders at full size"
        prefix = plan.split_reason
    elif options.kv_budget is None or (plan.rope_dim == max_rope and not plan.compressed):
        return plan  # ranks given, or the budget covers the lossless map
    else:
        total = math.floor(options.kv_budget * geo.kv_elements)
        candidates = budget_candidates(make, total, geo.rotary_dim, max_rope, portable=rules.ladder)
        why = f"measuring {len(candidates)} ways to split the budget"
        prefix = f"budget {options.kv_budget} of {geo.kv_elements} = {total} elements"
    if len(candidates) == 1:
        return candidates[0]
    hooks.on_stage(f"{why}, layer by layer", geo.layers)
    scored = measure.score(candidates, lambda i: hooks.on_progress(i + 1, geo.layers))
    best, reason = pick(scored)
    return replace(best, split_reason=f"{prefix}; {reason}")
