"""Query refit: with the converted keys fixed, refit each head's query map (no-rope and rotary rows) so the
converted attention logits match the source's on the calibration inputs.

The closed form derives the query map from the source's, which is exact only where every key component
kept its rotation; where one did not, the best query map is a different one. The logits are linear in the
query weights, so this is a linear least-squares problem over all causal (query, key) pairs of the
calibration windows, solved iteratively (L-BFGS; the normal equations couple positions through the
rotation). Queries and keys are taken from the modules themselves through a capturing attention
function, so the stored layout is whatever the modules compute. A refit that does not lower the
attention-output error on held-out calibration windows is undone bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from .layer_fit import HELD_SHARE, attention_error

CAPTURE = "mla_convert_capture"
FIT_WINDOWS = 6  # windows the logits are fitted on (cost and memory: windows * heads * seq_len^2 logits)
_captured: list[tuple[torch.Tensor, torch.Tensor]] = []


def _capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
    """An attention function that records (query, key) after rotary and returns zeros: only logits matter."""
    _captured.append((query, key))
    batch, _, seq, _ = query.shape
    return query.new_zeros(batch, seq, query.shape[1], value.shape[-1]), None


AttentionInterface.register(CAPTURE, _capture)


@dataclass
class QueryRefit:
    """Held-out relative attention-output error before and after, and the logit error on the fit windows."""

    before: float
    after: float
    logit_error_before: float
    logit_error_after: float


def queries_and_keys(attn: Any, x: torch.Tensor, pos: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(query [B, heads, T, dq], key [B, kv heads, T, dq]) of an attention module on x, after rotary."""
    config = attn.config
    saved, config._attn_implementation = config._attn_implementation, CAPTURE
    _captured.clear()
    try:
        attn(x, pos, None)
        return _captured.pop()
    finally:
        config._attn_implementation = saved
        _captured.clear()


def logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled attention logits [B, heads, T, T]; key heads repeat over their query group."""
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
    return scaling * query @ key.transpose(-1, -2)


def refit_queries(
    attn: Any,
    source_attn: Any,
    x: torch.Tensor,
    pos: Any,
    source_pos: Any,
    target: torch.Tensor,
    iterations: int = 20,
) -> QueryRefit:
    """Refit attn.q_proj in place (see module docstring); target is the source attention output on x."""
    held = max(1, x.shape[0] // HELD_SHARE)
    before = attention_error(attn, x[-held:], target[-held:], pos)
    if x.shape[0] <= held:
        return QueryRefit(before, before, float("nan"), float("nan"))
    fit = x[:-held][:FIT_WINDOWS]
    seq = fit.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
    with torch.no_grad():
        wanted = logits(*queries_and_keys(source_attn, fit, source_pos), source_attn.scaling)
        wanted = torch.where(causal, wanted, 0.0)
        keys = queries_and_keys(attn, fit, pos)[1].detach()
    norm = wanted.square().sum().clamp_min(1e-30)
    weight = attn.q_proj.weight
    stored, trainable = weight.detach().clone(), weight.requires_grad

    def loss_now() -> torch.Tensor:
        got = logits(queries_and_keys(attn, fit, pos)[0], keys, attn.scaling)
        return torch.where(causal, got - wanted, 0.0).square().sum() / norm

    with torch.no_grad():
        start = float(loss_now())
    weight.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_now()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight.requires_grad_(trainable)  # as it was: --layer-steps trains it next
    weight.grad = None
    with torch.no_grad():
        end = float(loss_now())
    after = attention_error(attn, x[-held:], target[-held:], pos)
    if not after < before:  # no held-out gain: the closed form stays, bit for bit
        with torch.no_grad():
            weight.copy_(stored)
        return QueryRefit(before, before, start**0.5, start**0.5)
    return QueryRefit(before, after, start**0.5, end**0.5)
