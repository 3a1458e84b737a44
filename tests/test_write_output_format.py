"""The output is a stock DeepSeek-V3 checkpoint: exactly the stock tensors and config keys, nothing else."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config

from mla_convert import Options, convert
from mla_convert.util.hf_compat import output_cache

from .conftest import QUICK_CALIB
from .helpers import load, random_ids


@pytest.fixture(scope="module")
def portable_out(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("fmt") / "out"
    report = convert(tiny_models["llama_gqa_tied"], out, Options(**QUICK_CALIB))
    return out, report


def _tensor_names(out):
    names = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            names.update({k: fh.get_slice(k).get_shape() for k in fh.keys()})  # noqa: SIM118
    return names


def test_tensors_are_exactly_those_of_the_stock_model(portable_out):
    out, _ = portable_out
    config = AutoConfig.from_pretrained(str(out))
    stock = AutoModelForCausalLM.from_config(config)
    expected = {k: list(v.shape) for k, v in stock.state_dict().items()}
    assert _tensor_names(out) == expected


def test_config_is_stock_and_serving_safe(portable_out, tiny_models):
    out, report = portable_out
    raw = json.loads((out / "config.json").read_text())
    known = set(DeepseekV3Config().to_dict()) | {"architectures", "dtype", "rope_parameters"}
    known |= {"rope_theta", "rope_scaling"}  # the same rope under the names engines on transformers 4.x read
    assert set(raw) <= known, set(raw) - known
    assert raw["model_type"] == "deepseek_v3" and raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert raw["q_lora_rank"] is None and raw["first_k_dense_replace"] == raw["num_hidden_layers"]
    assert raw["num_key_value_heads"] == raw["num_attention_heads"]
    # The plain ladder in DeepSeek's own YaRN form (factor 1): vLLM computes `default` wrongly for MLA.
    rope = raw["rope_parameters"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == 1.0 and raw["rope_interleave"] is True
    assert rope["mscale"] == rope["mscale_all_dim"] == 1.0 and "attention_factor" not in rope
    legacy = {k: v for k, v in raw["rope_scaling"].items() if k != "type"}
    assert raw["rope_theta"] == rope["rope_theta"] and legacy == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert raw["tie_word_embeddings"] is False and raw["attention_bias"] is False
    assert raw["rms_norm_eps"] == 1e-6  # the latent norm's epsilon in every engine
    assert (
        raw["kv_lora_rank"] == report["settings"]["kv_lora_rank"]
        and raw["qk_rope_head_dim"] == report["settings"]["qk_rope_head_dim"]
    )


def test_rope_form_computes_the_plain_ladder_bit_for_bit(portable_out, tmp_path):
    """The YaRN form with factor 1 (and its legacy copy) is exactly what `rope_type: default` computes."""
    import shutil

    out, _ = portable_out
    ids = random_ids(256, 40)
    with torch.no_grad():
        written = load(out)(ids).logits
        plain = tmp_path / "plain"
        shutil.copytree(out, plain)
        raw = json.loads((plain / "config.json").read_text())
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw["rope_parameters"]["rope_theta"]}
        for key in ("rope_scaling", "rope_theta"):
            raw.pop(key)
        (plain / "config.json").write_text(json.dumps(raw))
        assert torch.equal(load(plain)(ids).logits, written)


def test_loads_without_remote_code_and_every_layer_is_dense_mla(portable_out):
    out, _ = portable_out
    model = load(out, trust_remote_code=False)
    for layer in model.model.layers:
        assert layer.mlp.__class__.__name__ == "DeepseekV3MLP"
        assert layer.self_attn.__class__.__name__ == "DeepseekV3Attention"
    assert not (out / "configuration_deepseek.py").exists()
    assert not list(out.glob("*.py")) and not list(out.glob("*.bin"))


def test_cache_holds_the_latent_and_the_shared_rotary_key(portable_out):
    out, report = portable_out
    model = load(out)
    generated = model.generate(random_ids(256, 12)[:1], max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    layer = output_cache(generated).layers[0]
    assert layer.keys.shape[1] == 1 and layer.keys.shape[-1] == report["settings"]["kv_lora_rank"]
    assert layer.values.shape[1] == 1 and layer.values.shape[-1] == report["settings"]["qk_rope_head_dim"]
    assert generated.sequences.shape[1] == 17


def test_report_schema(portable_out):
    out, report = portable_out
    data = json.loads((out / "mla_report.json").read_text())
    assert {"source", "settings", "kv_cache", "layers", "summary", "verification", "warnings"} <= set(data)
    assert {"calibration", "evaluation"} <= set(data)
    assert all(x["attn_output_error"] is not None and x["k_act_error"] is not None for x in data["layers"])
    kv = data["kv_cache"]
    assert kv["original_elements_per_token_per_layer"] == 2 * 2 * 16
    assert (
        kv["converted_elements_per_token_per_layer"]
        == report["settings"]["kv_lora_rank"] + report["settings"]["qk_rope_head_dim"]
    )
    assert kv["ratio"] == pytest.approx(kv["converted_elements_per_token_per_layer"] / 64)
    assert [x["index"] for x in data["layers"]] == [0, 1]
    assert all({"k_rel_error", "v_rel_error", "rope_energy_kept"} <= set(x) for x in data["layers"])
    assert (
        data["verification"]["measured_cache_elements_per_token_per_layer"]
        == kv["converted_elements_per_token_per_layer"]
    )


def test_model_card_states_source_settings_saving_and_errors(portable_out, tiny_models):
    out, report = portable_out
    card = (out / "README.md").read_text()
    source = tiny_models["llama_gqa_tied"]
    # named by its folder, never by the local path it was read from (the card is published as it is)
    assert f"Source: `{source.name}`" in card and str(source) not in card and str(source.parent) not in card
    assert str(out.parent) not in card
    # the measured quality names the text it was measured on
    assert "tokens of text sampled from the source model itself (a separate sample" in card
    assert f"kv_lora_rank {report['settings']['kv_lora_rank']}" in card
    assert "KV cache per token per layer: 64 ->" in card
    assert "Key reconstruction error" in card and "| layer | K rel. error |" in card


def test_sharded_output_has_an_index_and_loads(tiny_models, tmp_path):
    out = tmp_path / "out"
    convert(
        tiny_models["llama_gqa_tied"],
        out,
        Options(verify=False, method="svd", max_shard_size=40_000, finetune_steps=0),
    )
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert load(out) is not None


def test_tokenizer_and_generation_config_are_copied(tiny_models, tmp_path):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(tiny_models["llama_gqa_tied"], src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    out = tmp_path / "out"
    convert(src, out, Options(verify=False, method="svd", finetune_steps=0))
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 512}'
    assert (out / "generation_config.json").is_file()
