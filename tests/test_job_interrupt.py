"""Signals at different points of a real CLI process: never a partial MODEL_OUT, never temp files left.

Each run pauses at a chosen point (a patched function prints PAUSED and sleeps), the test sends the
signal, and then inspects the output directory. SIGINT and SIGTERM clean up themselves; after SIGKILL
nothing can run, so the next conversion into the same place removes what the killed one left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import FAST, SUBPROCESS_TIMEOUT, as_from_a_terminal, temp_dirs

pytestmark = pytest.mark.slow  # each test runs the tool in a process of its own (about 6 s each)

PAUSING_CLI = """
import sys, time
import importlib

module_name, attr, when = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(module_name)
real = getattr(module, attr)
calls = []

def paused(*args, **kwargs):
    calls.append(1)
    if len(calls) == when:
        print("PAUSED", file=sys.stderr, flush=True)
        time.sleep(120)
    return real(*args, **kwargs)

setattr(module, attr, paused)
from mla_convert.cli import main

sys.argv = ["mla-convert", *sys.argv[4:]]
main()
"""

# (where to pause, which call of it): before anything is written, while shards are being written (the
# second layer, after the first went to disk), and after every shard is complete (the logits check).
POINTS = {
    "planning": ("mla_convert.job", "plan_for", 1),
    "writing shards": ("mla_convert.conversion.driver", "layer_tensors", 2),
    "checking": ("mla_convert.job", "verify", 1),
}


def start_paused(point: str, model_in: Path, model_out: Path) -> subprocess.Popen:
    module, attr, when = POINTS[point]
    args = [str(model_in), str(model_out), "--method", "svd", "--kv-budget", "0.5", "--finetune-steps", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CLI, module, attr, str(when), *args, "--max-shard-size", "20KB"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    assert proc.stderr is not None
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.strip() == "PAUSED":
            return proc
    proc.kill()
    raise AssertionError(f"the run never reached {point}: {''.join(seen)}")


@pytest.mark.parametrize(
    ("point", "signum"),
    [
        ("planning", signal.SIGTERM),
        ("writing shards", signal.SIGINT),
        ("writing shards", signal.SIGTERM),
        ("checking", signal.SIGINT),
    ],
)
def test_interrupt_leaves_nothing_behind(tiny_llama: Path, tmp_path: Path, point: str, signum: int) -> None:
    model_out = tmp_path / "model_out"
    proc = start_paused(point, tiny_llama, model_out)
    if point != "planning":
        assert len(temp_dirs(tmp_path)) == 1, "the run should be writing into its temp directory by now"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted") and "nothing was written" in lines[-1], stderr
    assert "Traceback" not in stderr
    assert not model_out.exists()
    assert temp_dirs(tmp_path) == []


def test_a_killed_run_is_cleaned_up_by_the_next(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_out = tmp_path / "model_out"
    proc = start_paused("writing shards", tiny_llama, model_out)
    left = temp_dirs(tmp_path)
    assert len(left) == 1 and list((tmp_path / left[0]).glob("shard-*.tmp")), "shards should be half-written"
    proc.kill()
    proc.wait(timeout=SUBPROCESS_TIMEOUT)
    assert not model_out.exists(), "a killed run must not leave something that looks like a model"
    result = cli(tiny_llama, model_out, *FAST, "--finetune-steps", "0", "-q")
    assert result.exit_code == 0, result.output
    assert (model_out / "config.json").is_file()
    assert temp_dirs(tmp_path) == []
