"""MoE sources (Mixtral, Qwen3-MoE, OLMoE): the attention converts as for any family, the router and experts go
into DeepSeek's MoE layout of the stock class whose router computes the source's routing, or comes closest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, DeepseekV2Config, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

from mla_convert import Options, convert, dry_run
from mla_convert.errors import ConversionError
from mla_convert.mla.routing import renormalization_scale
from mla_convert.source.families import family_for

from .conftest import COMMON, MOE_CONFIGS, QUICK_CALIB, build_moe
from .helpers import load, undocumented

RENORMALIZE = {"mixtral": True, "qwen3_moe": True, "olmoe": False}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    for name in MOE_CONFIGS:
        build_moe(name).save_pretrained(root / name)
    return {name: root / name for name in MOE_CONFIGS}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_moe_source_converts_to_the_stock_class_that_routes_like_it(
    moe_models: dict[str, Path], tmp_path: Path, name: str
) -> None:
    out = tmp_path / name
    report = convert(moe_models[name], out, Options(target="transformers", **QUICK_CALIB))
    assert report["verification"]["routing_agreement_per_layer"] and report["source"]["experts"]
    assert undocumented(report) == []  # every key a MoE report holds is in report.py's schema
    model = load(out)  # stock class, no trust_remote_code
    assert type(model).__name__ == "DeepseekV2ForCausalLM" == report["settings"]["target_class"]
    config = json.loads((out / "config.json").read_text())
    source = AutoConfig.from_pretrained(moe_models[name])
    dense = 1 if name == "qwen3_moe" else 0
    assert config["first_k_dense_replace"] == dense
    assert config["n_routed_experts"] == 4 and config["num_experts_per_tok"] == 2
    assert config["n_shared_experts"] == 1  # of zero weights: the sources have none, every engine needs one
    assert config["scoring_func"] == "softmax" and config["topk_method"] == "greedy"
    assert config["norm_topk_prob"] is False
    # every expert projection is copied exactly (float32 output); a layer's down_projs share one factor: the
    # residual stream's scale, times the layer's expert scale where the source renormalizes
    written, stored = tensors(out), tensors(moe_models[name])
    parts = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}.get(name, ("mlp", "gate_proj", "up_proj", "down_proj"))
    factors = []
    for i in range(dense, source.num_hidden_layers):
        layer_factors = set()
        for j in range(4):
            for target, part in zip(("gate_proj", "up_proj", "down_proj"), parts[1:], strict=True):
                got = written[f"model.layers.{i}.mlp.experts.{j}.{target}.weight"]
                want = stored[f"model.layers.{i}.{parts[0]}.experts.{j}.{part}.weight"]
                if target == "down_proj":
                    layer_factors.add(round(float(got.norm() / want.norm()), 5))
                    want = want * float(got.norm() / want.norm())
                torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert len(layer_factors) == 1
        stats = report["layers"][i]
        assert ("expert_scale" in stats) == RENORMALIZE[name]
        factors.append(layer_factors.pop() / stats.get("expert_scale", 1.0))
    assert max(factors) - min(factors) < 1e-4  # the same residual scale in every layer
    for i in range(dense, source.num_hidden_layers):
        shared = [v for k, v in written.items() if k.startswith(f"model.layers.{i}.mlp.shared_experts.")]
        assert len(shared) == 3 and not any(t.any() for t in shared)
    if dense:
        assert "model.layers.0.mlp.gate_proj.weight" in written and "model.layers.0.mlp.gate.weight" not in written
    # routing is measured end to end: the share of tokens whose experts are unchanged, per MoE layer
    routing = report["verification"]["routing_agreement_per_layer"]
    assert len(routing) == source.num_hidden_layers - dense and all(0.0 <= r <= 1.0 for r in routing)
    assert report["warnings"]  # every MoE family here is approximate somewhere, and says where
    card = (out / "README.md").read_text()
    assert "stock `DeepseekV2ForCausalLM`" in card and "- Routing: " in card
    assert all(w.split(":")[0] in card for w in report["warnings"])


def test_mixtral_full_size_picks_the_same_experts_and_computes_close(
    moe_models: dict[str, Path], tmp_path: Path
) -> None:
    """Mixtral's attention is exact at full size, so the first layer chooses the same experts on every token;
    only the expert weights (the softmax's own for its renormalized top-2, times a factor) differ, which later
    layers see in their inputs, and the report says so."""
    report = convert(moe_models["mixtral"], tmp_path / "m", Options(target="transformers", **QUICK_CALIB))
    routing = report["verification"]["routing_agreement_per_layer"]
    assert routing[0] == 1.0 and min(routing) >= 0.95
    assert report["verification"]["max_abs_logit_diff"] < 0.2
    assert any("renormalized softmax" in w for w in report["warnings"])


@pytest.mark.parametrize("calibrated", [True, False])
def test_expert_scale_brings_the_unrenormalized_weights_closer(
    moe_models: dict[str, Path], tmp_path: Path, calibrated: bool
) -> None:
    """Mixtral renormalizes its top-2 softmax, DeepSeek-V2 does not: one factor per layer on the experts, fitted on
    calibration text (or data-free on the norm's gains), brings the weights closer than none."""
    options = Options(kv_budget=0.5, **QUICK_CALIB) if calibrated else Options(method="svd", **QUICK_CALIB)
    report = convert(moe_models["mixtral"], tmp_path / "m", options)
    for layer in report["layers"]:
        assert layer["routing_weight_error_after"] < layer["routing_weight_error_before"]
        assert layer["expert_scale"] > 1.0  # the top-2 softmax mass is below one
        if calibrated:
            assert 0.0 < layer["moe_output_error"] < 0.5


def test_olmoe_routing_is_exact_in_deepseek_v2(moe_models: dict[str, Path], tmp_path: Path) -> None:
    """OLMoE (softmax top-k, not renormalized) routes exactly as DeepSeek-V2: on the same inputs the converted
    expert mix equals the source's, layer by layer (its q/k norms keep the whole model approximate)."""
    report = convert(moe_models["olmoe"], tmp_path / "o", Options(target="transformers", **QUICK_CALIB))
    errors = [layer["moe_output_error"] for layer in report["layers"]]
    assert errors and max(errors) < 1e-5
    assert "expert_scale" not in report["layers"][0]


def test_deepseek_v2_moe_block_equals_olmoe_block() -> None:
    """The mapping itself, without anything else: DeepSeek-V2's MoE block filled with an OLMoE block's router
    and experts (no shared expert) computes the same output."""
    source = build_moe("olmoe").model.layers[0].mlp
    config = DeepseekV2Config(
        hidden_size=COMMON["hidden_size"],
        moe_intermediate_size=COMMON["intermediate_size"],
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=0,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
    )
    target = DeepseekV2Moe(config).eval()
    state = {"gate.weight": source.gate.weight, **{f"experts.{k}": v for k, v in source.experts.state_dict().items()}}
    target.load_state_dict(state, strict=False)
    x = torch.randn(3, 7, COMMON["hidden_size"])
    with torch.no_grad():
        assert (target(x) - source(x)).abs().max() < 1e-6


def test_renormalization_scale_follows_the_softmax_mass() -> None:
    """A confident router (top-k mass near 1) needs no factor; a flat one over E experts about E/k."""
    gen = torch.Generator().manual_seed(0)
    confident = torch.randn(4000, 8, generator=gen, dtype=torch.float64) * 20.0
    scale, before, after = renormalization_scale(confident, 2)
    assert scale == pytest.approx(1.0, abs=0.02) and after <= before < 0.05
    flat = torch.randn(4000, 8, generator=gen, dtype=torch.float64) * 0.01
    scale, before, after = renormalization_scale(flat, 2)
    assert scale == pytest.approx(4.0, rel=0.02) and after < 0.01 < 0.5 < before


def test_moe_dry_run_names_the_target_class_and_the_approximation(moe_models: dict[str, Path]) -> None:
    plan = dry_run(moe_models["mixtral"], Options(kv_budget=0.5))
    assert plan["target_class"] == "DeepseekV2ForCausalLM"
    assert any("renormalized softmax" in w for w in plan["warnings"])


def test_qwen2_moe_is_refused_by_design() -> None:
    config = Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **COMMON)
    with pytest.raises(ConversionError, match=r"sigmoid gate.*refused by design"):
        family_for(config)


def test_dense_layers_between_expert_layers_are_refused() -> None:
    config = Qwen3MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], **COMMON)
    config.num_hidden_layers = 3
    with pytest.raises(ConversionError, match="first_k_dense_replace"):
        family_for(config)
