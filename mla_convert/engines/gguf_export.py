"""Write a converted checkpoint as one GGUF file that stock llama.cpp runs (architecture `deepseek2`).

llama.cpp's own convert_hf_to_gguf.py cannot be pointed at our checkpoints: it writes expert keys for
the dense model (expert_count 1, expert_group_count 1), and llama.cpp then aborts on
GGML_ASSERT(n_expert_groups < n_expert) (measured with llama-cpp-python 0.3.36). Nor can its f16 or q8_0
outputs keep the latent rows of `kv_a_proj_with_mqa` alive. Those rows are ~1e-8 by design (the latent
RMSNorm runs in its epsilon regime, where it is linear; see mla/latent_norm.py) beside rotary rows ~1e6
times larger, so f16, and the f16 block scales of every llama.cpp quant type, round them to zero and the
model loses its attention. Here every type keeps them: f32 and bf16 (float32's exponent range) do so
natively, and q8_0 keeps that one tensor, and the norms, in float32.

A MoE checkpoint's experts are stacked per layer into llama.cpp's `ffn_{gate,up,down}_exps`, with its
routing written out (gating function, renormalization, one expert group, so `n_expert_groups < n_expert`
holds) and the shared expert (ours is zeros: the sources have none, and every engine needs one). MoE
checkpoints are DeepSeek-V2 (softmax, never renormalized), the only MoE form mla-convert writes.

The GGUF is the MLA-absorbed layout llama.cpp runs: `kv_b_proj` is split into per-head `attn_k_b`
(transposed) and `attn_v_b`, and attention runs as MQA over the latent (head_count_kv 1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConversionError

GGUF_TYPES = ("f32", "bf16", "q8_0")
KV_A = "attn_kv_a_mqa"
QUANTIZE_HINT = (
    "re-quantizing this GGUF with llama.cpp's tools must keep attn_kv_a_mqa at f32 or bf16 (its latent rows are "
    "~1e-8, which f16 and every quant type's f16 block scales round to zero): start from the f32 or bf16 GGUF "
    "and run `llama-quantize --tensor-type attn_kv_a_mqa=f32 IN.gguf OUT.gguf TYPE` with a quantized TYPE "
    "(Q8_0, Q4_K_M, ...); never convert to F16, where llama-quantize ignores --tensor-type"
)

# Pre-tokenizer regexes as Hugging Face tokenizer.json files write them (llama.cpp's src/llama-vocab.cpp
# quotes the same strings as the "original regex from tokenizer.json" of its llama3 and qwen2 types).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def _gguf() -> Any:
    """The gguf package, imported on use: only this stage needs it."""
    import gguf

    return gguf


# --------------------------------------------------------------------------------------------------
# The checkpoint's geometry


@dataclass(frozen=True)
class Experts:
    """A MoE checkpoint's routing, as llama.cpp's deepseek2 graph computes it."""

    count: int
    used: int
    width: int
    dense_layers: int
    shared: int  # shared experts (n_shared_experts)
    scale: float  # routed_scaling_factor


@dataclass(frozen=True)
class Geometry:
    """What llama.cpp's deepseek2 loader needs to know, read from config.json and checked."""

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
    experts: Experts | None = None

    def is_moe(self, i: int) -> bool:
        return self.experts is not None and i >= self.experts.dense_layers


def read_geometry(checkpoint: Path) -> Geometry:
    """config.json as llama.cpp will see it; anything llama.cpp would run differently is refused here."""
    path = checkpoint / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"--gguf: {checkpoint} has no config.json; to resolve, point it at a converted checkpoint"
        )
    config = json.loads(path.read_text())
    _check_architecture(config)
    return Geometry(
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


def _experts(config: dict[str, Any]) -> Experts | None:
    """The routing of a checkpoint with MoE layers (None when every layer is dense)."""
    layers, dense = int(config["num_hidden_layers"]), int(config.get("first_k_dense_replace", 0))
    if dense >= layers:
        return None
    return Experts(
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


# --------------------------------------------------------------------------------------------------
# Weights


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


def plan_tensors(weights: Weights, geo: Geometry, quant: str) -> list[Planned]:
    """Every tensor llama.cpp's deepseek2 loader creates, with the shapes its create_tensor calls expect."""
    gguf = _gguf()
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
            *(_expert_tensors(geo) if geo.is_moe(i) else _dense_tensors(geo)),
        ]
        for kind, src, part, shape in layer:
            name = gguf.TENSOR_NAMES[kind].format(bid=i)
            planned.append(_planned(name, f"{pre}{src}.weight", part, shape, quant))
    _check_sources(planned, weights, geo)
    return planned


def _dense_tensors(geo: Geometry) -> list[tuple[Any, str, str, tuple[int, ...]]]:
    t, h = _gguf().MODEL_TENSOR, geo.hidden
    return [
        (t.FFN_GATE, "mlp.gate_proj", "all", (geo.intermediate, h)),
        (t.FFN_UP, "mlp.up_proj", "all", (geo.intermediate, h)),
        (t.FFN_DOWN, "mlp.down_proj", "all", (h, geo.intermediate)),
    ]


def _expert_tensors(geo: Geometry) -> list[tuple[Any, str, str, tuple[int, ...]]]:
    """A MoE layer (DeepSeek-V2): the router, the stacked experts, the shared expert."""
    t, h, e = _gguf().MODEL_TENSOR, geo.hidden, geo.experts
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
        block = _gguf().GGML_QUANT_SIZES[_gguf().GGMLQuantizationType.Q8_0][0]
        if base.endswith(KV_A) or shape[-1] % block:
            kind = "f32"
    return Planned(f"{base}.weight", source, part, shape, kind)


def _check_sources(planned: list[Planned], weights: Weights, geo: Geometry) -> None:
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


def tensor_data(weights: Weights, p: Planned, geo: Geometry) -> np.ndarray:
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
    return _gguf().quants.quantize(np.ascontiguousarray(data, dtype=np.float32), _qtype(kind))


def _qtype(kind: str) -> Any:
    q = _gguf().GGMLQuantizationType
    return {"f32": q.F32, "bf16": q.BF16, "q8_0": q.Q8_0}[kind]


def _nbytes(p: Planned) -> int:
    gguf = _gguf()
    if p.kind == "f32":
        return 4 * int(np.prod(p.shape))
    return int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, _qtype(p.kind))))


def check_latent_rows(name: str, source: np.ndarray, stored: np.ndarray, kind: str, rank: int) -> None:
    """The written kv_a must keep every non-zero latent row non-zero; a zeroed latent silences attention."""
    back = source if kind == "f32" else _gguf().quants.dequantize(stored, _qtype(kind))
    alive = np.abs(source[:rank]).max(axis=1) > 0
    lost = int((alive & (np.abs(back[:rank]).max(axis=1) == 0)).sum())
    if lost:
        raise ConversionError(
            f"--gguf {kind}: {lost} of {rank} latent rows of {name} would be stored as zeros; "
            "to resolve, write f32 or bf16"
        )


# --------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class Field:
    """One metadata key with its exact GGUF type (sub_type for arrays)."""

    key: str
    value: Any
    vtype: Any
    sub_type: Any = None


@dataclass
class Vocab:
    """The tokenizer metadata to write, complete and checked before the file is opened."""

    fields: list[Field] = field(default_factory=list)
    source: str = ""

    def apply(self, writer: Any) -> None:
        for f in self.fields:
            writer.add_key_value(f.key, f.value, f.vtype, sub_type=f.sub_type)


def vocab_from_gguf(path: Path, n_vocab: int) -> Vocab:
    """Every tokenizer key of the source GGUF, copied with its type: llama.cpp tokenizes as it did there."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ConversionError(
            f"--gguf: cannot read the tokenizer of {path} ({exc}); to resolve, pass the source .gguf"
        ) from exc
    fields = []
    for key, f in reader.fields.items():
        if key.startswith(("tokenizer.ggml.", "tokenizer.chat_template")):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            fields.append(Field(key, f.contents(), f.types[0], sub))
    vocab = Vocab(fields, source=f"copied from {path.name}")
    if not any(f.key == gguf.Keys.Tokenizer.LIST for f in fields):
        raise ConversionError(f"--gguf: {path} has no tokenizer; to resolve, write the GGUF from the tokenizer files")
    _pad_copied(vocab, n_vocab)
    return vocab


def _pad_copied(vocab: Vocab, n_vocab: int) -> None:
    """Fill the token arrays up to the embedding rows with unused tokens (HF models often have spare rows)."""
    gguf = _gguf()
    by_key = {f.key: f for f in vocab.fields}
    tokens = by_key[gguf.Keys.Tokenizer.LIST].value
    _check_size(len(tokens), n_vocab)
    pad = range(len(tokens), n_vocab)
    tokens.extend(f"[PAD{i}]" for i in pad)
    if (types := by_key.get(gguf.Keys.Tokenizer.TOKEN_TYPE)) is not None:
        types.value.extend(int(gguf.TokenType.UNUSED) for _ in pad)
    if (scores := by_key.get(gguf.Keys.Tokenizer.SCORES)) is not None:
        scores.value.extend(-1000.0 for _ in pad)


def _check_size(n_tokens: int, n_vocab: int) -> None:
    if n_tokens > n_vocab:
        raise ConversionError(
            f"--gguf: the tokenizer has {n_tokens} tokens but the model only {n_vocab} embedding rows; "
            "to resolve, use the tokenizer the model was trained with"
        )


def vocab_from_files(checkpoint: Path, n_vocab: int) -> Vocab:
    """The tokenizer from the checkpoint's tokenizer.json: byte-level BPE ("gpt2") or SentencePiece-style BPE."""
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(
            f"--gguf needs a tokenizer, and {checkpoint} has no tokenizer.json; to resolve, convert from a model "
            "with its tokenizer files (or from a .gguf, whose tokenizer is copied)"
        )
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(
            f"--gguf does not support {model.get('type')} tokenizers (only BPE); to resolve, convert from a .gguf "
            "of this model, whose tokenizer is copied as is"
        )
    if model.get("byte_fallback", False):
        return _spm_vocab(checkpoint, tok, n_vocab)
    return _bpe_vocab(checkpoint, tok, n_vocab)


def _bpe_vocab(checkpoint: Path, tok: dict[str, Any], n_vocab: int) -> Vocab:
    """Byte-level BPE: llama.cpp's "gpt2" model with a pre-tokenizer it knows by name."""
    gguf = _gguf()
    pre = identify_pre_tokenizer(tok)
    tokens, types = _tokens_and_types(tok, n_vocab)
    fields = _token_fields("gpt2", pre, tokens, types, None)
    fields += _special_fields(checkpoint, n_vocab, merges=True)
    fields.append(Field(gguf.Keys.Tokenizer.ADD_PREFIX, False, gguf.GGUFValueType.BOOL))
    return Vocab(fields, source=f"tokenizer.json (gpt2 BPE, pre-tokenizer {pre})")


def identify_pre_tokenizer(tok: dict[str, Any]) -> str:
    """llama.cpp's name for this tokenizer.json's pre-tokenizer (it splits text by name, not by regex)."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    normalizer = (tok.get("normalizer") or {}).get("type")
    decoder = (tok.get("decoder") or {}).get("type")
    name = _name_of(steps) if decoder == "ByteLevel" else None
    allowed = (None, "NFC") if name == "qwen2" else (None,)  # Qwen2 declares NFC; llama.cpp's qwen2 skips it
    if name is None or normalizer not in allowed:
        raise ConversionError(
            f"--gguf does not recognise this tokenizer's pre-tokenizer ({_describe(steps)}, normalizer "
            f"{normalizer}); llama.cpp selects its text splitting by name, so a guess would tokenize differently; "
            "to resolve, convert from a .gguf of this model (its tokenizer is copied as is)"
        )
    return name


def _name_of(steps: list[dict[str, Any]]) -> str | None:
    """Match the pre-tokenizer steps against the forms llama.cpp implements (src/llama-vocab.cpp)."""
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space", False) for s in steps):
        return None
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex alone
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # every digit alone, then GPT-2's regex (SmolLM, SmolLM2, StarCoder-style)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        if split.get("behavior") != "Isolated" or split.get("invert", False):
            return None
        regex = (split.get("pattern") or {}).get("Regex")
        return {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}.get(regex)
    return None


def _describe(steps: list[dict[str, Any]]) -> str:
    return " + ".join(str(s.get("type")) for s in steps) or "none"


def _tokens_and_types(tok: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id (byte-level text as tokenizer.json holds it) and llama.cpp token types."""
    gguf = _gguf()
    tt = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (text, int(tt.NORMAL)) for text, i in tok["model"]["vocab"].items()}
    for added in tok.get("added_tokens", []):
        by_id[int(added["id"])] = (added["content"], int(tt.CONTROL if added.get("special") else tt.USER_DEFINED))
    _check_size(max(by_id) + 1, n_vocab)
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", int(tt.UNUSED)))
        tokens.append(text)
        types.append(kind)
    return tokens, types


def _token_fields(model: str, pre: str, tokens: list[str], types: list[int], scores: list[float] | None) -> list[Field]:
    gguf = _gguf()
    k, v = gguf.Keys.Tokenizer, gguf.GGUFValueType
    fields = [
        Field(k.MODEL, model, v.STRING),
        Field(k.PRE, pre, v.STRING),
        Field(k.LIST, tokens, v.ARRAY, v.STRING),
        Field(k.TOKEN_TYPE, types, v.ARRAY, v.INT32),
    ]
    if scores is not None:
        fields.append(Field(k.SCORES, scores, v.ARRAY, v.FLOAT32))
    return fields


def _special_fields(checkpoint: Path, n_vocab: int, merges: bool) -> list[Field]:
    """Merges, special token ids, add_bos/add_eos and the chat template, read by gguf's SpecialVocab."""
    gguf = _gguf()
    k, v = gguf.Keys.Tokenizer, gguf.GGUFValueType
    special = gguf.SpecialVocab(checkpoint, load_merges=merges, n_vocab=n_vocab)
    fields = []
    if merges:
        if not special.merges:
            raise ConversionError("--gguf: tokenizer.json has no BPE merges; to resolve, save the tokenizer again")
        fields.append(Field(k.MERGES, list(special.merges), v.ARRAY, v.STRING))
    ids = {"bos": k.BOS_ID, "eos": k.EOS_ID, "unk": k.UNK_ID, "sep": k.SEP_ID, "pad": k.PAD_ID}
    ids |= {"mask": k.MASK_ID, "eot": k.EOT_ID, "eom": k.EOM_ID}
    fields += [Field(ids[t], int(i), v.UINT32) for t, i in special.special_token_ids.items() if t in ids]
    # What transformers adds is what llama.cpp must add: unset means the tokenizer adds nothing.
    adds = {"bos": False, "eos": False} | special.add_special_token
    keys = {"bos": k.ADD_BOS, "eos": k.ADD_EOS, "sep": k.ADD_SEP}
    fields += [Field(keys[t], bool(on), v.BOOL) for t, on in adds.items() if t in keys]
    if isinstance(special.chat_template, str):
        fields.append(Field(k.CHAT_TEMPLATE, special.chat_template, v.STRING))
    return fields


def _spm_vocab(checkpoint: Path, tok: dict[str, Any], n_vocab: int) -> Vocab:
    """SentencePiece-style BPE with byte fallback (Llama-2, Mistral): llama.cpp's "llama" model.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest, so each
    token's score is minus the rank of the first merge that makes it: the order tokenizer.json merges in.
    """
    gguf = _gguf()
    tt = gguf.TokenType
    prefix = _spm_prefix(tok)
    tokens, types = _tokens_and_types(tok, n_vocab)
    unk = _unk_text(checkpoint, tok)
    for i, text in enumerate(tokens):
        if text == unk:
            types[i] = int(tt.UNKNOWN)
        elif types[i] == tt.NORMAL and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = int(tt.BYTE)
    scores = _merge_scores(tok, tokens)
    fields = _token_fields("llama", "default", tokens, types, scores)
    fields += _special_fields(checkpoint, n_vocab, merges=False)
    fields.append(Field(gguf.Keys.Tokenizer.ADD_PREFIX, prefix, gguf.GGUFValueType.BOOL))
    return Vocab(fields, source="tokenizer.json (SentencePiece-style BPE with byte fallback)")


def _unk_text(checkpoint: Path, tok: dict[str, Any]) -> str | None:
    """The unknown token: tokenizer.json's model names it, or else tokenizer_config.json does."""
    config = checkpoint / "tokenizer_config.json"
    unk = json.loads(config.read_text()).get("unk_token") if config.is_file() else None
    unk = unk.get("content") if isinstance(unk, dict) else unk
    return tok["model"].get("unk_token") or unk


def _spm_prefix(tok: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text; anything other than the two usual forms is refused."""
    pre = tok.get("pre_tokenizer") or {}
    norm = tok.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and not norm:
        return pre.get("prepend_scheme", "always") != "never"
    norm_steps = [s.get("type") for s in norm.get("normalizers", [])]
    if not pre and norm_steps in (["Prepend", "Replace"], ["Replace"]):
        return norm_steps[0] == "Prepend"
    raise ConversionError(
        "--gguf does not recognise this tokenizer's pre-tokenizer (a byte-fallback BPE with "
        f"{pre.get('type')} / {norm.get('type')}); to resolve, convert from a .gguf of this model "
        "(its tokenizer is copied as is)"
    )


def _merge_scores(tok: dict[str, Any], tokens: list[str]) -> list[float]:
    """Score = minus the rank of the first merge producing the token; tokens no merge makes score 0."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(tok["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def read_vocab(checkpoint: Path, n_vocab: int, tokenizer_gguf: Path | None) -> Vocab:
    """A source .gguf's own tokenizer when there is one (exactly what llama.cpp ran), else the HF files."""
    if tokenizer_gguf is not None:
        return vocab_from_gguf(tokenizer_gguf, n_vocab)
    return vocab_from_files(checkpoint, n_vocab)


# --------------------------------------------------------------------------------------------------
# The file


def write_gguf(
    checkpoint: Path,
    out_file: Path,
    *,
    quant: str = "f32",
    tokenizer_gguf: Path | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Write `checkpoint` as one GGUF at `out_file` (atomically); returns the summary for the report.

    `general.name` is `name`, else the checkpoint folder's (the job passes MODEL_OUT's: it writes from a
    staging folder whose name is no one's business). Everything that could refuse (type, config, weights,
    tokenizer) is checked before a byte is written.
    """
    checkpoint, out_file = Path(checkpoint), Path(out_file)
    _check_quant(quant)
    geo = read_geometry(checkpoint)
    if name:
        geo = replace(geo, name=name)
    weights = Weights(checkpoint)
    planned = plan_tensors(weights, geo, quant)
    vocab = read_vocab(checkpoint, geo.vocab, tokenizer_gguf)
    partial = out_file.with_name(f".{out_file.name}.partial-{os.getpid()}")
    try:
        _write(partial, geo, vocab, planned, weights, quant)
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    kept = [p.name for p in planned if p.kind == "f32"] if quant != "f32" else []
    return {
        "file": out_file.name,
        "type": quant,
        "bytes": out_file.stat().st_size,
        "kept_float32": kept,
        "tokenizer": vocab.source,
        "warnings": [QUANTIZE_HINT],
    }


def _check_quant(quant: str) -> None:
    if quant == "f16":
        raise ConversionError(
            "--gguf f16 would round the latent rows of attn_kv_a_mqa (~1e-8) to zero and destroy the model; "
            "to resolve, use --gguf bf16 (same size, float32's range) or f32"
        )
    if quant not in GGUF_TYPES:
        raise ConversionError(f"--gguf {quant} is not supported; to resolve, choose one of {', '.join(GGUF_TYPES)}")


def _write(path: Path, geo: Geometry, vocab: Vocab, planned: list[Planned], weights: Weights, quant: str) -> None:
    gguf = _gguf()
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
    try:
        _add_hparams(writer, geo, quant)
        vocab.apply(writer)
        for p in planned:
            stored = np.dtype(np.float32) if p.kind == "f32" else np.dtype(np.uint8)
            shape = p.shape if p.kind == "f32" else gguf.quant_shape_to_byte_shape(p.shape, _qtype(p.kind))
            writer.add_tensor_info(p.name, shape, stored, _nbytes(p), raw_dtype=_qtype(p.kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _encoded(planned, weights, geo):
            writer.write_tensor_data(data)
    finally:
        writer.close()


def _encoded(planned: list[Planned], weights: Weights, geo: Geometry) -> Iterator[np.ndarray]:
    """Each tensor's stored bytes, in plan order; kv_a is checked for surviving latent rows."""
    for p in planned:
        values = tensor_data(weights, p, geo)
        data = encode(values, p.kind)
        if p.name.endswith(f"{KV_A}.weight"):
            check_latent_rows(p.name, values, data, p.kind, geo.rank)
        yield data


def _add_expert_hparams(writer: Any, geo: Geometry) -> None:
    """Dense: no expert keys (n_expert 0). MoE: the routing, with one expert group (llama.cpp asserts
    n_expert_groups < n_expert)."""
    e = geo.experts
    if e is None:
        writer.add_leading_dense_block_count(geo.layers)
        writer.add_expert_feed_forward_length(geo.intermediate)  # required by the loader even when dense
        writer.add_expert_shared_count(0)
        return
    gating = _gguf().ExpertGatingFuncType
    writer.add_leading_dense_block_count(e.dense_layers)
    writer.add_expert_feed_forward_length(e.width)
    writer.add_expert_count(e.count)
    writer.add_expert_used_count(e.used)
    writer.add_expert_shared_count(e.shared)
    writer.add_expert_weights_scale(e.scale)
    writer.add_expert_weights_norm(False)  # DeepSeek-V2 never renormalizes its top k
    writer.add_expert_gating_func(gating.SOFTMAX)
    writer.add_expert_group_count(1)
    writer.add_expert_group_used_count(1)


def _add_hparams(writer: Any, geo: Geometry, quant: str) -> None:
    """The deepseek2 keys llama.cpp reads for a q-LoRA-free MLA model."""
    gguf = _gguf()
    writer.add_name(geo.name)
    ftype = gguf.LlamaFileType
    writer.add_file_type({"f32": ftype.ALL_F32, "bf16": ftype.MOSTLY_BF16, "q8_0": ftype.MOSTLY_Q8_0}[quant])
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(geo.context)
    writer.add_embedding_length(geo.hidden)
    writer.add_feed_forward_length(geo.intermediate)
    writer.add_block_count(geo.layers)
    writer.add_vocab_size(geo.vocab)
    writer.add_head_count(geo.heads)
    writer.add_head_count_kv(1)  # absorbed MLA runs as MQA over the latent
    writer.add_layer_norm_rms_eps(geo.eps)
    writer.add_rope_freq_base(geo.theta)
    writer.add_rope_dimension_count(geo.rope)
    _add_expert_hparams(writer, geo)
    writer.add_q_lora_rank(0)  # 0: attn_q is a plain projection
    writer.add_kv_lora_rank(geo.rank)
    writer.add_key_length(geo.rank + geo.rope)
    writer.add_value_length(geo.rank)
    writer.add_key_length_mla(geo.nope + geo.rope)
    writer.add_value_length_mla(geo.v_dim)
