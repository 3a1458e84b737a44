"""Keep DeepSeek's latent RMSNorm linear by holding it in its epsilon regime.

RMSNorm(c) = w * c / sqrt(mean(c^2) + eps). When the stored latent c is so small that mean(c^2) is
a vanishing fraction of eps, the norm is the fixed linear scale w / sqrt(eps). We store the
down-projection scaled by a tiny factor s and set w = sqrt(eps) / s, so the product is the original map.
The engines agree on the result only if they agree on eps, which the converter guarantees by writing
rms_norm_eps equal to transformers' fixed latent-norm epsilon (see residual.py).
"""

from __future__ import annotations

import math

import torch

LATENT_NORM_EPS = 1e-6  # transformers builds kv_a_layernorm with this fixed epsilon
SAFETY = 1e-4  # stored latent rms <= SAFETY * sqrt(eps): relative deviation from linear <= SAFETY**2 / 2


def epsilon_regime_scale(down: torch.Tensor, input_bound: float) -> float:
    """The factor s that keeps the latent's mean square far below eps for any input with |[x; 1]| <= input_bound."""
    rank = down.shape[0]
    # the largest singular value, from the small Gram matrix (an SVD of down costs seconds for a 7B layer)
    spectral = math.sqrt(max(float(torch.linalg.eigvalsh(down @ down.mT)[-1]), 0.0)) if down.numel() else 0.0
    if spectral == 0.0:
        return 1.0
    worst_rms = spectral * input_bound / math.sqrt(rank)
    return SAFETY * math.sqrt(LATENT_NORM_EPS) / worst_rms


def attention_input_bound(input_norm_weight: torch.Tensor) -> float:
    """Upper bound on |[x; 1]| where x = g * h / rms(h) is the attention input (|h / rms(h)|^2 <= n)."""
    n = input_norm_weight.numel()
    return math.sqrt(n * float(input_norm_weight.abs().max()) ** 2 + 1.0)
