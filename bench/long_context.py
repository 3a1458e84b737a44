"""Long context, source beside conversion: decode speed against context in llama.cpp, the settings that
decide it, and the longest context each fits in a fixed memory (issue 21).

    python bench/long_context.py profile     # llama.cpp decode at 2K and 8K under each setting
    python bench/long_context.py curve       # llama.cpp decode tok/s at 2K .. 256K, fastest settings
    python bench/long_context.py capacity    # largest n_ctx in --memory-gib; the 256K run
    python bench/long_context.py vllm        # vLLM: max_model_len in a fixed KV space; prefill cost
    python bench/long_context.py vllm-batch  # vLLM: the 3B source's prefill, 1 sequence against 8, 1 and 4 GiB
    python bench/long_context.py plot        # docs/long_context.png from the curve
    python bench/long_context.py tables      # the markdown tables of docs/results.md

Models (cached under ~/.cache/mla-convert/bench/long_context):
- SmolLM2-135M (30 layers, 9 query heads, 3 KV heads of 64: 384 cache elements per token per layer) and
  its conversions at `--kv-budget 0.5` and `0.25` (data-free: speed and capacity depend on the widths only);
- the synthetic Llama-3.2-3B shape of bench/serve.py (2 decoder layers, 24 query heads, 8 KV heads of
  128) and its `--engine vllm --method svd` conversion (latent 512 + rotary 64).
Every GGUF of a conversion is written by mla-convert's own writer; the sources are written as Llama GGUFs
by bench/serve.py in the same weight type.

Decoding at long contexts is timed on a cache filled by repeating the cache of a real 1024-token prefill
(the llama.cpp probe's "tile" fill, through llama.cpp's own state files): a decode step's cost depends on
how many cells are cached, not on what they hold, and prefilling 256K tokens would take hours on 2 cores.
Results go to bench/results/long_context.json, one section per command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import serve
from assets import CACHE, smollm2_dir
from machine import machine

from mla_convert.engines import runtime

RESULTS = Path(__file__).parent / "results" / "long_context.json"
PLOT = Path(__file__).parent.parent / "docs" / "long_context.png"
WORK = CACHE / "bench" / "long_context"
K = 1024
# llama-cpp-python's defaults (flash attention off, f16 cache, 2 threads) and one change at a time from the
# fastest default of llama.cpp's own tools (flash attention "auto": on for the CPU).
SETTINGS: dict[str, dict[str, Any]] = {
    "python default (fa off)": {"flash_attn": False},
    "fa on": {"flash_attn": True},
    "fa on, 1 thread": {"flash_attn": True, "n_threads": 1},
    "fa on, f32 weights": {"flash_attn": True, "weights": "f32"},
    "fa on, q8_0 weights": {"flash_attn": True, "weights": "q8_0"},
    "fa on, f32 cache": {"flash_attn": True, "type_k": "f32"},
    "fa on, bf16 cache": {"flash_attn": True, "type_k": "bf16"},
    "fa on, q8_0 cache": {"flash_attn": True, "type_k": "q8_0"},
    "fa on, q8_0 weights, q8_0 cache": {"flash_attn": True, "weights": "q8_0", "type_k": "q8_0"},
    "fa off, f32 weights": {"flash_attn": False, "weights": "f32"},
    "fa off, q8_0 weights": {"flash_attn": False, "weights": "q8_0"},
    "non-absorbed (attn_kv_b), fa on, f32 weights": {"flash_attn": True, "weights": "f32", "layout": "legacy"},
    "non-absorbed (attn_kv_b), fa off, f32 weights": {"flash_attn": False, "weights": "f32", "layout": "legacy"},
}


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def smollm2_converted(budget: float) -> Path:
    """SmolLM2 converted at `budget` by the CLI (cached): data-free, since speed and capacity depend on the
    widths only, which are those a calibrated run picks at these budgets (rope 64 + latent 128 at 0.5,
    rope 32 + latent 64 at 0.25)."""
    target = WORK / f"smollm2-mla-{budget}"
    if not (target / "mla_report.json").is_file():
        flags = ["--kv-budget", str(budget), "--method", "svd", "--finetune-steps", "0", "--no-validate"]
        _run([sys.executable, "-m", "mla_convert.cli", str(smollm2_dir()), str(target), *flags, "--force"])
    return target


def three_b() -> tuple[Path, Path]:
    """bench/serve.py's synthetic 3B shape (2 layers) and its conversion, room for 256K positions."""
    source = serve.synthetic_source(2, 256 * K + 512)
    return source, serve.convert(source)


def pairs(names: list[str]) -> dict[str, tuple[Path, Path]]:
    """Name -> (source dir, converted dir)."""
    table: dict[str, Any] = {
        "SmolLM2 0.5": lambda: (smollm2_dir(), smollm2_converted(0.5)),
        "SmolLM2 0.25": lambda: (smollm2_dir(), smollm2_converted(0.25)),
        "3B shape": three_b,
    }
    return {name: table[name]() for name in names}


def gguf_file(model: Path, converted: bool, weights: str = "bf16", layout: str = "absorbed") -> Path:
    """The model as a GGUF of `weights` (cached): mla-convert's writer for a conversion, serve.py's for a source."""
    WORK.mkdir(parents=True, exist_ok=True)
    if not converted:
        return serve.llama_gguf(model, weights, WORK / f"{model.name}-{weights}.gguf")
    target = WORK / f"{model.name}-{weights}.gguf"
    if not target.is_file():
        from mla_convert.engines.gguf_writer import write_gguf

        write_gguf(model, target, quant=weights)
    if layout == "legacy":
        return legacy_gguf(target)
    return target


def legacy_gguf(absorbed: Path) -> Path:
    """The same weights in DeepSeek's pre-absorption GGUF layout: one `attn_kv_b` per layer and per-head
    key/value lengths, no `*_mla` keys. llama.cpp then caches every head's decompressed K and V (the
    source's cache or more) and attends per head: the "non-absorbed" path, for the profile only."""
    import gguf
    import numpy as np

    target = absorbed.with_name(absorbed.stem + "-legacy.gguf")
    if target.is_file():
        return target
    reader = gguf.GGUFReader(str(absorbed))
    arch = reader.fields["general.architecture"].contents()
    fields = {f.name: f for f in reader.fields.values()}
    heads = int(fields[f"{arch}.attention.head_count"].contents())
    replaced = {
        f"{arch}.attention.key_length": fields[f"{arch}.attention.key_length_mla"].contents(),
        f"{arch}.attention.value_length": fields[f"{arch}.attention.value_length_mla"].contents(),
        f"{arch}.attention.head_count_kv": heads,
    }
    writer = gguf.GGUFWriter(str(target), arch)
    for name, field in fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name.endswith("_mla"):
            continue
        value = replaced.get(name, field.contents())
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, kind, sub_type=sub)
    tensors = {t.name: t for t in reader.tensors}
    for name, t in tensors.items():
        if name.endswith("attn_v_b.weight"):
            continue
        if name.endswith("attn_k_b.weight"):
            k_b = np.asarray(t.data, dtype=np.float32)  # [heads, rank, nope]
            v_b = np.asarray(tensors[name.replace("attn_k_b", "attn_v_b")].data, dtype=np.float32)  # [heads, v, rank]
            kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, k_b.shape[1])
            writer.add_tensor(name.replace("attn_k_b", "attn_kv_b"), np.ascontiguousarray(kv_b))
            continue
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"legacy layout is written from a float32 GGUF; {name} is {t.tensor_type.name}")
        writer.add_tensor(name, np.ascontiguousarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def probe(runs: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
    return runtime.run_probe(runtime.LLAMA_CPP, runs, timeout=4 * 3600, **options)


def run_spec(path: Path, setting: dict[str, Any], n_ctx: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("flash_attn", "type_k", "n_threads", "use_mmap", "n_batch")
    spec = {"model": str(path), "prompts": [], "n_ctx": n_ctx, "throughput": cases}
    return spec | {k: setting[k] for k in keys if k in setting}


def decode_runs(
    pair: tuple[Path, Path], setting: dict[str, Any], contexts: list[int], new_tokens: int
) -> dict[str, dict[str, Any]]:
    """Both models of a pair under one setting: tok/s at each context (tile fill), and llama.cpp's cache."""
    cases = [{"context": c, "new_tokens": new_tokens, "fill": "tile"} for c in contexts]
    out: dict[str, dict[str, Any]] = {}
    for role, model in zip(("source", "converted"), pair, strict=True):
        if setting.get("layout") == "legacy" and role == "source":
            continue  # the layout is the conversion's; its source row is the same as "fa on/off, f32 weights"
        path = gguf_file(model, role == "converted", setting.get("weights", "bf16"), setting.get("layout", "absorbed"))
        key = json.dumps([str(path), setting, contexts, new_tokens], sort_keys=True)
        if key not in _MEASURED:  # SmolLM2's source is measured once for both budgets
            [result] = probe([run_spec(path, setting, max(contexts) + new_tokens + 64, cases)])
            _MEASURED[key] = _summary(result)
        out[role] = _MEASURED[key]
    return out


_MEASURED: dict[str, dict[str, Any]] = {}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        return {"error": result["error"]}
    rows = {}
    for case in result["throughput"]:
        steps = sorted(case["decode_step_seconds"])
        rows[str(case["context"])] = {  # the median step: a few slow steps on a shared machine move the mean
            "tokens_per_second": 1 / steps[len(steps) // 2],
            "mean_tokens_per_second": case["decode_tokens_per_second"],
            "median_step_ms": 1000 * steps[len(steps) // 2],
        }
    return {"kv_cache_bytes_per_token": result["kv_cache_bytes_per_token"], "kv_cache_log": result["kv_cache_log"],
            "model_desc": result["model_desc"], "contexts": rows}  # fmt: skip


def split_time(rows: dict[str, Any], short: int, long: int) -> dict[str, float]:
    """Median step time = fixed + per-cached-token x context, solved from two contexts: where the time goes."""
    t_short, t_long = rows[str(short)]["median_step_ms"], rows[str(long)]["median_step_ms"]
    per_k = (t_long - t_short) / ((long - short) / K)
    return {"fixed_ms": t_short - per_k * short / K, "ms_per_1k_cached_tokens": per_k}


def profile(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"contexts": args.contexts, "new_tokens": args.new_tokens, "pairs": {}}
    for name, pair in pairs(args.pairs).items():
        out["pairs"][name] = {}
        for label, setting in SETTINGS.items():
            if args.only and label not in args.only:
                continue
            started = time.monotonic()
            result = decode_runs(pair, setting, args.contexts, args.new_tokens)
            for role in result.values():
                if "contexts" in role:
                    role["split"] = split_time(role["contexts"], min(args.contexts), max(args.contexts))
            out["pairs"][name][label] = result
            print(f"{name} | {label}: {_brief(result)} ({time.monotonic() - started:.0f} s)", flush=True)
    return out


def _brief(result: dict[str, Any]) -> str:
    parts = []
    for role, r in result.items():
        if "error" in r:
            parts.append(f"{role} failed: {r['error']}")
        else:
            speeds = ", ".join(f"{int(c) // K}K {v['tokens_per_second']:.1f}" for c, v in r["contexts"].items())
            parts.append(f"{role} {speeds} tok/s")
    return "; ".join(parts)


def curve(args: argparse.Namespace) -> dict[str, Any]:
    """tok/s against context for every pair, under each of `--settings` (one probe per model and setting)."""
    out: dict[str, Any] = {"contexts": args.contexts, "new_tokens": args.new_tokens, "pairs": {}}
    for name, pair in pairs(args.pairs).items():
        out["pairs"][name] = {}
        for label in args.settings:
            started = time.monotonic()
            result = decode_runs(pair, SETTINGS[label], args.contexts, args.new_tokens)
            out["pairs"][name][label] = result
            print(f"{name} | {label}: {_brief(result)} ({time.monotonic() - started:.0f} s)", flush=True)
    return out


def fits(path: Path, n_ctx: int, limit: int, setting: dict[str, Any], cases: list[dict[str, Any]] | None = None):
    """Whether llama.cpp allocates an `n_ctx` context (weights read into memory, no mmap) in `limit` bytes
    and decodes in it: a short prompt and one step unless `cases` say more. Logits are kept for 512
    positions (llama-cpp-python holds n_batch x n_vocab floats: 0.4 GB at its 2048 default for SmolLM2)."""
    cases = cases or [{"context": 64, "new_tokens": 1}]
    spec = run_spec(path, setting | {"use_mmap": False, "n_batch": 512}, n_ctx, cases)
    [result] = probe([spec], memory_limit_bytes=limit)
    return result


def largest_context(path: Path, limit: int, setting: dict[str, Any], step: int = 4 * K) -> tuple[int, int | None]:
    """Binary search, in `step`s, for the largest n_ctx llama.cpp allocates and decodes in within `limit`
    bytes (0: none), with the peak resident memory of that run."""
    low, high, peak = 0, 4 * K * K // step, None  # in steps: up to 4M tokens
    while low < high:
        mid = (low + high + 1) // 2
        result = fits(path, mid * step, limit, setting)
        if "error" in result:
            high = mid - 1
        else:
            low, peak = mid, result["peak_rss_bytes"]
    return low * step, peak


def capacity(args: argparse.Namespace) -> dict[str, Any]:
    """Largest n_ctx in a fixed memory for each model, and the 256K run: the conversion decodes at 256K in
    the memory where the source's 256K context cannot be allocated."""
    limit = int(args.memory_gib * 2**30)
    setting = SETTINGS[args.setting]
    out: dict[str, Any] = {"memory_bytes": limit, "setting": args.setting, "models": {}, "long_run": {}}
    smol = pairs(["SmolLM2 0.5", "SmolLM2 0.25"])
    models = {"SmolLM2 source": (smol["SmolLM2 0.5"][0], False)}
    models |= {f"{name} converted": (pair[1], True) for name, pair in smol.items()}
    for name, (model, converted) in models.items():
        path = gguf_file(model, converted, setting.get("weights", "bf16"))
        started = time.monotonic()
        n_ctx, peak = largest_context(path, limit, setting)
        out["models"][name] = {"largest_n_ctx": n_ctx, "peak_rss_bytes": peak, "gguf_bytes": path.stat().st_size}
        seconds = time.monotonic() - started
        print(f"{name}: largest n_ctx in {args.memory_gib} GiB: {n_ctx} ({seconds:.0f} s)", flush=True)
    n_ctx = args.long_context + args.new_tokens + 64
    cases = [{"context": args.long_context, "new_tokens": args.new_tokens, "fill": "tile"}]
    for name in ("SmolLM2 source", "SmolLM2 0.25 converted"):
        model, converted = models[name]
        result = fits(gguf_file(model, converted, setting.get("weights", "bf16")), n_ctx, limit, setting, cases)
        out["long_run"][name] = (
            result
            if "error" in result
            else {key: result[key] for key in ("n_ctx", "kv_cache_log", "peak_rss_bytes", "throughput")}
        )
        print(f"{name} at {args.long_context}: {out['long_run'][name]}", flush=True)
    return out


def vllm(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM-CPU: the largest max_model_len in a fixed KV space, and prefill time against a DeepSeek-shaped
    checkpoint that transformers writes from a config (nothing of ours): whose cost is the slow prefill?"""
    out: dict[str, Any] = {}
    source, converted = three_b()  # vLLM-CPU runs MLA caches of 320, 512 or 576 elements only: the 3B shape
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    runs = [
        {"model": str(source), "prompts": prompt, "max_tokens": 4, "dtype": "bfloat16", "max_model_len": 16 * K},
        {"model": str(source), "prompts": prompt, "max_tokens": 4, "dtype": "bfloat16",
         "max_model_len": args.long_context},
        {"model": str(converted), "prompts": prompt, "max_tokens": 4, "dtype": "bfloat16",
         "max_model_len": args.long_context},
    ]  # fmt: skip
    started = time.monotonic()
    results = runtime.run_probe(runtime.VLLM, runs, timeout=3 * 3600, kv_cache_gib=args.kv_cache_gib)
    out["capacity"] = {
        "kv_cache_gib": args.kv_cache_gib,
        "runs": [_vllm_brief(spec, r) for spec, r in zip(runs, results, strict=True)],
        "seconds": time.monotonic() - started,
    }
    print(json.dumps(out["capacity"], indent=1), flush=True)
    deepseek = deepseek_like(converted)
    lite_mla, lite_mha = v2_lite_shaped()
    cases = [{"batch": 1, "context": c, "new_tokens": 4} for c in args.prefill_contexts]
    models = {
        "3B source (Llama GQA)": source,
        "3B converted (mla-convert)": converted,
        "3B widths, DeepseekV3 written by transformers": deepseek,
        "DeepSeek-V2-Lite attention, written by transformers": lite_mla,
        "same width as MHA Llama, written by transformers": lite_mha,
    }
    runs = [
        {"model": str(p), "prompts": [], "max_tokens": 1, "dtype": "bfloat16", "throughput": cases,
         "max_model_len": max(args.prefill_contexts) + 16, "max_num_batched_tokens": args.prefill_chunk}
        for p in models.values()
    ]  # fmt: skip
    started = time.monotonic()
    results = runtime.run_probe(runtime.VLLM, runs, timeout=3 * 3600, kv_cache_gib=args.kv_cache_gib)
    out["prefill"] = {"models": dict(zip(models, results, strict=True)), "seconds": time.monotonic() - started}
    for name, r in out["prefill"]["models"].items():
        print(name, r.get("error") or [(c["context"], round(c["prefill_seconds"], 1)) for c in r["throughput"]])
    return out


def vllm_batch(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM-CPU prefill of the 3B source at one context, one sequence against `--batches`, in each KV space
    of `--kv-cache-gib`: does either explain why bench/serve.py's batch-8 prefill (4 GiB) was so much
    faster per prompt than `vllm`'s batch 1 (1 GiB)?"""
    source, _ = three_b()
    cases = [{"batch": b, "context": args.context, "new_tokens": 4} for b in args.batches]
    run = {"model": str(source), "prompts": [], "max_tokens": 1, "dtype": "bfloat16", "throughput": cases,
           "max_model_len": args.context + 16, "max_num_batched_tokens": args.prefill_chunk}  # fmt: skip
    started = time.monotonic()
    rows = []
    for gib in args.kv_cache_gib:
        (result,) = runtime.run_probe(runtime.VLLM, [run], timeout=3 * 3600, kv_cache_gib=gib)
        if "error" in result:
            raise SystemExit(f"vLLM refused the source: {result['error']}")
        for c in result["throughput"]:
            rows.append(
                {"kv_cache_gib": gib}
                | {k: c[k] for k in ("batch", "context", "prefill_seconds", "cached_prefill_seconds")}
                | {"prefill_seconds_per_sequence": c["prefill_seconds"] / c["batch"]}
            )
            print(rows[-1], flush=True)
    return {"model": source.name, "rows": rows, "seconds": time.monotonic() - started}


def _vllm_brief(spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    keep = ("error", "kv_cache_tokens", "attention_backend", "greedy")
    return {"model": Path(spec["model"]).name, "max_model_len": spec["max_model_len"]} | {
        k: result[k] for k in keep if k in result
    }


def deepseek_like(converted: Path) -> Path:
    """A DeepseekV3ForCausalLM with the conversion's exact widths and random weights, written by
    transformers' own save_pretrained from a config: nothing of mla-convert's touches it."""
    ours = json.loads((converted / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "max_position_embeddings", "bos_token_id", "eos_token_id")  # fmt: skip
    return _random_model("deepseek-v3-random-3b-widths", "deepseek_v3", {k: ours[k] for k in keep if k in ours})


def v2_lite_shaped() -> tuple[Path, Path]:
    """DeepSeek-V2-Lite's attention (hidden 2048, 16 heads, latent 512 + rotary 64, nope 128, v 128) with a
    dense MLP of its width, 2 layers, and a Llama of the same width with plain multi-head attention (16 KV
    heads of 128): the CPU backend's cost of MLA against MHA on DeepSeek's own shape, no conversion involved."""
    base = {"vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 10944, "num_hidden_layers": 2,
            "num_attention_heads": 16, "max_position_embeddings": 16 * K, "bos_token_id": 1,
            "eos_token_id": 2}  # fmt: skip
    mla = {"kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
    return (
        _random_model("deepseek-v2-lite-attention-2l", "deepseek_v3", base | mla),
        _random_model("llama-mha-v2-lite-width-2l", "llama", base | {"num_key_value_heads": 16, "head_dim": 128}),
    )


def _random_model(name: str, model_type: str, keys: dict[str, Any]) -> Path:
    """A model of `model_type` with random bfloat16 weights and SmolLM2's tokenizer, saved by transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = WORK / name
    if (target / "config.json").is_file():
        return target
    extra: dict[str, Any] = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    if model_type == "deepseek_v3":  # every layer dense, as the conversion's
        extra |= {
            "num_key_value_heads": keys["num_attention_heads"],
            "first_k_dense_replace": keys["num_hidden_layers"],
        }
    config = AutoConfig.for_model(model_type, **keys, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(target)
    AutoTokenizer.from_pretrained(str(smollm2_dir())).save_pretrained(target)
    return target


def plot(args: argparse.Namespace) -> None:
    """tok/s against context, source and conversion, one panel per model, from the curve section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(RESULTS.read_text())["curve"]
    names = list(data["pairs"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for label, result in data["pairs"][name].items():
            for role, style in (("source", "--"), ("converted", "-")):
                r = result.get(role, {})
                if "contexts" not in r:
                    continue
                xs = [int(c) for c in r["contexts"]]
                ys = [v["tokens_per_second"] for v in r["contexts"].values()]
                ax.plot(xs, ys, style, marker="o", label=f"{role} ({label})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(data["contexts"], [f"{c // K}K" for c in data["contexts"]])
        ax.set_title(name)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s (llama.cpp, 2 CPU cores)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    print(f"wrote {PLOT}")


def tables(args: argparse.Namespace) -> None:
    """The markdown tables of docs/results.md, from bench/results/long_context.json."""
    data = json.loads(RESULTS.read_text())
    if "curve" in data:
        contexts = data["curve"]["contexts"]
        print("| model | setting | " + " | ".join(f"{c // K}K" for c in contexts) + " | ms per 1K cached |")
        print("|---|---|" + "---:|" * (len(contexts) + 1))
        for name, settings in data["curve"]["pairs"].items():
            for label, result in settings.items():
                for role in ("source", "converted"):
                    r = result[role]
                    if "error" in r:
                        print(f"| {name} {role} | {label} | failed: {r['error']} |")
                        continue
                    rows = r["contexts"]
                    _, slope = fit_line(rows)  # the intercept is noise-dominated (it fits negative in places)
                    speeds = " | ".join(_ratio_cell(rows, result, role, str(c)) for c in contexts)
                    print(f"| {name} {role} | {label} | {speeds} | {slope:.1f} |")
    if "profile" in data:
        contexts = data["profile"]["contexts"]
        print("\n| model | setting | " + " | ".join(f"source {c // K}K" for c in contexts) + " | "
              + " | ".join(f"converted {c // K}K" for c in contexts) + " |")  # fmt: skip
        print("|---|---|" + "---:|" * (2 * len(contexts)))
        for name, settings in data["profile"]["pairs"].items():
            for label, result in settings.items():
                cells = []
                for role in ("source", "converted"):
                    r = result.get(role)
                    for c in contexts:
                        ok = r is not None and "contexts" in r
                        cells.append(f"{r['contexts'][str(c)]['tokens_per_second']:.1f}" if ok else "")
                print(f"| {name} | {label} | " + " | ".join(cells) + " |")


def fit_line(rows: dict[str, Any]) -> tuple[float, float]:
    """Least squares step ms = fixed + slope x (context / 1K), over every measured context."""
    import numpy as np

    x = np.array([int(c) / K for c in rows])
    y = np.array([v["median_step_ms"] for v in rows.values()])
    slope, fixed = np.polyfit(x, y, 1)
    return float(fixed), float(slope)


def _ratio_cell(rows: dict[str, Any], result: dict[str, Any], role: str, context: str) -> str:
    speed = rows[context]["tokens_per_second"]
    if role == "source" or "contexts" not in result.get("source", {}):
        return f"{speed:.2f}"
    ratio = speed / result["source"]["contexts"][context]["tokens_per_second"]
    return f"{speed:.2f} ({ratio:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--pairs", nargs="+", default=["3B shape", "SmolLM2 0.25"])
    p.add_argument("--contexts", type=int, nargs="+", default=[2 * K, 8 * K])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--only", nargs="*", help="measure only these settings")
    c = sub.add_parser("curve")
    c.add_argument("--pairs", nargs="+", default=["SmolLM2 0.5", "SmolLM2 0.25", "3B shape"])
    c.add_argument("--contexts", type=int, nargs="+", default=[2 * K, 8 * K, 32 * K, 64 * K, 256 * K])
    c.add_argument("--new-tokens", type=int, default=8)
    c.add_argument("--settings", nargs="+", default=["fa on"], choices=list(SETTINGS))
    m = sub.add_parser("capacity")
    m.add_argument("--memory-gib", type=float, default=4.0)
    m.add_argument("--setting", default="fa on", choices=list(SETTINGS))
    m.add_argument("--long-context", type=int, default=256 * K)
    m.add_argument("--new-tokens", type=int, default=4)
    v = sub.add_parser("vllm")
    v.add_argument("--kv-cache-gib", type=int, default=1)
    v.add_argument("--long-context", type=int, default=256 * K)
    v.add_argument("--prefill-contexts", type=int, nargs="+", default=[2 * K, 8 * K])
    v.add_argument("--prefill-chunk", type=int, default=1024)
    b = sub.add_parser("vllm-batch")
    b.add_argument("--context", type=int, default=2 * K)
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    b.add_argument("--kv-cache-gib", type=int, nargs="+", default=[1, 4])
    b.add_argument("--prefill-chunk", type=int, default=1024)
    sub.add_parser("plot")
    sub.add_parser("tables")
    args = parser.parse_args()
    if args.command in ("plot", "tables"):
        {"plot": plot, "tables": tables}[args.command](args)
        return
    commands = {"profile": profile, "curve": curve, "capacity": capacity, "vllm": vllm, "vllm-batch": vllm_batch}
    result = commands[args.command](args)
    everything = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.command == "profile" and args.only and "profile" in everything:  # add these settings' rows
        for name, rows in result["pairs"].items():
            everything["profile"]["pairs"].setdefault(name, {}).update(rows)
    else:
        settings = {k: v for k, v in vars(args).items() if k != "command"}
        everything[args.command] = {"settings": settings, "machine": machine(), **result}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(everything, indent=1) + "\n")


if __name__ == "__main__":
    main()
