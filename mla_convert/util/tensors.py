"""Tensor arithmetic with bounded memory, for whole-checkpoint tensors (a 7B model's embedding table)."""

from __future__ import annotations

import torch

SCALE_ROWS = 4096


def scaled(tensor: torch.Tensor, factor: float, dtype: torch.dtype, in_place: bool = False) -> torch.Tensor:
    """tensor * factor, multiplied in a wider type and rounded to dtype, a block of rows at a time.

    Blocks keep memory near the output's size (a whole 7B embedding in float64 would take 1 GB), and
    in_place (for a tensor the caller owns, already in dtype) reuses the input's memory.
    """
    if factor == 1.0:
        return tensor
    if tensor.dtype == dtype and dtype in (torch.bfloat16, torch.float16):
        # 16-bit ops compute in float32 and round once: the same as widening by hand, without the copies
        return tensor.mul_(factor) if in_place else tensor * factor
    out = tensor if in_place and tensor.dtype == dtype else torch.empty(tensor.shape, dtype=dtype)
    for start in range(0, tensor.shape[0], SCALE_ROWS):
        out[start : start + SCALE_ROWS] = tensor[start : start + SCALE_ROWS].to(torch.float64) * factor
    return out
