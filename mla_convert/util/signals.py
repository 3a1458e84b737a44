"""Stop within seconds of SIGTERM or SIGINT, even while the main thread is inside one long torch call.

Python runs a signal handler only between bytecodes of the main thread. A signal that arrives during a single
long native call (a backward pass, the teacher's full-vocabulary logits, a large SVD) therefore waits until
that call returns: seconds to minutes on a CPU, while a scheduler or `docker stop` sends SIGKILL a few seconds
after SIGTERM. So `install` does two things:

- SIGTERM raises KeyboardInterrupt, as SIGINT does, so the normal unwinding removes partial output (the first
  signal only: a second one must not interrupt that cleanup);
- a watchdog thread, woken by the signal itself through `signal.set_wakeup_fd` (written by the C-level
  handler the moment the signal arrives, whichever thread runs), gives the unwinding GRACE_SECONDS; if the
  process is still alive then, it runs the cleanups registered with `partial` (the staging folder of
  MODEL_OUT), prints the farewell line and ends the process with exit code 130.

A cleanup never races the rename that publishes a finished output: both take the lock of `committing`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

GRACE_SECONDS = 1.5
EXIT_CODE = 130
STOPS = (signal.SIGTERM, signal.SIGINT)

_cleanups: dict[int, Callable[[], None]] = {}
_ids = itertools.count()
_commit = threading.Lock()
_state: dict[str, Any] = {"installed": False, "signalled": False, "farewell": None}


def install() -> None:
    """Translate SIGTERM, and start the watchdog; call once, from the main thread (the CLI's main())."""
    if _state["installed"]:
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    for signum in STOPS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # a run started with SIGINT ignored keeps it so
            signal.signal(signum, _interrupt)
    threading.Thread(target=_watch, args=(read,), name="mla-convert-stop", daemon=True).start()
    _state["installed"] = True


def farewell(line: Callable[[], str] | None) -> None:
    """What a forced exit prints (the same line the CLI prints after a clean interrupt); None: nothing, because
    the CLI has printed it already."""
    _state["farewell"] = line


@contextlib.contextmanager
def partial(cleanup: Callable[[], None]) -> Iterator[None]:
    """Within this block, a forced exit runs `cleanup` (which removes what the block is building)."""
    key = next(_ids)
    _cleanups[key] = cleanup
    try:
        yield
    finally:
        _cleanups.pop(key, None)


@contextlib.contextmanager
def committing() -> Iterator[None]:
    """Publish a finished output (a rename) without a forced exit's cleanup running at the same time."""
    with _commit:
        yield


def _interrupt(signum: int, frame: object) -> None:
    if not _state["signalled"]:
        _state["signalled"] = True
        raise KeyboardInterrupt(f"signal {signum}")


def _watch(fd: int) -> None:
    """Sleep until a stop signal arrives, then give the main thread GRACE_SECONDS to end the run itself."""
    while True:
        try:
            data = os.read(fd, 64)
        except InterruptedError:
            continue
        if any(byte in STOPS for byte in data):
            break
    time.sleep(GRACE_SECONDS)
    _force_exit()


def _force_exit() -> None:
    _commit.acquire()  # a rename in progress completes; none starts after this
    for cleanup in list(_cleanups.values()):
        with contextlib.suppress(Exception):
            cleanup()
    line = _state["farewell"]
    with contextlib.suppress(Exception):
        text = line() if line is not None else ""
        show_cursor = "\x1b[?25h" if sys.stderr.isatty() else ""  # a live progress bar hides it
        os.write(2, f"{show_cursor}\n{text}\n".encode() if text else show_cursor.encode())
    os._exit(EXIT_CODE)
