"""A run that fails part way (interrupted, an unexpected error, a full disk) says so in one line and leaves nothing:
MODEL_IN unchanged, no MODEL_OUT, no temporary folder; and the next run removes what a killed one left behind.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

import mla_convert.conversion.driver as convert_module
import mla_convert.write.writer as writer_module
from mla_convert.write.writer import TMP_PREFIX

from .helpers import FAST, SUBPROCESS_TIMEOUT, Untouched, one_line, temp_dirs

# ---------------------------------------------------------------- failures in the middle of a run


def _fail_on_second_layer(monkeypatch: pytest.MonkeyPatch, exc: BaseException, parent: Path) -> list[list[str]]:
    """Make layer_tensors raise exc on layer 1; returns the temp dirs seen at that moment (for a sanity check)."""
    real = convert_module.layer_tensors
    seen: list[list[str]] = []

    def flaky(source, plan, i, *args, **kwargs):  # type: ignore[no-untyped-def]
        if i == 1:
            seen.append(temp_dirs(parent))
            raise exc
        return real(source, plan, i, *args, **kwargs)

    monkeypatch.setattr(convert_module, "layer_tensors", flaky)
    return seen


def test_keyboard_interrupt_mid_conversion(cli, tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    model_out = tmp_path / "model_out"
    seen = _fail_on_second_layer(monkeypatch, KeyboardInterrupt(), tmp_path)
    guard = Untouched(tiny_llama, model_out)
    one_line(
        cli(tiny_llama, model_out, FAST),
        "interrupted",
        "nothing was written",
        code=130,
        prefix="interrupted",
        after_plan=True,
    )
    assert len(seen) == 1 and len(seen[0]) == 1, "the interruption should have happened while writing"
    guard.check()


def test_unexpected_error_mid_conversion(cli, tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    model_out = tmp_path / "model_out"
    seen = _fail_on_second_layer(monkeypatch, RuntimeError("boom in layer 1\nsecond line"), tmp_path)
    guard = Untouched(tiny_llama, model_out)
    line = one_line(cli(tiny_llama, model_out, FAST), "RuntimeError", "boom in layer 1", "-v", after_plan=True)
    assert "second line" not in line
    assert len(seen) == 1 and len(seen[0]) == 1
    guard.check()


VERBOSE_CRASH = """
import sys
import mla_convert.conversion.driver as convert_module

def boom(*args, **kwargs):
    raise RuntimeError("boom in layer")

convert_module.layer_tensors = boom
from mla_convert.cli import main

sys.argv = ["mla-convert", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # the tool in a process of its own
def test_unexpected_error_with_verbose_shows_traceback(tiny_llama: Path, tmp_path: Path) -> None:
    model_out = tmp_path / "model_out"
    guard = Untouched(tiny_llama, model_out)
    proc = subprocess.run(
        [sys.executable, "-c", VERBOSE_CRASH, str(tiny_llama), str(model_out), *FAST, "-v"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "RuntimeError: boom in layer" in proc.stderr
    guard.check()


def test_disk_full_while_writing(cli, tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    """The device fills up part way through a shard (in the writer thread): one line, nothing left behind."""
    model_out = tmp_path / "model_out"
    seen: list[list[str]] = []
    real_write = writer_module.ShardFile.write

    def fills_up(self, tensor):  # type: ignore[no-untyped-def]
        if len(self.header) > 3:
            seen.append(temp_dirs(tmp_path))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, tensor)

    monkeypatch.setattr(writer_module.ShardFile, "write", fills_up)
    guard = Untouched(tiny_llama, model_out)
    one_line(cli(tiny_llama, model_out, FAST), "no space left", after_plan=True)
    assert seen and len(seen[0]) == 1
    guard.check()


def _dead_pid() -> int:
    pid = 999999
    while writer_module._alive(pid):
        pid += 1
    return pid


def test_stale_temp_dir_is_cleaned_by_next_run(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_out = tmp_path / "model_out"
    stale = tmp_path / f"{TMP_PREFIX}{model_out.name}-{_dead_pid()}"
    stale.mkdir()
    (stale / "shard-0.tmp").write_bytes(b"half-written")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = tmp_path / f"{TMP_PREFIX}{model_out.name}-{sleeper.pid}"  # a run still in progress: kept
        live.mkdir()
        result = cli(tiny_llama, model_out, FAST, "--no-validate", "-q")  # the temp folders are what matter
        assert result.exit_code == 0, result.output
        assert (model_out / "config.json").is_file()
        assert not stale.exists()
        assert temp_dirs(tmp_path) == [live.name]
    finally:
        sleeper.kill()
        sleeper.wait()
