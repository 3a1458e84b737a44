"""A per-head RMSNorm on queries and keys (Qwen3's q_norm and k_norm) replaced by a fixed scale per head.

Qwen3 normalizes each head's query and key before the rotation: n(k) = w * k / sqrt(mean(k^2) + eps).
DeepSeek-V3 has no such norm (its latent norm acts on the whole latent, not on one head), so no stock
layer reproduces it; the closest linear map is w * k / r with r a typical RMS of that head's projection.
Here r^2 is the head's mean square over the inputs' second moment C = E[x x^T] (calibration activations,
or, without data, the input RMSNorm's gains squared on the diagonal, i.e. inputs of unit RMS before the
gain): r_h^2 = trace(W_h C W_h^T) / d + eps. Tokens whose head RMS departs from r_h are scaled wrongly in
proportion; the query refit and layer-wise steps, which fit to the source's normalized logits and outputs,
absorb part of that. The report measures what is left per layer.
"""

from __future__ import annotations

import torch


def input_second_moment(input_gain: torch.Tensor) -> torch.Tensor:
    """E[x̃ x̃ᵀ] of augmented inputs x̃ = [x; 1] when x = gain * x̂ and x̂ has independent unit-variance entries:
    the data-free stand-in for calibration statistics."""
    gain = input_gain.to(torch.float64)
    return torch.diag(torch.cat([gain.square(), gain.new_ones(1)]))


def linearized(
    weight: torch.Tensor, norm_weight: torch.Tensor, heads: int, eps: float, second_moment: torch.Tensor
) -> torch.Tensor:
    """The augmented projection [heads*d, n+1] with each head's rows multiplied by norm_weight / r_h."""
    d = weight.shape[0] // heads
    rows = weight.view(heads, d, -1)
    moment = second_moment.to(device=weight.device, dtype=weight.dtype)
    mean_square = torch.einsum("hdi,ij,hdj->h", rows, moment, rows) / d  # [heads]
    scale = norm_weight.to(weight)[None, :, None] / (mean_square + eps).sqrt()[:, None, None]
    return (rows * scale).reshape(weight.shape)
