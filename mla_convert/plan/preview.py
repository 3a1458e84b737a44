"""What a run will cost and produce, known from the config alone: widths, KV cache at long contexts, the
engines that will serve it, memory and a time estimate. `--dry-run` prints it and stops; a real run
prints the estimate before its heavy work."""

from __future__ import annotations

import os
from typing import Any

from ..options import Options, TrainSettings, size_bytes
from ..profiles import method
from ..util import resources
from ..util.units import human_bytes
from . import capacity, measured_speed
from .long_eval import LongEvalPlan
from .plan import Plan
from .serving import Verdict

CONTEXTS = (8 * 1024, 128 * 1024, 256 * 1024)
CARD_MEMORY = "24GiB"  # the report and card plan for --memory, else this size (not the converting machine's)
# Measured (docs/results.md, the README's quick start): SmolLM2-135M fine-tuned at 165 tokens/s on 2 CPU
# cores with the CPU defaults, teacher and student forward plus the student's backward (an earlier run on
# a busier machine of the same kind measured 80). Scaled by parameters and cores: a rough guide only.
CPU_TOKENS_PER_SECOND, CPU_MEASURED_PARAMETERS, CPU_MEASURED_CORES = 165.0, 134.5e6, 2


def finetune_seconds(parameters: int, settings: TrainSettings | None, device: str) -> float | None:
    """Rough fine-tune time on a CPU from the one measured rate; None on a GPU (not measured yet)."""
    if settings is None or settings.batch_size is None or device != "cpu" or parameters <= 0:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rate = CPU_TOKENS_PER_SECOND * CPU_MEASURED_PARAMETERS / max(parameters, 1) * cores / CPU_MEASURED_CORES
    return settings.steps * settings.batch_size * settings.seq_len / rate


def finetune_summary(parameters: int, settings: TrainSettings | None, device: str) -> dict[str, Any] | None:
    """The fine-tune's size and estimated time (None when nothing is trained)."""
    if settings is None:
        return None
    return {
        "steps": settings.steps,
        "windows_per_step": settings.batch_size,
        "tokens": settings.steps * (settings.batch_size or 0) * settings.seq_len,
        "estimated_seconds": finetune_seconds(parameters, settings, device),
    }


def describe(
    plan: Plan,
    verdicts: list[Verdict],
    parameters: int,
    options: Options,
    settings: TrainSettings | None,
    trains: bool,
    long: LongEvalPlan | None = None,
) -> dict[str, Any]:
    """The preview as data (the API's `plan()` returns it; the CLI prints `preview_lines` of it)."""
    geo = plan.geometry
    source_bytes, converted_bytes = plan.kv_bytes_per_token()
    samples = method(options.method).fits_activations and plan.compressed and not options.calib_data
    models = 2 if trains else 1 if samples or options.validate or options.verify else 0
    return {
        "target_class": geo.target_class,
        "kv_lora_rank": plan.latent_width,
        "real_latent_components": plan.kv_rank,
        "lossless_kv_rank": plan.full_kv_rank,
        "qk_rope_head_dim": plan.rope_dim,
        "split": plan.split_reason,
        "split_is_measured_later": options.kv_budget is not None
        and method(options.method).fits_activations
        and plan.compressed,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "kv_cache": {
            "elements_per_token_per_layer": {"source": geo.kv_elements, "converted": plan.kv_elements},
            "bytes_per_token": {"source": source_bytes, "converted": converted_bytes},
            "bytes_per_sequence": {
                str(n): {"source": source_bytes * n, "converted": converted_bytes * n} for n in CONTEXTS
            },
            "ratio": plan.kv_elements / geo.kv_elements,
        },
        "long_context": long_context(plan, parameters, options.memory),
        "engines": [v.as_dict() for v in verdicts],
        "parameters": parameters,
        "memory_bytes": resources.float32_models_bytes(parameters, models) if models else 0,
        "memory_available_bytes": resources.available_memory_bytes(),
        "finetune": finetune_summary(parameters, settings if trains else None, options.device),
        "samples_text": samples,
        "long_eval": long_eval_cost(long, plan, parameters, 3 if trains else 2),
        "warnings": list(plan.warnings),
    }


def long_eval_cost(long: LongEvalPlan | None, plan: Plan, parameters: int, models: int) -> dict[str, Any] | None:
    """What the long-context validation reads and a rough CPU time for it (source, converted, fine-tuned)."""
    if long is None:
        return None
    geo = plan.geometry
    return {
        **vars(long),
        "passkey_lengths": list(long.passkey_lengths),
        "models": models,
        "tokens_per_model": long.tokens_per_model(),
        "estimated_cpu_seconds": long.estimated_seconds(parameters, geo.layers * geo.heads * geo.head_dim, models),
    }


def long_context(plan: Plan, parameters: int, memory: str | None) -> dict[str, Any] | None:
    """The longest context that fits in `memory` (else this machine's), source and conversion, and the
    measured decode speed ratio nearest this conversion; None when the memory or parameters are unknown."""
    memory_bytes = size_bytes(memory, "--memory") if memory is not None else resources.total_memory_bytes()
    if not memory_bytes or parameters <= 0:
        return None
    geo, width = plan.geometry, plan.dtype.itemsize
    source_kv, converted_kv = plan.kv_bytes_per_token()
    source = capacity.longest_context(memory_bytes, parameters, source_kv, width)
    converted_parameters = capacity.converted_parameters(plan, parameters)
    converted = capacity.longest_context(memory_bytes, converted_parameters, converted_kv, width)
    out: dict[str, Any] = {
        "memory_bytes": memory_bytes,
        "memory_given": memory is not None,
        "source": vars(source),
        "converted": vars(converted),
        "measured_speed": None,
    }
    work = measured_speed.attention_work(geo.heads, geo.head_dim, plan.latent_width, plan.rope_dim)
    work_ratio = work / measured_speed.attention_work(geo.heads, geo.head_dim)
    nearest = measured_speed.nearest(plan.kv_elements / geo.kv_elements, work_ratio)
    if nearest is not None:
        context, ratio, best = measured_speed.at_context(nearest, min(source.tokens, converted.tokens) or 1)
        out["measured_speed"] = {
            "model": nearest.model,
            "context": context,
            "speed_ratio": ratio,
            "best_ratio": best,
            "measured_on": measured_speed.MEASURED_ON,
            "work_ratio": work_ratio,
        }
    return out


def long_context_lines(lc: dict[str, Any] | None) -> list[str]:
    """The dry run's lines on the longest context that fits and the measured speed ratio."""
    if lc is None:
        return ["longest context: unknown (this machine's memory or the parameter count could not be read)"]
    where = "given" if lc["memory_given"] else "this machine's memory; --memory SIZE plans for another"
    src, conv = lc["source"], lc["converted"]
    lines = [
        f"longest context in {human_bytes(lc['memory_bytes'])} ({where}): source {src['tokens']:,} tokens, "
        f"converted {conv['tokens']:,} (weights {human_bytes(src['weights_bytes'])} / "
        f"{human_bytes(conv['weights_bytes'])} and one sequence's cache only: an upper bound, the engine's own "
        "buffers come on top)"
    ]
    speed = lc["measured_speed"]
    if speed is not None:
        lines.append(
            f"  decode speed, converted / source, at {speed['context'] // 1024}K tokens (the measured context nearest "
            f"the shorter of the two): {speed['speed_ratio']:.2f}x with flash attention on for both (llama.cpp's "
            f"default), {speed['best_ratio']:.2f}x against the source at its fastest (flash attention off); "
            f"measured on CPU ({speed['measured_on']}) for {speed['model']}; other models and machines differ"
        )
    return lines


def finetune_line(finetune: dict[str, Any] | None, device: str) -> str:
    if finetune is None:
        return "fine-tune: none (lossless, or --finetune-steps 0)"
    base = (
        f"fine-tune: {finetune['steps']} steps x {finetune['windows_per_step']} windows = {finetune['tokens']:,} tokens"
    )
    seconds = finetune["estimated_seconds"]
    if seconds is None:
        return f"{base} (on {device}: no measured rate to estimate the time from)"
    return (
        f"{base}, about {_minutes(seconds)} on this CPU (scaled from {CPU_TOKENS_PER_SECOND:.0f} tokens/s measured "
        "for 135M parameters on 2 cores)"
    )


def preview_lines(d: dict[str, Any], device: str) -> list[str]:
    """The dry run, as lines to print."""
    kv = d["kv_cache"]
    latent = str(d["kv_lora_rank"])
    if d["kv_lora_rank"] > d["real_latent_components"]:
        latent += f" ({d['real_latent_components']} real, {d['kv_lora_rank'] - d['real_latent_components']} zero)"
    lines = [
        f"writes: a stock {d['target_class']} checkpoint",
        f"widths: kv_lora_rank {latent} (lossless {d['lossless_kv_rank']}), qk_rope_head_dim "
        f"{d['qk_rope_head_dim']}, dtype {d['dtype']} — {d['split']}",
    ]
    if d["split_is_measured_later"]:
        lines.append("  (the run measures the latent/rotary split on calibration text; the total stays the same)")
    per_token = kv["bytes_per_token"]
    lines.append(
        f"KV cache per token: {kv['elements_per_token_per_layer']['source']} -> "
        f"{kv['elements_per_token_per_layer']['converted']} elements per layer, "
        f"{human_bytes(per_token['source'])} -> {human_bytes(per_token['converted'])} over all layers "
        f"({kv['ratio']:.3f}x)"
    )
    for n, sizes in kv["bytes_per_sequence"].items():
        lines.append(
            f"  one {int(n) // 1024}K-token sequence: "
            f"{human_bytes(sizes['source'])} -> {human_bytes(sizes['converted'])}"
        )
    lines += long_context_lines(d["long_context"])
    for e in d["engines"]:
        lines.append(f"engine {e['engine']}: {e['status']} — {e['detail']}")
    have = d["memory_available_bytes"]
    if not d["parameters"]:
        lines.append("memory: unknown (the parameter count could not be read)")
    elif d["memory_bytes"]:
        lines.append(
            f"memory: whole models in float32 take {resources.gigabytes(d['memory_bytes'])} "
            f"({d['parameters'] / 1e6:,.1f}M parameters); activations and the fine-tune's logits come on top "
            f"(the SmolLM2-135M quick start peaked at 6.5 GB); available: {resources.gigabytes(have)}"
        )
    else:
        lines.append("memory: the conversion streams one layer at a time")
    lines.append(finetune_line(d["finetune"], device))
    lines.append(long_eval_line(d["long_eval"]))
    if d["samples_text"]:
        lines.append(
            "calibration text: none given, so it is sampled from the source (minutes on a CPU); --calib-data FILE "
            "skips that"
        )
    lines += [f"warning: {w}" for w in d["warnings"]]
    return lines


def long_eval_line(long: dict[str, Any] | None) -> str:
    if long is None:
        return "long-context validation: off"
    keys = ", ".join(str(n) for n in long["passkey_lengths"])
    return (
        f"long-context validation ({long['mode']}): ratio by position on up to {long['windows']} window(s) of "
        f"{long['length']} tokens, {long['passkey_trials']} passkeys at each of {keys} tokens; "
        f"{long['tokens_per_model']:,} tokens for each of {long['models']} models, about "
        f"{_minutes(long['estimated_cpu_seconds'])} on this CPU (--long-eval off|quick|full)"
    )


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
