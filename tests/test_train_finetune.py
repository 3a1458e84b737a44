"""The fine-tune and validation stage: a short run heals a compressed tiny model, resumes exactly, stops on a
NaN loss, refuses bad training input, and gives the same weights on two processes as on one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from mla_convert import Hooks, Options, TrainSettings, convert
from mla_convert.errors import ConversionError
from mla_convert.mla.latent_norm import SAFETY
from mla_convert.train import checkpoints, distill
from mla_convert.train.finetune import PENDING, STATE_DIR

from .conftest import COMMON, build_tiny
from .helpers import documents, load, messages, write_txt

STEPS = 12
TRAIN = TrainSettings(lr=3e-3, warmup_steps=2, batch_size=8, micro_batch_size=4, seq_len=32)
FLAGS = [
    "--kv-rank", 12, "--rope-dim", 8, "--calib-tokens", 2048, "--calib-seq-len", 32, "--eval-tokens", 512,
    "--finetune-steps", STEPS, "--train-seq-len", 32, "--batch-size", 8, "--micro-batch-size", 4, "--lr", 3e-3,
    "--warmup-steps", 2, "--train-tokens", 2048, "--no-verify",
]  # fmt: skip


def options(**overrides: object) -> Options:
    base: dict[str, object] = dict(
        kv_rank=12, rope_dim=8, calib_tokens=2048, calib_seq_len=32, eval_tokens=512, finetune_steps=STEPS,
        train=TRAIN, train_tokens=2048, verify=False,
    )  # fmt: skip
    base.update(overrides)
    return Options(**base)  # type: ignore[arg-type]


def fault_from_step_4(monkeypatch: pytest.MonkeyPatch, effect: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """Apply `effect` to the training loss from step 4 on (2 micro-batches a step); return the real loss."""
    real = distill.distill_loss
    calls = {"n": 0}

    def faulty(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args, **kwargs)  # type: ignore[arg-type]
        return effect(loss) if calls["n"] > 6 else loss

    monkeypatch.setattr(distill, "distill_loss", faulty)
    return real


@pytest.fixture(scope="module")
def peaky(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose next-token distributions are sharp, so a lossy conversion is far from it in KL."""
    model = build_tiny(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **COMMON), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    path = tmp_path_factory.mktemp("peaky") / "model"
    model.save_pretrained(path)
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(peaky: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same conversion without (0 steps) and with the fine-tune, both through the CLI."""
    from typer.testing import CliRunner

    from mla_convert.cli import app

    root = tmp_path_factory.mktemp("ft")
    runner = CliRunner()
    flags = [str(x) for x in FLAGS]
    before = runner.invoke(app, [str(peaky), str(root / "before"), *flags, "--finetune-steps", "0"])
    assert before.exit_code == 0, before.output
    after = runner.invoke(app, [str(peaky), str(root / "after"), *flags])
    assert after.exit_code == 0, after.output
    assert "Validation on" in after.stdout and f"fine-tune: {STEPS} steps" in after.stdout
    return root / "before", root / "after"


def test_short_run_heals_and_writes_a_stock_checkpoint_report_card_and_plots(trained) -> None:
    before_dir, out = trained
    report = json.loads((out / "mla_report.json").read_text())
    ft = report["finetune"]
    losses = ft["losses"]
    assert ft["steps"] == STEPS and len(losses) == STEPS and ft["tokens"] == STEPS * 8 * 32
    assert all(math.isfinite(x) for x in losses) and sum(losses[-4:]) < sum(losses[:4])
    rows = {row["model"]: row for row in report["validation"]["models"]}
    assert set(rows) == {"source", "converted", "fine-tuned"}
    # held-out text: closer to the source after the fine-tune
    assert rows["fine-tuned"]["kl_to_source"] < rows["converted"]["kl_to_source"]
    assert rows["fine-tuned"]["perplexity"] < rows["converted"]["perplexity"]
    assert rows["converted"]["perplexity"] == pytest.approx(report["evaluation"]["converted_perplexity"])
    assert set(report["validation"]["generation"]["outputs"]) == {"source", "converted", "fine-tuned"}
    assert PENDING not in report["warnings"] and not (out / STATE_DIR).exists()
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "## Fine-tune" in card and "## Validation" in card and "](training_loss.png)" in card
    assert "| fine-tuned |" in card

    # same tensors, same config as before training; attention changed, everything else did not
    old, new = weights(before_dir), weights(out)
    assert old.keys() == new.keys()
    assert json.loads((out / "config.json").read_text()) == json.loads((before_dir / "config.json").read_text())
    changed = {name for name in old if not torch.equal(old[name], new[name])}
    assert any("kv_b_proj" in n for n in changed) and any("kv_a_proj_with_mqa" in n for n in changed)
    # only attention weights; the latent norm's gain is re-derived for the trained down-projection (fold)
    assert all(".self_attn." in n and "q_a_" not in n for n in changed), changed
    model = load(out)  # stock transformers
    assert type(model).__name__ == "DeepseekV3ForCausalLM"


def test_trained_latent_stays_in_the_epsilon_regime(trained) -> None:
    """The fold after training re-derives the latent scale: the latent norm is still linear on real inputs."""
    _, out = trained
    model = load(out)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    seen = []
    hooks = [
        layer.self_attn.kv_a_layernorm.register_forward_hook(lambda m, i, o: seen.append(i[0].pow(2).mean(-1).max()))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    assert seen and all(float(ms) <= (SAFETY**2) * 1e-6 for ms in seen)


def test_resume_gives_the_weights_of_an_uninterrupted_run(peaky: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    convert(peaky, whole, options(save_every=2))

    def stop_after_five(info: distill.StepInfo) -> None:
        if info.step == 5:  # after the checkpoints of steps 2 and 4
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        convert(peaky, part, options(save_every=2), hooks=Hooks(on_step=stop_after_five))
    # MODEL_OUT holds the converted model from before training, and the checkpoints of steps 2 and 4
    assert PENDING in json.loads((part / "mla_report.json").read_text())["warnings"]
    saved = checkpoints.all_checkpoints(part / STATE_DIR / "checkpoints")
    assert [checkpoints.step_of(p) for p in saved] == [2, 4]
    load(part)

    with pytest.raises(ConversionError, match="different settings"):
        convert(peaky, part, options(save_every=2, resume=True), lr=1e-3)
    report = convert(peaky, part, options(save_every=2, resume=True))
    assert report["finetune"]["resumed_from"] == 4
    expected = json.loads((whole / "mla_report.json").read_text())["finetune"]["losses"]
    assert report["finetune"]["losses"] == expected
    a, b = weights(whole), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ConversionError, match="holds no unfinished fine-tune"):  # it has finished
        convert(peaky, part, options(save_every=2, resume=True))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cli, peaky: Path, tmp_path: Path, monkeypatch) -> None:
    fault_from_step_4(monkeypatch, lambda loss: loss * float("nan"))
    out = tmp_path / "out"
    result = cli(peaky, out, FLAGS, "--save-every", 2)
    assert result.exit_code == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "loss became nan at step 4" in message and "step 2" in message and "--lr" in message
    assert "Traceback" not in result.output
    assert [checkpoints.step_of(p) for p in checkpoints.all_checkpoints(out / STATE_DIR / "checkpoints")] == [2]
    report = json.loads((out / "mla_report.json").read_text())
    assert PENDING in report["warnings"] and report["finetune"] is None
    load(out)  # the converted model from before training is intact


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--finetune-steps", -3), "--finetune-steps must be positive, or 0"),
        (("--train-seq-len", 4096), "--train-seq-len 4096 is longer than the model's context (512)"),
        (("--lr", 0), "--lr must be a positive number"),
        (("--batch-size", 6, "--micro-batch-size", 4), "--micro-batch-size 4 does not divide"),
        (("--distill-weight", 1.5), "--distill-weight must be between 0 and 1"),
        (("--resume",), "no unfinished fine-tune"),
    ],
)
def test_bad_training_input_is_one_line_and_writes_nothing(cli, peaky, tmp_path, flags, fragment) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    flags = tuple(str(empty) if f == "EMPTY" else str(tmp_path / f) if f == "missing.txt" else f for f in flags)
    out = tmp_path / "out"
    result = cli(peaky, out, FLAGS, *flags)
    assert result.exit_code == 2, result.output
    lines = messages(result.stderr)
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".mla-convert-tmp-*"))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "missing.txt", ("text data file not found",)),
        (lambda d: write_txt(d / "empty.txt", ["   "]), ("holds no text",)),
        (lambda d: write_txt(d / "short.txt", ["a few words"]), ("--train-data", "holds fewer than 32 tokens")),
    ],
)
def test_bad_training_text_is_one_line_and_writes_nothing(cli, text_model, tmp_path, make, fragment) -> None:
    out = tmp_path / "out"
    result = cli(text_model, out, FLAGS, "--train-data", make(tmp_path))
    assert result.exit_code == 2, result.output
    lines = [line for line in messages(result.stderr) if not line.startswith("engine ")]  # plan info
    assert len(lines) == 1 and all(f in lines[0] for f in fragment), result.stderr
    assert not out.exists() and not list(tmp_path.glob(".mla-convert-tmp-*"))


def test_training_text_never_includes_the_held_out_text(text_model, tmp_path) -> None:
    from mla_convert.source.checkpoint import resolve
    from mla_convert.source.text import read_texts, text_sets, tokenize_windows

    data = write_txt(tmp_path / "train.txt", documents(60, seed=7))
    source = resolve(str(text_model))
    common = dict(calib_tokens=256, seq_len=32, eval_tokens=128, column="text", seed=0, need_eval=True)
    for calib in (None, str(data)):  # held-out part of --calib-data, or of --train-data
        sets = text_sets(source, calib_data=calib, eval_data=None, train_data=str(data), train_tokens=10_000,
                         train_seq_len=16, need_calib=calib is not None, **common)  # fmt: skip
        assert sets.evaluation is not None and sets.evaluation.held_span is not None
        assert sets.train is not None and sets.train.ids.shape[1] == 16
        stream = tokenize_windows(read_texts(str(data)), source.tokenizer(), 16).flatten()
        a, b = sets.evaluation.held_span
        assert torch.equal(stream[a:b], sets.evaluation.ids.flatten())
        starts = [i * 16 for i in range(stream.numel() // 16)]
        expected = [s for s in starts if s + 16 <= a or s >= b]
        assert sets.train.ids.shape[0] == len(expected) > 0
        assert torch.equal(sets.train.ids, torch.stack([stream[s : s + 16] for s in expected]))


def test_no_space_for_checkpoints_keeps_the_converted_model(cli, peaky, tmp_path, monkeypatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", full)
    out = tmp_path / "out"
    result = cli(peaky, out, FLAGS, "--save-every", 2)
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "cannot save the training checkpoint" in line and "no space left" in line and "unchanged" in line
    assert PENDING in json.loads((out / "mla_report.json").read_text())["warnings"]
    assert not list((out / STATE_DIR / "checkpoints").glob(".*tmp"))
    load(out)


def test_lossless_conversion_skips_the_fine_tune(cli, peaky, tmp_path) -> None:
    out = tmp_path / "out"
    result = cli(peaky, out, "--target", "transformers", "--finetune-steps", 5, "--no-verify", "--eval-tokens", 128)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "mla_report.json").read_text())
    assert report["finetune"] is None and not (out / STATE_DIR).exists()
    rows = {row["model"]: row for row in report["validation"]["models"]}
    assert rows["converted"]["kl_to_source"] < 1e-6 and rows["converted"]["top1_agreement"] == 1.0


@pytest.mark.slow  # two training processes under torch.distributed
def test_two_processes_reach_the_weights_of_one(peaky: Path, tmp_path: Path) -> None:
    """Data parallel over gloo with the same global batch: the same trained weights as one process."""
    flags = [str(x) for x in FLAGS] + ["--method", "svd", "--batch-size", "4", "--micro-batch-size", "1", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "mla_convert.cli", str(peaky), str(tmp_path / "one"), *flags],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    double = subprocess.run(
        [*launch, "-m", "mla_convert.cli", str(peaky), str(tmp_path / "two"), *flags],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    report = json.loads((tmp_path / "two" / "mla_report.json").read_text())
    assert report["finetune"]["world_size"] == 2
    assert json.loads((tmp_path / "one" / "mla_report.json").read_text())["finetune"]["world_size"] == 1
    losses = [json.loads((tmp_path / d / "mla_report.json").read_text())["finetune"]["losses"] for d in ("one", "two")]
    assert losses[0][-1] < losses[0][0]  # it trained
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)


def test_interrupted_fine_tune_says_how_to_resume(cli, peaky: Path, tmp_path: Path, monkeypatch) -> None:
    def interrupt(loss: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt

    real = fault_from_step_4(monkeypatch, interrupt)
    out = tmp_path / "out"
    result = cli(peaky, out, FLAGS, "--save-every", 2)
    assert result.exit_code == 130
    line = result.stderr.strip().splitlines()[-1]
    assert "interrupted" in line and "--resume" in line and "checkpoint of step 2" in line
    monkeypatch.setattr(distill, "distill_loss", real)
    resumed = cli(peaky, out, FLAGS, "--save-every", 2, "--resume", "-q")
    assert resumed.exit_code == 0, resumed.output
    report = json.loads((out / "mla_report.json").read_text())
    assert report["finetune"]["resumed_from"] == 2 and len(report["finetune"]["losses"]) == STEPS
    assert report["plots"][0] == "training_loss.png"


def test_gradient_checkpointing_saves_memory_without_changing_the_result(peaky: Path, tmp_path: Path) -> None:
    plain = convert(peaky, tmp_path / "plain", options())
    recomputed = convert(peaky, tmp_path / "recomputed", options(), gradient_checkpointing=True)
    assert recomputed["finetune"]["losses"] == pytest.approx(plain["finetune"]["losses"], rel=1e-5)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "recomputed")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_train_all_updates_the_whole_model(peaky: Path, tmp_path: Path) -> None:
    before = tmp_path / "before"
    convert(peaky, before, options(finetune_steps=0))
    convert(peaky, tmp_path / "all", options(), train="all")
    old, new = weights(before), weights(tmp_path / "all")
    changed = {name for name in old if not torch.equal(old[name], new[name])}
    for part in ("mlp.down_proj", "mlp.gate_proj", "embed_tokens", "lm_head", "input_layernorm", "kv_b_proj"):
        assert any(part in name for name in changed), part
    report = json.loads((tmp_path / "all" / "mla_report.json").read_text())
    assert report["finetune"]["scope"] == "all"
    assert report["finetune"]["trainable_parameters"] > 2 * sum(t.numel() for n, t in old.items() if "self_attn" in n)
