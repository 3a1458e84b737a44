"""Progress callbacks: the job reports what it is doing through these and never prints itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .conversion.driver import LayerStats
    from .plan.plan import Plan
    from .plan.serving import Verdict
    from .train.distill import StepInfo


def _ignore(*args: Any) -> None:
    return None


@dataclass
class Hooks:
    """on_stage starts a stage (with its item count when known); on_progress reports items done in it."""

    on_plan: Callable[[Plan], None] = _ignore
    on_engines: Callable[[list[Verdict]], None] = _ignore
    on_layer: Callable[[LayerStats], None] = _ignore
    on_stage: Callable[..., None] = _ignore  # (text, total=None)
    on_progress: Callable[[int, int], None] = _ignore  # (done, total) within the current stage
    on_note: Callable[[str], None] = _ignore  # a line worth keeping: estimates, choices made
    on_step: Callable[[StepInfo], None] = _ignore
