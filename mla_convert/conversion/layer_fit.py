"""The pieces every layer-wise fit shares: a converted DeepSeek-V3 layer built from its tensors, rotary
tables, batched forward passes, the attention-output error and the held-out share of calibration windows.

The calibrator, the query refit, layer-wise reconstruction and the budget measurement all build on these,
and nothing here imports them back.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3DecoderLayer,
    DeepseekV3MoE,
)

from ..plan.plan import Plan
from ..plan.target_config import deepseek_config
from ..source.layers import materialise

BATCH = 8  # windows per forward pass: bounds attention memory


def deepseek_runtime_config(plan: Plan, source_config: Any) -> DeepseekV3Config:
    config = DeepseekV3Config(**deepseek_config(plan, source_config))
    config._attn_implementation = "sdpa"  # causal masking with attention_mask=None
    return config


def rotary(embedding: torch.nn.Module, like: torch.Tensor, seq_len: int) -> Any:
    """A rotary embedding's (cos, sin) for positions 0..seq_len-1, on like's device."""
    positions = torch.arange(seq_len, device=like.device)[None]
    return embedding.to(like.device)(like, positions)


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """E[x̃ x̃ᵀ] of the augmented inputs x̃ = [x; 1] (float64), over all tokens of x [..., n]."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    aug = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)
    return aug.T @ aug / aug.shape[0]


def batched(fn: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i : i + BATCH]) for i in range(0, x.shape[0], BATCH)])


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


HELD_SHARE = 8  # query refit and layer-wise steps hold out one calibration window in this many (at least one)


@torch.no_grad()
def attention_error(attn: Any, x: torch.Tensor, target: torch.Tensor, pos: Any) -> float:
    """Relative error of an attention module's output on inputs x against target."""
    return relative(batched(lambda t: attn(t, pos, None)[0], x), target)


def build_layer(
    config: DeepseekV3Config, index: int, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> DeepseekV3DecoderLayer:
    """A converted decoder layer. Its attention is DeepSeek-V3's (DeepSeek-V2's computes the same with
    interleaved rotary pairs); a MoE layer of a DeepSeek-V2 target routes as DeepSeek-V2 does."""
    with torch.device("meta"):
        layer = DeepseekV3DecoderLayer(config, index)
        if isinstance(layer.mlp, DeepseekV3MoE) and getattr(config, "scoring_func", None) == "softmax":
            keys = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
            layer.mlp = DeepseekV2Moe(DeepseekV2Config(**keys))
    return _filled(layer, f"model.layers.{index}.", tensors, device)


def converted_experts(source_layer: Any, index: int, scale: float) -> dict[str, torch.Tensor]:
    """The fused experts of a converted MoE layer (full names), taken from the source layer in memory:
    the experts pass through unchanged (down_proj times the residual scale)."""
    prefix, experts = f"model.layers.{index}.mlp.", source_layer.mlp.experts
    return {
        prefix + "experts.gate_up_proj": experts.gate_up_proj.detach(),
        prefix + "experts.down_proj": experts.down_proj.detach() * scale,
    }


def build_attention(
    config: DeepseekV3Config, index: int, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> DeepseekV3Attention:
    return _built(DeepseekV3Attention, config, index, f"model.layers.{index}.self_attn.", tensors, device)


def _built(kind: Any, config: DeepseekV3Config, index: int, prefix: str, tensors: dict, device: Any) -> Any:
    """A converted module made on the meta device (no initialisation) and filled from its tensors on device."""
    with torch.device("meta"):
        module = kind(config, index)
    return _filled(module, prefix, tensors, device)


def _filled(module: Any, prefix: str, tensors: dict, device: Any) -> Any:
    """A meta-device module given storage on device and filled from the tensors under prefix."""
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return materialise(module, state, str(device))
