"""The source's tokenizer and generation settings, written beside the converted checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..source.checkpoint import Source
from .writer import copy_file


def copy_tokenizer(source: Source, out: Path) -> None:
    """The tokenizer and generation config beside the converted weights: copied as they are, or written from
    a GGUF's own vocabulary and config."""
    files = list(source.tokenizer_files())
    for path in files:
        copy_file(path, out)
    gen = source.generation_config_file()
    if gen is not None:
        copy_file(gen, out)
    if source.gguf_file is not None:
        from transformers import GenerationConfig

        tokenizer = source.tokenizer()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        GenerationConfig.from_model_config(source.config).save_pretrained(str(out))
