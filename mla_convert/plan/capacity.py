"""The longest context that fits in a memory size, source beside conversion, known from the config alone.

Why: the smaller cache is the reason to convert, and the figure a user needs before converting is not the
bytes per token but the context that now fits where it did not. Counted: the weights at the output dtype
plus one sequence's KV cache at that dtype (what llama.cpp and vLLM allocate for a 16-bit cache). Not
counted: the engine's own buffers, so this is an upper bound. llama.cpp's compute buffer grows by about
1 KiB per context token too, and under an enforced 4 GiB limit it reached 0.80x (source) and 0.60x (0.25
conversion) of this estimate for SmolLM2 (bench/long_context.py capacity; docs/results.md, "Long context").
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import Plan


def attention_parameters(plan: Plan) -> tuple[int, int]:
    """Attention weights per layer, (source, converted): the conversion widens q by the rotary slice,
    replaces k/v by the latent down-projection, its norm and the per-head up-projection."""
    geo = plan.geometry
    source = geo.hidden * geo.head_dim * (2 * geo.heads + 2 * geo.kv_heads)
    converted = (
        geo.hidden * geo.heads * (plan.nope_dim + plan.rope_dim)  # q
        + geo.hidden * (plan.latent_width + plan.rope_dim)  # kv_a (latent and shared rotary key)
        + plan.latent_width  # the latent's norm
        + plan.latent_width * geo.heads * (plan.nope_dim + geo.head_dim)  # kv_b
        + geo.heads * geo.head_dim * geo.hidden  # o
    )
    return source, converted


def converted_parameters(plan: Plan, source_parameters: int) -> int:
    """The output's parameter count: the attention change in every layer, and an untied output head
    (the conversion writes `tie_word_embeddings` false)."""
    geo = plan.geometry
    source, converted = attention_parameters(plan)
    untied = geo.vocab * geo.hidden if geo.tied else 0
    return source_parameters + geo.layers * (converted - source) + untied


@dataclass(frozen=True)
class Fit:
    """The longest single-sequence context that fits: (memory - weights) / KV bytes per token."""

    weights_bytes: int
    kv_bytes_per_token: int
    tokens: int


def longest_context(memory_bytes: int, parameters: int, kv_bytes_per_token: int, width: int) -> Fit:
    weights = parameters * width
    tokens = max(0, (memory_bytes - weights) // kv_bytes_per_token) if kv_bytes_per_token > 0 else 0
    return Fit(weights_bytes=weights, kv_bytes_per_token=kv_bytes_per_token, tokens=tokens)
