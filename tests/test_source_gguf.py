"""A .gguf as MODEL_IN: checked and configured from its header alone, converted beside itself, and refused in
one line when it is cut short or is not GGUF at all. Every GGUF here is a tiny random Llama written in the test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import mla_convert.source.checkpoint as source_module
from mla_convert.errors import ConversionError
from mla_convert.source.checkpoint import resolve
from mla_convert.source.paths import check_output_path

from .helpers import FAST, FFN, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, Untouched, one_line, write_llama_gguf


def expected_parameters(tied: bool = True) -> int:
    attn = HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN
    layer = 2 * HIDDEN + attn + 3 * HIDDEN * FFN
    return VOCAB * HIDDEN * (1 if tied else 2) + LAYERS * layer + HIDDEN


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_llama_gguf(tmp_path / "model.gguf")


def _no_weights(path: Path) -> object:
    raise AssertionError(f"a weight of {path.name} was read")


# ---------------------------------------------------------------- resolve reads the header only


def test_resolve_reads_no_weights(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "_load_gguf_tensors", _no_weights)
    source = resolve(str(tiny_gguf))
    assert source.config.model_type == "llama"
    assert (source.config.num_hidden_layers, source.config.num_key_value_heads) == (LAYERS, KV_HEADS)
    assert source.config.tie_word_embeddings
    assert source.gguf_file == "model.gguf" and source.gguf_path == tiny_gguf
    assert source.streams is False
    assert source.parameter_count() == expected_parameters()  # from the header's shapes
    with pytest.raises(ConversionError, match=r"a weight of model\.gguf was read"):
        source.names()  # the first use of a tensor is what loads them


@pytest.mark.parametrize("tied", [True, False])
def test_tensors_load_on_first_use(tmp_path: Path, tied: bool) -> None:
    path = write_llama_gguf(tmp_path / "model.gguf", tied=tied)
    source = resolve(str(path))
    assert source._tensors is None and source._model is None
    names = source.names()
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert ("lm_head.weight" in names) is not tied
    assert source.has("model.embed_tokens.weight") and not source.has("no.such.tensor")
    assert tuple(source.get("model.layers.0.mlp.gate_proj.weight").shape) == (FFN, HIDDEN)
    assert source.parameter_count() == expected_parameters(tied) == sum(source.get(n).numel() for n in names)
    assert source.model() is source.model()
    assert source.streams is False
    with pytest.raises(ConversionError, match=r"'no\.such\.tensor' is missing"):
        source.get("no.such.tensor")


def test_model_alone_loads_the_tensors(tiny_gguf: Path) -> None:
    source = resolve(str(tiny_gguf))
    model = source.model()
    assert source._tensors is not None and "model.norm.weight" in source._tensors
    assert model.config.num_hidden_layers == LAYERS


# ---------------------------------------------------------------- a GGUF beside its output


def test_output_beside_the_gguf_is_accepted(tiny_gguf: Path) -> None:
    check_output_path(tiny_gguf, tiny_gguf.parent / "model-mla", force=False)


@pytest.mark.parametrize(("out", "fragment"), [(".", "is the MODEL_IN file"), ("..", "holds MODEL_IN")])
def test_output_that_would_replace_the_gguf_is_refused(tiny_gguf: Path, out: str, fragment: str) -> None:
    target = tiny_gguf if out == "." else tiny_gguf.parent
    with pytest.raises(ConversionError, match=fragment):
        check_output_path(tiny_gguf, target, force=True)


def test_gguf_converts_beside_itself(cli, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mla-convert model.gguf model-mla` run in the folder holding model.gguf."""
    monkeypatch.chdir(tiny_gguf.parent)
    result = cli("model.gguf", "model-mla", FAST, "--finetune-steps", "0", "--no-validate")
    assert result.exit_code == 0, result.output
    out = tiny_gguf.parent / "model-mla"
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------- damaged files, refused in one line


def test_truncated_gguf_names_both_sizes(cli, tiny_gguf: Path) -> None:
    full = tiny_gguf.stat().st_size
    with open(tiny_gguf, "r+b") as file:
        file.truncate(full - 1000)
    model_out = tiny_gguf.parent / "model-mla"
    guard = Untouched(tiny_gguf, model_out)
    line = one_line(
        cli(tiny_gguf, model_out, FAST),
        "model.gguf is truncated",
        f"expected at least {full} bytes",
        f"found {full - 1000}",
    )
    assert "reshape" not in line
    guard.check()


def test_gguf_cut_inside_its_header_is_truncated(cli, tiny_gguf: Path) -> None:
    with open(tiny_gguf, "r+b") as file:
        file.truncate(200)  # inside the metadata
    model_out = tiny_gguf.parent / "model-mla"
    guard = Untouched(tiny_gguf, model_out)
    one_line(cli(tiny_gguf, model_out, FAST), "model.gguf is truncated", "expected at least", "found 200")
    guard.check()


def test_truncated_gguf_is_refused_before_any_weight_is_read(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "_load_gguf_tensors", _no_weights)
    os.truncate(tiny_gguf, tiny_gguf.stat().st_size - 4)
    with pytest.raises(ConversionError, match=r"^model\.gguf is truncated: expected at least \d+ bytes, found \d+$"):
        resolve(str(tiny_gguf))


@pytest.mark.parametrize("content", [b"", b"GGU", b"this is not a GGUF file\n" * 100], ids=["empty", "short", "text"])
def test_non_gguf_file_is_refused_in_one_line(cli, tmp_path: Path, content: bytes) -> None:
    model_in = tmp_path / "model.gguf"
    model_in.write_bytes(content)
    model_out = tmp_path / "model-mla"
    guard = Untouched(model_in, model_out)
    one_line(cli(model_in, model_out, FAST), "model.gguf is not a GGUF file")
    guard.check()
