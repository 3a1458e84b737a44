"""Rotary bookkeeping: source frequencies, the target frequency ladder, and per-frequency head mixing.

RoPE rotates each 2-D pair of a head by one frequency. Mixing the KV heads of one frequency with a
scalar matrix commutes with that rotation, so per frequency we may rotate across heads to gather the
rotary energy into as few components as possible; each component then needs one rotary slot.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def source_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """The source's per-pair inverse frequencies (float64) and the attention scale its rope applies to cos/sin."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    default = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope_type == "default":
        return default, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.to(torch.float64), float(scaling)


def half_split_pairs(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the two members of each rotary pair in the Llama half-split layout."""
    half = head_dim // 2
    first = torch.arange(half)
    return first, first + half


def ladder(rope_dim: int, theta: float) -> torch.Tensor:
    """The plain frequency ladder every serving engine computes for a DeepSeek rotary key."""
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))


def portable_theta(source_theta: float, rope_dim: int, head_dim: int, stride: int = 1, density: int = 1) -> float:
    """The rope_theta whose ladder of rope_dim/2 frequencies is every stride-th source frequency, or with
    density > 1 every source frequency followed by density - 1 slots spaced evenly (in log frequency)
    before the next one."""
    return source_theta ** (stride * rope_dim / (head_dim * density))


def near_slots(exact: list[int | None], density: int, freqs: int) -> list[tuple[int, int] | None]:
    """Slots of a ladder with `density` slots per source frequency step.

    Slot density*j holds source frequency j's first mixed component exactly. The slots between j and
    j + 1 (in log frequency) hold further components of the nearer of the two: those in the first half
    components 1, 2, ... of j, those in the second half the next ones of j + 1. Such a component rotates
    a fraction of a step too slowly or too fast instead of not rotating at all. A component left over
    takes a spare slot past the slowest frequency, where it barely rotates (as it would not in the latent),
    so every slot is used and the latent stays as narrow as the slots allow.
    """
    half = density // 2
    slots: list[tuple[int, int] | None] = []
    for k, match in enumerate(exact):
        j, r = divmod(k, density)
        if match is not None:
            slot: tuple[int, int] | None = (match, 0)
        elif density == 1 or j >= freqs:
            slot = None
        elif r <= half or j + 1 >= freqs:
            slot = (j, r)
        else:
            slot = (j + 1, half + density - r)
        slots.append(None if slot in slots else slot)  # past the slowest frequency: already placed
    if density > 1:  # a component left without a near slot (the fastest frequency's last) takes a spare one
        spare = [k for k, slot in enumerate(slots) if slot is None and k // density < freqs]
        left = [(j, r) for j in range(freqs) for r in range(1, density) if (j, r) not in slots]
        for k, component in zip(spare, left, strict=False):
            slots[k] = component
    return slots


def match_ladder(target: torch.Tensor, source: torch.Tensor, rel_tol: float = 1e-4) -> list[int | None]:
    """For each target slot, the source frequency it reproduces exactly (None where none matches)."""
    matches: list[int | None] = []
    used: set[int] = set()
    log_src = torch.log(source)
    for freq in target.tolist():
        gaps = (log_src - math.log(freq)).abs()
        best = int(torch.argmin(gaps))
        if gaps[best] <= rel_tol and best not in used:
            matches.append(best)
            used.add(best)
        else:
            matches.append(None)
    return matches


def head_mixing(pairs: torch.Tensor, query_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Per frequency, the mix of KV heads that concentrates rotary energy where the queries look.

    pairs: [freqs, heads, 2, features] key rows of each KV head's rotary pair; query_weight [freqs, heads]:
    the squared norm of the query rows that read each KV head (None: all equal). We take the principal
    components of the query-weighted keys, which is the rank-1 fit that minimises the score error of the
    components left without rotation.
    Returns (energy [freqs, M] descending, build [freqs, G, M], coef [freqs, G, M]): component m of
    frequency i is sum_g build[i, g, m] * pairs[i, g], and pairs[i, g] = sum_m coef[i, g, m] * component m.
    """
    if query_weight is None:
        query_weight = torch.ones(pairs.shape[:2], dtype=pairs.dtype, device=pairs.device)
    root = query_weight.clamp_min(torch.finfo(pairs.dtype).tiny).sqrt()  # [freqs, G]
    weighted = pairs * root[:, :, None, None]
    gram = torch.einsum("fgrx,fhrx->fgh", weighted, weighted)
    energy, mix = torch.linalg.eigh(gram)
    energy, mix = energy.flip(-1).clamp_min(0), mix.flip(-1)
    return energy, mix * root[:, :, None], mix / root[:, :, None]
