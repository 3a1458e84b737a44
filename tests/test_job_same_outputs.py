"""Outputs do not change by accident: fixed conversions give the bytes recorded in tests/data/same_outputs.json
(weights, config, tokenizer, GGUF, and the report without its times) on a tiny model (both profiles, a fine-tune,
both GGUF paths, the vLLM widths) and on SmolLM2 (a 2-step fine-tune, and the transformers profile). A refactor
must keep them; a change meant to alter outputs records them again (tests/same_outputs.py says how).

The conversions run with the CPU kernels pinned (same_outputs.PINS), so one record serves every x86-64 machine
with AVX2 of a recorded vendor. Where no record matches this environment, the reference is made here: the same
cases converted by the package of the commit that recorded the bytes, on this machine, in this run. Without the
git history for that, the test fails with what to do: a guard that skipped would guard nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import same_outputs


def check(cases: dict[str, list[str]], tmp_path: Path, smollm2_hf: Path | None = None) -> None:
    environment, found = same_outputs.convert_pinned(list(cases), tmp_path / "head", smollm2_hf)
    record = same_outputs.recorded().get(environment)
    against = "the record"
    if record is None:
        commit = same_outputs.reference_commit()
        if commit is None:
            pytest.fail(same_outputs.unrecorded(environment), pytrace=False)
        code = same_outputs.package_at(commit, tmp_path / "package")
        _, record = same_outputs.convert_pinned(list(cases), tmp_path / "reference", smollm2_hf, code)
        against = f"the conversions by the package at {commit[:12]} on this machine"
    wrong = same_outputs.differences(record, found)
    assert not wrong, f"output bytes differ from {against} (tests/same_outputs.py):\n" + "\n".join(wrong)


def test_the_reference_is_the_package_of_the_commit_that_recorded_the_bytes(tmp_path: Path) -> None:
    """Where no record matches, the reference conversions run the package as it was when the bytes were
    recorded: the commit exists and holds the package."""
    commit = same_outputs.reference_commit()
    assert commit is not None, "no git history: the guard could not make its reference on an unrecorded machine"
    assert (same_outputs.package_at(commit, tmp_path) / "mla_convert" / "job.py").is_file()


def test_tiny_conversions_write_the_recorded_bytes(tmp_path: Path) -> None:
    check(same_outputs.TINY_CASES, tmp_path)


@pytest.mark.slow
def test_smollm2_conversions_write_the_recorded_bytes(smollm2_hf: Path, tmp_path: Path) -> None:
    check(same_outputs.SMOLLM2_CASES, tmp_path, smollm2_hf)
