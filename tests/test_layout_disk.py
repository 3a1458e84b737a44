"""The suite cleans up after itself and says up front when a disk cannot hold it: a passing test's temporary
folder is removed (SmolLM2-sized outputs filled 21 GB over three runs before), and `.ci/run` starts with a
one-line disk check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INNER = """
def test_passes(tmp_path):
    (tmp_path / "checkpoint.bin").write_bytes(bytes(2_000_000))

def test_fails(tmp_path):
    (tmp_path / "checkpoint.bin").write_bytes(bytes(2_000_000))
    assert False
"""


def inner_session(tmp_path: Path, *tests: str) -> Path:
    """Run this project's pytest configuration on a two-test file; returns the temporary root it used."""
    (tmp_path / "test_inner.py").write_text(INNER)
    root = tmp_path / "temproot"
    root.mkdir(exist_ok=True)
    env = {**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml")]
    cmd += ["--rootdir", str(tmp_path), *(f"test_inner.py::{test}" for test in tests)]
    subprocess.run(cmd, cwd=tmp_path, env=env, timeout=120, capture_output=True)
    return root


def checkpoints(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.rglob("checkpoint.bin"))


def test_a_passing_session_leaves_no_temporary_files(tmp_path: Path) -> None:
    assert checkpoints(inner_session(tmp_path, "test_passes")) == []


def test_a_failing_session_keeps_only_the_failed_tests_files(tmp_path: Path) -> None:
    assert checkpoints(inner_session(tmp_path, "test_passes", "test_fails")) == ["test_fails0"]


def test_ci_checks_free_disk_first_in_one_line() -> None:
    run = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in run if line and not line.startswith("#")]
    assert commands.index(".ci/check-disk  # one line and exit 1 when the disk cannot hold the suite") < next(
        i for i, line in enumerate(commands) if "venv" in line
    )
    check = ROOT / ".ci" / "check-disk"
    refused = subprocess.run([check], env={**os.environ, "MLA_CONVERT_CI_NEED_GB": "999999"}, capture_output=True)
    lines = refused.stderr.decode().strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "needs about 999999 GB free" in lines[0], lines
    assert "GB free" in lines[0].rpartition(";")[2]  # and says what there is
    passed = subprocess.run([check], env={**os.environ, "MLA_CONVERT_CI_NEED_GB": "0"}, capture_output=True)
    assert passed.returncode == 0 and passed.stderr == b""
