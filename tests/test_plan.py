"""Planning from the config alone: budget split, lossless widths, profile settings."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from mla_convert.errors import ConversionError
from mla_convert.plan import make_plan

SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    vocab_size=49152,
)


@pytest.mark.parametrize(("budget", "rope", "latent"), [(0.5, 64, 128), (0.25, 32, 64), (0.125, 16, 32)])
def test_budget_split_on_smollm2_shapes(budget, rope, latent):
    plan = make_plan(LlamaConfig(**SMOLLM2), kv_budget=budget)
    assert (plan.rope_dim, plan.kv_rank) == (rope, latent)
    assert plan.kv_elements <= budget * 384
    assert plan.rope_theta == pytest.approx(100000.0 ** (rope / 64))
    assert all(slot == (j, 0) for j, slot in enumerate(plan.slots))  # the fastest frequencies


def test_lossless_widths_per_profile():
    portable = make_plan(LlamaConfig(**SMOLLM2))
    assert (portable.rope_dim, portable.kv_rank) == (64, 2 * 64 + 3 * 64)  # 2 of 3 rotary components + values
    assert not portable.compressed
    full = make_plan(LlamaConfig(**SMOLLM2), target="transformers")
    assert (full.rope_dim, full.kv_rank) == (192, 192) and full.kv_elements == 384


def test_scales_fold_source_softmax_and_norm_epsilon():
    plan = make_plan(LlamaConfig(**SMOLLM2), kv_rank=100, rope_dim=32)
    assert plan.q_scale == pytest.approx((64 + 32) ** 0.5 / 64**0.5)
    assert plan.residual_scale == pytest.approx((1e-6 / 1e-5) ** 0.5)


def test_auto_dtype_keeps_bfloat16_and_maps_float16_to_bfloat16():
    assert make_plan(LlamaConfig(**SMOLLM2, dtype="bfloat16")).dtype == torch.bfloat16
    assert make_plan(LlamaConfig(**SMOLLM2, dtype="float16")).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kv_rank": 321}, "between 1 and 320"),
        ({"rope_dim": 66}, "larger than the lossless width 64"),
        ({"rope_dim": 200, "target": "transformers"}, "larger than the lossless width 192"),
        ({"kv_budget": 0.005}, "too few"),
        ({"target": "vllm"}, "--target must be one of"),
    ],
)
def test_invalid_requests_are_refused(kwargs, fragment):
    with pytest.raises(ConversionError, match=fragment):
        make_plan(LlamaConfig(**SMOLLM2), **kwargs)
