"""Resident memory over time during a calibrated conversion of a synthetic checkpoint.

    python bench/rss_trace.py 1.5B
    python bench/rss_trace.py 1.5B MALLOC_MMAP_THRESHOLD_=131072

Writes the checkpoint and a calibration file as bench/scaling.py does, runs the CLI activation-aware
(--calib-data, the budget-0.25 split as ranks) in a child process with the extra environment given as
NAME=VALUE, samples its VmRSS every 0.25 s and prints the maximum in each tenth of the run. A steady
climb across the tenths is memory the run does not give back; a flat line is bounded memory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scaling import CALIBRATE, budget_ranks, shape_of, write_checkpoint, write_text_data


def vm_rss_gb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return None


def main() -> None:
    name, extra = sys.argv[1], sys.argv[2:]
    work = Path.home() / ".cache" / "mla-convert" / "rss-trace"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        shape = shape_of(name)
        write_checkpoint(work / "src", shape)
        text = write_text_data(work / "src")
        os.sync()
        flags = [f for f in CALIBRATE if f != "-q"] + ["--calib-data", str(text), *budget_ranks(shape)]
        cmd = [sys.executable, "-m", "mla_convert.cli", str(work / "src"), str(work / "out"), *flags]
        env = dict(os.environ, **dict(pair.split("=", 1) for pair in extra))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        start, trace = time.monotonic(), []
        while proc.poll() is None:
            rss = vm_rss_gb(proc.pid)
            if rss is not None:
                trace.append((time.monotonic() - start, rss))
            time.sleep(0.25)
        if proc.returncode != 0 or not trace:
            raise SystemExit(f"the conversion failed (exit {proc.returncode})")
        n = len(trace)
        for k in range(10):
            part = trace[k * n // 10 : (k + 1) * n // 10]
            if part:
                print(f"{part[0][0]:6.0f}-{part[-1][0]:6.0f} s: max {max(r for _, r in part):.2f} GB")
        print(f"peak {max(r for _, r in trace):.2f} GB in {trace[-1][0]:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
