"""How much long-context validation a run does (--long-eval, --long-eval-len) and what it costs.

Short windows hide what compression does far into a context (docs/results.md, "Long context kept"): the
validation therefore also scores the evaluation text by position, in buckets up to the longest context
measured, and asks a synthetic passkey at several lengths. This module only sizes that work, from the flags
and the config, so the dry run can print its cost; evaluate/long_context.py does it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Longest context measured by default: quick fits the default CPU run, full is for a benchmark.
DEFAULT_LENGTHS = {"quick": 4096, "full": 16384}
WINDOWS = {"quick": 1, "full": 4}  # long text windows scored by position (at most)
TRIALS = {"quick": 2, "full": 4}  # passkey prompts per length, at depths spread over the prompt
SHORTEST_PASSKEY = 1024
# Measured on SmolLM2-135M (30 layers, 9 heads of 64) on 2 CPU cores, stock transformers with sdpa: a 2,048-token
# forward took 4.6 s and an 8,192-token one 32.4 s, i.e. about 1.68 ms per token plus 2.8e-7 s per token
# squared. Scaled by parameters, attention width and cores: a rough guide only.
SECONDS_PER_TOKEN, SECONDS_PER_TOKEN_PAIR = 1.68e-3, 2.78e-7
MEASURED_PARAMETERS, MEASURED_ATTENTION, MEASURED_CORES = 134.5e6, 30 * 9 * 64, 2


@dataclass(frozen=True)
class LongEvalPlan:
    """The long-context validation of one run: the context measured, the text windows and the passkeys."""

    mode: str
    length: int  # tokens per scored window, the longest passkey prompt
    windows: int  # long text windows to score by position (fewer when the text is shorter)
    passkey_lengths: tuple[int, ...]
    passkey_trials: int

    def tokens_per_model(self) -> int:
        """Tokens each model reads: the scored windows and every passkey prompt."""
        return self.windows * self.length + self.passkey_trials * sum(self.passkey_lengths)

    def estimated_seconds(self, parameters: int, attention_width: int, models: int) -> float:
        """A rough CPU time for `models` models (the source included), from the one measured model."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        linear = SECONDS_PER_TOKEN * max(parameters, 1) / MEASURED_PARAMETERS
        pairs = SECONDS_PER_TOKEN_PAIR * max(attention_width, 1) / MEASURED_ATTENTION
        lengths = [self.length] * self.windows + [n for n in self.passkey_lengths for _ in range(self.passkey_trials)]
        one_model = sum(linear * n + pairs * n * n for n in lengths)
        return one_model * models * MEASURED_CORES / cores


def long_eval_plan(mode: str, cap: int | None, max_positions: int | None) -> LongEvalPlan | None:
    """The long-context validation for --long-eval MODE (None for off): up to the source's context, capped by
    --long-eval-len (default by mode)."""
    if mode == "off":
        return None
    length = cap if cap is not None else DEFAULT_LENGTHS[mode]
    if max_positions:
        length = min(length, int(max_positions))
    return LongEvalPlan(mode, length, WINDOWS[mode], passkey_lengths(length), TRIALS[mode])


def passkey_lengths(length: int) -> tuple[int, ...]:
    """1K, 2K, 4K, ... up to `length`, and `length` itself (only `length` when it is under 1K)."""
    lengths: list[int] = []
    n = SHORTEST_PASSKEY
    while n < length:
        lengths.append(n)
        n *= 2
    return (*lengths, length)


def bucket_edges(length: int) -> list[int]:
    """Position buckets [edges[i], edges[i+1]) for windows of `length` tokens: the first sixteenth, then up to
    a quarter, a half and the whole (0-512, 512-2K, 2K-4K, 4K-8K at 8K). The first quarter is what the
    report calls near, the last half far."""
    edges = [0, *(length // d for d in (16, 4, 2)), length]
    return sorted(set(edges))


def near_far(length: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The near span (the first quarter) and the far span (the last half) of a window of `length` tokens."""
    return (0, max(1, length // 4)), (length // 2, length)
