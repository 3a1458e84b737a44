"""What differs between the source families, kept as data: which ones convert, how their tensors map onto
Llama's names and meaning (source/canonical.py applies it), and which are refused by design, with the reason.

Every family that converts has Llama's decoder layer: pre-norm RMSNorm, rotary attention, a SwiGLU MLP
or a mixture of SwiGLU experts behind a softmax router (Mixtral, Qwen3-MoE, OLMoE). They differ in naming
(Phi-3 fuses q/k/v and gate/up, Mixtral calls its experts' projections w1/w3/w2), in constant multipliers
that fold into weights (Granite), in q/k/v biases and norms, and in settings we refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConversionError


@dataclass(frozen=True)
class MoeNames:
    """Where a mixture-of-experts family stores its router and experts, and how its config names them.

    Checkpoints store every expert's three projections as tensors of their own (transformers fuses them
    only in memory), so the conversion can copy them one tensor at a time.
    """

    block: str  # the MoE block under a layer: "mlp" or "block_sparse_moe"
    parts: tuple[str, str, str]  # the stored names of each expert's gate, up and down projections
    count_key: str  # the config's number of routed experts
    width_key: str  # the config's width of one expert
    renormalize: bool | None  # True: top-k weights always renormalized (Mixtral); None: config.norm_topk_prob


@dataclass(frozen=True)
class Family:
    """A source architecture we can convert."""

    model_type: str
    display_name: str
    qkv_bias: bool | None  # True: always; False: never; None: read config.attention_bias
    fused_qkv: bool = False  # self_attn.qkv_proj holds q, k and v rows in that order (Phi-3)
    fused_gate_up: bool = False  # mlp.gate_up_proj holds the gate rows, then the up rows (Phi-3)
    multipliers: bool = False  # embedding/attention/residual multipliers and logits scaling (Granite)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Qwen3): approximated, never exact
    partial_rotary: bool = False  # its modeling rotates only the first partial_rotary_factor of each head (Phi-3)
    qk_norm_heads: bool = True  # q/k norms act on each head (Qwen3); False: on all heads at once (OLMoE)
    moe: MoeNames | None = None  # routed experts in place of the MLP (in all layers but a leading dense few)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "Llama (incl. Llama 2/3/3.1/3.2, SmolLM/SmolLM2)", qkv_bias=None),
    "mistral": Family("mistral", "Mistral", qkv_bias=False),
    "qwen2": Family("qwen2", "Qwen2/Qwen2.5", qkv_bias=True),
    "phi3": Family(
        "phi3", "Phi-3/Phi-3.5/Phi-4-mini", qkv_bias=False, fused_qkv=True, fused_gate_up=True, partial_rotary=True
    ),
    "granite": Family("granite", "Granite (3.x)", qkv_bias=None, multipliers=True),
    "qwen3": Family("qwen3", "Qwen3 (approximate: per-head q/k norms)", qkv_bias=None, qk_norm=True),
    "mixtral": Family(
        "mixtral",
        "Mixtral (MoE: approximate expert weights)",
        qkv_bias=False,
        moe=MoeNames("block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts", "intermediate_size", True),
    ),
    "qwen3_moe": Family(
        "qwen3_moe",
        "Qwen3-MoE (approximate: per-head q/k norms, expert weights)",
        qkv_bias=None,
        qk_norm=True,
        moe=MoeNames("mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts", "moe_intermediate_size", None),
    ),
    "olmoe": Family(
        "olmoe",
        "OLMoE (MoE, exact routing; approximate: q/k norms)",
        qkv_bias=None,
        qk_norm=True,
        qk_norm_heads=False,
        moe=MoeNames("mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts", "intermediate_size", None),
    ),
}

_GEMMA3 = "normalizes after attention and after the MLP (post-norms) and interleaves sliding-window and global layers"

# Families whose decoder layer has something DeepSeek-V3's cannot express: refused by design, saying what.
BY_DESIGN: dict[str, str] = {
    "gemma": "scales its embeddings by sqrt(hidden_size) inside the model and uses a GeGLU MLP",
    "gemma2": (
        "normalizes after attention and after the MLP (post-norms), soft-caps attention scores and logits, "
        "and interleaves sliding-window and global layers"
    ),
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
    "olmo2": "normalizes after attention and after the MLP (post-norms) and normalizes queries and keys",
    "cohere": "runs attention and the MLP in parallel from one LayerNorm and normalizes queries and keys",
    "cohere2": "runs attention and the MLP in parallel from one LayerNorm and interleaves sliding-window layers",
    "qwen2_moe": "adds a shared expert scaled by a per-token sigmoid gate to its routed experts",
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
    "q_norm": "model.layers.{i}.self_attn.q_norm",
    "k_norm": "model.layers.{i}.self_attn.k_norm",
}
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Experts:
    """A MoE source's routing, as the target must reproduce it."""

    count: int  # routed experts per MoE layer
    top_k: int  # experts each token uses
    width: int  # intermediate width of one expert
    dense_layers: int  # leading layers with a dense MLP (DeepSeek's first_k_dense_replace)
    renormalize: bool  # the top-k softmax weights are renormalized to sum to one

    def router(self, i: int) -> str:
        """The router's weight of layer i, under the canonical (DeepSeek) name."""
        return f"model.layers.{i}.mlp.gate.weight"

    def expert_tensors(self, i: int) -> list[str]:
        """Every expert projection of layer i, under the canonical (DeepSeek) names, in storage order."""
        return [
            f"model.layers.{i}.mlp.experts.{j}.{part}.weight"
            for j in range(self.count)
            for part in ("gate_proj", "up_proj", "down_proj")
        ]


def experts_of(family: Family, config: Any) -> Experts | None:
    """The routing of a MoE source, or None for a dense one. Dense layers must lead (DeepSeek places them so)."""
    names = family.moe
    if names is None:
        return None
    arch = (getattr(config, "architectures", None) or [family.model_type])[0]
    layers = int(config.num_hidden_layers)
    step = int(getattr(config, "decoder_sparse_step", None) or 1)
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    sparse = [i not in dense_only and (i + 1) % step == 0 for i in range(layers)]
    dense = sparse.index(True) if True in sparse else layers
    if not all(sparse[dense:]):
        raise ConversionError(
            f"'{arch}' mixes dense and expert layers after layer {dense}; DeepSeek's layout holds dense layers only "
            "before the first expert layer (first_k_dense_replace)"
        )
    renormalize = names.renormalize
    if renormalize is None:
        renormalize = bool(getattr(config, "norm_topk_prob", False))
    return Experts(
        count=int(getattr(config, names.count_key)),
        top_k=int(config.num_experts_per_tok),
        width=int(getattr(config, names.width_key)),
        dense_layers=dense,
        renormalize=renormalize,
    )


def supported_list() -> str:
    return ", ".join(f.display_name for f in FAMILIES.values())


def family_for(config: Any, allow_full_attention: bool = False) -> Family:
    """Return the family of a source config, or refuse it with one line naming why and what we support.

    allow_full_attention: a sliding-window model converts to full attention (exact within the window)
    instead of being refused.
    """
    model_type = getattr(config, "model_type", None)
    arch = (getattr(config, "architectures", None) or [model_type])[0]
    if model_type in BY_DESIGN:
        raise ConversionError(
            f"'{arch}' {BY_DESIGN[model_type]}, which DeepSeek-V3's decoder layer cannot express: refused by "
            f"design; supported: {supported_list()}"
        )
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise ConversionError(
            f"unsupported architecture '{arch}' (model_type '{model_type}'); supported: {supported_list()}"
        )
    _check_supported_settings(config, arch, allow_full_attention, family.partial_rotary)
    if getattr(config, "clip_qkv", None) is not None:
        raise ConversionError(f"'{arch}' clips q, k and v to ±{config.clip_qkv}, which DeepSeek-V3 cannot express")
    experts_of(family, config)  # refuses an unsupported expert layout
    return family


def has_qkv_bias(family: Family, config: Any) -> bool:
    if family.qkv_bias is None:
        return bool(getattr(config, "attention_bias", False))
    return family.qkv_bias


def head_dim_of(config: Any) -> int:
    """Each attention head's width: the config's head_dim, or hidden_size over the heads where it has none."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_factor(config: Any) -> float:
    """The share of each head that rotates (`partial_rotary_factor`, in rope_parameters or beside them)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))


def sliding_window(config: Any) -> int | None:
    """The attention window a source uses, or None when it attends to all earlier tokens."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if getattr(config, "model_type", "") in ("qwen2", "qwen3"):
        return int(window) if getattr(config, "use_sliding_window", False) else None
    return int(window) if window < getattr(config, "max_position_embeddings", window + 1) else None


def _check_supported_settings(config: Any, arch: str, allow_full_attention: bool, partial_rotary: bool) -> None:
    """Refuse settings inside a supported family that the converter does not reproduce."""
    window = sliding_window(config)
    if window is not None and not allow_full_attention:
        raise ConversionError(
            f"'{arch}' uses sliding-window attention (window {window}), which DeepSeek-V3 cannot express; to "
            "resolve, pass --allow-full-attention to convert it to full attention (exact on contexts up to the "
            "window, different beyond it)"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(
            f"'{arch}' uses rope type '{rope_type}', which changes with sequence length; "
            f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    factor = rotary_factor(config)
    if factor != 1.0 and not partial_rotary:
        raise ConversionError(
            f"'{arch}' uses partial rotary embeddings, which its family's modeling does not; supported: full-width RoPE"
        )
    head_dim = head_dim_of(config)
    if (head_dim * factor) % 2:
        raise ConversionError(
            f"'{arch}' rotates {head_dim * factor:g} dimensions of each head; RoPE needs an even count"
        )
    if getattr(config, "mlp_bias", False):
        raise ConversionError(f"'{arch}' has MLP biases, which DeepSeek-V3's MLP cannot hold")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"'{arch}' uses activation '{config.hidden_act}'; supported: silu")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ConversionError(f"'{arch}' has {heads} heads not divisible by {kv_heads} KV heads")
