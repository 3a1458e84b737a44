"""Unit tests of the conversion math: head mixing, the latent norm regime, the frequency ladder."""

from __future__ import annotations

import math

import torch

from mla_convert.mla.exact import SourceAttention, augment, mla_form
from mla_convert.mla.factorize import weight_svd
from mla_convert.mla.latent_norm import LATENT_NORM_EPS, epsilon_regime_scale
from mla_convert.mla.rotary import head_mixing, ladder, match_ladder, portable_theta


def test_head_mixing_reconstructs_every_head():
    torch.manual_seed(0)
    pairs = torch.randn(4, 3, 2, 10, dtype=torch.float64)
    weights = torch.rand(4, 3, dtype=torch.float64) + 0.1
    energy, build, coef = head_mixing(pairs, weights)
    comps = torch.einsum("fgrx,fgm->fmrx", pairs, build)
    back = torch.einsum("fmrx,fgm->fgrx", comps, coef)
    assert torch.allclose(back, pairs, atol=1e-10)
    assert (energy[:, :-1] >= energy[:, 1:] - 1e-12).all()


def test_dependent_heads_put_all_energy_in_one_component():
    torch.manual_seed(0)
    base = torch.randn(5, 1, 2, 8, dtype=torch.float64)
    pairs = base * torch.randn(5, 3, 1, 1, dtype=torch.float64)
    energy, _, _ = head_mixing(pairs)
    assert (energy[:, 1:] < 1e-9 * energy[:, :1]).all()


def test_latent_norm_in_epsilon_regime_is_linear():
    torch.manual_seed(0)
    down = torch.randn(16, 33, dtype=torch.float64)
    bound = 50.0
    s = epsilon_regime_scale(down, bound)
    x = torch.randn(100, 33, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * bound  # the worst allowed inputs
    c = s * x @ down.T
    normed = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + LATENT_NORM_EPS) * (math.sqrt(LATENT_NORM_EPS) / s)
    assert torch.allclose(normed, x @ down.T, rtol=1e-7, atol=0)


def test_portable_ladder_reproduces_the_fastest_source_frequencies():
    source = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    target = ladder(32, portable_theta(10000.0, 32, 64))
    assert match_ladder(target, source) == list(range(16))
    assert match_ladder(ladder(64, 10000.0), source) == list(range(32))
    assert match_ladder(ladder(8, 7.0), source)[1:] == [None, None, None]


def test_weight_svd_is_exact_at_full_rank_and_pads_beyond_it():
    torch.manual_seed(0)
    kv = torch.randn(12, 5, dtype=torch.float64) @ torch.randn(5, 9, dtype=torch.float64)  # rank 5
    f = weight_svd(kv, 5)
    assert torch.allclose(f.up @ f.down, kv, atol=1e-10)
    padded = weight_svd(kv, 7)
    assert padded.down.shape == (7, 9) and torch.allclose(padded.up @ padded.down, kv, atol=1e-10)


def test_mla_form_scores_match_source_without_rotation():
    """With rotation set aside (position 0), q·k of the MLA form equals the source's for every head."""
    torch.manual_seed(0)
    heads, kv_heads, d, n = 4, 2, 8, 12
    src = SourceAttention(
        q=augment(torch.randn(heads * d, n, dtype=torch.float64), None),
        k=augment(torch.randn(kv_heads * d, n, dtype=torch.float64), torch.randn(kv_heads * d, dtype=torch.float64)),
        v=augment(torch.randn(kv_heads * d, n, dtype=torch.float64), None),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=d,
    )
    form = mla_form(src, [(0, 0), (1, 0), (2, 1)], q_scale=1.0)
    x = torch.cat([torch.randn(n, dtype=torch.float64), torch.ones(1, dtype=torch.float64)])
    for h in range(heads):
        g = h // 2
        source_score = (src.q.view(heads, d, -1)[h] @ x) @ (src.k.view(kv_heads, d, -1)[g] @ x)
        q = form.q[h] @ x
        k_nope = form.kv[g * d : (g + 1) * d] @ x
        mla_score = q[:d] @ k_nope + q[d:] @ (form.k_rope @ x)
        assert torch.isclose(mla_score, source_score, rtol=1e-10)
