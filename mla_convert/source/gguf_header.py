"""A GGUF file's header, read without the tensors: the shapes it declares, whether the file holds them, and
its `general.*` metadata (name, license, lineage) for the model card.

gguf.GGUFReader maps every tensor as it parses and fails on a file cut short with a reshape error that
names neither the file nor the cause; this reads only the header (metadata is stepped over), so a file
that is not GGUF, is damaged, or was truncated by an interrupted download is refused in one line.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import ConversionError, first_line

# GGUF metadata value types (gguf.GGUFValueType) of fixed size, as struct formats
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_ALIGNMENT_KEY = "general.alignment"


class _Truncated(Exception):
    def __init__(self, needed: int):
        self.needed = needed


def gguf_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors a GGUF file declares (name -> shape in torch order), after checking the file holds them.

    Only the header is parsed (metadata is skipped over, tensor data is never touched), so a file that is not
    GGUF, is damaged, or was cut short (an interrupted download) is refused in one line before any work.
    """
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = path.name
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 8 or file.read(4) != b"GGUF":
                raise ConversionError(f"{name} is not a GGUF file (it does not start with the GGUF magic)")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                tensors, data_offset, _ = _parse_gguf_header(data, name)
    except OSError as exc:
        raise ConversionError(f"cannot read {name}: {first_line(exc)}") from exc
    except _Truncated as exc:
        raise ConversionError(f"{name} is truncated: expected at least {exc.needed} bytes, found {size}") from None
    end = data_offset
    shapes = {}
    for tensor_name, dims, kind, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise ConversionError(
                f"{name} is not a valid GGUF file (tensor '{tensor_name}' has unknown type {kind})"
            ) from None
        count = math.prod(dims)
        if count % block:
            raise ConversionError(f"{name} is not a valid GGUF file (tensor '{tensor_name}' splits a block)")
        end = max(end, data_offset + offset + count // block * type_size)
        shapes[tensor_name] = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
    if end > size:
        raise ConversionError(f"{name} is truncated: expected at least {end} bytes, found {size}")
    return shapes


def gguf_general(path: Path) -> dict[str, str | int | float]:
    """The file's scalar `general.*` metadata (`general.license`, `general.base_model.0.repo_url`, ...); {} when
    the header cannot be read (resolve() has refused such a file already)."""
    import mmap

    try:
        with open(path, "rb") as file:
            if file.read(4) != b"GGUF":
                return {}
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse_gguf_header(data, path.name)[2]
    except (OSError, ValueError, ConversionError, _Truncated):
        return {}


def _parse_gguf_header(
    data: Any, name: str
) -> tuple[list[tuple[str, list[int], int, int]], int, dict[str, str | int | float]]:
    """(name, dims, type, offset) of each tensor, where tensor data starts, and the scalar `general.*` metadata;
    _Truncated if data runs out."""
    version = struct.unpack_from("<I", data, 4)[0]
    order = "<" if version & 0xFFFF else ">"  # a big-endian file reads as a huge little-endian version
    version = struct.unpack_from(order + "I", data, 4)[0]
    if version not in (2, 3):
        raise ConversionError(f"{name} has GGUF version {version}; supported: 2 and 3")
    size = len(data)
    pos = 8

    def take(fmt: str) -> Any:
        nonlocal pos
        width = struct.calcsize(fmt)
        if pos + width > size:
            raise _Truncated(pos + width)
        value = struct.unpack_from(order + fmt, data, pos)[0]
        pos += width
        return value

    def string() -> bytes:
        nonlocal pos
        length = take("Q")
        if pos + length > size:
            raise _Truncated(pos + length)
        pos += length
        return data[pos - length : pos]

    def skip(kind: int) -> Any:
        """Step over one metadata value; scalars and strings are returned, arrays are not."""
        nonlocal pos
        if kind in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return bytes(string()).decode("utf-8", "replace")
        if kind != _GGUF_ARRAY:
            raise ConversionError(f"{name} is not a valid GGUF file (unknown metadata type {kind})")
        item, count = take("I"), take("Q")
        if item in _GGUF_SCALARS:
            width = struct.calcsize(_GGUF_SCALARS[item]) * count
            if pos + width > size:
                raise _Truncated(pos + width)
            pos += width
        else:
            for _ in range(count):
                skip(item)
        return None

    n_tensors, n_values = take("Q"), take("Q")
    alignment = 32
    general: dict[str, str | int | float] = {}
    for _ in range(n_values):
        key = bytes(string()).decode("utf-8", "replace")
        value = skip(take("I"))
        if key == _GGUF_ALIGNMENT_KEY and isinstance(value, int) and value > 0:
            alignment = value
        if key.startswith("general.") and value is not None:
            general[key] = value
    tensors = []
    for _ in range(n_tensors):
        tensor_name = string().decode("utf-8", "replace")
        dims = [take("Q") for _ in range(take("I"))]
        tensors.append((tensor_name, dims, take("I"), take("Q")))
    return tensors, -(-pos // alignment) * alignment, general
