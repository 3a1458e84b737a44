"""The GGUF stage: write the finished checkpoint once more as a GGUF beside it, for llama.cpp users."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def gguf_beside(checkpoint: Path, name: str, quant: str, source_gguf: Path | None) -> dict[str, Any]:
    """Write `checkpoint` as `checkpoint/<name>-<quant>.gguf`; returns the report's `gguf` entry.

    A .gguf input lends its tokenizer metadata, so llama.cpp tokenizes exactly as it did for the source.
    """
    from .gguf_export import write_gguf  # reads the gguf package only when asked for

    return write_gguf(checkpoint, checkpoint / f"{name}-{quant}.gguf", quant=quant, tokenizer_gguf=source_gguf)
