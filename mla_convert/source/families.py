"""What differs between the supported source families, kept as data.

Every supported family stores its attention and MLP weights under the same Llama-style names; they
differ in whether q/k/v carry biases and in which config settings we must refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConversionError


@dataclass(frozen=True)
class Family:
    """A source architecture we can convert."""

    model_type: str
    display_name: str
    qkv_bias: bool | None  # True: always; False: never; None: read config.attention_bias


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "Llama (incl. Llama 2/3/3.1/3.2, SmolLM/SmolLM2)", qkv_bias=None),
    "mistral": Family("mistral", "Mistral", qkv_bias=False),
    "qwen2": Family("qwen2", "Qwen2/Qwen2.5", qkv_bias=True),
}

# Static rotary variants whose inverse frequencies do not depend on the sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

LAYER_TENSORS = {
    "q": "model.layers.{i}.self_attn.q_proj",
    "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj",
    "o": "model.layers.{i}.self_attn.o_proj",
    "gate": "model.layers.{i}.mlp.gate_proj",
    "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
    "input_norm": "model.layers.{i}.input_layernorm",
    "post_norm": "model.layers.{i}.post_attention_layernorm",
}
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def supported_list() -> str:
    return ", ".join(f.display_name for f in FAMILIES.values())


def family_for(config: Any) -> Family:
    """Return the family of a source config, or refuse it with one line naming what we support."""
    model_type = getattr(config, "model_type", None)
    arch = (getattr(config, "architectures", None) or [model_type])[0]
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise ConversionError(
            f"unsupported architecture '{arch}' (model_type '{model_type}'); supported: {supported_list()}"
        )
    _check_supported_settings(config, arch)
    return family


def has_qkv_bias(family: Family, config: Any) -> bool:
    if family.qkv_bias is None:
        return bool(getattr(config, "attention_bias", False))
    return family.qkv_bias


def _check_supported_settings(config: Any, arch: str) -> None:
    """Refuse settings inside a supported family that the converter does not reproduce."""
    if getattr(config, "sliding_window", None) and _sliding_window_active(config):
        raise ConversionError(
            f"'{arch}' uses sliding-window attention (window {config.sliding_window}), which DeepSeek-V3 "
            "cannot express; supported: models with full attention"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(
            f"'{arch}' uses rope type '{rope_type}', which changes with sequence length; "
            f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"'{arch}' uses partial rotary embeddings; supported: full-width RoPE")
    if getattr(config, "mlp_bias", False):
        raise ConversionError(f"'{arch}' has MLP biases, which DeepSeek-V3's MLP cannot hold")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"'{arch}' uses activation '{config.hidden_act}'; supported: silu")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ConversionError(f"'{arch}' has {heads} heads not divisible by {kv_heads} KV heads")


def _sliding_window_active(config: Any) -> bool:
    if getattr(config, "model_type", "") == "qwen2":
        return bool(getattr(config, "use_sliding_window", False))
    window = config.sliding_window
    return window is not None and window < getattr(config, "max_position_embeddings", window + 1)
