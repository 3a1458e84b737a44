"""`mla-convert verify OUT`: is this folder what mla-convert wrote? Every file the report lists is re-hashed
against the sha256 recorded when it was written, then the checkpoint is loaded as a user would (stock
transformers, no trust_remote_code) and run on a few tokens.

Problems are ConversionErrors of one line that name the file, so a copy damaged on its way (a truncated
download, an edited shard) is found before anyone serves it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConversionError, first_line
from ..write.manifest import REPORT, mismatches, published_files


def check_output(folder: Path) -> dict[str, Any]:
    """{files (checked), extra (files not in the report), architecture, parameters}; raises on any problem."""
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a directory; pass the MODEL_OUT folder that mla-convert wrote")
    recorded = _recorded_files(folder)
    problems = mismatches(folder, recorded)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConversionError(f"{folder.name}: {problems[0]}{more}")
    extra = [p.relative_to(folder).as_posix() for p in published_files(folder)]
    extra = [name for name in extra if name not in recorded]
    model = _load(folder)
    return {
        "files": len(recorded),
        "extra": extra,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _recorded_files(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / REPORT
    if not path.is_file():
        raise ConversionError(f"{folder.name} has no {REPORT}: it was not written by mla-convert, or not finished")
    try:
        files = json.loads(path.read_text()).get("files")
    except (ValueError, AttributeError) as exc:
        raise ConversionError(f"{folder.name}/{REPORT} is damaged ({first_line(exc)})") from exc
    if not isinstance(files, dict) or not files:
        raise ConversionError(f"{folder.name}/{REPORT} records no file hashes (written by an older mla-convert)")
    return files


def _load(folder: Path) -> Any:
    """The checkpoint through stock transformers (no remote code), run on four tokens."""
    import torch

    from .verify import load_converted

    try:
        model = load_converted(folder)
        with torch.no_grad():
            logits = model(torch.zeros(1, 4, dtype=torch.long)).logits
    except Exception as exc:
        raise ConversionError(f"{folder.name} does not load with stock transformers: {first_line(exc)}") from exc
    if not bool(torch.isfinite(logits).all()):
        raise ConversionError(f"{folder.name} loads, but its logits are not finite")
    return model
