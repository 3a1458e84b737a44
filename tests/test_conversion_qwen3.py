"""Qwen3's per-head q/k norms have no stock DeepSeek-V3 form: the conversion replaces each by a fixed per-head
scale measured on calibration text, says it is approximate at every width, and reports what that costs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config

import mla_convert.conversion.driver as driver
from mla_convert import Options, convert

from .conftest import COMMON, QUICK_CALIB, build_qwen3
from .helpers import load, random_ids

CALIB = {**QUICK_CALIB, "calib_tokens": 2048}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GQA Qwen3 whose norm gains are far from 1."""
    model = build_qwen3(Qwen3Config(num_key_value_heads=2, **COMMON))
    path = tmp_path_factory.mktemp("qwen3") / "qwen3"
    model.save_pretrained(path)
    return path


def mean_attention_error(report: dict) -> float:
    return sum(layer["attn_output_error"] for layer in report["layers"]) / len(report["layers"])


@pytest.mark.parametrize("target", ["transformers", "portable"])
def test_qwen3_converts_to_a_stock_model_and_says_it_is_approximate(qwen3: Path, tmp_path: Path, target: str) -> None:
    out = tmp_path / target
    report = convert(qwen3, out, Options(target=target, **CALIB))
    model = load(out)  # stock class, no trust_remote_code
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    notes = [w for w in report["warnings"] if "q_norm, k_norm" in w]
    assert notes and "approximate at every width" in notes[0]
    assert "approximate at every width" in (out / "README.md").read_text()
    # full size: the per-layer error is what replacing the norms costs, measured on calibration inputs
    assert report["kv_cache"]["ratio"] == 1.0 if target == "transformers" else True
    errors = [layer["attn_output_error"] for layer in report["layers"]]
    assert all(0.0 < e < 1.0 for e in errors)
    saved = json.loads((out / "mla_report.json").read_text())
    assert [layer["attn_output_error"] for layer in saved["layers"]] == errors
    assert report["verification"]["max_abs_logit_diff"] > 1e-3  # approximate, and the check says so


def test_the_dry_run_says_qwen3_is_approximate(cli, qwen3: Path) -> None:
    result = cli(qwen3, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "approximate at every width" in result.stdout + result.stderr


@pytest.mark.slow  # two whole calibrated runs, compared
def test_measured_head_scales_beat_dropping_the_norm(qwen3: Path, tmp_path: Path, monkeypatch) -> None:
    options = Options(target="transformers", query_refit=False, verify=False, **CALIB)
    fitted = mean_attention_error(convert(qwen3, tmp_path / "fitted", options))
    unit = lambda weight, norm_weight, heads, eps, moment: weight  # noqa: E731  (as if the norm were not there)
    monkeypatch.setattr(driver, "linearized", unit)
    dropped = mean_attention_error(convert(qwen3, tmp_path / "dropped", options))
    assert fitted < 0.6 * dropped  # measured 0.27 against 0.52


@pytest.mark.slow  # two whole calibrated runs, one with layer steps
def test_query_refit_and_layer_steps_fit_the_normalized_source(qwen3: Path, tmp_path: Path) -> None:
    # more windows than the other tests: the held-out check keeps a fit only where held-out windows improve
    calib = {**CALIB, "calib_tokens": 4096}
    base = convert(qwen3, tmp_path / "base", Options(target="transformers", query_refit=False, verify=False, **calib))
    fitted = convert(qwen3, tmp_path / "fit", Options(target="transformers", layer_steps=200, verify=False, **calib))
    assert all(layer.get("query_refit_error_after") is not None for layer in fitted["layers"])
    assert mean_attention_error(fitted) < mean_attention_error(base)
    with torch.no_grad():  # and the logits come closer to the source's
        ids = random_ids(256, 64)
        ref = load(qwen3)(ids).logits
        gaps = [(load(tmp_path / name)(ids).logits - ref).abs().mean() for name in ("base", "fit")]
    assert gaps[1] < gaps[0]
