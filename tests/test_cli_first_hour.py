"""A new user's first hour: errors before any weight is read, a plan without converting, progress in logs,
one options object behind both the CLI and the Python API."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import mla_convert
import mla_convert.api as api
import mla_convert.source.checkpoint as source_module
from mla_convert.hooks import Hooks
from mla_convert.options import FINETUNE_DEFAULTS, Options, TrainSettings, cli_fields, finetune_defaults
from mla_convert.plan.plan import MEASURED_FLOOR, make_plan
from mla_convert.source.text import text_sets
from mla_convert.util.safetensors_io import TensorFile

from .helpers import messages

FAST = ("--method", "svd", "--finetune-steps", "0", "--no-verify", "--no-validate")


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every way of reading a weight fail loudly; the list records any attempt."""
    attempts: list[str] = []

    def refuse(what: str):  # type: ignore[no-untyped-def]
        def reader(*args: object, **kwargs: object) -> None:
            attempts.append(what)
            raise AssertionError(f"{what} was called before the flags were checked")

        return reader

    monkeypatch.setattr(TensorFile, "get", refuse("TensorFile.get"))
    monkeypatch.setattr(source_module.Source, "model", refuse("Source.model"))
    monkeypatch.setattr(source_module.Source, "get", refuse("Source.get"))
    return attempts


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--kv-budget", "2"), "--kv-budget must be in (0, 1]"),
        (("--kv-budget", "0"), "--kv-budget must be in (0, 1]"),
        (("--calib-data", "missing.txt"), "text data file not found"),
        (("--kv-budget", "25%"), "--kv-budget: expects a number"),
        (("--kv-rank", "100000"), "--kv-rank must be between 1 and"),  # needs the config, not the weights
        (("--train-seq-len", "4096", "--kv-rank", "8"), "longer than the model's context"),
        (("--engine", "vllm", "--kv-budget", "0.25"), "--engine vllm holds 576"),
        (("--gguf", "f16"), "'f16' is not one of"),
        (("--kv-budget", "0.5", "--kv-rank", "8"), "pass either the budget or ranks"),
        (("--calib-sampled", "1"), "--calib-sampled must be a share, 0 <= F < 1"),
    ],
)
def test_flag_errors_arrive_before_any_weight_is_read(cli, tiny_llama, tmp_path, no_weights, flags, fragment) -> None:
    out = tmp_path / "out"
    result = cli(tiny_llama, out, *[str(tmp_path / f) if f.endswith(".txt") else f for f in flags])
    assert result.exit_code == 2, result.output
    lines = [line for line in messages(result.stderr) if not line.startswith("engine ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert no_weights == [] and not out.exists()


def test_a_model_path_that_does_not_exist_is_refused_without_importing_torch(tmp_path: Path) -> None:
    """The cheapest mistake costs no torch import (seconds on a laptop)."""
    import subprocess
    import sys

    script = (
        "import sys; from mla_convert.cli import main; sys.argv = ['mla-convert', sys.argv[1], sys.argv[2]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print('torch' in sys.modules, e.code)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "nope"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert proc.stdout.split() == ["False", "2"], proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"error: model path not found: {tmp_path / 'nope'}"


def test_dry_run_prints_the_plan_and_writes_nothing(cli, tiny_llama, tmp_path, no_weights) -> None:
    out = tmp_path / "out"
    result = cli(tiny_llama, out, "--kv-budget", "0.5", "--dry-run")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for fragment in ("widths: kv_lora_rank", "KV cache per token", "one 128K-token sequence", "engine vLLM: refuses"):
        assert fragment in text, text
    assert "fine-tune: 40 steps x 4 windows" in text and "memory: whole models in float32 take" in text
    assert text.rstrip().endswith("dry run: nothing was written")
    assert not out.exists() and list(tmp_path.iterdir()) == [] and no_weights == []


def test_plan_api_counts_the_cache_at_long_contexts(tiny_llama: Path) -> None:
    found = mla_convert.dry_run(tiny_llama, kv_budget=0.5)
    kv = found["kv_cache"]
    per_token = kv["bytes_per_token"]
    config = json.loads((tiny_llama / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    source_elements = 2 * config["num_key_value_heads"] * head_dim
    assert per_token["source"] == source_elements * 4 * config["num_hidden_layers"]  # float32
    assert kv["elements_per_token_per_layer"]["converted"] == source_elements // 2
    assert kv["bytes_per_sequence"][str(128 * 1024)]["converted"] == per_token["converted"] * 128 * 1024


def test_the_cli_is_a_thin_layer_over_the_api(cli, tiny_llama, tmp_path, monkeypatch) -> None:
    """Every flag lands in the same Options the Python API takes, and the CLI calls api.convert with it."""
    seen: dict[str, object] = {}

    def fake_convert(model_in, model_out, options, *, hooks=None):  # type: ignore[no-untyped-def]
        seen.update(model_in=model_in, model_out=model_out, options=options)
        raise mla_convert.ConversionError("stopped by the test")

    monkeypatch.setattr(api, "convert", fake_convert)
    flags = ["--kv-budget", "0.3", "--method", "svd", "--train", "all", "--lr", "0.002", "--batch-size", "2",
             "--micro-batch-size", "1", "--train-seq-len", "64", "--no-verify", "--gguf", "bf16",
             "--max-shard-size", "2GB", "--seed", "7", "--calib-tokens", "512"]  # fmt: skip
    result = cli(tiny_llama, tmp_path / "out", *flags)
    assert result.exit_code == 2 and "stopped by the test" in result.stderr
    expected = api.with_settings(
        None,
        dict(kv_budget=0.3, method="svd", train="all", lr=0.002, batch_size=2, micro_batch_size=1, train_seq_len=64,
             verify=False, gguf="bf16", max_shard_size="2GB", seed=7, calib_tokens=512),
    )  # fmt: skip
    assert seen["options"] == expected and seen["model_in"] == str(tiny_llama)


def test_every_option_is_a_flag_listed_in_help(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    text = result.stdout
    names = [(meta["name"] or path.rpartition(".")[2]).replace("_", "-") for path, _, meta in cli_fields()]
    top = {f.name for f in dataclasses.fields(Options)} - {"train"}
    inner = {f.name for f in dataclasses.fields(TrainSettings) if f.metadata}
    assert len(names) == len(top) + len(inner)  # every field but train's internals is a flag
    for name in names:
        assert f"--{name}" in text, name
    for panel in ("Compression", "Calibration and evaluation text", "Fine-tune", "Output and serving", "Runtime"):
        assert panel in text
    assert "Examples:" in text and "--dry-run" in text


def test_python_api_converts_like_the_cli(tiny_llama: Path, tmp_path: Path) -> None:
    report = mla_convert.convert(tiny_llama, tmp_path / "out", kv_rank=8, method="svd", finetune_steps=0, verify=False)
    assert report["settings"]["kv_lora_rank"] == 8
    assert json.loads((tmp_path / "out" / "mla_report.json").read_text())["settings"]["kv_lora_rank"] == 8
    with pytest.raises(mla_convert.ConversionError, match="unknown option"):
        mla_convert.convert(tiny_llama, tmp_path / "other", kv_rnak=8)


def test_a_run_outside_a_terminal_prints_stages_with_times_and_a_summary(cli, tiny_llama, tmp_path) -> None:
    result = cli(tiny_llama, tmp_path / "out", "--kv-rank", "8", *FAST)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    stages = [line for line in lines if line.startswith("[")]
    assert any("reading the source" in line for line in stages), result.stderr
    assert any("converting layers (2 to do)" in line for line in stages), result.stderr
    summary = lines.index(next(line for line in lines if line.startswith("time by stage (total ")))
    assert any("converting layers" in line for line in lines[summary + 1 :])


def test_sampling_calibration_text_reports_its_count(tiny_llama: Path) -> None:
    stages: list[tuple[str, int | None]] = []
    progress: list[tuple[int, int]] = []
    hooks = Hooks(
        on_stage=lambda text, total=None: stages.append((text, total)), on_progress=lambda d, t: progress.append((d, t))
    )
    source = source_module.resolve(str(tiny_llama))
    text_sets(source, calib_data=None, calib_tokens=64, seq_len=16, eval_data=None, eval_tokens=32, column="text",
              seed=0, need_eval=False, hooks=hooks)  # fmt: skip
    assert stages and stages[0][1] == 64 and "no --calib-data" in stages[0][0]  # 4 windows of 16 tokens
    assert len(progress) == 16 and progress[-1] == (64, 64)  # a report per generated token


def test_fine_tune_defaults_follow_the_device() -> None:
    cpu = finetune_defaults(Options(), "cpu")
    gpu = finetune_defaults(Options(), "cuda")
    assert (cpu.finetune_steps, cpu.train.batch_size) == FINETUNE_DEFAULTS["cpu"] == (40, 4)
    assert (gpu.finetune_steps, gpu.train.batch_size) == FINETUNE_DEFAULTS["cuda"] == (100, 8)
    given = finetune_defaults(Options(finetune_steps=3, train=TrainSettings(batch_size=2)), "cuda")
    assert (given.finetune_steps, given.train.batch_size, given.train.micro_batch_size) == (3, 2, 2)


def test_a_rank_below_anything_measured_warns(tiny_llama: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama)
    tiny = make_plan(config, kv_rank=1, rope_dim=2)
    assert any(f"smallest budget the benchmarks measured ({MEASURED_FLOOR}" in w for w in tiny.warnings)
    assert not any("benchmarks measured" in w for w in make_plan(config, kv_budget=0.5).warnings)


def test_hub_datasets_name_the_extra_before_any_work(cli, tiny_llama, tmp_path, monkeypatch, no_weights) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    result = cli(tiny_llama, tmp_path / "out", "--calib-data", "wikitext:wikitext-2-raw-v1")
    assert result.exit_code == 2
    assert "pip install 'mla-convert[datasets]'" in result.stderr and no_weights == []
