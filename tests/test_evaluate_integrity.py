"""`mla-convert verify OUT`: the report records the sha256 of every written file; verify re-hashes the folder
and loads it with stock transformers. A truncated, edited or missing file is named in one line, exit 2."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mla_convert.cli import app

from .helpers import FAST, one_line


@pytest.fixture(scope="module")
def written(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished conversion in several shards, converted once for the module."""
    out = tmp_path_factory.mktemp("integrity") / "model-mla"
    flags = [*FAST, "--kv-budget", "0.5", "--finetune-steps", "0", "--no-validate", "--max-shard-size", "40KB"]
    result = CliRunner().invoke(app, [str(tiny_models["llama_gqa_tied"]), str(out), *flags])
    assert result.exit_code == 0, result.output
    return out


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


@pytest.fixture
def copy(written: Path, tmp_path: Path) -> Path:
    """A copy of the output to damage."""
    return Path(shutil.copytree(written, tmp_path / "model-mla"))


def test_the_report_records_every_written_file(written: Path) -> None:
    files = json.loads((written / "mla_report.json").read_text())["files"]
    on_disk = {p.name for p in written.iterdir() if p.is_file() and p.name != "mla_report.json"}
    assert set(files) == on_disk and len(shards(written)) > 2 and "README.md" in files
    for name, facts in files.items():
        data = (written / name).read_bytes()
        assert facts == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_verify_passes_an_intact_folder(cli, copy: Path) -> None:
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # what a hub client adds: hidden, ignored
    result = cli("verify", copy)
    assert result.exit_code == 0, result.output
    assert "files match the sha256 in mla_report.json" in result.stdout and "DeepseekV3ForCausalLM" in result.stdout


def test_a_truncated_shard_is_named(cli, copy: Path) -> None:
    shard = shards(copy)[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as file:
        file.truncate(size - 100)
    one_line(cli("verify", copy), f"{shard.name} is truncated", f"{size - 100} bytes, {size} written")


def test_an_edited_shard_is_named(cli, copy: Path) -> None:
    shard = shards(copy)[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: same size, a model that still loads
    shard.write_bytes(bytes(data))
    one_line(cli("verify", copy), f"{shard.name} was modified")


def test_a_missing_file_and_a_missing_report_are_named(cli, copy: Path) -> None:
    (copy / "tokenizer_config.json").unlink(missing_ok=True)
    (copy / "config.json").unlink()
    one_line(cli("verify", copy), "config.json is missing")
    (copy / "mla_report.json").unlink()
    one_line(cli("verify", copy), "has no mla_report.json")


def test_an_added_file_is_a_warning(cli, copy: Path) -> None:
    (copy / "notes.txt").write_text("added after the run\n")
    result = cli("verify", copy)
    assert result.exit_code == 0, result.output
    assert "notes.txt is not among the files mla-convert wrote" in result.stderr
