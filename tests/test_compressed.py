"""Compressed settings: the cache shrinks to the asked width, the model still runs, errors are reported."""

from __future__ import annotations

import json

import pytest
import torch

from mla_convert.job import Options, run

from .helpers import load, random_ids


@pytest.mark.parametrize(
    ("flags", "kv_rank", "rope_dim"),
    [
        ({"kv_rank": 20, "rope_dim": 8}, 20, 8),
        ({"kv_budget": 0.5}, 22, 10),  # 0.5 * 64 = 32 elements: a third (even) to rope
        ({"kv_budget": 0.25}, 12, 4),
    ],
)
def test_compressed_widths_cache_and_report(tiny_models, tmp_path, flags, kv_rank, rope_dim):
    out = tmp_path / "out"
    report = run(str(tiny_models["llama_gqa_tied"]), out, Options(**flags))
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
    assert report.plan.compressed


def test_more_latent_rank_means_less_error(tiny_models, tmp_path):
    errors = []
    for rank in (8, 24, 40):
        report = run(str(tiny_models["llama_gqa_tied"]), tmp_path / str(rank), Options(kv_rank=rank, verify=False))
        errors.append(report.summary()["v_rel_error_mean"] + report.summary()["k_rel_error_mean"])
    assert errors[0] > errors[1] > errors[2]


def test_compressed_transformers_profile_picks_components_and_stays_loadable(tiny_models, tmp_path):
    out = tmp_path / "out"
    report = run(str(tiny_models["llama_gqa_tied"]), out, Options(target="transformers", kv_budget=0.5))
    assert report.plan.rope_dim == 10 and len(report.plan.slots) == 5
    assert 0 < report.summary()["rope_energy_kept_mean"] < 1
    assert report.verification is not None and report.verification.top1_agreement > 0.5
    with torch.no_grad():
        assert torch.isfinite(load(out)(random_ids(256, 16)).logits).all()
