"""A renormalized softmax router expressed, as closely as a stock class allows, by DeepSeek-V2's router.

Mixtral and Qwen3-MoE weight their top-k experts by the softmax's probabilities renormalized over the top k,
p_i / s with s = sum_topk p_j. DeepSeek-V2 picks the same experts (the top k of the same softmax) and weights
them by p_i itself. The two differ by the factor 1/s, which changes from token to token, so no constant
folds it away; a constant c (folded into the layer's expert down-projections, exactly) can still match it
on average. c minimises the squared error of the weights, sum (c p_i - p_i / s)^2, over the router logits of
calibration tokens (or, without data, of inputs drawn from the norm's gains).

(DeepSeek-V3's router was measured as the other candidate: a sigmoid ranks logits as the softmax does, but
sigmoid(l_i) / sum sigmoid(l_j) is far from the renormalized softmax once the logits spread, 0.23 to 0.86
relative weight error for logit spreads of 1 to 5 against 0.02 to 0.19 for this mapping; bench/router_mapping.py)
"""

from __future__ import annotations

import torch


def topk_probabilities(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[tokens, top_k] softmax probabilities of each token's top_k experts (not renormalized)."""
    return logits.to(torch.float64).softmax(-1).topk(top_k, dim=-1).values


def renormalization_scale(logits: torch.Tensor, top_k: int) -> tuple[float, float, float]:
    """(c, relative weight error at c = 1, at c) for router logits [tokens, experts].

    The error is sqrt(sum (c p - p/s)^2 / sum (p/s)^2) over all tokens and chosen experts."""
    p = topk_probabilities(logits.reshape(-1, logits.shape[-1]), top_k)
    target = p / p.sum(-1, keepdim=True)
    scale = float((p * target).sum() / (p * p).sum())

    def error(c: float) -> float:
        return float(((c * p - target).square().sum() / target.square().sum()).sqrt())

    return scale, error(1.0), error(scale)


def proxy_logits(router: torch.Tensor, norm_gain: torch.Tensor, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """Router logits on inputs the data-free path can draw: the post-attention norm's gains times independent
    unit-variance entries (what the norm's output looks like before the gains, if nothing else is known)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, norm_gain.shape[0], generator=gen, dtype=torch.float64) * norm_gain.to(torch.float64)
    return x @ router.to(torch.float64).T
