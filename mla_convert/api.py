"""The Python API, for notebooks and pipelines; the `mla-convert` command is a thin layer over it.

    from mla_convert import convert, dry_run
    print(dry_run("SmolLM2-135M-Instruct.Q4_1.gguf", kv_budget=0.25)["kv_cache"])
    report = convert("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-mla", kv_budget=0.25)

Both take an `Options` object, or the command line's flags as keywords, named as the flags are with underscores
for dashes (`kv_budget=0.25, finetune_steps=0, train="all", train_seq_len=512`), or both (the keywords win). Problems
with the input, a wrong keyword or a value of the wrong type included, raise `ConversionError` with a one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .hooks import Hooks
from .options import Options, check_options, with_flags
from .source.paths import check_paths


def convert(
    model_in: str | Path,
    model_out: str | Path,
    options: Options | None = None,
    *,
    hooks: Hooks | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Convert MODEL_IN into a DeepSeek-V3 (MLA) checkpoint in MODEL_OUT; returns mla_report.json's content."""
    options = with_settings(options, settings)
    check_options(options)  # before torch is imported: a bad flag costs no time
    if not options.resume:
        check_paths(str(model_in), Path(model_out), options.force)
    from .job import run

    return run(str(model_in), Path(model_out), options, hooks)


def dry_run(
    model_in: str | Path, options: Options | None = None, *, model_out: str | Path | None = None, **settings: Any
) -> dict[str, Any]:
    """What `convert` would do, from the config alone: widths, KV cache, engines, memory, fine-tune time."""
    options = with_settings(options, settings)
    check_options(options)
    if model_out is not None:
        check_paths(str(model_in), Path(model_out), options.force)
    from .job import preview

    return preview(str(model_in), options)


def verify_output(model_out: str | Path) -> dict[str, Any]:
    """Check a written MODEL_OUT: every file against the sha256 its report recorded, then a load with stock
    transformers. Returns {files, extra, architecture, parameters}; a problem raises ConversionError naming
    the file."""
    from .evaluate.integrity import check_output

    return check_output(Path(model_out).expanduser())


def with_settings(options: Options | None, settings: dict[str, Any]) -> Options:
    """`options` (default: Options()) with keyword settings, named as the command line's flags, applied."""
    return with_flags(options or Options(), settings)
