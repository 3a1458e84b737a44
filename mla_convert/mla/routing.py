"""A renormalized softmax router expressed, as closely as one can, by DeepSeek-V3's renormalized sigmoids.

Mixtral and Qwen3-MoE weight their top-k experts by softmax(l) renormalized over the top k, i.e. by
exp(l_i) / sum_topk exp(l_j). DeepSeek-V3 weights them by sigmoid(l_i) / sum_topk sigmoid(l_j), and picks the
same experts (a sigmoid and a softmax rank logits alike). The two weightings agree where the logits are very
negative (sigmoid(x) ~ exp(x)) and differ most near zero, where a sigmoid is half as steep as exp at its
centre. A scale a on the router (sigmoid(a * l)) keeps the choice and trades between those regimes; it is
picked per layer on the router logits of calibration tokens, minimising the squared error of the weights.
"""

from __future__ import annotations

import torch

SCALES = torch.linspace(0.5, 4.0, 36, dtype=torch.float64)  # the candidate router scales, 1 and 2 among them


def topk_weights(logits: torch.Tensor, top_k: int, sigmoid_scale: float | None) -> torch.Tensor:
    """[tokens, top_k] renormalized weights of the top_k experts (by logit): softmax's, or sigmoid(scale * l)'s."""
    top = logits.topk(top_k, dim=-1).values
    scores = top.softmax(-1) if sigmoid_scale is None else torch.sigmoid(sigmoid_scale * top)
    return scores / scores.sum(-1, keepdim=True)


def weight_error(logits: torch.Tensor, top_k: int, scale: float) -> float:
    """Mean squared difference of the top-k weights, sigmoid(scale * l) against the softmax's."""
    diff = topk_weights(logits, top_k, scale) - topk_weights(logits, top_k, None)
    return float(diff.square().sum(-1).mean())


def best_sigmoid_scale(logits: torch.Tensor, top_k: int) -> tuple[float, float, float]:
    """(scale, error at scale 1, error at the scale) for router logits [tokens, experts] of calibration text."""
    logits = logits.reshape(-1, logits.shape[-1]).to(torch.float64)
    errors = [weight_error(logits, top_k, float(a)) for a in SCALES]
    best = min(range(len(errors)), key=errors.__getitem__)
    return float(SCALES[best]), weight_error(logits, top_k, 1.0), errors[best]
