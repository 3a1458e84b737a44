"""Attention at chosen query positions, against every key before them: what the far end of a long window
costs, measured in time linear in its length.

A converted layer's error far into a context shows only on long windows, where a whole attention pass is
quadratic in the length and the split measurement would run it for every candidate of every layer. Here
the module's own queries, keys and values are captured (after rotary) through a capturing attention
function, and the softmax is taken for a few hundred far query rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from .layer_fit import batched, relative

CAPTURE = "mla_convert_capture"
FAR_ROWS = 256  # query positions in the second half of a long window where its far error is measured and fitted
_captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []


def _capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
    """An attention function that records (query, key, value) after rotary and returns zeros."""
    _captured.append((query, key, value))
    batch, _, seq, _ = query.shape
    return query.new_zeros(batch, seq, query.shape[1], value.shape[-1]), None


AttentionInterface.register(CAPTURE, _capture)


def captured(attn: Any, x: torch.Tensor, pos: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query [B, heads, T, dq], key [B, kv heads, T, dq], value [B, kv heads, T, dv]) of an attention module."""
    config = attn.config
    saved, config._attn_implementation = config._attn_implementation, CAPTURE
    _captured.clear()
    try:
        attn(x, pos, None)
        return _captured.pop()
    finally:
        config._attn_implementation = saved
        _captured.clear()


def queries_and_keys(attn: Any, x: torch.Tensor, pos: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(query [B, heads, T, dq], key [B, kv heads, T, dq]) of an attention module on x, after rotary."""
    query, key, _ = captured(attn, x, pos)
    return query, key


def _repeat(t: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // t.shape[1]
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled attention logits [B, heads, T, T]; key heads repeat over their query group."""
    return scaling * query @ _repeat(key, query.shape[1]).transpose(-1, -2)


def rows_output(attn: Any, x: torch.Tensor, pos: Any, rows: torch.Tensor) -> torch.Tensor:
    """The input of attn.o_proj [B, len(rows), heads * dv] at query positions `rows` (causal, every earlier
    key): the same numbers the module's own forward gives there."""
    query, key, value = captured(attn, x, pos)
    query = query[:, :, rows]
    scores = logits(query, key, attn.scaling)
    allowed = torch.arange(key.shape[2], device=x.device)[None, :] <= rows[:, None]
    probs = torch.where(allowed, scores, float("-inf")).softmax(-1).to(value.dtype)
    out = probs @ _repeat(value, query.shape[1])  # [B, heads, rows, dv]
    return out.transpose(1, 2).reshape(x.shape[0], rows.numel(), -1)


def far_rows(seq: int) -> torch.Tensor:
    """FAR_ROWS positions spread over the second half of a window of `seq` tokens, its last included."""
    return torch.linspace(seq // 2, seq - 1, min(FAR_ROWS, seq - seq // 2)).round().long().unique()


@dataclass
class FarWindows:
    """Long calibration windows: their residual stream and rotary tables, and, while a layer is fitted, its
    attention inputs and the source attention's output on them."""

    h: torch.Tensor  # [count, long_len, hidden]
    pos: Any  # the converted layer's rotary tables
    src_pos: Any  # the source's
    x: torch.Tensor | None = None
    ref: torch.Tensor | None = None

    @property
    def rows(self) -> torch.Tensor:
        """The far query positions (the second half of each window) where errors are measured and fitted."""
        return far_rows(self.h.shape[1]).to(self.h.device)

    @torch.no_grad()
    def inputs(self, attn: Any) -> torch.Tensor:
        """attn.o_proj's inputs at the far rows [count, rows, heads * dv]."""
        assert self.x is not None
        rows = self.rows
        return batched(lambda t: rows_output(attn, t, self.pos, rows), self.x)

    def target(self) -> torch.Tensor:
        """The source attention's output at the far rows."""
        assert self.ref is not None
        return self.ref[:, self.rows]

    @torch.no_grad()
    def error(self, attn: Any) -> float:
        """Relative attention-output error of attn at the far rows."""
        return relative(attn.o_proj(self.inputs(attn)), self.target())
