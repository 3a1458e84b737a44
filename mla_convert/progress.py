"""What a run shows while it works: a live bar on a terminal, plain timestamped lines anywhere else (logs,
CI, nohup), and at the end the time each stage took. Knows nothing about conversion: the CLI feeds it
the job's hooks."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

MILESTONES = 10  # plain output: about this many progress lines per counted stage


@dataclass
class Stage:
    text: str
    started: float
    total: int | None = None
    done: int = 0
    seconds: float = 0.0


class StageDisplay:
    """Stages with counts and time left; live on a terminal, line by line elsewhere, silent when quiet."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.live = not quiet and console.is_interactive
        self.stages: list[Stage] = []
        self.started = time.monotonic()
        self._next_line = 0.0
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            # Off when not a terminal: a transient bar shows nothing there, and rich would still print a
            # stray blank line on stop, ahead of any error message.
            disable=not self.live,
            transient=True,
        )
        self._task = self._bar.add_task("starting", total=None)

    def __enter__(self) -> StageDisplay:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_stage()
        self._bar.stop()

    def stage(self, text: str, total: int | None = None) -> None:
        """Start a stage; `total` items when it counts them (layers, windows, steps)."""
        self._close_stage()
        now = time.monotonic()
        self.stages.append(Stage(text, now, total))
        self._next_line = 1 / MILESTONES
        if self.live:
            self._bar.reset(self._task, description=text, total=total, completed=0)
        elif not self.quiet:
            count = f" ({total} to do)" if total else ""
            self._line(f"[{_clock(now - self.started)}] {text}{count}")

    def advance(self, done: int | None = None, total: int | None = None, detail: str = "") -> None:
        """Items done in the current stage (one more when `done` is None)."""
        if not self.stages:
            return
        current = self.stages[-1]
        current.done = current.done + 1 if done is None else done
        current.total = total or current.total
        description = f"{current.text}: {detail}" if detail else current.text
        if self.live:
            self._bar.update(self._task, completed=current.done, total=current.total, description=description)
            return
        if self.quiet or not current.total:
            return
        fraction = current.done / current.total
        if fraction + 1e-9 >= self._next_line:
            self._next_line = (int(fraction * MILESTONES) + 1) / MILESTONES
            spent = time.monotonic() - current.started
            left = spent / current.done * (current.total - current.done) if current.done else 0.0
            extra = f", {detail}" if detail else ""
            self._line(f"  {current.done}/{current.total}{extra}, {_clock(spent)} so far, about {_clock(left)} left")

    def note(self, text: str, style: str | None = None) -> None:
        """A line that stays (above the live bar on a terminal)."""
        if not self.quiet:
            markup = f"[{style}]{escape(text)}[/{style}]" if style else escape(text)
            self.console.print(markup, soft_wrap=True, highlight=False)

    def summary(self) -> list[str]:
        """Time per stage, in the order they ran, and the total."""
        self._close_stage()
        width = max((len(_clock(s.seconds)) for s in self.stages), default=0)
        lines = [f"  {_clock(s.seconds):>{width}}  {s.text}" for s in self.stages]
        return [f"time by stage (total {_clock(time.monotonic() - self.started)}):", *lines]

    def _close_stage(self) -> None:
        if self.stages and not self.stages[-1].seconds:
            self.stages[-1].seconds = time.monotonic() - self.stages[-1].started

    def _line(self, text: str) -> None:
        self.console.print(escape(text), soft_wrap=True, highlight=False)


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
