"""What a GGUF of our checkpoint holds: the deepseek2 shape its config.json gives, and every tensor llama.cpp's
loader creates, with where its data comes from and how it is stored.

The GGUF is the MLA-absorbed layout llama.cpp runs: `kv_b_proj` is split into per-head `attn_k_b`
(transposed) and `attn_v_b`, and attention runs as MQA over the latent (head_count_kv 1). A MoE checkpoint's
experts are stacked per layer into llama.cpp's `ffn_{gate,up,down}_exps`, beside its router and the shared
expert (ours is zeros: the sources have none, and every engine needs one).

The storage types keep the latent rows of `kv_a_proj_with_mqa` alive. Those rows are ~1e-8 by design (the
latent RMSNorm runs in its epsilon regime, where it is linear; see mla/latent_norm.py) beside rotary rows ~1e6
times larger, so f16, and the f16 block scales of every llama.cpp quant type, round them to zero and the model
loses its attention. f32 and bf16 (float32's exponent range) keep them natively, and q8_0 keeps that one
tensor, and the norms, in float32; `check_latent_rows` proves it for every file written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..errors import ConversionError

KV_A = "attn_kv_a_mqa"


@dataclass(frozen=True)
class GgufExperts:
    """A MoE checkpoint's routing, as llama.cpp's deepseek2 graph computes it (source/families.py's Experts is
    the source's)."""

    count: int
    used: int
    width: int
    dense_layers: int
    shared: int  # shared experts (n_shared_experts)
    scale: float  # routed_scaling_factor


@dataclass(frozen=True)
class GgufShape:
    """What llama.cpp's deepseek2 loader needs to know, read from the converted config.json and checked
    (plan/plan.py's Geometry is the source's)."""

    name: str
    hidden: int
    layers: int
    heads: int
    nope: int
    rope: int
    v_dim: int
    rank: int
    intermediate: int
    vocab: int
    context: int
    theta: float
    eps: float
    experts: GgufExperts | None = None

    def is_moe_layer(self, i: int) -> bool:
        """Layer i routes to experts: the MoE layers follow the leading dense ones."""
        return self.experts is not None and i >= self.experts.dense_layers


def read_shape(checkpoint: Path) -> GgufShape:
    """config.json as llama.cpp will see it; anything llama.cpp would run differently is refused here."""
    path = checkpoint / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"--gguf: {checkpoint} has no config.json; to resolve, point it at a converted checkpoint"
        )
    config = json.loads(path.read_text())
    _check_architecture(config)
    return GgufShape(
        name=checkpoint.name,
        hidden=int(config["hidden_size"]),
        layers=int(config["num_hidden_layers"]),
        heads=int(config["num_attention_heads"]),
        nope=int(config["qk_nope_head_dim"]),
        rope=int(config["qk_rope_head_dim"]),
        v_dim=int(config["v_head_dim"]),
        rank=int(config["kv_lora_rank"]),
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        context=int(config.get("max_position_embeddings", 4096)),
        theta=_rope_theta(config),
        eps=float(config.get("rms_norm_eps", 1e-6)),
        experts=_experts(config),
    )


def _experts(config: dict[str, Any]) -> GgufExperts | None:
    """The routing of a checkpoint with MoE layers (None when every layer is dense)."""
    layers, dense = int(config["num_hidden_layers"]), int(config.get("first_k_dense_replace", 0))
    if dense >= layers:
        return None
    return GgufExperts(
        count=int(config["n_routed_experts"]),
        used=int(config["num_experts_per_tok"]),
        width=int(config["moe_intermediate_size"]),
        dense_layers=dense,
        shared=int(config.get("n_shared_experts") or 0),
        scale=float(config.get("routed_scaling_factor", 1.0)),
    )


def _check_architecture(config: dict[str, Any]) -> None:
    """The features of our DeepSeek-V3 output that the GGUF cannot carry (or llama.cpp computes otherwise)."""
    refuse = []
    if config.get("model_type") not in ("deepseek_v3", "deepseek_v2"):
        refuse.append(f"model_type is {config.get('model_type')!r}, not 'deepseek_v3' or 'deepseek_v2'")
    if config.get("q_lora_rank") is not None or config.get("attention_bias"):
        refuse.append("it has attention biases folded into a q-LoRA (written by --target transformers)")
    moe = int(config.get("first_k_dense_replace", 0)) < int(config["num_hidden_layers"])
    if moe and int(config.get("n_shared_experts") or 0) < 1:
        refuse.append("its MoE layers have no shared expert, which llama.cpp's deepseek2 loader requires")
    if moe and config.get("model_type") != "deepseek_v2":
        refuse.append("its MoE layers route as DeepSeek-V3 (sigmoid); mla-convert writes MoE sources as DeepSeek-V2")
    if moe and int(config.get("n_group") or 1) != 1:
        refuse.append("it routes by expert groups")
    if not config.get("rope_interleave", False):
        refuse.append("its rotary pairs are not interleaved (llama.cpp's deepseek2 rotates interleaved pairs)")
    if config.get("hidden_act", "silu") != "silu":
        refuse.append(f"its activation is {config.get('hidden_act')!r}, not silu")
    if int(config.get("qk_nope_head_dim", 0)) < 1:
        refuse.append("qk_nope_head_dim is 0 (llama.cpp asserts it is at least 1)")
    if refuse:
        raise ConversionError(f"--gguf cannot write this checkpoint: {'; '.join(refuse)}")


def _rope_theta(config: dict[str, Any]) -> float:
    """The rope base; only the plain frequency ladder (our portable form: YaRN with factor 1) is accepted."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "longrope":
        raise ConversionError(
            "--gguf cannot write a --target transformers checkpoint: its per-dimension rotary frequencies "
            "(longrope factors) have no GGUF key and llama.cpp would rotate with the plain ladder; "
            "to resolve, convert with --target portable"
        )
    if kind not in ("default", "yarn") or (kind == "yarn" and float(rope.get("factor", 1.0)) != 1.0):
        raise ConversionError(
            f"--gguf supports only the plain rotary ladder, not rope_type {kind!r} with factor "
            f"{rope.get('factor')}; to resolve, convert with --target portable"
        )
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


class Weights:
    """The checkpoint's safetensors shards, read one tensor at a time (a GGUF of any size streams)."""

    def __init__(self, checkpoint: Path) -> None:
        from safetensors import safe_open

        self.files = {file: safe_open(str(checkpoint / file), framework="pt") for file in _shards(checkpoint)}
        self.where = {key: file for file, handle in self.files.items() for key in handle.keys()}  # noqa: SIM118

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.files[self.where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self.files[self.where[key]].get_tensor(key).float()


def _shards(checkpoint: Path) -> list[str]:
    """model.safetensors, or the shards its index names."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (checkpoint / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ConversionError(f"--gguf: {checkpoint} holds no safetensors weights; to resolve, convert it again")


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: where its data comes from and how it is stored."""

    name: str  # GGUF name
    source: str  # checkpoint tensor
    part: str  # "all", "k_b" or "v_b" (the halves of kv_b_proj)
    shape: tuple[int, ...]  # numpy shape (the GGUF shape reversed)
    kind: str  # "f32", "bf16" or "q8_0"


def plan_tensors(weights: Weights, geo: GgufShape, quant: str) -> list[Planned]:
    """Every tensor llama.cpp's deepseek2 loader creates, with the shapes its create_tensor calls expect."""
    t = gguf.MODEL_TENSOR
    h, heads, rank = geo.hidden, geo.heads, geo.rank
    output = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    tops = [
        (t.TOKEN_EMBD, "model.embed_tokens.weight", (geo.vocab, h)),
        (t.OUTPUT_NORM, "model.norm.weight", (h,)),
        (t.OUTPUT, output, (geo.vocab, h)),
    ]
    planned = [_planned(gguf.TENSOR_NAMES[kind], src, "all", shape, quant) for kind, src, shape in tops]
    for i in range(geo.layers):
        pre = f"model.layers.{i}."
        layer = [
            (t.ATTN_NORM, "input_layernorm", "all", (h,)),
            (t.ATTN_Q, "self_attn.q_proj", "all", (heads * (geo.nope + geo.rope), h)),
            (t.ATTN_KV_A_MQA, "self_attn.kv_a_proj_with_mqa", "all", (rank + geo.rope, h)),
            (t.ATTN_KV_A_NORM, "self_attn.kv_a_layernorm", "all", (rank,)),
            (t.ATTN_K_B, "self_attn.kv_b_proj", "k_b", (heads, rank, geo.nope)),
            (t.ATTN_V_B, "self_attn.kv_b_proj", "v_b", (heads, geo.v_dim, rank)),
            (t.ATTN_OUT, "self_attn.o_proj", "all", (h, heads * geo.v_dim)),
            (t.FFN_NORM, "post_attention_layernorm", "all", (h,)),
            *(_expert_tensors(geo) if geo.is_moe_layer(i) else _dense_tensors(geo)),
        ]
        for kind, src, part, shape in layer:
            name = gguf.TENSOR_NAMES[kind].format(bid=i)
            planned.append(_planned(name, f"{pre}{src}.weight", part, shape, quant))
    _check_sources(planned, weights, geo)
    return planned


def _dense_tensors(geo: GgufShape) -> list[tuple[gguf.MODEL_TENSOR, str, str, tuple[int, ...]]]:
    t, h = gguf.MODEL_TENSOR, geo.hidden
    return [
        (t.FFN_GATE, "mlp.gate_proj", "all", (geo.intermediate, h)),
        (t.FFN_UP, "mlp.up_proj", "all", (geo.intermediate, h)),
        (t.FFN_DOWN, "mlp.down_proj", "all", (h, geo.intermediate)),
    ]


def _expert_tensors(geo: GgufShape) -> list[tuple[gguf.MODEL_TENSOR, str, str, tuple[int, ...]]]:
    """A MoE layer (DeepSeek-V2): the router, the stacked experts, the shared expert."""
    t, h, e = gguf.MODEL_TENSOR, geo.hidden, geo.experts
    assert e is not None
    shared = e.width * e.shared
    return [
        (t.FFN_GATE_INP, "mlp.gate", "all", (e.count, h)),
        (t.FFN_GATE_EXP, "mlp.experts", "stack:gate_proj", (e.count, e.width, h)),
        (t.FFN_UP_EXP, "mlp.experts", "stack:up_proj", (e.count, e.width, h)),
        (t.FFN_DOWN_EXP, "mlp.experts", "stack:down_proj", (e.count, h, e.width)),
        (t.FFN_GATE_SHEXP, "mlp.shared_experts.gate_proj", "all", (shared, h)),
        (t.FFN_UP_SHEXP, "mlp.shared_experts.up_proj", "all", (shared, h)),
        (t.FFN_DOWN_SHEXP, "mlp.shared_experts.down_proj", "all", (h, shared)),
    ]


def _members(p: Planned, count: int) -> list[str]:
    """The checkpoint tensors one GGUF tensor is made of."""
    if p.part.startswith("stack:"):
        base = p.source.removesuffix(".weight")
        return [f"{base}.{j}.{p.part[6:]}.weight" for j in range(count)]
    return [p.source]


def _planned(base: str, source: str, part: str, shape: tuple[int, ...], quant: str) -> Planned:
    """The storage type: 1-D tensors stay float32 (llama.cpp's CPU ops multiply by f32 norms only), and
    q8_0 is used only for matrices whose rows fill whole blocks, never for kv_a."""
    kind = quant
    if len(shape) < 2:
        kind = "f32"
    elif quant == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if base.endswith(KV_A) or shape[-1] % block:
            kind = "f32"
    return Planned(f"{base}.weight", source, part, shape, kind)


def _check_sources(planned: list[Planned], weights: Weights, geo: GgufShape) -> None:
    """Every tensor is there with the shape the config implies, and nothing is left over."""
    count = geo.experts.count if geo.experts else 0
    used: set[str] = set()
    for p in planned:
        for member in _members(p, count):
            if member not in weights:
                raise ConversionError(f"--gguf: the checkpoint lacks {member}; to resolve, convert it again")
            want = p.shape[1:] if p.part.startswith("stack:") else p.shape
            if p.part in ("k_b", "v_b"):
                want = (geo.heads * (geo.nope + geo.v_dim), geo.rank)
            if weights.shape(member) != want:
                raise ConversionError(
                    f"--gguf: {member} has shape {list(weights.shape(member))}, the config implies {list(want)}"
                )
            used.add(member)
    extra = sorted(k for k in weights.where if k not in used and k != "lm_head.weight")
    if extra:
        raise ConversionError(f"--gguf: the checkpoint has tensors llama.cpp would not load: {', '.join(extra[:4])}")


def tensor_data(weights: Weights, p: Planned, geo: GgufShape) -> np.ndarray:
    """The float32 values of one GGUF tensor, in its numpy layout."""
    if p.part.startswith("stack:"):
        assert geo.experts is not None
        members = _members(p, geo.experts.count)
        return np.stack([weights.get(m).numpy() for m in members])  # one layer's experts of one projection
    w = weights.get(p.source)
    if p.part == "all":
        return w.numpy()
    kv_b = w.view(geo.heads, geo.nope + geo.v_dim, geo.rank)  # per head: no-rope key rows, then value rows
    if p.part == "k_b":
        return kv_b[:, : geo.nope].transpose(1, 2).contiguous().numpy()  # [heads, rank, nope]
    return kv_b[:, geo.nope :].contiguous().numpy()  # [heads, v, rank]


def encode(data: np.ndarray, kind: str) -> np.ndarray:
    """The bytes to store (float32 as is; bf16 and q8_0 through gguf's quantizer)."""
    if kind == "f32":
        return np.ascontiguousarray(data, dtype=np.float32)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype(kind))


def qtype(kind: str) -> gguf.GGMLQuantizationType:
    """The ggml type a storage kind is written as."""
    q = gguf.GGMLQuantizationType
    return {"f32": q.F32, "bf16": q.BF16, "q8_0": q.Q8_0}[kind]


def nbytes(p: Planned) -> int:
    """The bytes one tensor takes in the file: the header announces them before any data is streamed."""
    if p.kind == "f32":
        return 4 * int(np.prod(p.shape))
    return int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, qtype(p.kind))))


def check_latent_rows(name: str, source: np.ndarray, stored: np.ndarray, kind: str, rank: int) -> None:
    """The written kv_a must keep every non-zero latent row non-zero; a zeroed latent silences attention."""
    back = source if kind == "f32" else gguf.quants.dequantize(stored, qtype(kind))
    alive = np.abs(source[:rank]).max(axis=1) > 0
    lost = int((alive & (np.abs(back[:rank]).max(axis=1) == 0)).sum())
    if lost:
        raise ConversionError(
            f"--gguf {kind}: {lost} of {rank} latent rows of {name} would be stored as zeros; "
            "to resolve, write f32 or bf16"
        )


def encoded(planned: list[Planned], weights: Weights, geo: GgufShape) -> Iterator[np.ndarray]:
    """Each tensor's stored bytes, in plan order; kv_a is checked for surviving latent rows."""
    for p in planned:
        values = tensor_data(weights, p, geo)
        data = encode(values, p.kind)
        if p.name.endswith(f"{KV_A}.weight"):
            check_latent_rows(p.name, values, data, p.kind, geo.rank)
        yield data
