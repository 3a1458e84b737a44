"""Compressed settings: the cache shrinks to the asked width, the model still runs, errors are reported."""

from __future__ import annotations

import json

import pytest
import torch

from mla_convert import Options, convert
from mla_convert.evaluate.metrics import compare
from mla_convert.source.text import sample_windows

from .conftest import QUICK_CALIB
from .helpers import load, random_ids


@pytest.mark.parametrize(
    ("flags", "kv_rank", "rope_dim"),
    [
        ({"kv_rank": 20, "rope_dim": 8}, 20, 8),
        ({"kv_budget": 0.5, "method": "svd"}, 22, 10),  # 0.5 * 64 = 32 elements: data-free rule gives rope a third
        ({"kv_budget": 0.25, "method": "svd"}, 12, 4),
    ],
)
def test_compressed_widths_cache_and_report(tiny_models, tmp_path, flags, kv_rank, rope_dim):
    out = tmp_path / "out"
    report = convert(tiny_models["llama_gqa_tied"], out, Options(**flags, **QUICK_CALIB))
    config = json.loads((out / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (kv_rank, rope_dim)
    data = json.loads((out / "mla_report.json").read_text())
    assert data["kv_cache"]["converted_elements_per_token_per_layer"] == kv_rank + rope_dim
    assert data["kv_cache"]["ratio"] == pytest.approx((kv_rank + rope_dim) / 64)
    assert data["verification"]["measured_cache_elements_per_token_per_layer"] == kv_rank + rope_dim
    assert all(layer["k_rel_error"] > 1e-3 and layer["v_rel_error"] > 1e-3 for layer in data["layers"])
    assert all(layer["k_rel_error"] < 1 and layer["v_rel_error"] < 1 for layer in data["layers"])
    model = load(out)
    generated = model.generate(random_ids(256, 8)[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)
    assert report["settings"]["kv_lora_rank"] < report["settings"]["lossless_kv_rank"]


def test_more_latent_rank_means_less_error(tiny_models, tmp_path):
    errors = []
    for rank in (8, 24, 40):
        options = Options(kv_rank=rank, verify=False, **QUICK_CALIB)
        report = convert(tiny_models["llama_gqa_tied"], tmp_path / str(rank), options)
        errors.append(report["summary"]["v_rel_error_mean"] + report["summary"]["k_rel_error_mean"])
    assert errors[0] > errors[1] > errors[2]


def test_budget_split_is_measured_and_explained(tiny_models, tmp_path):
    out = tmp_path / "out"
    report = convert(tiny_models["llama_gqa_tied"], out, Options(kv_budget=0.5, **QUICK_CALIB))
    plan = report["settings"]
    rope_dim, stride, density = plan["qk_rope_head_dim"], plan["rotary_stride"], plan["rotary_density"]
    assert plan["kv_lora_rank"] + rope_dim == 32
    # candidates within the budget: rope 8 at stride 1 or 2, rope 16 (every source frequency), or a
    # ladder of density 2 (two slots per source frequency) of 8, 16 or 24
    assert (rope_dim, stride, density) in {(8, 1, 1), (8, 2, 1), (16, 1, 1), (8, 1, 2), (16, 1, 2), (24, 1, 2)}
    reason = json.loads((out / "mla_report.json").read_text())["settings"]["split_reason"]
    assert "measured on calibration windows" in reason and reason.count("latent") >= 6
    assert "(density 2)" in reason and "(stride 2)" in reason
    spacing = f"density {density}" if density > 1 else f"stride {stride}"
    assert f"chose rope {rope_dim} ({spacing})" in reason
    data = json.loads((out / "mla_report.json").read_text())
    assert data["calibration"]["method"] == "activation" and data["calibration"]["tokens"] == 1024
    assert data["evaluation"]["perplexity_ratio"] > 0 and 0 <= data["evaluation"]["top1_agreement"] <= 1


def test_activation_method_beats_weight_svd_on_held_out_text(tiny_models, tmp_path):
    source = load(tiny_models["llama_gqa_tied"])
    held_out = sample_windows(source, None, 8, 64, seed=123)  # not the calibration sample (seed 0)
    kl = {}
    for method in ("svd", "activation"):
        options = Options(kv_rank=12, rope_dim=8, method=method, verify=False, **QUICK_CALIB)
        convert(tiny_models["llama_gqa_tied"], tmp_path / method, options)
        kl[method] = compare(source, load(tmp_path / method), held_out).kl
    assert kl["activation"] < kl["svd"]


def test_compressed_transformers_profile_picks_components_and_stays_loadable(tiny_models, tmp_path):
    out = tmp_path / "out"
    options = Options(target="transformers", kv_budget=0.5, **QUICK_CALIB)
    report = convert(tiny_models["llama_gqa_tied"], out, options)
    assert report["settings"]["qk_rope_head_dim"] + report["settings"]["kv_lora_rank"] == 32
    assert len(report["settings"]["rotary_slots"]) == report["settings"]["qk_rope_head_dim"] // 2
    assert 0 < report["summary"]["rope_energy_kept_mean"] < 1
    assert report["verification"]["top1_agreement"] > 0.5
    with torch.no_grad():
        assert torch.isfinite(load(out)(random_ids(256, 16)).logits).all()
