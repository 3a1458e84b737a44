"""Outputs do not change by accident: fixed conversions give the bytes recorded in tests/data/same_outputs.json
(weights, config, tokenizer) on a tiny model and on SmolLM2 with a 2-step fine-tune. A refactor must keep them;
a change meant to alter outputs records them again (tests/same_outputs.py says how)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import same_outputs


@pytest.fixture
def golden() -> dict[str, dict[str, str]]:
    """This machine's record: float sums differ between torch builds and CPU kernels, so bytes are recorded
    per machine (`python -m tests.same_outputs` adds one)."""
    here = same_outputs.machine()
    found = same_outputs.recorded().get(here)
    if found is None:
        pytest.skip(f"no bytes recorded for {here}; record them with `python -m tests.same_outputs`")
    return found


def test_tiny_conversion_writes_the_recorded_bytes(golden: dict[str, dict[str, str]], tmp_path: Path) -> None:
    assert same_outputs.tiny(tmp_path) == golden["tiny"]


@pytest.mark.slow
def test_smollm2_conversion_with_a_fine_tune_writes_the_recorded_bytes(
    golden: dict[str, dict[str, str]], smollm2_hf: Path, tmp_path: Path
) -> None:
    if "smollm2" not in golden:
        pytest.skip("SmolLM2's bytes were not recorded on this machine")
    assert same_outputs.smollm2(tmp_path, smollm2_hf) == golden["smollm2"]
