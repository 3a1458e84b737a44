"""Train the epsilon-regime latent in its natural scale, and fold the scale back in before saving.

The converter stores the latent rows of `kv_a_proj_with_mqa` multiplied by a tiny factor s (and
`kv_a_layernorm.weight` = sqrt(eps) / s) so that DeepSeek's latent RMSNorm stays linear (see
mla/latent_norm.py). An optimizer stepping those stored rows directly moves them by about the learning
rate per step, which is enormous next to s ~ 1e-7: the latent leaves the epsilon regime and training
diverges. So during training the stored rows are a parametrization, s * W, of the natural map W, the
latent norm's gain is frozen (it is redundant with kv_b_proj), and `fold` recomputes s for the trained
W before the weights are written, so the written checkpoint keeps the safety bound of the conversion.

The fine-tune and layer-wise reconstruction both train this way, with the same frozen gains (`FROZEN`) and
per-tensor relative learning rates (`relative_groups`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .latent_norm import attention_input_bound, epsilon_regime_scale

# Frozen in every scope: the epsilon-regime gains (pure scales, redundant with the up-projections) and the
# pass-through q latent of the transformers profile (an identity that carries the query bias).
FROZEN = ("kv_a_layernorm", "q_a_proj", "q_a_layernorm")


def relative_groups(params: list[torch.nn.Parameter], lr: float) -> list[dict[str, Any]]:
    """One AdamW group per tensor with learning rate lr * RMS(tensor).

    Adam moves every element by about its learning rate per step whatever the element's size, and a
    conversion leaves tensors at very different scales (the folded softmax scale in the query, the residual
    rescaling, the split of each latent direction between down- and up-projection). Scaling the rate by
    each tensor's RMS makes --lr a relative step size, the same for every tensor and every model.
    """
    groups = []
    for param in params:
        rms = float(param.detach().float().pow(2).mean().sqrt())
        groups.append({"params": [param], "lr": lr * (rms if rms > 0 else 1.0)})
    return groups


class RowScale(nn.Module):
    """stored = scale * natural, row by row (for a weight [rows, cols] or a bias [rows])."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, natural: torch.Tensor) -> torch.Tensor:
        return natural * (self.scale[:, None] if natural.dim() == 2 else self.scale)

    def right_inverse(self, stored: torch.Tensor) -> torch.Tensor:
        return stored / (self.scale[:, None] if stored.dim() == 2 else self.scale)


def _row_scale(attn: Any) -> torch.Tensor:
    """Per-row factor of kv_a_proj_with_mqa: sqrt(eps) / gain for latent rows, 1 for the rotary key rows."""
    norm = attn.kv_a_layernorm
    gain = norm.weight.detach().double()
    latent = math.sqrt(norm.variance_epsilon) / gain
    rope = torch.ones(attn.kv_a_proj_with_mqa.weight.shape[0] - gain.numel(), dtype=torch.float64)
    return torch.cat([latent, rope]).to(attn.kv_a_proj_with_mqa.weight.dtype)


def attention_modules(model: Any) -> list[Any]:
    return [layer.self_attn for layer in model.model.layers]


def to_natural(model: Any) -> None:
    """Make every latent down-projection a parametrization of its natural-scale map."""
    for attn in attention_modules(model):
        natural_attention(attn)


def natural_attention(attn: Any) -> None:
    """Make one attention's latent down-projection a parametrization of its natural-scale map."""
    scale = _row_scale(attn).to(attn.kv_a_proj_with_mqa.weight.device)
    for name in ("weight", "bias"):
        if getattr(attn.kv_a_proj_with_mqa, name, None) is not None:
            parametrize.register_parametrization(attn.kv_a_proj_with_mqa, name, RowScale(scale.clone()))


def plain_attention(attn: Any) -> None:
    """Drop the parametrization and keep the stored weights as they are (no new scale)."""
    proj = attn.kv_a_proj_with_mqa
    for name in list(proj.parametrizations) if parametrize.is_parametrized(proj) else []:
        parametrize.remove_parametrizations(proj, name, leave_parametrized=True)


def fold(model: Any) -> None:
    """Remove the parametrizations and choose a fresh epsilon-regime scale for the trained maps."""
    for layer in model.model.layers:
        fold_layer(layer)


def fold_layer(layer: Any) -> None:
    """fold() for one decoder layer."""
    attn = layer.self_attn
    proj = attn.kv_a_proj_with_mqa
    if not parametrize.is_parametrized(proj):
        return
    natural = {name: proj.parametrizations[name].original.detach().double() for name in proj.parametrizations}
    parametrize.remove_parametrizations(proj, "weight", leave_parametrized=True)
    if "bias" in natural:
        parametrize.remove_parametrizations(proj, "bias", leave_parametrized=True)
    rank = attn.kv_a_layernorm.weight.numel()
    down = natural["weight"][:rank]
    if "bias" in natural:
        down = torch.cat([down, natural["bias"][:rank, None]], dim=1)
    bound = attention_input_bound(layer.input_layernorm.weight.detach().double())
    s = epsilon_regime_scale(down, bound)
    root_eps = math.sqrt(attn.kv_a_layernorm.variance_epsilon)
    with torch.no_grad():
        proj.weight[:rank] = (s * natural["weight"][:rank]).to(proj.weight.dtype)
        proj.weight[rank:] = natural["weight"][rank:].to(proj.weight.dtype)
        if "bias" in natural:
            proj.bias[:rank] = (s * natural["bias"][:rank]).to(proj.bias.dtype)
            proj.bias[rank:] = natural["bias"][rank:].to(proj.bias.dtype)
        attn.kv_a_layernorm.weight.fill_(root_eps / s)


@torch.no_grad()
def to_natural_norm(attn: Any, x: torch.Tensor) -> None:
    """Leave the epsilon regime: store the natural latent map and give the norm the latent's mean RMS over
    x as its gain, so the norm divides each token by its own RMS as DeepSeek trains it. Not exact (the
    per-token rescaling reaches the keys and values); measured as an alternative in
    bench/natural_norm_cli.py (issue 12, item 5), not a conversion option."""
    norm, proj = attn.kv_a_layernorm, attn.kv_a_proj_with_mqa
    rank = norm.weight.numel()
    scale = _row_scale(attn)[:rank].double()  # stored = scale * natural
    natural = proj.weight[:rank].double() / scale[:, None]
    flat = x.reshape(-1, x.shape[-1]).double()
    latent = flat @ natural.T
    if proj.bias is not None:
        bias = proj.bias[:rank].double() / scale
        latent = latent + bias
        proj.bias[:rank] = bias.to(proj.bias.dtype)
    proj.weight[:rank] = natural.to(proj.weight.dtype)
    norm.weight.fill_(float(latent.pow(2).mean(-1).sqrt().mean()))
