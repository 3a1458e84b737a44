"""The llama.cpp probe's "tile" fill: a sequence-state file (llama.cpp's format, written here by hand) is
repeated to a longer context without changing any row, for both V layouts; decode timing at 256K relies on it."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

PROBE = Path(__file__).parent.parent / "mla_convert" / "engines" / "probes" / "llamacpp_probe.py"
MAGIC, VERSION = 0x67677371, 3


def _probe():
    spec = importlib.util.spec_from_file_location("llamacpp_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state(cells: int, layers: int, k_row: int, v: str, v_width: int, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A one-stream state: cells at positions 0..cells-1 of sequence 0, K rows per layer, then V."""
    parts = [struct.pack("<III", MAGIC, VERSION, 0), struct.pack("<II", 1, cells)]
    parts += [struct.pack("<iIi", pos, 1, 0) for pos in range(cells)]
    parts.append(struct.pack("<II", 1 if v == "transposed" else 0, layers))
    k = [rng.integers(0, 256, (cells, k_row), dtype=np.uint8) for _ in range(layers)]
    for rows in k:
        parts += [struct.pack("<iQ", 1, k_row), rows.tobytes()]
    vs = []
    if v == "rows":
        vs = [rng.integers(0, 256, (cells, 2 * v_width), dtype=np.uint8) for _ in range(layers)]
        for rows in vs:
            parts += [struct.pack("<iQ", 1, 2 * v_width), rows.tobytes()]
    elif v == "transposed":
        vs = [rng.integers(0, 256, (v_width, 2 * cells), dtype=np.uint8) for _ in range(layers)]
        for rows in vs:
            parts += [struct.pack("<iII", 1, 2, v_width), rows.tobytes()]
    return b"".join(parts), {"k": k, "v": vs}


@pytest.mark.parametrize("v", ["none", "rows", "transposed"])  # MLA's latent-only cache; V with and without FA
def test_tiling_repeats_every_row_and_numbers_the_positions(tmp_path: Path, v: str) -> None:
    cells, context, layers, k_row, v_width = 5, 12, 2, 6, 3
    data, original = _state(cells, layers, k_row, v, v_width, np.random.default_rng(0))
    (tmp_path / "seed.bin").write_bytes(data)
    _probe()._write_tiled(str(tmp_path / "seed.bin"), str(tmp_path / "tiled.bin"), context)
    out = (tmp_path / "tiled.bin").read_bytes()

    assert struct.unpack_from("<IIIII", out, 0) == (MAGIC, VERSION, 0, 1, context)
    meta = np.frombuffer(out, dtype=np.int32, count=3 * context, offset=20).reshape(context, 3)
    assert meta[:, 0].tolist() == list(range(context)) and (meta[:, 1] == 1).all() and (meta[:, 2] == 0).all()
    at = 20 + 12 * context
    assert struct.unpack_from("<II", out, at) == (1 if v == "transposed" else 0, layers)
    at += 8
    repeat = [i % cells for i in range(context)]
    for rows in original["k"]:
        assert struct.unpack_from("<iQ", out, at) == (1, k_row)
        got = np.frombuffer(out, dtype=np.uint8, count=context * k_row, offset=at + 12).reshape(context, k_row)
        assert (got == rows[repeat]).all()
        at += 12 + context * k_row
    for rows in original["v"]:
        if v == "rows":
            width = rows.shape[1]
            got = np.frombuffer(out, dtype=np.uint8, count=context * width, offset=at + 12).reshape(context, width)
            assert (got == rows[repeat]).all()
            at += 12 + context * width
        else:
            assert struct.unpack_from("<iII", out, at) == (1, 2, v_width)
            got = np.frombuffer(out, dtype=np.uint8, count=v_width * 2 * context, offset=at + 12)
            per_cell = rows.reshape(v_width, cells, 2)[:, repeat]
            assert (got.reshape(v_width, context, 2) == per_cell).all()
            at += 12 + v_width * 2 * context
    assert at == len(out)


def test_a_cache_of_several_streams_is_refused(tmp_path: Path) -> None:
    data = struct.pack("<III", MAGIC, VERSION, 0) + struct.pack("<II", 2, 1)
    (tmp_path / "seed.bin").write_bytes(data + b"\0" * 64)
    with pytest.raises(RuntimeError, match="one KV stream"):
        _probe()._write_tiled(str(tmp_path / "seed.bin"), str(tmp_path / "tiled.bin"), 8)
