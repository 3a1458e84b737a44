"""The fine-tune stage: the converted checkpoint in MODEL_OUT is distilled from the source, and its trained
weights are written; the job then validates them and replaces MODEL_OUT only when everything has succeeded.

Until then MODEL_OUT holds the complete converted model from before training, with the training text and
checkpoints under MODEL_OUT/.finetune/ so that `--resume` can continue an interrupted run. Under
`accelerate launch` the main process converts, every process trains, and the main process writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConversionError
from ..mla.natural_scale import fold
from ..options import TrainSettings
from ..source.checkpoint import Source
from ..source.text import TokenWindows
from ..write.writer import ShardWriter, copy_file
from . import checkpoints
from .distill import TrainResult, train

STATE_DIR = ".finetune"
PENDING = (
    "fine-tune not finished: this is the converted model from before training; run the same command with "
    "--resume to continue from the last training checkpoint"
)
OWN_FILES = ("mla_report.json", "README.md", "model.safetensors.index.json")
T = TypeVar("T")


@dataclass
class StagedText:
    """The text a fine-tune and its validation read, kept with the checkpoint (see stage_data)."""

    train: TokenWindows
    evaluation: TokenWindows | None = None
    long: TokenWindows | None = None  # long held-out windows of the long-context validation
    long_note: str | None = None


def stage_data(directory: Path, text: StagedText) -> None:
    """Keep the fine-tune and validation windows with the checkpoint, so a resumed run sees the same text."""
    state = directory / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    tensors = {}
    origins: dict[str, str | None] = {"long_note": text.long_note}
    for name in ("train", "evaluation", "long"):
        windows = getattr(text, name)
        if windows is not None:
            tensors[name] = windows.ids.contiguous()
            origins[name] = windows.origin
    save_file(tensors, str(state / "text.safetensors"))
    (state / "text.json").write_text(json.dumps(origins) + "\n")


def load_data(model_out: Path) -> StagedText:
    state = model_out / STATE_DIR
    tensors = load_file(str(state / "text.safetensors"))
    origins = json.loads((state / "text.json").read_text())
    found = {name: TokenWindows(tensors[name], origins[name]) for name in ("evaluation", "long") if name in tensors}
    return StagedText(TokenWindows(tensors["train"], origins["train"]), **found, long_note=origins.get("long_note"))


def main_process_first(fn: Callable[[], T], enabled: bool) -> T | None:
    """Run fn on the main process only (under a multi-process launch), and tell the others whether it worked."""
    if not enabled or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return fn()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    result: T | None = None
    failure: BaseException | None = None
    if state.is_main_process:
        try:
            result = fn()
        except BaseException as exc:  # the others must hear about it, or they wait forever
            failure = exc
    box = [None if failure is None else str(failure)]
    torch.distributed.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise ConversionError(f"the main process failed: {box[0]}")
    return result


def fine_tune(
    student: Any,
    source: Source,
    train_text: TokenWindows,
    settings: TrainSettings,
    model_out: Path,
    *,
    save_every: int,
    resume: bool,
    device: str,
    on_step: Callable[..., None],
) -> TrainResult:
    """Distil `student` (the converted model as written) from the source on the staged text, in place;
    training checkpoints go to MODEL_OUT/.finetune/checkpoints."""
    teacher = source.model() if settings.distill_weight > 0 else None
    result = train(
        student,
        teacher,
        train_text.ids,
        settings,
        checkpoint_dir=model_out / STATE_DIR / "checkpoints",
        save_every=save_every,
        resume=resume,
        device=device,
        on_step=on_step,
    )
    if teacher is not None:
        teacher.to("cpu")  # validation and the checks after training run on the CPU
    return result


class FinetuneSection(TypedDict):
    """The report's `finetune` section."""

    steps: int
    batch_size: int | None
    seq_len: int
    tokens: int
    text: str
    text_tokens: int
    lr: float
    warmup_steps: int | None
    scope: str
    distill_weight: float
    trainable_parameters: int
    world_size: int
    seconds: float
    resumed_from: int | None
    losses: list[float]
    lrs: list[float]


def section(result: TrainResult, settings: TrainSettings, train_text: TokenWindows) -> FinetuneSection:
    """The report's `finetune` section."""
    return FinetuneSection(
        steps=result.steps,
        batch_size=settings.batch_size,
        seq_len=settings.seq_len,
        tokens=result.tokens,
        text=train_text.origin,
        text_tokens=train_text.tokens,
        lr=settings.lr,
        warmup_steps=settings.warmup_steps,
        scope=settings.scope,
        distill_weight=settings.distill_weight,
        trainable_parameters=result.trainable_parameters,
        world_size=result.world_size,
        seconds=result.seconds,
        resumed_from=result.resumed_from,
        losses=result.losses,
        lrs=result.lrs,
    )


def write_trained(student: Any, model_out: Path, out: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """The trained weights (folded back to the stored layout) into `out`, with every file of MODEL_OUT that
    training does not change (config, tokenizer) copied beside them."""
    fold(student)
    with ShardWriter(out, dtype, max_shard_bytes) as writer:
        for name, tensor in student.state_dict().items():
            writer.add(name, tensor)
        writer.finish()
    for path in sorted(model_out.iterdir()):
        if path.is_file() and not _written_here(path):
            copy_file(path, out)


def interrupted_note(model_out: Path) -> str | None:
    """What an interrupted run left in MODEL_OUT when it was fine-tuning, for the one-line message."""
    report = model_out / "mla_report.json"
    if not (model_out / STATE_DIR).is_dir() or not report.is_file():
        return None
    try:
        if PENDING not in json.loads(report.read_text()).get("warnings", []):
            return None
    except (OSError, ValueError):
        return None
    last = checkpoints.latest(model_out / STATE_DIR / "checkpoints")
    where = f"from the checkpoint of step {checkpoints.step_of(last)}" if last else "from the start of training"
    return (
        f"{model_out} holds the converted model from before the fine-tune; run the same command with --resume "
        f"to continue {where}"
    )


def _written_here(path: Path) -> bool:
    return path.suffix in (".safetensors", ".png", ".gguf") or path.name in OWN_FILES


def pending_report(model_out: Path, resume: bool) -> dict[str, Any]:
    path = model_out / "mla_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    if PENDING not in report.get("warnings", []) or not (model_out / STATE_DIR / "text.safetensors").is_file():
        what = "--resume: " if resume else ""
        raise ConversionError(f"{what}{model_out} holds no unfinished fine-tune to continue")
    return report
