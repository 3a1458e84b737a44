"""SIGTERM (what a scheduler or `docker stop` sends, SIGKILL following a few seconds later) and SIGINT end a run
within 3 s even while the main thread is inside one long native call, which Python cannot interrupt.

Each run stops inside such a call at a chosen point: a patched function waits on a torch future that is never
completed (a native wait that ignores signals, as a long backward pass does). The test sends the signal and
measures the time until the process has exited: calibration leaves nothing behind; the fine-tune leaves the
converted model with its training checkpoint, and `--resume` continues from it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import SUBPROCESS_TIMEOUT, as_from_a_terminal, documents, temp_dirs, write_txt

pytestmark = pytest.mark.slow  # the tool in processes of its own

STOP_WITHIN = 3.0
STUCK_CLI = """
import functools
import importlib
import sys

module_name, attr, when = sys.argv[1], sys.argv[2], int(sys.argv[3])
*path, name = attr.split(".")  # a function, or Class.method
owner = functools.reduce(getattr, path, importlib.import_module(module_name))
real = getattr(owner, name)
calls = []

def stuck(*args, **kwargs):
    calls.append(1)
    if len(calls) == when:
        import torch

        print("STUCK", file=sys.stderr, flush=True)
        torch.futures.Future().wait()  # native, never returns, signals wait for it
    return real(*args, **kwargs)

setattr(owner, name, stuck)
from mla_convert.cli import main

sys.argv = ["mla-convert", *sys.argv[4:]]
main()
"""
# (function, which call, whether the staging folder exists by then): the second candidate layer of the budget
# split's measurement; calibration of the second layer (the first one's shard is on disk); validation of the
# written model; and the second step's loss (one micro-batch a step), after the checkpoint of step 1.
POINTS = {
    "measuring the split": ("mla_convert.conversion.budget", "refit_output_projection", 2, False),
    "calibration": ("mla_convert.conversion.calibrator", "SequentialCalibrator.advance", 2, True),
    "validation": ("mla_convert.evaluate.validation", "measured", 1, True),
    "fine-tune": ("mla_convert.train.distill", "distill_loss", 2, True),
}
FLAGS = ["--kv-budget", "0.5", "--calib-tokens", "512", "--calib-seq-len", "32", "--eval-tokens", "256"]
FINETUNE = ["--finetune-steps", "3", "--save-every", "1", "--train-seq-len", "32", "--batch-size", "2"]
FINETUNE += ["--micro-batch-size", "2", "--warmup-steps", "1", "--train-tokens", "512", "--no-verify"]


def start_stuck(point: str, model_in: Path, model_out: Path, text: Path, *flags: str) -> subprocess.Popen:
    module, attr, when, _ = POINTS[point]
    args = [str(model_in), str(model_out), "--calib-data", str(text), *FLAGS, *flags]
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_CLI, module, attr, str(when), *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.strip() == "STUCK":
            return proc
    proc.kill()
    raise AssertionError(f"the run never reached {point}: {''.join(seen)}")


def stop(proc: subprocess.Popen, signum: int) -> tuple[float, str]:
    """Send the signal; the seconds until the process has exited, and what it printed on stderr."""
    time.sleep(0.3)  # well inside the native wait
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(timeout=STOP_WITHIN + 7)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {STOP_WITHIN + 7:.0f} s after the signal") from None
    seconds = time.monotonic() - sent
    print(f"exited {seconds:.2f} s after signal {signum}")  # the figure docs/results.md quotes (pytest -s)
    assert proc.stderr is not None
    return seconds, proc.stderr.read()


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """The runs a test starts; any still alive when it ends (a failed assertion) is killed, never left stuck."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def text(tmp_path: Path) -> Path:
    return write_txt(tmp_path / "notes.txt", documents(120, seed=3))


@pytest.mark.parametrize(
    ("point", "signum"),
    [
        ("measuring the split", signal.SIGTERM),
        ("calibration", signal.SIGTERM),
        ("calibration", signal.SIGINT),
        ("validation", signal.SIGTERM),
    ],
)
def test_a_signal_inside_a_long_call_ends_the_run_within_3_s(
    text_model,
    text,
    tmp_path,
    started,
    point,
    signum,
) -> None:
    model_out = tmp_path / "model_out"
    proc = start_stuck(point, text_model, model_out, text, "--finetune-steps", "0")
    started.append(proc)
    assert len(temp_dirs(tmp_path)) == POINTS[point][3], "is the run writing into its staging folder by now?"
    seconds, stderr = stop(proc, signum)
    assert seconds < STOP_WITHIN, f"{seconds:.2f} s"
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: nothing was written to MODEL_OUT", stderr
    assert not model_out.exists() and temp_dirs(tmp_path) == []


def test_sigterm_during_the_fine_tune_keeps_the_checkpoint_to_resume(
    cli,
    text_model,
    text,
    tmp_path,
    started,
) -> None:
    model_out = tmp_path / "model_out"
    proc = start_stuck("fine-tune", text_model, model_out, text, *FINETUNE)
    started.append(proc)
    seconds, stderr = stop(proc, signal.SIGTERM)
    assert seconds < STOP_WITHIN, f"{seconds:.2f} s"
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "--resume to continue from the checkpoint of step 1" in last, stderr
    checkpoints = sorted(p.name for p in (model_out / ".finetune" / "checkpoints").iterdir())
    assert checkpoints == ["step-000001"], checkpoints  # no half-written one beside it
    assert temp_dirs(tmp_path) == []
    result = cli(text_model, model_out, "--calib-data", text, *FLAGS, *FINETUNE, "--resume", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((model_out / "mla_report.json").read_text())
    assert report["finetune"]["resumed_from"] == 1 and len(report["finetune"]["losses"]) == 3
