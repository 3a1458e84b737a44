"""The source model one decoder layer at a time, built from its tensors on the compute device.

Calibration needs the source's own layers (their norms, attention outputs and residual updates), not the
whole model: a skeleton of the model's transformers class is made on the meta device (no memory, no
initialisation), and each layer is given real storage on the device and filled from the checkpoint only
while it is used. Peak memory is one float32 source layer, not the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConversionError
from .canonical import canonical
from .checkpoint import Source
from .families import EMBED, experts_of


def materialise(module: nn.Module, state: dict[str, torch.Tensor], device: str) -> nn.Module:
    """Give a meta-device module storage on `device` and fill all its tensors from state (as float32).

    Names the module does not have (an old checkpoint's saved rotary frequencies) are ignored; a name
    it has and state lacks is an error, so no weight is ever left uninitialised.
    """
    wanted = module.state_dict().keys()
    missing = [name for name in wanted if name not in state]
    if missing:
        raise ConversionError(f"the checkpoint lacks {', '.join(missing[:3])} for a {type(module).__name__}")
    module.to_empty(device=device)
    module.load_state_dict({name: state[name].float() for name in wanted}, strict=True)
    return module.eval()


class SourceLayers:
    """Embeddings, rotary embedding and decoder layers of the source, read from its checkpoint on demand."""

    def __init__(self, source: Source, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.source = source
        self.device = device
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(source.config, dtype=torch.float32)
        self._layers = skeleton.model.layers
        # the rotary embedding's frequencies are computed buffers, not checkpoint tensors: build it for real
        self.rotary = type(skeleton.model.rotary_emb)(config=source.config).to(device)
        self._live: dict[int, nn.Module] = {}
        view = canonical(source)
        self._view = view
        self.residual = view.scales.residual  # a family's factor on attention and MLP outputs (Granite)
        self._experts = experts_of(view.family, source.config)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's start for ids (float32, on the device): the token embeddings, times a family's
        embedding multiplier; the table is read once and dropped."""
        table = self._view.get(EMBED).to(device=self.device, dtype=torch.float32)
        return nn.functional.embedding(ids.to(self.device), table)

    def layer(self, index: int) -> Any:
        """Decoder layer `index` with its weights, kept until `release(index)`."""
        if index not in self._live:
            prefix = f"model.layers.{index}."
            state = {
                name[len(prefix) :]: self.source.get(name) for name in self.source.names() if name.startswith(prefix)
            }
            if self._experts is not None and index >= self._experts.dense_layers:
                state.update(fused_experts(self._view, index, self._experts.count))
            self._live[index] = materialise(self._layers[index], state, self.device)
        return self._live[index]

    def release(self, index: int) -> None:
        """Drop layer `index`'s weights (back to meta), so at most the layers in use are resident."""
        module = self._live.pop(index, None)
        if module is not None:
            module.to("meta")


def fused_experts(view: Any, index: int, count: int) -> dict[str, torch.Tensor]:
    """A MoE layer's router and experts as transformers' modules hold them in memory (names under the layer):
    `mlp.experts.gate_up_proj` [experts, 2*width, hidden] (gate rows, then up rows) and `mlp.experts.down_proj`
    [experts, hidden, width], fused from the per-expert tensors checkpoints store (read via the canonical view).
    Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V2/V3 all use this layout."""
    base = f"model.layers.{index}.mlp."
    gate_up, down = [], []
    for j in range(count):
        expert = f"{base}experts.{j}."
        gate_up.append(torch.cat([view.get(expert + "gate_proj.weight"), view.get(expert + "up_proj.weight")]).float())
        down.append(view.get(expert + "down_proj.weight").float())
    return {
        "mlp.gate.weight": view.get(base + "gate.weight"),
        "mlp.experts.gate_up_proj": torch.stack(gate_up),
        "mlp.experts.down_proj": torch.stack(down),
    }
