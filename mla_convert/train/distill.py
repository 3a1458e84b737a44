"""Heal a converted model by distillation from its source: the student learns the teacher's next-token
distribution (KL), optionally mixed with the language-model loss.

The loop is plain PyTorch driven through `accelerate`, so the same code runs on one CPU, one GPU, or
under `accelerate launch` (data parallel, FSDP). The batch is global: every step consumes the same
`batch_size` windows in the same order whatever the number of processes, which is what makes a run on
two processes reach the weights of a run on one, and a resumed run the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConversionError
from ..mla.natural_scale import FROZEN, relative_groups, to_natural
from ..options import TrainSettings, per_process_windows
from . import checkpoints


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    world_size: int = 1
    trainable_parameters: int = 0


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    tokens_per_second: float
    seconds_left: float


def select_trainable(model: Any, scope: str) -> list[torch.nn.Parameter]:
    """Attention parameters that the conversion created (or everything), less the frozen scales."""
    chosen = []
    for name, param in model.named_parameters():
        wanted = scope == "all" or ".self_attn." in name
        param.requires_grad_(wanted and not any(f".{frozen}." in name for frozen in FROZEN))
        if param.requires_grad:
            chosen.append(param)
    return chosen


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, ids: torch.Tensor, weight: float
) -> torch.Tensor:
    """weight * KL(teacher || student) + (1 - weight) * cross-entropy, per predicted token (nats)."""
    logp = student_logits[:, :-1].float().log_softmax(-1)
    loss = logp.new_zeros(())
    if weight > 0:
        assert teacher_logits is not None
        ref = teacher_logits[:, :-1].float().log_softmax(-1)
        loss = loss + weight * F.kl_div(logp.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="batchmean")
    if weight < 1:
        loss = loss + (1 - weight) * F.nll_loss(logp.flatten(0, 1), ids[:, 1:].flatten())
    return loss


def window_order(count: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """The window index of every sequence of every step: fresh seeded permutations, epoch after epoch."""
    need = steps * batch_size
    epochs = []
    for epoch in range(math.ceil(need / count)):
        epochs.append(torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)))
    return torch.cat(epochs)[:need].view(steps, batch_size)


def schedule(settings: TrainSettings) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    warm, total = settings.warmup_steps or 0, settings.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    student: Any,
    teacher: Any,
    windows: torch.Tensor,
    settings: TrainSettings,
    *,
    checkpoint_dir: Path,
    save_every: int = 0,
    resume: bool = False,
    device: str = "cpu",
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train `student` (in place) towards `teacher` on token windows [count, seq_len]; return the history.

    A checkpoint lands in checkpoint_dir every `save_every` steps; `resume` continues from the newest.
    A NaN or infinite loss stops the run before the optimizer applies it (the last checkpoint stays).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = per_process_windows(settings, world)
    set_seed(settings.seed)

    to_natural(student)
    params = select_trainable(student, settings.scope)
    if settings.gradient_checkpointing:
        _recompute_activations(student, True)
    student.config.use_cache = False
    student.train()
    optimizer = torch.optim.AdamW(
        relative_groups(params, settings.lr), weight_decay=settings.weight_decay, betas=(0.9, 0.95)
    )
    factor = schedule(settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher = teacher.to(accelerator.device).eval() if teacher is not None and settings.distill_weight > 0 else None

    result = TrainResult(steps=0, tokens=0, seconds=0.0, world_size=world, trainable_parameters=_count(params))
    start = 0
    if resume:
        state = checkpoints.latest(checkpoint_dir)
        if state is None:
            raise ConversionError(f"--resume: no training checkpoint in {checkpoint_dir}")
        meta = checkpoints.load(state, accelerator.unwrap_model(student), optimizer, scheduler, settings)
        start, result.losses, result.lrs = meta["step"], meta["losses"], meta["lrs"]
        result.resumed_from = start
    order = window_order(windows.shape[0], settings.steps, settings.batch_size, settings.seed)
    began = time.monotonic()
    for step in range(start, settings.steps):
        mine = order[step, rank * per_process : (rank + 1) * per_process]
        micro = [mine[i : i + settings.micro_batch_size] for i in range(0, per_process, settings.micro_batch_size)]
        total = torch.zeros((), device=accelerator.device)
        for k, index in enumerate(micro):
            ids = windows[index].to(accelerator.device)
            with torch.no_grad():
                target = teacher(ids).logits if teacher is not None else None
            last_micro = k == len(micro) - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(student):
                with accelerator.autocast():
                    loss = distill_loss(student(ids).logits, target, ids, settings.distill_weight) / len(micro)
                accelerator.backward(loss)
            total += loss.detach()
        mean_loss = float(accelerator.reduce(total, reduction="mean"))
        if not math.isfinite(mean_loss):
            last = checkpoints.latest(checkpoint_dir)
            kept = (
                f"the last good checkpoint (step {checkpoints.step_of(last)}) is in {last}"
                if last
                else ("no checkpoint had been saved yet")
            )
            raise ConversionError(
                f"training stopped: the loss became {mean_loss} at step {step + 1}; {kept}. "
                "The converted model from before training is unchanged; try a lower --lr"
            )
        accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        result.lrs.append(settings.lr * factor(step))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(mean_loss)
        done = step + 1
        if save_every and (done % save_every == 0) and done < settings.steps:
            if accelerator.is_main_process:
                checkpoints.save(
                    checkpoint_dir,
                    done,
                    accelerator.unwrap_model(student),
                    optimizer,
                    scheduler,
                    settings,
                    result.losses,
                    result.lrs,
                )
            accelerator.wait_for_everyone()
        if on_step is not None:
            elapsed = time.monotonic() - began
            rate = (done - start) * settings.batch_size * settings.seq_len / max(elapsed, 1e-9)
            left = elapsed / (done - start) * (settings.steps - done)
            on_step(StepInfo(done, settings.steps, mean_loss, result.lrs[-1], rate, left))
    result.steps = settings.steps
    result.tokens = settings.steps * settings.batch_size * windows.shape[1]
    result.seconds = time.monotonic() - began
    student = accelerator.unwrap_model(student)
    student.eval()
    if settings.gradient_checkpointing:
        _recompute_activations(student, False)
    student.config.use_cache = True
    accelerator.wait_for_everyone()
    return result


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _recompute_activations(model: Any, on: bool) -> None:
    """Gradient (activation) checkpointing, under the name the installed transformers uses."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _count(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
