"""Layer-wise reconstruction: after the closed-form fit of one layer, a few hundred Adam steps on that
converted attention so its output matches the source attention's on the calibration inputs (the inputs
the already converted layers produce).

The latent down-projection is optimised in its natural scale and folded back into the epsilon regime
afterwards (mla/natural_scale.py), the latent norm gains stay frozen, and the stored layout is untouched.
Early stopping watches held-out calibration windows (never the evaluation text), and a layer whose
held-out error does not fall is left exactly as it was, so lossless maps stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..mla.natural_scale import FROZEN, fold_layer, natural_attention, plain_attention, relative_groups
from .layer_fit import HELD_SHARE, attention_error

EVAL_EVERY = 25  # steps between held-out checks
PATIENCE = 3  # checks without improvement before stopping
MIN_GAIN = 1e-3  # a relative improvement below this counts as none


@dataclass
class Reconstruction:
    """Held-out relative output error of one layer before and after, and the steps taken."""

    before: float
    after: float
    steps: int


def reconstruct(
    layer: Any,
    x: torch.Tensor,
    target: torch.Tensor,
    pos: Any,
    steps: int,
    lr: float = 1e-3,
    batch: int = 4,
    natural_norm: bool = False,
) -> Reconstruction:
    """Optimise layer.self_attn in place so attn(x) approaches target; keep the best held-out state.

    natural_norm: the latent norm is in its ordinary regime already (measured by bench/natural_norm_cli.py),
    so the stored rows are trained as they are and nothing is folded."""
    attn = layer.self_attn
    held = max(1, x.shape[0] // HELD_SHARE)
    if steps <= 0 or x.shape[0] <= held:
        error = attention_error(attn, x, target, pos)
        return Reconstruction(error, error, 0)
    fit_x, fit_t, held_x, held_t = x[:-held], target[:-held], x[-held:], target[-held:]
    before = attention_error(attn, held_x, held_t, pos)
    stored = {name: t.clone() for name, t in attn.state_dict().items()}
    if not natural_norm:
        natural_attention(attn)
    params = [p for name, p in attn.named_parameters() if not any(f"{frozen}." in name for frozen in FROZEN)]
    initial = {name: p.detach().clone() for name, p in attn.named_parameters()}
    best, best_state, stalls, taken = before, initial, 0, 0
    optimizer = torch.optim.Adam(relative_groups(params, lr), betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(layer.self_attn.layer_idx)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            pick = torch.randint(fit_x.shape[0], (min(batch, fit_x.shape[0]),), generator=generator)
            want = fit_t[pick]
            loss = (attn(fit_x[pick], pos, None)[0] - want).pow(2).mean() / want.pow(2).mean().clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            taken = step
            if step % EVAL_EVERY and step != steps:
                continue
            error = attention_error(attn, held_x, held_t, pos)
            if error < best * (1 - MIN_GAIN):
                best, stalls = error, 0
                best_state = {name: p.detach().clone() for name, p in attn.named_parameters()}
            else:
                stalls += 1
                if stalls >= PATIENCE:
                    break
    if best_state is initial:  # nothing gained: the layer stays bit for bit as the closed form made it
        if not natural_norm:
            plain_attention(attn)
        attn.load_state_dict(stored)
        return Reconstruction(before, before, taken)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(best_state[name])
    if not natural_norm:
        fold_layer(layer)
    return Reconstruction(before, attention_error(attn, held_x, held_t, pos), taken)
