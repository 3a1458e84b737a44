"""Layer-by-layer calibration: statistics for layer i come from the inputs that converted layers 0..i-1
produce, so approximation errors are seen (and partly absorbed) instead of silently compounding.

Only the residual stream of the calibration windows ([windows, seq_len, hidden], float32), the source
layer being converted (read from the checkpoint, source/layers.py) and its converted counterpart are
held, all on the compute device: memory depends on the largest layer, not on the number of layers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from ..plan.plan import Plan
from ..source.checkpoint import Source
from ..source.layers import SourceLayers
from .attention_rows import FarWindows
from .driver import LayerStats, fit_expert_scale, is_moe_layer, needs_expert_scale
from .layer_fit import (
    attention_error,
    batched,
    build_layer,
    converted_experts,
    deepseek_runtime_config,
    relative,
    rotary,
    second_moment,
)
from .query_refit import refit_queries
from .reconstruct import reconstruct


class SequentialCalibrator:
    """Implements convert.Calibrator on token windows ids [count, seq_len], and optionally long windows
    long_ids [count, long_len] beside them.

    The long windows count in the input statistics and the output projection's refit like any tokens; the
    query refit also fits far (query, key) pairs on them, and the report's far_attn_output_error is measured
    on their second half: a fit that only sees a few hundred tokens cannot see what it does far away."""

    def __init__(
        self,
        source: Source,
        plan: Plan,
        ids: torch.Tensor,
        device: str = "cpu",
        layer_steps: int = 0,
        query_refit: bool = False,
        long_ids: torch.Tensor | None = None,
    ):
        self.source = SourceLayers(source, device)
        self.plan = plan
        self.config = deepseek_runtime_config(plan, source.config)
        self.lam = plan.residual_scale
        embedding = DeepseekV3RotaryEmbedding(self.config)
        with torch.no_grad():
            self.h = self.source.embed(ids) * self.lam
            self.ds_pos = rotary(embedding, self.h[:1], ids.shape[1])
            self.src_pos = rotary(self.source.rotary, self.h[:1], ids.shape[1])
            self.far: FarWindows | None = None
            if long_ids is not None:
                h = self.source.embed(long_ids) * self.lam
                seq = long_ids.shape[1]
                self.far = FarWindows(h, rotary(embedding, h[:1], seq), rotary(self.source.rotary, h[:1], seq))
        self._x: torch.Tensor | None = None
        self.layer_steps = layer_steps
        self.query_refit = query_refit

    @torch.no_grad()
    def covariance(self, index: int) -> torch.Tensor:
        norm = self.source.layer(index).input_layernorm
        self._x = batched(lambda h: norm(h / self.lam), self.h)  # equals the converted layer's own norm
        moment = second_moment(self._x)
        if self.far is None:
            return moment
        self.far.x = batched(lambda h: norm(h / self.lam), self.far.h)
        short, long = self._x[..., 0].numel(), self.far.x[..., 0].numel()
        return (moment * short + second_moment(self.far.x) * long) / (short + long)

    @torch.no_grad()
    def advance(self, index: int, tensors: dict[str, torch.Tensor], stats: LayerStats) -> None:
        """Optionally refit the queries (--query-refit), refit o_proj to the source attention output on these
        inputs, optionally reconstruct the layer (--layer-steps), record the errors in stats, then move the
        stream on."""
        x = self._x
        assert x is not None
        src_layer = self.source.layer(index)
        moe = is_moe_layer(self.plan.geometry, index)
        runtime = dict(tensors)
        if moe:
            runtime.update(converted_experts(src_layer, index, self.lam))
        layer = build_layer(self.config, index, runtime, x.device)
        src_attn = src_layer.self_attn
        scale = self.lam * self.source.residual
        ref = batched(lambda t: src_attn(t, self.src_pos, None)[0], x) * scale
        far = self.far
        if far is not None:
            assert far.x is not None
            far.ref = batched(lambda t: src_attn(t, far.src_pos, None)[0], far.x) * scale
        prefix = f"model.layers.{index}.self_attn."
        if self.query_refit and prefix + "q_proj.weight" in tensors:
            refit = refit_queries(layer.self_attn, src_attn, x, self.ds_pos, self.src_pos, ref, far=far)
            stats.query_error_before, stats.query_error_after = refit.before, refit.after
            tensors[prefix + "q_proj.weight"] = layer.self_attn.q_proj.weight.detach().clone()
        parts = [(o_proj_inputs(layer.self_attn, x, self.ds_pos), ref)]
        if far is not None:
            parts.append((far.inputs(layer.self_attn), far.target()))
        refit_output_projection(layer.self_attn, parts, tensors, index)
        if self.layer_steps > 0:
            fit = reconstruct(layer, x, ref, self.ds_pos, self.layer_steps)
            stats.reconstruction_steps = fit.steps
            stats.held_out_error_before, stats.held_out_error_after = fit.before, fit.after
            for name, tensor in layer.self_attn.state_dict().items():
                if prefix + name in tensors:
                    tensors[prefix + name] = tensor.detach().clone()
        stats.attn_output_error = attention_error(layer.self_attn, x, ref, self.ds_pos)
        if far is not None:
            stats.far_attn_output_error = far.error(layer.self_attn)
        if moe:
            z = batched(lambda t: mlp_input(layer, t, self.ds_pos), self.h)  # the MoE block's inputs
            if needs_expert_scale(self.plan, index):
                fit_expert_scale(self.plan, stats, z @ layer.mlp.gate.weight.T)
                layer.mlp.experts.down_proj.mul_(stats.expert_scale)  # as the driver will write them
            ref_moe = batched(src_layer.mlp, z) * (self.lam * self.source.residual)
            stats.moe_output_error = relative(batched(layer.mlp, z), ref_moe)  # what the routing weights cost
        self.h = batched(lambda h: layer(h, position_embeddings=self.ds_pos), self.h)
        if far is not None:
            far.h = batched(lambda h: layer(h, position_embeddings=far.pos), far.h)
            far.x = far.ref = None
        self.source.release(index)
        self._x = None


def mlp_input(layer: Any, h: torch.Tensor, pos: Any) -> torch.Tensor:
    """What a converted layer's MLP sees for residual stream h: the stream after attention, normalized."""
    out = h + layer.self_attn(layer.input_layernorm(h), pos, None)[0]
    return layer.post_attention_layernorm(out)


def refit_output_projection(
    attn: DeepseekV3Attention,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    tensors: dict[str, torch.Tensor],
    index: int,
) -> None:
    """Refit o_proj so the converted attention output matches the source's (rescaled), over every (o_proj
    inputs, target) of `parts`: the short calibration windows, and the far rows of the long ones if any.

    Ridge least squares pulled towards the current weights, so an exact layer stays as it is. (A per-head
    refit of the value up-projection before it was tried and measured no better on SmolLM2.)
    """
    name = f"model.layers.{index}.self_attn.o_proj.weight"
    inputs = torch.cat([z.reshape(-1, z.shape[-1]) for z, _ in parts])
    targets = torch.cat([o.reshape(-1, o.shape[-1]) for _, o in parts])
    weight = tensors[name].to(device=inputs.device, dtype=torch.float64)
    tensors[name] = refit_linear(inputs, targets, weight)
    attn.o_proj.weight.copy_(tensors[name].float())


def o_proj_inputs(attn: DeepseekV3Attention, x: torch.Tensor, pos: Any) -> torch.Tensor:
    """What attn.o_proj reads on inputs x [windows, T, hidden], all windows."""
    return batched(lambda t: o_proj_input(attn, t, pos), x)


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
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + mu * eye, rhs.T).T


class SourceWalk:
    """The source model's own attention inputs and outputs, layer by layer (for comparing candidates)."""

    def __init__(self, source: Source, ids: torch.Tensor, device: str = "cpu"):
        self.source = SourceLayers(source, device)
        with torch.no_grad():
            self.h = self.source.embed(ids)
            self.src_pos = rotary(self.source.rotary, self.h[:1], ids.shape[1])

    @torch.no_grad()
    def step(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention input, source attention output) of layer `index`, then move to the next layer."""
        layer = self.source.layer(index)
        x = batched(layer.input_layernorm, self.h)
        out = batched(lambda t: layer.self_attn(t, self.src_pos, None)[0], x) * self.source.residual
        self.h = batched(lambda h: layer(h, position_embeddings=self.src_pos), self.h)
        self.source.release(index)
        return x, out
