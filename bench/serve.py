"""What serving buys, measured in real engines: KV-cache capacity and decode speed, source vs conversion.

    python bench/serve.py [--layers 2] [--contexts 2048 8192] [--batch 8] [--new-tokens 32]
                          [--kv-cache-gib 4] [--engines vllm llama.cpp]

The source is a synthetic Llama-3.2-3B-shaped checkpoint (random bfloat16 weights): hidden 3072, 24 query
heads, 8 KV heads x head_dim 128 (2048 cache elements per token per layer), MLP 8192, only `--layers`
decoder layers (2 by default: the per-layer figures do not depend on the depth) and SmolLM2's tokenizer
and vocabulary (49152; llama.cpp needs a real one). Its conversion is `--engine vllm --method svd`
(latent 512 + rotary 64 = 576 elements, 0.28x), data-free: speed and capacity depend on the shapes only.

- vLLM (the CPU build from engines/runtime.py, or a GPU vLLM with --device cuda): the KV-cache capacity in
  tokens that vLLM allocates for the same `--kv-cache-gib`, the time to prefill `--batch` prompts of each
  context (in chunks of `--prefill-chunk` tokens), and the decode throughput of those `--batch`
  concurrent sequences: the prompts are then in vLLM's prefix cache, and the time for `--new-tokens`
  tokens minus the time for one is that many decode steps.
- llama.cpp (llama-cpp-python built from source, engines/runtime.py): the KV-cache bytes per token from
  its own log, and single-sequence decode speed at each context; the source is written as a Llama GGUF by
  this script, the conversion by `mla-convert --gguf bf16`.

An engine that is not installed is installed into the cache first (engines/runtime.py); one that fails is
reported as failed, never skipped silently. Writes a markdown table and bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, str(Path(__file__).parent))
from assets import CACHE, smollm2_dir, smollm2_gguf
from machine import machine

from mla_convert.engines import runtime

RESULTS = Path(__file__).parent / "results" / "serve.json"
SHAPE = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    tie_word_embeddings=True,
)


def synthetic_source(layers: int, max_positions: int) -> Path:
    """A Llama-3.2-3B-shaped checkpoint with random bfloat16 weights and SmolLM2's tokenizer (cached)."""
    target = CACHE / "bench" / "serve" / f"llama3b-shaped-{layers}l-{max_positions}"
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    config = LlamaConfig(
        **SHAPE,
        num_hidden_layers=layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def convert(source: Path) -> Path:
    """The --engine vllm conversion with a bf16 GGUF beside it (cached)."""
    target = source.parent / f"{source.name}-mla"
    if not (target / "mla_report.json").is_file():
        flags = ["--engine", "vllm", "--method", "svd", "--finetune-steps", "0", "--no-validate", "--no-verify"]
        cmd = [sys.executable, "-m", "mla_convert.cli", str(source), str(target), *flags, "--gguf", "bf16", "--force"]
        subprocess.run(cmd, check=True)
    return target


def llama_gguf(source: Path, quant: str = "bf16", target: Path | None = None) -> Path:
    """The source as a Llama GGUF (bf16, f32 or q8_0 matrices; llama.cpp's own layout: q/k rows permuted to
    its rope pairs), beside the source unless `target` is given."""
    import gguf

    target = target or source / f"source-{quant}.gguf"
    if target.is_file():
        return target
    from safetensors.torch import load_file

    config = json.loads((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    writer = gguf.GGUFWriter(str(target), "llama")
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    _copy_tokenizer_metadata(writer)

    def permute(w: torch.Tensor, n: int) -> torch.Tensor:  # HF half-split pairs -> llama.cpp's adjacent pairs
        return w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    names = {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    names |= {"mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(quant)

    def add(name: str, t: torch.Tensor) -> None:  # norms in float32, matrices in `quant`
        data = t.float().numpy()
        if t.ndim == 1 or kind is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)

    add("token_embd.weight", tensors["model.embed_tokens.weight"])
    add("output_norm.weight", tensors["model.norm.weight"])
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_q.weight", permute(tensors[p + "self_attn.q_proj.weight"], heads))
        add(f"blk.{i}.attn_k.weight", permute(tensors[p + "self_attn.k_proj.weight"], kv_heads))
        add(f"blk.{i}.attn_v.weight", tensors[p + "self_attn.v_proj.weight"])
        for hf, ours in names.items():
            add(f"blk.{i}.{ours}.weight", tensors[p + hf + ".weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _copy_tokenizer_metadata(writer: Any) -> None:
    """SmolLM2's tokenizer keys from its GGUF (the synthetic model uses its tokenizer)."""
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf()))
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            value = field.contents()
            kind = field.types[0]
            if kind == gguf.GGUFValueType.ARRAY:
                writer.add_array(field.name, value)
            else:
                writer.add_key_value(field.name, value, kind)


def run_vllm(models: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    cases = [{"batch": args.batch, "context": c, "new_tokens": args.new_tokens} for c in args.contexts]
    runs = [
        {"model": str(path), "prompts": [], "max_tokens": 1, "dtype": "bfloat16", "throughput": cases,
         "max_model_len": max(args.contexts) + args.new_tokens, "max_num_batched_tokens": args.prefill_chunk}
        for path in models.values()
    ]  # fmt: skip
    started = time.monotonic()
    results = runtime.run_probe(runtime.VLLM, runs, timeout=6 * 3600, kv_cache_gib=args.kv_cache_gib)
    return {"seconds": time.monotonic() - started, "models": dict(zip(models, results, strict=True))}


def run_llama_cpp(models: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    cases = [{"context": c, "new_tokens": args.new_tokens} for c in args.contexts]
    n_ctx = max(args.contexts) + args.new_tokens
    runs = [{"model": str(p), "prompts": [], "throughput": cases, "n_ctx": n_ctx} for p in models.values()]
    started = time.monotonic()
    results = runtime.run_probe(runtime.LLAMA_CPP, runs, timeout=6 * 3600)
    return {"seconds": time.monotonic() - started, "models": dict(zip(models, results, strict=True))}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| engine | model | cache elements/token/layer | KV cache tokens (same space) | KV bytes/token | "
        "context x sequences | prefill s | decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, data in results["engines"].items():
        if "error" in data:
            lines.append(f"| {engine} | failed: {data['error']} | | | | | | |")
            continue
        for name, run in data["models"].items():
            if "error" in run:
                lines.append(f"| {engine} | {name}: failed: {run['error']} | | | | | | |")
                continue
            for case in run["throughput"]:
                lines.append(
                    f"| {engine} | {name} | {results['elements'][name]} | {run.get('kv_cache_tokens') or ''} | "
                    f"{run.get('kv_cache_bytes_per_token') or ''} | {case['context']} x {case.get('batch', 1)} | "
                    f"{case['prefill_seconds']:.1f} | {_speed(case['decode_tokens_per_second'])} |"
                )
    return "\n".join(lines)


def _speed(rate: float | None) -> str:
    """None: the backend re-prefilled instead of reusing the cached prompt, so decoding was not separable."""
    return "not separable" if rate is None else f"{rate:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    # vLLM prefills in chunks of this many tokens: one 8K prompt at once needs 24 x 8K x 8K float32 scores
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--engines", nargs="+", default=["vllm", "llama.cpp"], choices=["vllm", "llama.cpp"])
    args = parser.parse_args()

    source = synthetic_source(args.layers, max(args.contexts) + args.new_tokens)
    converted = convert(source)
    report = json.loads((converted / "mla_report.json").read_text())
    results: dict[str, Any] = {
        "settings": vars(args),
        "machine": machine(),
        "shape": {**SHAPE, "layers": args.layers},
        "elements": {
            "source": report["kv_cache"]["original_elements_per_token_per_layer"],
            "converted": report["kv_cache"]["converted_elements_per_token_per_layer"],
        },
        "engines": {},
    }
    for engine in args.engines:
        try:
            if engine == "vllm":
                results["engines"][engine] = run_vllm({"source": source, "converted": converted}, args)
            else:
                gguf_file = next(converted.glob("*.gguf"))
                results["engines"][engine] = run_llama_cpp({"source": llama_gguf(source), "converted": gguf_file}, args)
        except Exception as exc:  # an engine that fails is a result, never a silent skip
            results["engines"][engine] = {"error": f"{type(exc).__name__}: {str(exc).strip()[:2000]}"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
