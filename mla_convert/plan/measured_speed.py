"""Decode speed of conversions against their sources, as measured in llama.cpp on a CPU; the dry run and
the card quote the measurement nearest a planned conversion, marked as measured on CPU.

Why a table of measurements and not a model of speed: on a CPU, MLA's absorbed decode does more arithmetic
per cached token than the GQA it replaces (every query head attends over the latent) and reads fewer
bytes, and which of the two wins depends on the machine and the context. Measured, not predicted:
`python bench/long_context.py curve` (docs/results.md, "Long context").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MEASURED_ON = "llama.cpp 0.3.36, 2 CPU cores (AVX2), f16 cache, bf16 weights"


@dataclass(frozen=True)
class Measured:
    """One measured pair: the conversion's cache and arithmetic against its source's, and the speed ratio."""

    model: str
    bench_pair: str  # its name in bench/results/long_context.json ("curve")
    kv_ratio: float  # converted / source cache elements per token
    work_ratio: float  # converted / source multiply-adds per cached token in decode (attention_work)
    speed_ratio: dict[int, float]  # context -> converted / source tok/s, both with flash attention (llama.cpp default)
    best_ratio: dict[int, float]  # the same, each with flash attention on or off, whichever is faster


def attention_work(heads: int, head_dim: int, latent: int | None = None, rope: int = 0) -> int:
    """Multiply-adds per cached token and layer in one decode step: a GQA source's heads each dot a key
    and weight a value (2 x head_dim); absorbed MLA's heads each dot the latent and rotary key and weight
    the latent (2 x latent + rope). The KV head count does not enter: it changes the bytes read, not the
    work."""
    return heads * (2 * head_dim if latent is None else 2 * latent + rope)


# docs/results.md, "Long context": median decode step, cache filled to each context (bench/long_context.py).
MEASURED: tuple[Measured, ...] = (
    Measured(
        "SmolLM2-135M at --kv-budget 0.5 (latent 128 + rotary 64)",
        bench_pair="SmolLM2 0.5",
        kv_ratio=0.5,
        work_ratio=2.5,
        speed_ratio={2048: 1.29, 8192: 1.29, 32768: 2.64, 65536: 3.07, 131072: 3.39, 262144: 2.93},
        best_ratio={2048: 0.96, 8192: 0.69, 32768: 0.68, 65536: 0.68, 131072: 0.78, 262144: 0.88},
    ),
    Measured(
        "SmolLM2-135M at --kv-budget 0.25 (latent 64 + rotary 32)",
        bench_pair="SmolLM2 0.25",
        kv_ratio=0.25,
        work_ratio=1.25,
        speed_ratio={2048: 1.26, 8192: 1.23, 32768: 3.13, 65536: 3.66, 131072: 3.92, 262144: 4.68},
        best_ratio={2048: 0.93, 8192: 0.74, 32768: 0.81, 65536: 0.81, 131072: 0.90, 262144: 1.40},
    ),
    Measured(
        "a Llama-3.2-3B-shaped model at --engine vllm (latent 512 + rotary 64)",
        bench_pair="3B shape",
        kv_ratio=0.28125,
        work_ratio=4.25,
        speed_ratio={2048: 0.89, 8192: 0.76, 32768: 1.51, 65536: 1.61, 131072: 1.89, 262144: 1.65},
        best_ratio={2048: 0.89, 8192: 0.74, 32768: 0.51, 65536: 0.43, 131072: 0.35, 262144: 0.31},
    ),
)


def nearest(kv_ratio: float, work_ratio: float) -> Measured | None:
    """The measured pair closest in cache ratio and work ratio (log distance), None when nothing is measured."""

    def distance(m: Measured) -> float:
        return math.log(m.kv_ratio / kv_ratio) ** 2 + math.log(m.work_ratio / work_ratio) ** 2

    return min(MEASURED, key=distance, default=None)


def at_context(measured: Measured, context: int) -> tuple[int, float, float]:
    """The measured context nearest `context` (log distance), and the speed ratios there: both with flash
    attention, and each at its fastest."""
    near = min(measured.speed_ratio, key=lambda c: abs(math.log(c / max(context, 1))))
    return near, measured.speed_ratio[near], measured.best_ratio[near]
