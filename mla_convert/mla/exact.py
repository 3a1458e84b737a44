"""The exact MLA form of one GQA/MHA attention layer.

Per frequency the KV heads are mixed (see rotary.head_mixing); the mixed components that get a slot in
the shared rotary key keep their rotation, everything else of the keys, and all values, goes into the
per-head no-rope part that the latent carries. At full latent rank this reproduces the source scores
exactly when every component with energy has a slot; components without a slot lose their rotation.

All matrices are "augmented": the last column is the bias, so a map is W @ [x; 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rotary import half_split_pairs, head_mixing

Slot = tuple[int, int] | None  # (source frequency index, mixed-component rank) or an empty slot


@dataclass
class SourceAttention:
    """One source attention layer in float64, biases folded in as a last column."""

    q: torch.Tensor  # [H*d, n+1]
    k: torch.Tensor  # [G*d, n+1]
    v: torch.Tensor  # [G*d, n+1]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int = 0  # the first rotary_dim dimensions of a head rotate (half-split pairs); 0: all of them

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of each rotary pair within a head; the dimensions past rotary_dim never rotate and stay in the
        no-rope part, exactly."""
        return half_split_pairs(self.rotary_dim or self.head_dim)


@dataclass
class MLAForm:
    """The layer in MLA shape before latent compression."""

    q: torch.Tensor  # [H, d + D, n+1]: no-rope rows (source order), then rope rows (interleaved pairs)
    k_rope: torch.Tensor  # [D, n+1] the shared rotary key, interleaved pairs
    kv: torch.Tensor  # [2*G*d, n+1] per KV head no-rope keys, then per KV head values
    rope_energy: torch.Tensor  # [freqs, G] per-frequency component energy
    rope_energy_kept: float  # share of rotary key energy that still rotates


def augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    column = weight.new_zeros(weight.shape[0], 1) if bias is None else bias[:, None]
    return torch.cat([weight, column.to(weight.dtype)], dim=1)


@dataclass
class RotaryComponents:
    """Per frequency, the query-weighted principal mixes of the KV heads' rotary key pairs."""

    components: torch.Tensor  # [freqs, M, 2, n+1]
    coef: torch.Tensor  # [freqs, G, M]: KV head g's pair = sum_m coef[.., g, m] * component m
    energy: torch.Tensor  # [freqs, M] query-weighted energy of each component, descending


def rotary_components(
    src: SourceAttention, q_heads: torch.Tensor | None = None, cov_root: torch.Tensor | None = None
) -> RotaryComponents:
    """Mix KV heads per frequency; with cov_root (C = L Lᵀ of the inputs) energies are measured on activations."""
    d, kv_heads = src.head_dim, src.num_kv_heads
    feats = src.q.shape[1]
    a, b = src.pairs
    if q_heads is None:
        q_heads = src.q.view(src.num_heads, d, feats)
    k_heads = src.k.view(kv_heads, d, feats)
    pairs = torch.stack([k_heads[:, a], k_heads[:, b]], dim=2).transpose(0, 1)  # [freqs, G, 2, n+1]
    q_pairs = torch.stack([q_heads[:, a], q_heads[:, b]], dim=2)  # [H, freqs, 2, n+1]
    if cov_root is not None:
        q_pairs = q_pairs @ cov_root
    q_energy = q_pairs.square().sum((2, 3)).view(kv_heads, src.group, -1).sum(1).T  # [freqs, G]
    energy, build, coef = head_mixing(pairs if cov_root is None else pairs @ cov_root, q_energy)
    components = torch.einsum("fgrx,fgm->fmrx", pairs, build)
    return RotaryComponents(components=components, coef=coef, energy=energy)


def mla_form(src: SourceAttention, slots: list[Slot], q_scale: float, cov_root: torch.Tensor | None = None) -> MLAForm:
    """Rewrite one layer into MLA form with the given rotary slots (see module docstring)."""
    heads, kv_heads, d = src.num_heads, src.num_kv_heads, src.head_dim
    feats = src.q.shape[1]
    a, b = src.pairs
    k_heads = src.k.view(kv_heads, d, feats)
    q_heads = src.q.view(heads, d, feats) * q_scale
    rot = rotary_components(src, q_heads, cov_root)
    components, coef, energy = rot.components, rot.coef, rot.energy

    rope_dim = 2 * len(slots)
    k_rope = src.k.new_zeros(rope_dim, feats)
    q_rope = src.q.new_zeros(heads, rope_dim, feats)
    k_nope = k_heads.clone()
    group_of_head = torch.arange(heads, device=src.q.device) // src.group
    kept = 0.0
    for j, slot in enumerate(slots):
        if slot is None:
            continue
        freq, comp = slot
        k_rope[2 * j : 2 * j + 2] = components[freq, comp]
        weights = coef[freq, :, comp]  # [G]: how much of this component each KV head holds
        for pos, row in enumerate((a[freq], b[freq])):
            q_rope[:, 2 * j + pos] = weights[group_of_head, None] * q_heads[:, row]
            k_nope[:, row] -= weights[:, None] * components[freq, comp, pos][None, :]
        kept += float(energy[freq, comp])

    q = torch.cat([q_heads, q_rope], dim=1)
    kv = torch.cat([k_nope.reshape(kv_heads * d, feats), src.v], dim=0)
    total = float(energy.sum())
    return MLAForm(
        q=q,
        k_rope=k_rope,
        kv=kv,
        rope_energy=energy,
        rope_energy_kept=kept / total if total > 0 else 1.0,
    )
