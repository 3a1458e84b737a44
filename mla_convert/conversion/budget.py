"""Choose how to spend a KV budget (rotary width, which frequencies, latent width) by measurement.

Each candidate split is converted layer by layer on a few calibration windows and scored by how far its
attention output lands from the source's on the same inputs (after the same o_proj refit as the real
run). With a long calibration window the error at its far positions (rows spread over its second half,
attention_rows.py) is scored too, and a
candidate counts by the worse of the two: a ladder that wins over a few hundred tokens and loses far away
(a rotary key that aliases, components that lost their rotation) loses the selection. The lowest mean
relative error wins; the table of all candidates goes into the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from ..mla.activation import psd_root
from ..plan.plan import KeyEnergy, Plan
from ..plan.split import Scored
from ..source.checkpoint import Source
from .attention_rows import far_rows, rows_output
from .calibrator import SourceWalk, o_proj_inputs, refit_output_projection
from .driver import layer_tensors, source_key_energy
from .layer_fit import batched, build_attention, deepseek_runtime_config, relative, rotary, second_moment

SELECTION_WINDOWS = 8
ROTARY_WINDOWS = 8  # calibration windows whose input moments weigh the transformers profile's rotary choice


@dataclass
class CalibrationMeasure:
    """plan/split.py's SplitMeasure on this source's weights and calibration windows (ids [windows, seq];
    long_ids [1, long] for the far error)."""

    source: Source
    ids: torch.Tensor
    device: str = "cpu"
    long_ids: torch.Tensor | None = None

    def rotary_covariances(self) -> list[torch.Tensor]:
        walk = SourceWalk(self.source, self.ids[:ROTARY_WINDOWS], self.device)
        return [second_moment(walk.step(i)[0]).cpu() for i in range(self.source.config.num_hidden_layers)]

    def key_energy(self, covariances: list[torch.Tensor] | None) -> KeyEnergy:
        return source_key_energy(self.source, covariances)

    def score(self, plans: list[Plan], on_layer: Callable[[int], None]) -> list[Scored]:
        return score_candidates(self.source, plans, self.ids, on_layer, self.device, self.long_ids)


@torch.no_grad()
def score_candidates(
    source: Source,
    plans: list[Plan],
    ids: torch.Tensor,
    on_layer: Callable[[int], None] | None = None,
    device: str = "cpu",
    long_ids: torch.Tensor | None = None,
) -> list[Scored]:
    """Run every candidate on the source's own activations, layer by layer (and on long_ids [1, long_len], the
    long calibration window, whose far half is scored on its own)."""
    walk = SourceWalk(source, ids[:SELECTION_WINDOWS], device)
    far_walk = SourceWalk(source, long_ids[:1], device) if long_ids is not None else None
    runtimes = []
    for plan in plans:
        config = deepseek_runtime_config(plan, source.config)
        embedding = DeepseekV3RotaryEmbedding(config)
        far_pos = rotary(embedding, far_walk.h[:1], far_walk.h.shape[1]) if far_walk is not None else None
        runtimes.append((config, rotary(embedding, walk.h[:1], ids.shape[1]), far_pos))
    totals = [0.0] * len(plans)
    far_totals = [0.0] * len(plans)
    rows = far_rows(far_walk.h.shape[1]) if far_walk is not None else None
    layers = plans[0].geometry.layers
    for i in range(layers):
        x, ref = walk.step(i)
        cov = second_moment(x)
        far_x, far_ref = far_walk.step(i) if far_walk is not None else (None, None)
        if far_x is not None:  # the real run's statistics count the long window's tokens too
            short, long = x[..., 0].numel(), far_x[..., 0].numel()
            cov = (cov * short + second_moment(far_x) * long) / (short + long)
        root = psd_root(cov)[0]
        for c, (plan, (config, pos, far_pos)) in enumerate(zip(plans, runtimes, strict=True)):
            tensors, _ = layer_tensors(source, plan, i, cov, device, cov_root=root)
            attn = build_attention(config, i, tensors, device)
            target = ref * plan.residual_scale
            far = None
            if far_x is not None and far_ref is not None:  # the far rows only: linear in the window's length
                far = (rows_output(attn, far_x, far_pos, rows), far_ref[:, rows] * plan.residual_scale)
            parts = [(o_proj_inputs(attn, x, pos), target)] + ([far] if far is not None else [])
            refit_output_projection(attn, parts, tensors, i)
            out = batched(lambda t, a=attn, p=pos: a(t, p, None)[0], x)
            totals[c] += relative(out, target)
            if far is not None:
                with torch.no_grad():
                    far_totals[c] += relative(attn.o_proj(far[0]), far[1])
        if on_layer:
            on_layer(i)
    return [
        Scored(plan, total / layers, far / layers if far_walk is not None else None)
        for plan, total, far in zip(plans, totals, far_totals, strict=True)
    ]
