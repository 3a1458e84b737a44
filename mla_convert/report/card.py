"""The model card (README.md) written beside the converted checkpoint, rendered from mla_report.json's data
so the fine-tune stage can re-render it without the conversion's in-memory objects.

The card is meant to be uploaded to the Hugging Face Hub as it is: its YAML metadata names the base model and
license where the source declares them (a GGUF: its `general.*` metadata; never a guess), its title the model's
own name where a GGUF states one, and its text names the source and every text file by hub id or file name,
never by a local path.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePath
from typing import Any

from ..plan.target_config import TRANSFORMERS_ONLY
from ..profiles import profile
from ..util.names import looks_local, strip_paths
from ..util.units import human_bytes
from .plots import LAYER_PLOT, LONG_PLOT, LOSS_PLOT

TAGS = ("mla", "deepseek_v3", "kv-cache-compression", "mla-convert")
HUB = "https://huggingface.co"
HELD_OUT = " (held-out tail)"  # source/text.py's suffix for the held-out end of a text file
MIXED = " and text sampled from the source"  # source/text.py: a file mixed with sampled text (--calib-sampled)
SAMPLED = "sampled from the source"
FILE_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".parquet")
PLAIN = re.compile(r"^[A-Za-z0-9][\w./-]*$")
YAML_WORDS = {"null", "true", "false", "yes", "no", "on", "off", "y", "n", "~"}


DEFAULT_CLASS = "DeepseekV3ForCausalLM"


def model_card(report: dict[str, Any], model_out_name: str) -> str:
    settings = report["settings"]
    serving = (
        f"> **Warning.** {TRANSFORMERS_ONLY}\n"
        if not profile(settings["target"]).engines_compute_it
        else (
            "This checkpoint uses only settings that transformers, vLLM and SGLang compute identically: the plain "
            "rotary frequency ladder (written as DeepSeek's YaRN form with factor 1), interleaved rotary pairs, no "
            "attention biases, an untied output head and `rms_norm_eps` equal to the latent-norm epsilon."
        )
    )
    sections = [
        serving_section(report, model_out_name),
        conversion_section(report),
        finetune_section(report),
        validation_section(report),
        long_eval_section(report),
        plots_section(report),
    ]
    body = "\n".join(s for s in sections if s)
    target_class = report["settings"].get("target_class", DEFAULT_CLASS)
    return f"""{front_matter(report)}
# {title(report["source"], model_out_name)}

Multi-head Latent Attention (DeepSeek-V3 layout) conversion of {_source_ref(report["source"])}, made with
mla-convert {report["tool"]["version"]}.{lineage_note(report["source"])} It is a stock `{target_class}`
checkpoint:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{model_out_name}")  # no trust_remote_code needed
tokenizer = AutoTokenizer.from_pretrained("{model_out_name}")
```

{license_note(report["source"])}

{serving}

{body}
The full figures are in `mla_report.json`.
"""


def front_matter(report: dict[str, Any]) -> str:
    """The Hub metadata block. `base_model_relation` is left to the Hub to infer: its documented values
    (adapter, merge, quantized, finetune) name no architecture conversion."""
    src = report["source"]
    meta: list[tuple[str, Any]] = []
    base = source_hub_id(src)
    stated = [b["hub_id"] for b in src.get("base_models") or [] if b.get("hub_id")]
    if base or stated:
        meta.append(("base_model", base or (stated[0] if len(stated) == 1 else stated)))
    declared = src.get("license")
    if declared:
        meta.append(("license", declared))
        meta += [(key, src[key]) for key in ("license_name", "license_link") if src.get(key)]
    meta += [("library_name", "transformers"), ("pipeline_tag", "text-generation"), ("tags", list(TAGS))]
    lines = ["---"]
    for key, value in meta:
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {_yaml(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml(value)}")
    return "\n".join([*lines, "---"]) + "\n"


def _yaml(value: str) -> str:
    """A YAML scalar: plain when it cannot be read as anything but this string, else double-quoted (JSON)."""
    plain = PLAIN.match(value) and value.lower() not in YAML_WORDS and not re.fullmatch(r"[\d._-]+", value)
    return value if plain else json.dumps(value)


def source_hub_id(src: dict[str, Any]) -> str | None:
    """The source's hub repo: as recorded, or (reports from before it was) the path when that was a hub id."""
    if "hub_id" in src:
        return src["hub_id"]
    path = src["path"]
    return None if looks_local(path) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) else path


def source_name(src: dict[str, Any]) -> str:
    """How the card names the source: its hub id, or the bare name of its folder or file."""
    if src.get("name"):
        return src["name"]
    return PurePath(src["path"]).name if looks_local(src["path"]) else src["path"]


def title(src: dict[str, Any], model_out_name: str) -> str:
    """MODEL_OUT's name, with the model's own name where the source states one (a GGUF's general.name)."""
    named = src.get("model_name")
    return f"{model_out_name}: {named} in Multi-head Latent Attention" if named else model_out_name


def lineage_note(src: dict[str, Any]) -> str:
    """What a GGUF source states of its model: organization and base models (linked only where it gives a repo)."""
    parts = []
    if src.get("model_name"):
        by = f" by {src['organization']}" if src.get("organization") else ""
        parts.append(f"The source file names its model *{src['model_name']}*{by}.")
    bases = []
    for base in src.get("base_models") or []:
        label = " by ".join(x for x in (base.get("name") or base.get("hub_id"), base.get("organization")) if x)
        bases.append(f"[`{base['hub_id']}`]({HUB}/{base['hub_id']})" if base.get("hub_id") else label)
    if bases:
        parts.append(f"It states its base model{'s' if len(bases) > 1 else ''}: {', '.join(bases)}.")
    return (" " + " ".join(parts)) if parts else ""


def _source_ref(src: dict[str, Any]) -> str:
    name, hub_id = source_name(src), source_hub_id(src)
    if hub_id is None:
        return f"`{name}`"
    if hub_id == name:
        return f"[`{name}`]({HUB}/{name})"
    return f"`{name}` (its config names [`{hub_id}`]({HUB}/{hub_id}))"


def license_note(src: dict[str, Any]) -> str:
    declared = src.get("license")
    if declared:
        named = src.get("license_name") or declared
        return f"License: `{named}`, as the source declares it; the source's terms apply."
    return (
        "License: the source declares none in its model card or config.json, so none is set here; "
        "the source's terms apply."
    )


def text_origin(origin: str) -> str:
    """Where evaluation, calibration or training text came from, in words, with no local path."""
    if origin == SAMPLED:
        return "text sampled from the source model itself"
    if origin == f"{SAMPLED} (separate seed)":
        return "text sampled from the source model itself (a separate sample from the calibration text)"
    if origin.endswith(MIXED):
        return f"`{_spec_name(origin[: -len(MIXED)])}` and text sampled from the source model itself"
    if origin.endswith(HELD_OUT):
        return f"the held-out tail of `{_spec_name(origin[: -len(HELD_OUT)])}`, unseen by calibration and fine-tuning"
    return f"`{_spec_name(origin)}`"


def _spec_name(spec: str) -> str:
    """A text file by its file name; a hub dataset id (`name[:config][@split]`) as it is."""
    dataset = spec.partition("@")[0].partition(":")[0]
    file = looks_local(spec) or dataset.count("/") > 1 or PurePath(dataset).suffix.lower() in FILE_SUFFIXES
    return PurePath(spec.replace("\\", "/")).name if file else spec


def scrub(text: str, r: dict[str, Any]) -> str:
    """Free text from the report (warnings, reasons) with the source's path and any other absolute path
    replaced by the bare file or folder name."""
    path = r["source"].get("path")
    if path and looks_local(path):
        text = text.replace(path, source_name(r["source"]))
    return strip_paths(text)


def conversion_section(r: dict[str, Any]) -> str:
    src, st, kv, summary = r["source"], r["settings"], r["kv_cache"], r["summary"]
    lines = [
        "## Conversion",
        "",
        f"- Source: `{source_name(src)}` ({src['architecture']}, {src['layers']} layers, {src['heads']} query heads, "
        f"{src['kv_heads']} KV heads, head_dim {src['head_dim']})",
        f"- Target profile: `{st['target']}`; kv_lora_rank {_latent(st)} (lossless {st['lossless_kv_rank']}), "
        f"qk_rope_head_dim {st['qk_rope_head_dim']}, rope_theta {st['rope_theta']:g}, dtype {st['dtype']}",
        f"- Split: {scrub(st['split_reason'], r)}",
        f"- KV cache per token per layer: {kv['original_elements_per_token_per_layer']} -> "
        f"{kv['converted_elements_per_token_per_layer']} elements (ratio {kv['ratio']:.3f}); "
        f"{human_bytes(kv['original_bytes_per_token'])} -> {human_bytes(kv['converted_bytes_per_token'])} per token "
        "over all layers",
        *long_context_lines(r.get("long_context")),
        f"- Key reconstruction error (relative Frobenius): mean {summary['k_rel_error_mean']:.2e}, "
        f"worst {summary['k_rel_error_max']:.2e}",
        f"- Value reconstruction error: mean {summary['v_rel_error_mean']:.2e}, worst {summary['v_rel_error_max']:.2e}",
        f"- Rotary key energy that still rotates: mean {summary['rope_energy_kept_mean']:.1%}, "
        f"lowest {summary['rope_energy_kept_min']:.1%}"
        + (
            f" ({summary['rope_energy_near_mean']:.1%} on near-frequency slots, rotating slightly off)"
            if summary.get("rope_energy_near_mean")
            else ""
        ),
    ]
    if r.get("calibration"):
        c = r["calibration"]
        long = c.get("long_windows")
        extra = f", plus {long['count']} long window(s) of {long['tokens']} tokens" if long else ""
        lines.append(
            f"- Method: {c['method']}, calibrated on {c['tokens']} tokens of {text_origin(c['source'])}{extra}"
        )
    if "attn_output_error_mean" in summary:
        far = summary.get("far_attn_output_error_mean")
        lines.append(
            f"- On calibration activations: key error mean {summary['k_act_error_mean']:.2e}, value error "
            f"mean {summary['v_act_error_mean']:.2e}, attention output error mean "
            f"{summary['attn_output_error_mean']:.2e}"
            + ("" if far is None else f" ({far:.2e} at the far positions of the long windows)")
        )
    if r.get("evaluation"):
        e = r["evaluation"]
        lines.append(
            f"- One-shot perplexity on {e['tokens']} tokens of {text_origin(e['text'])}: "
            f"source {e['source_perplexity']:.3f}, converted {e['converted_perplexity']:.3f} "
            f"(ratio {e['perplexity_ratio']:.3f}); KL to source "
            f"{e['kl_to_source']:.4f} nats, top-1 agreement {e['top1_agreement']:.1%}"
        )
    if r.get("verification"):
        v = r["verification"]
        lines.append(
            f"- Check against the source on {v['tokens']} tokens (float32): max |Δlogit| "
            f"{v['max_abs_logit_diff']:.2e}, top-1 agreement {v['top1_agreement']:.1%}, mean KL {v['kl_mean']:.2e}; "
            f"live cache holds {v['measured_cache_elements_per_token_per_layer']} elements per token per layer"
        )
        if v.get("routing_agreement") is not None:
            per_layer = ", ".join(f"{a:.1%}" for a in v["routing_agreement_per_layer"])
            lines.append(
                f"- Routing: {v['routing_agreement']:.1%} of tokens keep their experts in every MoE layer on average "
                f"(per layer: {per_layer})"
            )
    lines += ["", "| layer | K rel. error | V rel. error | rotary energy kept |", "|---:|---:|---:|---:|"]
    lines += [
        f"| {x['index']} | {x['k_rel_error']:.2e} | {x['v_rel_error']:.2e} | {x['rope_energy_kept']:.1%} |"
        for x in r["layers"]
    ]
    if r.get("warnings"):
        lines += ["", "### Warnings", ""] + [f"- {scrub(w, r)}" for w in r["warnings"]]
    return "\n".join(lines) + "\n"


def _latent(settings: dict[str, Any]) -> str:
    width, real = settings["kv_lora_rank"], settings.get("latent_rank", settings["kv_lora_rank"])
    return str(width) if real >= width else f"{width} ({real} real components, {width - real} zero for the engine)"


def long_context_lines(lc: dict[str, Any] | None) -> list[str]:
    """The longest context that fits, and the measured CPU decode speed ratio nearest this conversion."""
    if not lc:
        return []
    src, conv = lc["source"], lc["converted"]
    lines = [
        f"- Longest single-sequence context in {human_bytes(lc['memory_bytes'])} (weights and cache at "
        f"the output dtype only, an upper bound: the engine's buffers come on top): source {src['tokens']:,} tokens, "
        f"this model {conv['tokens']:,}"
    ]
    speed = lc.get("measured_speed")
    if speed:
        lines.append(
            f"- Decode speed against the source at {speed['context'] // 1024}K tokens in llama.cpp, measured on CPU "
            f"for {speed['model']} (not for this model; {speed['measured_on']}): {speed['speed_ratio']:.2f}x with "
            f"flash attention on for both, {speed['best_ratio']:.2f}x against the source at its fastest (flash "
            "attention off)"
        )
    return lines


def finetune_section(r: dict[str, Any]) -> str:
    f = r.get("finetune")
    if not f:
        return ""
    return (
        "## Fine-tune\n\n"
        f"- Distillation from the source ({f['distill_weight']:g} KL + {1 - f['distill_weight']:g} LM loss), "
        f"{f['steps']} steps of {f['batch_size']} x {f['seq_len']} tokens ({f['tokens']} tokens of "
        f"{text_origin(f['text'])}), "
        f"trained: {f['scope']} ({f['trainable_parameters']} parameters), lr {f['lr']:g}, "
        f"{f['world_size']} process(es), {f['seconds']:.0f} s\n"
        f"- Loss: first step {f['losses'][0]:.4f}, last step {f['losses'][-1]:.4f}\n"
    )


def validation_section(r: dict[str, Any]) -> str:
    v = r.get("validation")
    if not v:
        return ""
    lines = [
        "## Validation",
        "",
        f"Measured on {v['tokens']} tokens of {text_origin(v['text'])} (the evaluation text):",
        "",
        "| model | perplexity | ratio to source | KL to source (nats) | top-1 agreement |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in v["models"]:
        kl = "" if row["kl_to_source"] is None else f"{row['kl_to_source']:.4f}"
        top1 = "" if row["top1_agreement"] is None else f"{row['top1_agreement']:.1%}"
        lines.append(f"| {row['model']} | {row['perplexity']:.3f} | {row['perplexity_ratio']:.3f} | {kl} | {top1} |")
    g = v.get("generation")
    if g:
        lines += ["", f"Greedy continuation ({g['max_new_tokens']} tokens) of: *{g['prompt']}*", ""]
        lines += ["| model | continuation |", "|---|---|"]
        for name, text in g["outputs"].items():
            lines.append(f"| {name} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def long_eval_section(r: dict[str, Any]) -> str:
    """Quality by position and passkey retrieval (the long-context validation)."""
    long = r.get("long_eval")
    if not long:
        return ""
    lines = ["## Long context", ""]
    buckets = long.get("buckets") or []
    if buckets:
        names = list(buckets[0]["models"])
        lines += [
            f"Perplexity ratio to the source (KL in nats) by position, on {long['windows']} window(s) of "
            f"{long['length']} tokens of {text_origin(long['text'])}:",
            "",
            "| positions | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for b in buckets:
            cells = [f"{m['perplexity_ratio']:.3f} ({m['kl_to_source']:.3f})" for m in b["models"].values()]
            lines.append(f"| {b['start']}-{b['end']} | " + " | ".join(cells) + " |")
        spans = long["spans"]
        (_, near_end), (far_start, far_end) = spans["near"], spans["far"]
        for name, s in spans["models"].items():
            lines.append(
                f"\n{name}: {s['far_ratio']:.3f}x the source perplexity at positions {far_start}-{far_end} "
                f"against {s['near_ratio']:.3f}x over the first {near_end}: {s['far_over_near']:.3f} times "
                "worse far than near"
            )
    passkey = long.get("passkey")
    if passkey:
        lengths = passkey["lengths"]
        lines += [
            "",
            f"Passkey retrieval (correct of {passkey['trials']} per length, the key hidden at depths "
            + ", ".join(f"{d:.0%}" for d in passkey["depths"])
            + "):",
            "",
            "| model | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|" + "---:|" * len(lengths),
        ]
        for name, correct in passkey["correct"].items():
            lines.append(f"| {name} | " + " | ".join(f"{c}/{passkey['trials']}" for c in correct) + " |")
    if long.get("note"):
        lines += ["", f"Note: {long['note']}."]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def plots_section(r: dict[str, Any]) -> str:
    plots = r.get("plots") or []
    if not plots:
        return ""
    titles = {
        LOSS_PLOT: "Fine-tune loss",
        LAYER_PLOT: "Per-layer reconstruction error",
        LONG_PLOT: "Quality by position and passkey retrieval",
    }
    names = [PurePath(p).name for p in plots]
    return "## Plots\n\n" + "\n".join(f"![{titles.get(p, p)}]({p})" for p in names) + "\n"


QUANTIZATION_NOTE = (
    "The first `kv_lora_rank` rows of every `kv_a_proj_with_mqa` are about 1e-8 in size by design (they keep "
    "the latent norm linear). float16 and any quantizer with per-tensor or float16 block scales (GGUF q8_0/q4 "
    "of that tensor, per-tensor fp8) round them to zero and break the model: keep `kv_a_proj_with_mqa` "
    "(`attn_kv_a_mqa` in a GGUF) in bfloat16 or float32; per-output-channel schemes keep it intact."
)


def serving_section(r: dict[str, Any], name: str) -> str:
    """Which engines serve it (decided from its widths and profile, tested where marked) and how."""
    rows = r.get("engines") or []
    if not rows:
        return ""
    lines = ["## Serving", "", "| engine | status | why |", "|---|---|---|"]
    lines += [f"| {row['engine']} | {row['status']} | {_cell(scrub(row['detail'], r))} |" for row in rows]
    status = {row["engine"]: row["status"] for row in rows}
    if status.get("vLLM") == "serves":
        lines += [
            "",
            "vLLM (tested on its CPU build in float32; on a GPU the same command picks a GPU MLA backend):",
            "",
            "```python",
            "from vllm import LLM",
            f'llm = LLM(model="{name}")',
            "```",
        ]
    gguf = r.get("gguf")
    if gguf:
        lines += [
            "",
            f"llama.cpp: `{PurePath(gguf['file']).name}` ({gguf['type']}), e.g. "
            f"`llama-cli -m {PurePath(gguf['file']).name}`; "
            "no `--override-kv` needed. Its default float16 KV cache rounds the cached latent as any float16 "
            "cache does; `-ctk f32` computes what transformers computes (tested with a float32 GGUF).",
            "",
            "Fastest decoding: flash attention on (`-fa on`; llama.cpp's own tools default to `auto`, which is on "
            "for the CPU, but llama-cpp-python's `Llama(...)` needs `flash_attn=True`). Without it llama.cpp "
            "copies the whole cached latent, transposed, at every step: on CPU this measured 1.1x to 3.9x slower "
            "from a 32K context on. Keep the f16 cache (f32, bf16 and q8_0 caches measured slower for MLA on "
            "CPU); q8_0 weights decode faster at short contexts, where their rounding is acceptable. On CPU "
            "the source at its own best setting (flash attention off) measured faster than its conversion at "
            "most lengths up to 256K; "
            'mla-convert\'s docs/results.md, "Long context", has the measurements.',
        ]
    lines += ["", QUANTIZATION_NOTE]
    return "\n".join(lines) + "\n"
