"""Write a converted checkpoint as one GGUF file that stock llama.cpp runs (architecture `deepseek2`).

llama.cpp's own convert_hf_to_gguf.py cannot be pointed at our checkpoints: it writes expert keys for
the dense model (expert_count 1, expert_group_count 1), and llama.cpp then aborts on
GGML_ASSERT(n_expert_groups < n_expert) (measured with llama-cpp-python 0.3.36). Nor can its f16 or q8_0
outputs keep the latent rows of `kv_a_proj_with_mqa` alive (gguf_layout.py says why and how we do).

This module writes the file: the deepseek2 hyperparameters, a MoE checkpoint's routing written out (gating
function, renormalization, one expert group, so `n_expert_groups < n_expert` holds; MoE checkpoints are
DeepSeek-V2: softmax, never renormalized, the only MoE form mla-convert writes), the tokenizer
(gguf_vocab.py) and the tensors (gguf_layout.py), streamed one at a time.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ConversionError
from ..options import GGUF_TYPES
from .gguf_layout import GgufShape, Planned, Weights, encoded, nbytes, plan_tensors, qtype, read_shape
from .gguf_vocab import Vocab, read_vocab

QUANTIZE_HINT = (
    "re-quantizing this GGUF with llama.cpp's tools must keep attn_kv_a_mqa at f32 or bf16 (its latent rows are "
    "~1e-8, which f16 and every quant type's f16 block scales round to zero): start from the f32 or bf16 GGUF "
    "and run `llama-quantize --tensor-type attn_kv_a_mqa=f32 IN.gguf OUT.gguf TYPE` with a quantized TYPE "
    "(Q8_0, Q4_K_M, ...); never convert to F16, where llama-quantize ignores --tensor-type"
)


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
    geo = read_shape(checkpoint)
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


def _write(path: Path, geo: GgufShape, vocab: Vocab, planned: list[Planned], weights: Weights, quant: str) -> None:
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
    try:
        _add_hparams(writer, geo, quant)
        vocab.apply(writer)
        for p in planned:
            stored = np.dtype(np.float32) if p.kind == "f32" else np.dtype(np.uint8)
            shape = p.shape if p.kind == "f32" else gguf.quant_shape_to_byte_shape(p.shape, qtype(p.kind))
            writer.add_tensor_info(p.name, shape, stored, nbytes(p), raw_dtype=qtype(p.kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in encoded(planned, weights, geo):
            writer.write_tensor_data(data)
    finally:
        writer.close()


def _add_hparams(writer: gguf.GGUFWriter, geo: GgufShape, quant: str) -> None:
    """The deepseek2 keys llama.cpp reads for a q-LoRA-free MLA model."""
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


def _add_expert_hparams(writer: gguf.GGUFWriter, geo: GgufShape) -> None:
    """Dense: no expert keys (n_expert 0). MoE: the routing, with one expert group (llama.cpp asserts
    n_expert_groups < n_expert)."""
    e = geo.experts
    if e is None:
        writer.add_leading_dense_block_count(geo.layers)
        writer.add_expert_feed_forward_length(geo.intermediate)  # required by the loader even when dense
        writer.add_expert_shared_count(0)
        return
    gating = gguf.ExpertGatingFuncType
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
