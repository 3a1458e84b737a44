"""`mla-convert` with DeepSeek's latent RMSNorm in its ordinary ("natural") regime: a measurement for
issue 12, item 5, not a product option.

The tool keeps the latent norm linear (mla/latent_norm.py): the stored down-projection rows are tiny
(about 1e-8), so the norm sees a mean square far below its epsilon and is a fixed scale. Weight quantizers
that do not keep those rows in float32 erase them. The alternative measured here stores the natural
down-projection and lets the norm normalise each token, as DeepSeek trains it, with the norm's gain set to
the latent's mean RMS on the calibration inputs; the layer-wise steps (--layer-steps) then train the
attention in that regime to absorb the per-token rescaling, which no exact map can.

Every argument is mla-convert's; run through bench/one_shot.py --natural-norm. Each converted layer is
moved to the natural regime just before its layer-wise steps, so --layer-steps must be given (its
value is the number of steps; MLA_NATURAL_STEPS=0 measures the regime without any).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

import mla_convert.conversion.calibrator as calibrator_module
import mla_convert.conversion.reconstruct as reconstruct_module
from mla_convert.cli import main
from mla_convert.conversion.layer_fit import attention_error
from mla_convert.mla.natural_scale import to_natural_norm

closed_form_reconstruct = reconstruct_module.reconstruct


def natural_reconstruct(layer: Any, x: torch.Tensor, target: torch.Tensor, pos: Any, steps: int, **kw: Any) -> Any:
    to_natural_norm(layer.self_attn, x)
    steps = int(os.environ.get("MLA_NATURAL_STEPS", steps))
    if steps == 0:
        error = attention_error(layer.self_attn, x, target, pos)
        return reconstruct_module.Reconstruction(error, error, 0)
    return closed_form_reconstruct(layer, x, target, pos, steps, natural_norm=True, **kw)


if __name__ == "__main__":
    calibrator_module.reconstruct = natural_reconstruct  # the calibrator's layer-wise steps call this name
    sys.argv[0] = "mla-convert"
    sys.exit(main())
