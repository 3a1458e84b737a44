"""Query refit: with the converted keys fixed, refit each head's query map (no-rope and rotary rows) so the
converted attention logits match the source's on the calibration inputs.

The closed form derives the query map from the source's, which is exact only where every key component
kept its rotation; where one did not, the best query map is a different one. The logits are linear in the
query weights, so this is a linear least-squares problem over all causal (query, key) pairs of the
calibration windows, solved iteratively (L-BFGS; the normal equations couple positions through the
rotation). Queries and keys are taken from the modules themselves through a capturing attention
function, so the stored layout is whatever the modules compute. With long calibration windows, their far
rows (attention_rows.FAR_ROWS query positions in the second half) are fitted too, against every key before
them: a rotary component that lost its rotation adds the same score at every distance, and only far pairs
show what that costs. A refit that does not lower the attention-output error on held-out calibration windows (plus, with
long windows, the error at their far positions) is undone bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .attention_rows import FarWindows, logits, queries_and_keys
from .layer_fit import HELD_SHARE, attention_error

FIT_WINDOWS = 6  # windows the logits are fitted on (cost and memory: windows * heads * seq_len^2 logits)


@dataclass
class QueryRefit:
    """Held-out relative attention-output error before and after, and the logit error on the fit windows."""

    before: float
    after: float
    logit_error_before: float
    logit_error_after: float


def refit_queries(
    attn: Any,
    source_attn: Any,
    x: torch.Tensor,
    pos: Any,
    source_pos: Any,
    target: torch.Tensor,
    iterations: int = 20,
    far: FarWindows | None = None,
) -> QueryRefit:
    """Refit attn.q_proj in place (see module docstring); target is the source attention output on x."""
    held = max(1, x.shape[0] // HELD_SHARE)
    before = attention_error(attn, x[-held:], target[-held:], pos)
    if x.shape[0] <= held:
        return QueryRefit(before, before, float("nan"), float("nan"))
    far_before = far.error(attn) if far is not None else 0.0
    fit = x[:-held][:FIT_WINDOWS]
    seq = fit.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
    with torch.no_grad():
        wanted = logits(*queries_and_keys(source_attn, fit, source_pos), source_attn.scaling)
        wanted = torch.where(causal, wanted, 0.0)
        keys = queries_and_keys(attn, fit, pos)[1].detach()
    norm = wanted.square().sum().clamp_min(1e-30)
    far_loss = _far_logits(attn, source_attn, far) if far is not None else None
    weight = attn.q_proj.weight
    stored, trainable = weight.detach().clone(), weight.requires_grad

    def loss_now() -> torch.Tensor:
        got = logits(queries_and_keys(attn, fit, pos)[0], keys, attn.scaling)
        loss = torch.where(causal, got - wanted, 0.0).square().sum() / norm
        return loss + far_loss() if far_loss is not None else loss

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
    far_after = far.error(attn) if far is not None else 0.0
    if not after + far_after < before + far_before:  # no held-out gain: the closed form stays, bit for bit
        with torch.no_grad():
            weight.copy_(stored)
        return QueryRefit(before, before, start**0.5, start**0.5)
    return QueryRefit(before, after, start**0.5, end**0.5)


def _far_logits(attn: Any, source_attn: Any, far: FarWindows) -> Any:
    """The far part of the refit's loss: at the far rows of each long window, the squared logit error against
    every key before them, relative to the source logits' energy."""
    assert far.x is not None
    rows, seq = far.rows, far.x.shape[1]
    before = torch.arange(seq, device=far.x.device)[None, :] <= rows[:, None]  # [rows, seq]
    with torch.no_grad():
        query, key = queries_and_keys(source_attn, far.x, far.src_pos)
        wanted = torch.where(before, logits(query[:, :, rows], key, source_attn.scaling), 0.0)
        keys = queries_and_keys(attn, far.x, far.pos)[1].detach()
    norm = wanted.square().sum().clamp_min(1e-30)

    def loss() -> torch.Tensor:
        query = queries_and_keys(attn, far.x, far.pos)[0][:, :, rows]
        return torch.where(before, logits(query, keys, attn.scaling) - wanted, 0.0).square().sum() / norm

    return loss
