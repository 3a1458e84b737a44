"""MODEL_IN and MODEL_OUT, judged from the file system alone (no torch), so a mistyped path is refused at once."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConversionError

HUB_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?$")  # "name" or "org/name"


def check_model_in(model_in: str) -> Path | None:
    """The local path MODEL_IN names (None for a hub id), refused when it can be neither."""
    path = Path(model_in).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ConversionError(f"GGUF file not found: {path}")
        return path
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"MODEL_IN must be a model directory, a hub id or a .gguf file: {path}")
        return path
    if not HUB_NAME.match(model_in):
        raise ConversionError(f"model path not found: {path}")
    return None


def check_paths(model_in: str, model_out: Path, force: bool) -> None:
    """Both paths, before anything is loaded."""
    check_output_path(check_model_in(model_in), model_out, force)


def check_output_path(model_in: Path | None, model_out: Path, force: bool) -> None:
    """Refuse outputs that would overwrite the input or an existing directory (without --force).

    A directory input may neither hold the output nor sit inside it. A file input (a .gguf) may sit beside
    the output, but the output may not be the file itself, nor a directory holding it, which replacing
    would delete.
    """
    out = model_out.expanduser().resolve()
    if model_in is not None:
        src = model_in.expanduser().resolve()
        if src.is_file():
            if out == src:
                raise ConversionError(f"MODEL_OUT {model_out} is the MODEL_IN file; choose another path")
            if out in src.parents:
                raise ConversionError(
                    f"MODEL_OUT {model_out} holds MODEL_IN, which writing it would delete; choose another directory"
                )
        elif out == src or src in out.parents:
            raise ConversionError(f"MODEL_OUT {model_out} is inside MODEL_IN; choose a directory outside it")
        elif out in src.parents:
            raise ConversionError(
                f"MODEL_OUT {model_out} holds MODEL_IN, which writing it would delete; choose another directory"
            )
    if out.exists() and not force:
        raise ConversionError(f"{model_out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{model_out} exists and is not a directory")
    if not out.parent.exists():
        raise ConversionError(f"the parent directory of {model_out} does not exist")
