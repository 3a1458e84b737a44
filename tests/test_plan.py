"""Planning from the config alone: budget split, lossless widths, profile settings."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from mla_convert.errors import ConversionError
from mla_convert.options import Options, check_options
from mla_convert.plan.plan import make_plan

from .helpers import SMOLLM2


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


def test_a_portable_rotary_key_wider_than_head_dim_is_a_dense_ladder():
    plan = make_plan(LlamaConfig(**SMOLLM2), rope_dim=128)
    assert plan.density == 2 and plan.rope_dim == 128 and plan.full_kv_rank == 256
    assert plan.slots[::2] == [(j, 0) for j in range(32)] and plan.slots[1::2] == [(j, 1) for j in range(32)]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kv_rank": 321}, "between 1 and 320"),
        ({"rope_dim": 194}, "wider than the portable profile can fill: at most 192"),
        ({"rope_dim": 200, "target": "transformers"}, "larger than the lossless width 192"),
        ({"kv_budget": 0.005}, "too few"),
    ],
)
def test_invalid_requests_are_refused(kwargs, fragment):
    with pytest.raises(ConversionError, match=fragment):
        make_plan(LlamaConfig(**SMOLLM2), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"target": "vllm"}, "--target must be one of"),
        ({"engine": "vllm", "rope_dim": 32}, "fixes the rotary key at 64"),
        ({"engine": "vllm", "kv_rank": 600}, "does not fit the 512-wide latent"),
        ({"engine": "vllm", "target": "transformers"}, "needs --target portable"),
    ],
)
def test_requests_refused_without_a_model_are_refused_by_the_options_check(kwargs, fragment):
    with pytest.raises(ConversionError, match=fragment):
        check_options(Options(**kwargs))


LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    vocab_size=128256,
)


def test_engine_vllm_pads_smollm2_to_the_vllm_layout():
    plan = make_plan(LlamaConfig(**SMOLLM2), engine="vllm")
    assert (plan.latent_width, plan.rope_dim, plan.kv_rank) == (512, 64, 320)  # every real component, zeros after
    assert plan.kv_elements == 576 and not plan.compressed
    assert any("1.50x this model's 384" in w for w in plan.warnings)  # more cache than the source: said
    compressed = make_plan(LlamaConfig(**SMOLLM2), engine="vllm", kv_rank=128)
    assert (compressed.latent_width, compressed.kv_rank) == (512, 128) and compressed.compressed


def test_engine_vllm_compresses_a_large_model_to_512_real_components():
    plan = make_plan(LlamaConfig(**LLAMA3_8B), engine="vllm", kv_budget=0.3)
    assert (plan.latent_width, plan.kv_rank, plan.rope_dim) == (512, 512, 64)
    assert plan.full_kv_rank == 2 * (32 * 7 + 32 * 8) + 8 * 128 and plan.compressed  # half the frequencies unrotated
    assert plan.kv_elements / 2048 == pytest.approx(0.28125) and not plan.warnings


def test_engine_vllm_pads_a_narrow_rotary_key_without_losing_frequencies():
    config = LlamaConfig(**{**SMOLLM2, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 1})
    plan = make_plan(config, engine="vllm")
    assert plan.rope_dim == 64 and plan.slots[:8] == [(j, 0) for j in range(8)] and plan.slots[8:] == [None] * 24
    assert not any("match no source frequency" in w for w in plan.warnings)


@pytest.mark.parametrize(
    ("config", "kwargs", "fragment"),
    [
        (SMOLLM2, {"kv_budget": 0.5}, "--engine vllm holds 576 cache elements per token per layer"),
        (LLAMA3_8B, {"kv_budget": 0.25}, "allows 512 of this model's 2048"),
        (SMOLLM2, {"kv_rank": 321}, "between 1 and 320"),
    ],
)
def test_engine_requests_vllm_cannot_serve_are_refused(config, kwargs, fragment):
    with pytest.raises(ConversionError, match=fragment):
        make_plan(LlamaConfig(**config), engine="vllm", **kwargs)


def test_engine_verdicts_follow_the_widths_and_profile():
    from mla_convert.plan.serving import REFUSES, SERVES, UNTESTED, WRONG, verdicts

    def status(*args: object) -> dict[str, str]:
        return {v.engine: v.status for v in verdicts(*args)}  # type: ignore[arg-type]

    assert status("portable", 512, 64, "f32") == {
        "transformers": SERVES,
        "vLLM": SERVES,
        "SGLang": UNTESTED,
        "llama.cpp": SERVES,
    }
    assert status("portable", 320, 64)["vLLM"] == REFUSES and status("portable", 320, 64)["llama.cpp"] == REFUSES
    assert status("portable", 256, 64)["vLLM"] == UNTESTED  # width 320: vLLM's Triton MLA only
    assert status("transformers", 192, 192) == {
        "transformers": SERVES,
        "vLLM": WRONG,
        "SGLang": WRONG,
        "llama.cpp": REFUSES,
    }
