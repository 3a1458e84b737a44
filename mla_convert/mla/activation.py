"""Activation-aware factorization: fit the latent to what the key/value maps do to real inputs.

With C = E[x̃ x̃ᵀ] the second moment of the (augmented) attention input, the error that matters for a
key/value map ΔM is not ||ΔM|| but how it moves scores and outputs: ||R ΔM L|| with C = L Lᵀ and R a
row metric (per KV head: the second moment of the queries that read its keys, and o_proj's Gram for its
values). The best rank-r latent is then the top-r left singular subspace of R M L.
"""

from __future__ import annotations

import torch

from .factorize import Factors

RIDGE = 1e-6  # relative regulariser: keeps every metric invertible, so full rank stays exact
NOISE = 1e-20  # energy ratio below which the no-rope keys are float64 rounding noise, not a map


def psd_root(matrix: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root and inverse square root of a PSD matrix, regularised relative to its trace."""
    size = matrix.shape[0]
    scale = float(torch.trace(matrix)) / size if size else 0.0
    vals, vecs = torch.linalg.eigh(
        matrix + ridge * max(scale, 1e-30) * torch.eye(size, dtype=matrix.dtype, device=matrix.device)
    )
    vals = vals.clamp_min(ridge * max(scale, 1e-30))
    return (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T


def kv_row_metric(
    q_nope: torch.Tensor,
    o_proj: torch.Tensor,
    cov: torch.Tensor,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal row metric (and its inverse) for the stacked [no-rope keys; values] of all KV heads.

    q_nope [H, d, n+1]: each head's no-rope query map; o_proj [n, H*d]. Key blocks use the queries'
    second moment, value blocks o_proj's Gram (activation_factors balances the two halves).
    """
    heads = q_nope.shape[0]
    group = heads // num_kv_heads
    q_moment = torch.einsum("hdx,xy,hey->hde", q_nope, cov, q_nope)  # [H, d, d]
    o_heads = o_proj.view(o_proj.shape[0], heads, head_dim).permute(1, 2, 0)  # [H, d, n]
    o_gram = o_heads @ o_heads.transpose(1, 2)  # [H, d, d]
    k_blocks = q_moment.view(num_kv_heads, group, head_dim, head_dim).sum(1)
    v_blocks = o_gram.view(num_kv_heads, group, head_dim, head_dim).sum(1)
    return k_blocks, v_blocks


def activation_factors(
    kv: torch.Tensor,
    cov: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    rank: int,
    cov_root: torch.Tensor | None = None,
) -> Factors:
    """Rank-`rank` latent minimising the metric-weighted error of kv [2*G*d, n+1] on inputs with moment cov.

    cov_root (psd_root(cov)[0]) can be passed when the caller has it: for a 7B layer it is an
    eigendecomposition of a 4097-square matrix.
    """
    kv_heads, d = k_blocks.shape[0], k_blocks.shape[1]
    if cov_root is None:
        cov_root = psd_root(cov)[0]
    roots, inv_roots = [], []
    for block in (*k_blocks, *v_blocks):
        root, inv = psd_root(block)
        roots.append(root)
        inv_roots.append(inv)
    rows = kv_heads * d
    weighted = torch.cat([r @ kv[i * d : (i + 1) * d] for i, r in enumerate(roots)]) @ cov_root
    k_energy = float(weighted[:rows].square().sum())
    v_energy = float(weighted[rows:].square().sum())
    # Keys whose no-rope part is only rounding noise (every key dimension rotates, as at full size under
    # --target transformers) must not be balanced up to the values' energy: the noise would take latent rank.
    keys_present = k_energy > NOISE * v_energy and v_energy > 0
    balance = (v_energy / k_energy) ** 0.5 if keys_present else 1.0
    scale = torch.ones(2 * kv_heads, dtype=kv.dtype, device=kv.device)
    scale[:kv_heads] = balance
    weighted = weighted * scale.repeat_interleave(d)[:, None]
    u, s, _ = torch.linalg.svd(weighted, full_matrices=False)
    r = min(rank, s.numel())
    basis = u[:, :r]  # orthonormal in the weighted row space
    metric = torch.block_diag(*[sc * root for sc, root in zip(scale, roots, strict=True)])
    metric_inv = torch.block_diag(*[inv / sc for sc, inv in zip(scale, inv_roots, strict=True)])
    down = basis.T @ metric @ kv
    up = metric_inv @ basis
    if r < rank:
        down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])])
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1)
    return Factors(down=down, up=up, singular_values=s)


def activation_error(reference: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    """Relative error of a linear map measured on inputs with second moment cov: what it does, not its weights."""
    diff = reference - approx
    num = float(torch.einsum("rx,xy,ry->", diff, cov, diff))
    den = float(torch.einsum("rx,xy,ry->", reference, cov, reference))
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
