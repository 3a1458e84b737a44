"""Progress callbacks: the job reports what it is doing through these and never prints itself.

This module sits below every stage, so it names what a callback receives by the attributes a receiver may
read (the small Protocols below), never by importing the stages' classes, not even for type checking: on_plan
gets a plan/plan.py Plan, on_engines plan/serving.py Verdicts, on_layer a conversion/driver.py LayerStats and
on_step a train/distill.py StepInfo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class PlanView(Protocol):
    """The plan's headline, known before any heavy work."""

    @property
    def target(self) -> str: ...
    @property
    def kv_rank(self) -> int: ...  # real latent components
    @property
    def full_kv_rank(self) -> int: ...  # the rank that would be lossless
    @property
    def latent_width(self) -> int: ...  # kv_lora_rank as written (zeros beyond kv_rank)
    @property
    def rope_dim(self) -> int: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def split_reason(self) -> str: ...


class VerdictView(Protocol):
    """Whether one serving engine serves the planned checkpoint, and why (or why not)."""

    @property
    def engine(self) -> str: ...
    @property
    def status(self) -> str: ...  # "serves", "computes wrongly", "refuses" or "untested"
    @property
    def detail(self) -> str: ...


class LayerView(Protocol):
    """One converted layer, with its weights' relative reconstruction errors."""

    @property
    def index(self) -> int: ...
    @property
    def k_rel_error(self) -> float: ...
    @property
    def v_rel_error(self) -> float: ...


class StepView(Protocol):
    """One fine-tune step done."""

    @property
    def step(self) -> int: ...
    @property
    def total(self) -> int: ...
    @property
    def loss(self) -> float: ...
    @property
    def lr(self) -> float: ...
    @property
    def tokens_per_second(self) -> float: ...
    @property
    def seconds_left(self) -> float: ...


def _ignore(*args: Any) -> None:
    return None


@dataclass
class Hooks:
    """on_stage starts a stage (with its item count when known); on_progress reports items done in it."""

    on_plan: Callable[[PlanView], None] = _ignore
    on_engines: Callable[[Sequence[VerdictView]], None] = _ignore
    on_layer: Callable[[LayerView], None] = _ignore
    on_stage: Callable[..., None] = _ignore  # (text, total=None)
    on_progress: Callable[[int, int], None] = _ignore  # (done, total) within the current stage
    on_note: Callable[[str], None] = _ignore  # a line worth keeping: estimates, choices made
    on_step: Callable[[StepView], None] = _ignore
