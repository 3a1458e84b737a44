"""Bad input: every refusal is one clear line on stderr, a non-zero exit, no traceback and nothing written.

Each case also checks that MODEL_IN is byte-for-byte unchanged, that MODEL_OUT was not created (or, when it
already existed, was left exactly as it was) and that no temporary directory is left beside MODEL_OUT. A run that
fails part way leaves nothing either: tests/test_job_failures_mid_run.py.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
)

from .conftest import COMMON, build_tiny
from .helpers import FAST, SUBPROCESS_TIMEOUT, Untouched, one_line, snapshot, temp_dirs

# ---------------------------------------------------------------- helpers


def copy_model(src: Path, tmp_path: Path, name: str = "model_in") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- damaged or missing MODEL_IN


def _missing(tmp_path: Path, tiny: Path) -> Path:
    return tmp_path / "no" / "such" / "model"


def _missing_gguf(tmp_path: Path, tiny: Path) -> Path:
    return tmp_path / "SmolLM2-135M.Q4_1.gguf"


def _no_config(tmp_path: Path, tiny: Path) -> Path:
    path = copy_model(tiny, tmp_path)
    (path / "config.json").unlink()
    return path


def _no_weights(tmp_path: Path, tiny: Path) -> Path:
    path = copy_model(tiny, tmp_path)
    (path / "model.safetensors").unlink()
    return path


def _pickle_only(tmp_path: Path, tiny: Path) -> Path:
    path = copy_model(tiny, tmp_path)
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def _config_not_json(tmp_path: Path, tiny: Path) -> Path:
    path = copy_model(tiny, tmp_path)
    (path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,,\n')
    return path


def _config_not_object(tmp_path: Path, tiny: Path) -> Path:
    path = copy_model(tiny, tmp_path)
    (path / "config.json").write_text("null\n")
    return path


def _garbage_safetensors(tmp_path: Path, tiny: Path) -> Path:
    path = copy_model(tiny, tmp_path)
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file\n" * 500)
    return path


def _bad_header_json(tmp_path: Path, tiny: Path) -> Path:
    path = copy_model(tiny, tmp_path)
    header = b"{{{ not json }}}"
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    return path


def _header_without_offsets(tmp_path: Path, tiny: Path) -> Path:
    path = copy_model(tiny, tmp_path)
    header = b'{"model.embed_tokens.weight": {"dtype": "F32", "shape": [4]}}'
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    return path


def _truncated_safetensors(tmp_path: Path, tiny: Path) -> Path:
    path = copy_model(tiny, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return path


def _sharded_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model_in"
    build_tiny(LlamaConfig(num_key_value_heads=2, **COMMON)).save_pretrained(path, max_shard_size="20KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").is_file()
    return path


def _missing_shard(tmp_path: Path, tiny: Path) -> Path:
    path = _sharded_checkpoint(tmp_path)
    sorted(path.glob("model-*.safetensors"))[1].unlink()  # model-00002-of-000NN.safetensors
    return path


def _damaged_index(tmp_path: Path, tiny: Path) -> Path:
    path = _sharded_checkpoint(tmp_path)
    (path / "model.safetensors.index.json").write_text("[]\n")
    return path


INPUT_CASES: list[tuple[str, Callable[[Path, Path], Path], tuple[str, ...]]] = [
    ("missing-path", _missing, ("model path not found",)),
    ("missing-gguf", _missing_gguf, ("GGUF file not found", ".gguf")),
    ("no-config", _no_config, ("no config.json",)),
    ("config-no-weights", _no_weights, ("no safetensors weights",)),
    ("pickle-only", _pickle_only, ("pickle", "safetensors")),
    ("config-not-json", _config_not_json, ("config.json", "not valid JSON")),
    ("config-not-object", _config_not_object, ("config.json", "not a JSON object")),
    ("garbage-safetensors", _garbage_safetensors, ("model.safetensors is not a valid safetensors file",)),
    ("header-not-json", _bad_header_json, ("model.safetensors is not a valid safetensors file",)),
    ("header-no-offsets", _header_without_offsets, ("model.safetensors is not a valid safetensors file",)),
    ("truncated-safetensors", _truncated_safetensors, ("model.safetensors is truncated",)),
    ("missing-shard", _missing_shard, ("shard model-00002-of-", "listed in model.safetensors.index.json is missing")),
    ("damaged-index", _damaged_index, ("model.safetensors.index.json", "is damaged")),
]


@pytest.mark.parametrize(("make", "fragments"), [c[1:] for c in INPUT_CASES], ids=[c[0] for c in INPUT_CASES])
def test_bad_model_in(cli, tiny_llama: Path, tmp_path: Path, make, fragments) -> None:
    model_in = make(tmp_path, tiny_llama)
    assert model_in.is_absolute()
    model_out = tmp_path / "model_out"
    guard = Untouched(model_in, model_out)
    one_line(cli(model_in, model_out, FAST), *fragments)
    guard.check()


def test_markup_like_path_is_quoted_verbatim(cli, tmp_path: Path) -> None:
    """Paths are user text: '[...]' in them must be printed as-is, not read as console markup."""
    model_in = tmp_path / "run[/bold]" / "[red]model"
    model_out = tmp_path / "model_out"
    guard = Untouched(model_in, model_out)
    one_line(cli(model_in, model_out, FAST), f"model path not found: {model_in}")
    guard.check()


# ---------------------------------------------------------------- unsupported architectures


def _save_causal(config: object, path: Path) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def _gpt2(path: Path) -> None:
    _save_causal(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128), path)


def _bert(path: Path) -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
    )
    BertForMaskedLM(config).save_pretrained(path)


def _gemma3_text(path: Path) -> None:
    _save_causal(Gemma3TextConfig(num_key_value_heads=2, **COMMON), path)


def _gemma2(path: Path) -> None:
    _save_causal(Gemma2Config(num_key_value_heads=2, **COMMON), path)


def _olmo2(path: Path) -> None:
    _save_causal(Olmo2Config(num_key_value_heads=2, **COMMON), path)


def _phi3_longrope(path: Path) -> None:
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    config = Phi3Config(
        num_key_value_heads=2, pad_token_id=0, rope_parameters=rope, original_max_position_embeddings=256, **COMMON
    )
    _save_causal(config, path)


def _mistral_sliding_window(path: Path) -> None:
    _save_causal(MistralConfig(num_key_value_heads=2, sliding_window=16, **COMMON), path)


SUPPORTED = "supported: Llama"
ARCH_CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("gpt2", _gpt2, ("unsupported architecture 'GPT2LMHeadModel'", SUPPORTED, "Mistral", "Qwen2")),
    ("bert", _bert, ("unsupported architecture 'BertForMaskedLM'", SUPPORTED)),
    ("gemma3-text", _gemma3_text, ("'Gemma3ForCausalLM'", "post-norms", "sliding-window", "by design", SUPPORTED)),
    ("gemma2", _gemma2, ("'Gemma2ForCausalLM'", "post-norms", "soft-caps", "by design", SUPPORTED)),
    ("olmo2", _olmo2, ("'Olmo2ForCausalLM'", "post-norms", "normalizes queries and keys", "by design")),
    ("phi3-longrope", _phi3_longrope, ("'Phi3ForCausalLM'", "rope type 'longrope'", "supported rope types")),
    (
        "mistral-sliding-window",
        _mistral_sliding_window,
        ("'MistralForCausalLM'", "sliding-window", "window 16", "--allow-full-attention"),
    ),
]


@pytest.mark.parametrize(("save", "fragments"), [c[1:] for c in ARCH_CASES], ids=[c[0] for c in ARCH_CASES])
def test_unsupported_architecture(cli, tmp_path: Path, save, fragments) -> None:
    model_in = tmp_path / "model_in"
    save(model_in)
    model_out = tmp_path / "model_out"
    guard = Untouched(model_in, model_out)
    one_line(cli(model_in, model_out, FAST), *fragments)
    guard.check()


# ---------------------------------------------------------------- flags out of range


FLAG_CASES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("kv-rank-0", ("--kv-rank", "0"), ("--kv-rank must be a positive number", "got 0")),
    ("kv-rank-negative", ("--kv-rank", "-3"), ("--kv-rank must be a positive number", "got -3")),
    ("kv-rank-above-lossless", ("--kv-rank", "100000"), ("--kv-rank must be between 1 and 48", "got 100000")),
    ("rope-dim-0", ("--rope-dim", "0"), ("--rope-dim must be a positive even number, got 0",)),
    ("rope-dim-odd", ("--rope-dim", "3"), ("--rope-dim must be a positive even number, got 3",)),
    ("rope-dim-above-lossless", ("--rope-dim", "4096"), ("--rope-dim 4096 is wider than the portable profile",)),
    ("kv-budget-0", ("--kv-budget", "0"), ("--kv-budget must be in (0, 1]",)),
    ("kv-budget-above-1", ("--kv-budget", "1.5"), ("--kv-budget must be in (0, 1]", "1.5")),
    ("kv-budget-too-small", ("--kv-budget", "0.0001"), ("--kv-budget 0.0001", "smallest usable budget")),
    ("kv-budget-with-kv-rank", ("--kv-budget", "0.5", "--kv-rank", "8"), ("either the budget or ranks",)),
    ("kv-budget-with-rope-dim", ("--kv-budget", "0.5", "--rope-dim", "8"), ("either the budget or ranks",)),
    ("dtype-float16", ("--dtype", "float16"), ("--dtype float16", "use --dtype bfloat16")),
    ("engine-vllm-budget", ("--engine", "vllm", "--kv-budget", "0.5"), ("--engine vllm holds 576", "allows 32")),
    ("engine-vllm-rope-dim", ("--engine", "vllm", "--rope-dim", "8"), ("fixes the rotary key at 64",)),
    ("engine-vllm-transformers", ("--engine", "vllm", "--target", "transformers"), ("needs --target portable",)),
    ("max-shard-size-garbage", ("--max-shard-size", "garbage"), ("--max-shard-size", "cannot read size 'garbage'")),
    ("max-shard-size-zero", ("--max-shard-size", "0GB"), ("--max-shard-size", "must be positive")),
]


@pytest.mark.parametrize(("flags", "fragments"), [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_bad_flags(cli, tiny_llama: Path, tmp_path: Path, flags, fragments) -> None:
    model_out = tmp_path / "model_out"
    guard = Untouched(tiny_llama, model_out)
    one_line(cli(tiny_llama, model_out, FAST, *flags), *fragments)
    guard.check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_gpu(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_out = tmp_path / "model_out"
    guard = Untouched(tiny_llama, model_out)
    one_line(cli(tiny_llama, model_out, FAST, "--device", "cuda"), "--device cuda", "no CUDA GPU", "--device cpu")
    guard.check()


# ---------------------------------------------------------------- MODEL_OUT problems


def test_model_out_equal_to_model_in(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_in = copy_model(tiny_llama, tmp_path)
    guard = Untouched(model_in, model_in)
    one_line(cli(model_in, model_in, FAST), "inside MODEL_IN")
    guard.check()


def test_model_out_inside_model_in(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_in = copy_model(tiny_llama, tmp_path)
    model_out = model_in / "converted"
    guard = Untouched(model_in, model_out)
    one_line(cli(model_in, model_out, FAST), "inside MODEL_IN")
    guard.check()


def test_model_out_parent_missing(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_out = tmp_path / "missing-parent" / "model_out"
    guard = Untouched(tiny_llama, model_out)
    one_line(cli(tiny_llama, model_out, FAST), "parent directory", "does not exist")
    assert not model_out.parent.exists()
    assert snapshot(tiny_llama) == guard.in_before
    assert temp_dirs(tmp_path) == []


def test_model_out_is_a_file(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_out = tmp_path / "model_out"
    model_out.write_text("not a directory\n")
    guard = Untouched(tiny_llama, model_out)
    one_line(cli(tiny_llama, model_out, FAST, "--force"), "exists and is not a directory")
    guard.check()


def _existing_output(tmp_path: Path) -> Path:
    model_out = tmp_path / "model_out"
    model_out.mkdir()
    (model_out / "MARKER.txt").write_text("keep me\n")
    (model_out / "sub").mkdir()
    (model_out / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    return model_out


def test_existing_model_out_without_force(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_out = _existing_output(tmp_path)
    guard = Untouched(tiny_llama, model_out)
    one_line(cli(tiny_llama, model_out, FAST), "already exists", "--force")
    guard.check()
    assert (model_out / "MARKER.txt").read_text() == "keep me\n"


def test_existing_model_out_with_force_is_replaced(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_out = _existing_output(tmp_path)
    before_in = snapshot(tiny_llama)
    result = cli(tiny_llama, model_out, FAST, "--force", "--no-validate", "-q")  # the folder is what matters
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert (model_out / "config.json").is_file()
    assert (model_out / "model.safetensors").is_file()
    assert not (model_out / "MARKER.txt").exists()
    assert not (model_out / "sub").exists()
    assert snapshot(tiny_llama) == before_in
    assert temp_dirs(tmp_path) == []


# ---------------------------------------------------------------- the installed command


def _command() -> list[str]:
    script = Path(sys.executable).with_name("mla-convert")
    if script.is_file():
        return [str(script)]
    found = shutil.which("mla-convert")
    return [found] if found else [sys.executable, "-m", "mla_convert.cli"]


def test_console_script_missing_path(tmp_path: Path) -> None:
    model_in = tmp_path / "no" / "such" / "model"
    model_out = tmp_path / "model_out"
    env = {**os.environ, "COLUMNS": "40"}  # the message must stay on one line in a narrow, non-tty stderr
    proc = subprocess.run(
        [*_command(), str(model_in), str(model_out), *FAST],
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: model path not found: {model_in}"]
    assert not model_out.exists()
    assert temp_dirs(tmp_path) == []
