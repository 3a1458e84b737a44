"""Read and write safetensors shards one tensor at a time, so memory is bounded by a tensor, not a shard.

Why not the safetensors package for this: `safe_open` memory-maps a shard, and every page a read touches
stays in the process's resident set until the handle is closed (measured: reading a 1 GB shard tensor
by tensor grew RSS by 1 GB); and `save_file` needs every tensor of a shard in memory at once. Here reads
are plain positioned reads into a fresh buffer, and a shard is written as its tensors arrive: the data
goes after a reserved header, and the header is filled in when the shard is closed, padded with spaces
as the format allows ("the header MAY be trailing padded with whitespace").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
HEADER_CAPACITY = 64 * 1024  # room for ~500 tensor entries per shard; a multiple of 8 keeps data aligned
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


class SafetensorsError(ValueError):
    """A file that is not a complete, well-formed safetensors file."""


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors a shard holds, after checking that the header parses and all the data is there."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        if header_len <= 0 or header_len > MAX_HEADER or 8 + header_len > size:
            raise SafetensorsError("header length is out of range")
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SafetensorsError(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    base = 8 + header_len
    entries = {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise SafetensorsError(f"tensor '{name}' has unsupported dtype {info['dtype']}")
            begin, end = (int(x) for x in info["data_offsets"])
            entries[name] = Entry(
                SAFETENSORS_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]), base + begin, base + end
            )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SafetensorsError):
            raise
        raise SafetensorsError("malformed header") from exc
    needed = max((e.end for e in entries.values()), default=base)
    if needed > size:
        raise SafetensorsError(f"truncated: {size} bytes on disk, {needed} expected")
    for name, e in entries.items():
        numel = 1
        for d in e.shape:
            numel *= d
        if e.end - e.start != numel * _itemsize(e.dtype) or e.start < base:
            raise SafetensorsError(f"tensor '{name}' has data offsets that do not match its shape")
    return entries


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class TensorFile:
    """One safetensors shard read with positioned reads; nothing stays mapped between calls."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = read_header(path)

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        count = entry.end - entry.start
        if count == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        buffer = torch.empty(count, dtype=torch.uint8)  # not zero-filled, unlike a bytearray
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(entry.start)
            view, done = memoryview(buffer.numpy()), 0
            while done < count:  # a raw read may return less than asked
                got = fh.readinto(view[done:])
                if not got:
                    raise SafetensorsError(f"tensor '{name}' is cut short")
                done += got
        return buffer.view(entry.dtype).reshape(entry.shape)


class ShardFile:
    """A safetensors file written tensor by tensor: data first, the header last into reserved room."""

    def __init__(self, path: Path, capacity: int = HEADER_CAPACITY):
        self.path = path
        self.capacity = capacity
        self.header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        self.data_bytes = 0
        self._fh: BinaryIO | None = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.seek(8 + capacity)

    def fits(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether the header still has room for one more entry like this."""
        return len(self._encode({**self.header, name: self._entry(tensor)})) <= self.capacity

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.record(name, tensor)
        self.write(tensor)

    def record(self, name: str, tensor: torch.Tensor) -> None:
        """Enter the tensor in the header; its bytes must follow with `write`, in the same order."""
        self.header[name] = self._entry(tensor)
        self.data_bytes += tensor.numel() * tensor.element_size()

    def write(self, tensor: torch.Tensor) -> None:
        assert self._fh is not None
        if tensor.numel():
            self._fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)

    def _entry(self, tensor: torch.Tensor) -> dict:
        size = tensor.numel() * tensor.element_size()
        return {
            "dtype": CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.data_bytes, self.data_bytes + size],
        }

    @staticmethod
    def _encode(header: dict) -> bytes:
        return json.dumps(header, separators=(",", ":")).encode()

    def close(self) -> None:
        assert self._fh is not None
        text = self._encode(self.header)
        self._fh.seek(0)
        self._fh.write(len(text.ljust(self.capacity)).to_bytes(8, "little"))
        self._fh.write(text.ljust(self.capacity, b" "))
        self._fh.close()
        self._fh = None
