"""How much memory the process has used and how much the machine has left.

The converter streams weights through bounded memory, but its optional stages (verification,
validation, calibration, fine-tuning) hold whole float32 models. Knowing the machine's free memory up
front turns an out-of-memory kill hours in into a clear line before anything is written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys
import time
from typing import Any

GB = 1024**3


def peak_rss_bytes() -> int:
    """The largest resident set this process has had so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def total_memory_bytes() -> int | None:
    """This machine's physical memory; None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def fits(needed_bytes: int, share: float = 0.9) -> bool:
    """Whether needed_bytes fits in the memory available now (unknown counts as fitting)."""
    available = available_memory_bytes()
    return available is None or needed_bytes <= share * available


def float32_models_bytes(parameters: int, models: int = 2) -> int:
    """Memory for `models` float32 copies of a model with this many parameters."""
    return 4 * parameters * models


def usage(started: float) -> dict[str, Any]:
    """The `resources` section of the report: peak resident memory and wall time of this run."""
    return {"peak_rss_bytes": peak_rss_bytes(), "seconds": round(time.monotonic() - started, 3)}


def gigabytes(size: int | None) -> str:
    return "unknown" if size is None else f"{size / GB:.1f} GB"


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Freed blocks below glibc's mmap threshold stay in the heap, and a long run of same-sized layers
    fragments it, so resident memory creeps up layer after layer although nothing is held. Trimming after
    each layer keeps the calibrated path flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig); None where there is none."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
