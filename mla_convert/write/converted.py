"""The convert-and-write stage: every converted tensor streamed into shards, then the config and the tokenizer.

The conversion (conversion/) emits tensors layer by layer, fitted to calibration windows when there are any;
this stage is where they meet the files, so the whole model is never held in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..conversion.driver import LayerStats, convert
from ..hooks import Hooks
from ..options import Options, max_shard_bytes
from ..plan.plan import Plan
from ..plan.target_config import deepseek_config
from ..source.checkpoint import Source
from .tokenizer import copy_tokenizer
from .writer import ShardWriter, write_json


def write_converted(
    source: Source,
    plan: Plan,
    options: Options,
    hooks: Hooks,
    out: Path,
    calib_ids: torch.Tensor | None = None,
    long_ids: torch.Tensor | None = None,
) -> list[LayerStats]:
    """Convert `source` as `plan` says into `out` (fitted to calib_ids, and long_ids, when given); returns each
    layer's measured errors."""
    calibrator: Any = None
    if calib_ids is not None:
        from ..conversion.calibrator import SequentialCalibrator  # imports transformers' DeepSeek modeling: seconds

        calibrator = SequentialCalibrator(
            source,
            plan,
            calib_ids,
            options.device,
            options.layer_steps,
            # at full size it measured no gain, except where per-head q/k norms were replaced by scales
            options.query_refit and (plan.compressed or plan.geometry.family.qk_norm),
            long_ids=long_ids,
        )
    hooks.on_stage("converting layers", plan.geometry.layers)
    with ShardWriter(out, plan.dtype, max_shard_bytes(options.max_shard_size)) as writer:
        stats = convert(source, plan, writer.add, hooks.on_layer, device=options.device, calibrator=calibrator)
        hooks.on_stage("writing the checkpoint")
        writer.finish()
    write_json(out / "config.json", deepseek_config(plan, source.config))
    copy_tokenizer(source, out)
    return stats
