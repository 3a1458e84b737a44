"""Layer-by-layer calibration: statistics for layer i come from the inputs that converted layers 0..i-1
produce, so approximation errors are seen (and partly absorbed) instead of silently compounding.

Of the converted model only the residual stream of the calibration windows ([windows, seq_len, hidden],
float32) and the layer being converted are held. The source model is still held whole (for its
attention outputs); streaming it layer by layer is future work.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3DecoderLayer,
    DeepseekV3RotaryEmbedding,
)

from .plan import Plan
from .source import Source
from .target_config import deepseek_config

BATCH = 8  # windows per forward pass: bounds attention memory


def deepseek_runtime_config(plan: Plan, source_config: Any) -> DeepseekV3Config:
    config = DeepseekV3Config(**deepseek_config(plan, source_config))
    config._attn_implementation = "sdpa"  # causal masking with attention_mask=None
    return config


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """E[x̃ x̃ᵀ] of the augmented inputs x̃ = [x; 1] (float64), over all tokens of x [..., n]."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    aug = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)
    return aug.T @ aug / aug.shape[0]


def batched(fn: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i : i + BATCH]) for i in range(0, x.shape[0], BATCH)])


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class SequentialCalibrator:
    """Implements convert.Calibrator on token windows ids [count, seq_len]."""

    def __init__(self, source: Source, plan: Plan, ids: torch.Tensor):
        model = source.model()
        self.layers = model.model.layers
        self.config = deepseek_runtime_config(plan, source.config)
        self.lam = plan.residual_scale
        with torch.no_grad():
            self.h = model.model.embed_tokens(ids).float() * self.lam
            positions = torch.arange(ids.shape[1])[None]
            self.ds_pos = DeepseekV3RotaryEmbedding(self.config)(self.h[:1], positions)
            self.src_pos = model.model.rotary_emb(self.h[:1], positions)
        self._x: torch.Tensor | None = None
        self.refit_output = plan.refit_output

    @torch.no_grad()
    def covariance(self, index: int) -> torch.Tensor:
        norm = self.layers[index].input_layernorm
        self._x = batched(lambda h: norm(h / self.lam), self.h)  # equals the converted layer's own norm
        return second_moment(self._x)

    @torch.no_grad()
    def advance(self, index: int, tensors: dict[str, torch.Tensor]) -> float:
        """Refit o_proj to the source attention output on these inputs, then move the stream on."""
        layer = build_layer(self.config, index, tensors)
        x = self._x
        assert x is not None
        src_attn = self.layers[index].self_attn
        ref = batched(lambda t: src_attn(t, self.src_pos, None)[0], x) * self.lam
        if self.refit_output:
            refit_output_projection(layer.self_attn, x, self.ds_pos, ref, tensors, index)
        out = batched(lambda t: layer.self_attn(t, self.ds_pos, None)[0], x)
        self.h = batched(lambda h: layer(h, position_embeddings=self.ds_pos), self.h)
        self._x = None
        return relative(out, ref)


def refit_output_projection(
    attn: DeepseekV3Attention,
    x: torch.Tensor,
    pos: Any,
    target: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    index: int,
) -> None:
    """Refit o_proj so the converted attention output on inputs x matches target (the source's, rescaled).

    Ridge least squares pulled towards the current weights, so an exact layer stays as it is. (A per-head
    refit of the value up-projection before it was tried and measured no better on SmolLM2.)
    """
    name = f"model.layers.{index}.self_attn.o_proj.weight"
    inputs = batched(lambda t: o_proj_input(attn, t, pos), x)
    tensors[name] = refit_linear(inputs, target, tensors[name].to(torch.float64))
    attn.o_proj.weight.copy_(tensors[name].float())


def o_proj_input(attn: DeepseekV3Attention, x: torch.Tensor, pos: Any) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    hook = attn.o_proj.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    try:
        attn(x, pos, None)
    finally:
        hook.remove()
    return captured[0]


def refit_linear(
    inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, ridge: float = 1e-4
) -> torch.Tensor:
    """Least-squares W minimising |W z - o|^2 + mu |W - W0|^2 over all tokens (mu relative to the input energy).

    Pulling toward the current weight W0 keeps the fit stable where the calibration inputs are thin, and
    leaves an already exact layer as it was.
    """
    z = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
    o = targets.reshape(-1, targets.shape[-1]).to(torch.float64)
    gram = z.T @ z
    mu = ridge * float(torch.trace(gram)) / gram.shape[0]
    rhs = o.T @ z + mu * weight
    return torch.linalg.solve(gram + mu * torch.eye(gram.shape[0], dtype=gram.dtype), rhs.T).T


def build_layer(config: DeepseekV3Config, index: int, tensors: dict[str, torch.Tensor]) -> DeepseekV3DecoderLayer:
    prefix = f"model.layers.{index}."
    layer = DeepseekV3DecoderLayer(config, index).eval()
    layer.load_state_dict({k[len(prefix) :]: v.float() for k, v in tensors.items()}, strict=True)
    return layer


def build_attention(config: DeepseekV3Config, index: int, tensors: dict[str, torch.Tensor]) -> DeepseekV3Attention:
    prefix = f"model.layers.{index}.self_attn."
    attn = DeepseekV3Attention(config, index).eval()
    state = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    attn.load_state_dict(state, strict=True)
    return attn


class SourceWalk:
    """The source model's own attention inputs and outputs, layer by layer (for comparing candidates)."""

    def __init__(self, source: Source, ids: torch.Tensor):
        model = source.model()
        self.layers = model.model.layers
        with torch.no_grad():
            self.h = model.model.embed_tokens(ids).float()
            positions = torch.arange(ids.shape[1])[None]
            self.src_pos = model.model.rotary_emb(self.h[:1], positions)
            self.positions = positions

    @torch.no_grad()
    def step(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention input, source attention output) of layer `index`, then move to the next layer."""
        layer = self.layers[index]
        x = batched(layer.input_layernorm, self.h)
        out = batched(lambda t: layer.self_attn(t, self.src_pos, None)[0], x)
        self.h = batched(lambda h: layer(h, position_embeddings=self.src_pos), self.h)
        return x, out
