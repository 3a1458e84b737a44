"""The full-size map is exact: every family in the transformers profile; MQA and dependent heads portable."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mla_convert import Options, convert

from .conftest import QUICK_CALIB, TINY_CONFIGS
from .helpers import load, max_logit_diff, random_ids

TOL = 1e-3


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_transformers_profile_is_lossless_for_every_family(tiny_models, tmp_path, family):
    out = tmp_path / "out"
    convert(tiny_models[family], out, Options(target="transformers", verify=False))
    assert load(out).__class__.__name__ == "DeepseekV3ForCausalLM"
    assert max_logit_diff(tiny_models[family], out, random_ids(256, 96)) <= TOL


@pytest.mark.parametrize("method", ["svd", "activation"])
@pytest.mark.parametrize(
    "family",
    [
        "llama_dependent_heads",
        "phi3_dependent_heads",
        "phi3_partial_dependent_heads",
        "granite_dependent_heads",
        "smollm_like_mqa",
    ],
)
def test_portable_profile_is_exact_when_no_rotary_energy_is_lost(tiny_models, tmp_path, family, method):
    out = tmp_path / "out"
    report = convert(tiny_models[family], out, Options(verify=False, method=method, **QUICK_CALIB))
    assert report["summary"]["rope_energy_kept_min"] > 1 - 1e-9
    assert max_logit_diff(tiny_models[family], out, random_ids(256, 96)) <= TOL


@pytest.mark.parametrize(
    ("family", "target"), [("llama_gqa_tied", "transformers"), ("llama_dependent_heads", "portable")]
)
def test_a_full_budget_gives_the_exact_map_with_either_method(tiny_models, tmp_path, family, target):
    for method in ("svd", "activation"):
        out = tmp_path / method
        options = Options(target=target, kv_budget=1.0, method=method, verify=False, **QUICK_CALIB)
        report = convert(tiny_models[family], out, options)
        assert report["kv_cache"]["ratio"] == 1.0
        assert report["settings"]["kv_lora_rank"] == report["settings"]["lossless_kv_rank"]
        assert max_logit_diff(tiny_models[family], out, random_ids(256, 96)) <= TOL


def test_portable_profile_reports_the_rotary_loss_of_independent_heads(tiny_models, tmp_path):
    out = tmp_path / "out"
    # one plain ladder (head_dim wide): left to measure, the run now picks a dense ladder here, which rotates all
    report = convert(tiny_models["llama_gqa_tied"], out, Options(rope_dim=16, **QUICK_CALIB))
    kept = json.loads((out / "mla_report.json").read_text())["summary"]["rope_energy_kept_mean"]
    assert 0.0 < kept < 0.99  # random independent KV heads cannot share one rotary key
    assert report["verification"]["max_abs_logit_diff"] > TOL
    # full latent rank: the keys and values themselves are reproduced, only rotation is lost
    assert report["summary"]["k_rel_error_max"] < 1e-9 and report["summary"]["v_rel_error_max"] < 1e-9


def test_portable_drops_biases_with_a_warning_and_transformers_keeps_them(tiny_models, tmp_path):
    portable = convert(
        tiny_models["qwen2_gqa_bias"], tmp_path / "p", Options(verify=False, method="svd", finetune_steps=0)
    )
    assert any("biases" in w for w in portable["warnings"])
    tensors = json.loads((tmp_path / "p" / "config.json").read_text())
    assert tensors["attention_bias"] is False and tensors["q_lora_rank"] is None
    convert(tiny_models["qwen2_gqa_bias"], tmp_path / "t", Options(target="transformers", verify=False))
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["attention_bias"] is True and config["q_lora_rank"] == 65  # pass-through latent for the q bias
    tensors = load_file(str(tmp_path / "t" / "model.safetensors"))
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.bias" in tensors


def test_bfloat16_output_error_is_no_larger_than_the_sources_own(tiny_models, tmp_path):
    src = tiny_models["llama_gqa_tied"]
    out = tmp_path / "out"
    convert(src, out, Options(target="transformers", dtype="bfloat16", verify=False))
    ids = random_ids(256, 64)
    with torch.no_grad():
        ref = load(src)(ids).logits
        src_bf16 = load(src).to(torch.bfloat16)(ids).logits.float()
        out_bf16 = load(out).to(torch.bfloat16)(ids).logits.float()
    assert (out_bf16 - ref).abs().max() <= 2 * (src_bf16 - ref).abs().max() + 1e-3


def test_the_built_in_verification_agrees_with_an_independent_check(tiny_models, tmp_path):
    out = tmp_path / "out"
    report = convert(tiny_models["mistral_gqa"], out, Options(target="transformers"))
    assert report["verification"] is not None
    assert report["verification"]["max_abs_logit_diff"] <= TOL
    assert report["verification"]["top1_agreement"] == 1.0


def test_a_sliding_window_source_converts_to_full_attention_only_when_asked(tmp_path):
    """Exact on contexts within the window, different beyond it, and the plan, report and card say so."""
    from transformers import MistralConfig

    from .conftest import COMMON, build_tiny

    src = tmp_path / "mistral_window"
    build_tiny(MistralConfig(num_key_value_heads=2, sliding_window=16, **COMMON)).save_pretrained(src)
    out = tmp_path / "out"
    report = convert(src, out, Options(target="transformers", verify=False, allow_full_attention=True))
    assert any("last 16 tokens only" in w for w in report["warnings"])
    assert "last 16 tokens only" in (out / "README.md").read_text()
    inside, beyond = random_ids(256, 16), random_ids(256, 48)
    assert max_logit_diff(src, out, inside) <= TOL
    with torch.no_grad():
        differs = (load(src)(beyond).logits - load(out)(beyond).logits).abs().amax(dim=(0, 2))
    assert differs[:16].max() <= TOL < differs[16:].min()
