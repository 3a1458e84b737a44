"""The GGUF stage: write the finished checkpoint once more as a GGUF beside it, for llama.cpp users."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check_gguf_request(source_root: Path, vocab: int, source_gguf: Path | None) -> None:
    """Refuse, before any work, a --gguf that the source's tokenizer rules out (the profile was judged with
    the other options: profiles.Profile.refuse_gguf)."""
    from .gguf_vocab import read_vocab

    read_vocab(source_root, vocab, source_gguf)  # the tokenizer the GGUF will carry: present and supported


def gguf_beside(checkpoint: Path, name: str, quant: str, source_gguf: Path | None) -> dict[str, Any]:
    """Write `checkpoint` as `checkpoint/<name>-<quant>.gguf`; returns the report's `gguf` entry.

    A .gguf input lends its tokenizer metadata, so llama.cpp tokenizes exactly as it did for the source.
    """
    from .gguf_writer import write_gguf  # reads the gguf package only when asked for

    out_file = checkpoint / f"{name}-{quant}.gguf"
    return write_gguf(checkpoint, out_file, quant=quant, tokenizer_gguf=source_gguf, name=name)
