"""One report object rendered three ways: a rich table, mla_report.json and the model card section.

Schema of mla_report.json (version 2; version 1 had no long_eval). tests/test_report_schema.py checks that every
key a written report holds, and every field of the typed sections, is named here:
  schema_version, tool {name, version},
  source {name (hub id, or the folder / file name: what the model card shows), hub_id (the hub repo it was given
          as, the `org/name` its config.json's `_name_or_path` declares, or the repository a GGUF states, else
          null), license (its README.md's `license:`, else config.json's; a GGUF's `general.license`; else null),
          and license_name, license_link (only with `license: other`), architecture, layers, heads, kv_heads,
          head_dim, and for a MoE source experts {count, top_k, width, dense_layers, renormalize}; a GGUF's own
          statements (report/lineage.py): model_name, organization, base_models [{name, organization, hub_id}];
          path (the full local path, or the hub id) only with --report-paths},
  texts [{name (base name, or hub dataset id), bytes, sha256 (null for a dataset), path (only with
         --report-paths)}] of every text file read,
  settings {target, target_class (the stock class written), kv_lora_rank (as written, zero padding included),
            latent_rank (real latent components),
            qk_rope_head_dim, engine (--engine or null), rope_theta, rotary_stride, rotary_density, dtype, split_reason,
            lossless_kv_rank, rotary_slots [[frequency_index, component] | null]},
  kv_cache {original_elements_per_token_per_layer, converted_elements_per_token_per_layer (what engines hold,
            padding included), ratio, original_bytes_per_token, converted_bytes_per_token, dtype_bytes},
  long_context (plan/preview.py) {memory_bytes (--memory, else this machine's), memory_given, source and converted
               {weights_bytes, kv_bytes_per_token, tokens (the longest context that fits)}, measured_speed {model,
               context, speed_ratio, best_ratio, measured_on, work_ratio} (the measured decode speed nearest this
               conversion) or null} or null when the memory or parameter count is unknown,
  engines [{engine, status (serves | computes wrongly | refuses | untested), detail}],
  gguf {file, type, bytes, kept_float32 [tensor names], tokenizer (where its vocabulary came from), warnings} or
       null without --gguf,
  layers [{index, k_rel_error, v_rel_error, rope_energy_kept, rope_energy_near (the part of it on a dense ladder's
          near-frequency slots), k_act_error, v_act_error, attn_output_error, with long calibration windows
          far_attn_output_error (the same error at their far positions, the second half of each), and
          with --layer-steps: reconstruction_steps, held_out_error_before, held_out_error_after (relative
          attention-output error on held-out calibration windows around the layer-wise reconstruction), and with
          --query-refit: query_refit_error_before, query_refit_error_after (the same error around the query refit;
          equal when the refit was undone), and for a calibrated MoE layer moe_output_error (the converted expert mix
          against the source's on the same inputs: what the target's routing weights cost) and, for a source
          that renormalizes its top-k softmax, expert_scale with routing_weight_error_before and
          routing_weight_error_after (the top-k weights' relative error against the source's without and with
          that factor on the layer's experts)}]
         (the last three null without calibration),
  summary {k_rel_error_mean, k_rel_error_max, v_rel_error_mean, v_rel_error_max, rope_energy_kept_mean,
           rope_energy_kept_min, rope_energy_near_mean, and with calibration k_act_error_mean, k_act_error_max,
           v_act_error_mean, v_act_error_max, attn_output_error_mean, attn_output_error_max, with long calibration
           windows far_attn_output_error_mean, far_attn_output_error_max, and for a MoE source
           moe_output_error_mean, moe_output_error_max},
  calibration {method, source, tokens (the short windows'), long_windows {count, tokens (each)} when long
               calibration windows were used} or null,
  evaluation (one-shot, before any fine-tune) {text, tokens, source_perplexity, converted_perplexity,
              perplexity_ratio, kl_to_source, top1_agreement} or null,
  verification {tokens, max_abs_logit_diff, top1_agreement, kl_mean, measured_cache_elements_per_token_per_layer,
                and for a MoE source routing_agreement (the share of tokens routed to the same experts, mean over
                expert layers) and routing_agreement_per_layer} or null when skipped,
  finetune {steps, batch_size, seq_len, tokens, text, text_tokens (tokens of training text read), lr, warmup_steps,
            scope, distill_weight, trainable_parameters, world_size, seconds, resumed_from, losses [per step],
            lrs [per step]}
           or null when there was no fine-tune,
  validation {text, tokens, models [{model, perplexity, perplexity_ratio, kl_to_source, top1_agreement}],
              generation {prompt, max_new_tokens, outputs {model: text}}} or null with --no-validate,
  long_eval (--long-eval, evaluate/long_context.py) {mode, length (tokens per window), text, windows, note (how the
            windows were made when not from documents that long, or why there is no passkey), buckets [{start, end,
            source_perplexity, models {model: {perplexity, perplexity_ratio, kl_to_source, top1_agreement}}}],
            spans {near [start, end], far [start, end], models {model: {near_ratio, far_ratio, far_over_near}}},
            passkey {lengths, trials, depths, correct {model (the source first): [correct per length]}} or null}
            or null with --long-eval off or --no-validate (no time in it: identical runs write identical reports),
  plots [file names of the PNGs beside the checkpoint],
  resources {peak_rss_bytes, seconds} of the run that wrote the report (the only part that varies between
            identical runs; the model card leaves it out),
  warnings [str],
  files {relative name: {bytes, sha256}} of every other file written beside the report (`mla-convert verify OUT`
        checks them)

No local path appears anywhere (texts and sources are named by base name) unless --report-paths asked for one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from rich.table import Table

from ..conversion.driver import LayerStats
from ..evaluate.validation import Validated
from ..evaluate.verify import Verification
from ..plan.plan import Plan
from ..plan.target_config import TORCH_DTYPE_NAMES
from ..source.checkpoint import Source
from ..source.gguf_header import gguf_general
from ..train.finetune import FinetuneSection
from ..util.names import strip_paths
from ..util.units import human_bytes
from ..util.version import VERSION
from ..write.manifest import file_hashes
from ..write.writer import write_json, write_text
from .card import model_card
from .lineage import OWNED_HUB_ID, gguf_facts


class Calibration(TypedDict, total=False):
    """The report's `calibration` section."""

    method: str
    source: str
    tokens: int  # the short windows'
    long_windows: dict[str, int]  # {count, tokens (each)}, with long calibration windows only


class GgufSection(TypedDict):
    """The report's `gguf` section (engines/export.py writes the file)."""

    file: str
    type: str
    bytes: int
    kept_float32: list[str]
    tokenizer: str
    warnings: list[str]


@dataclass(frozen=True)
class Outcome:
    """What the stages after the conversion add to the report, each section as its stage returned it."""

    verification: Verification | None = None
    validated: Validated = field(default_factory=Validated)
    finetune: FinetuneSection | None = None
    plots: list[str] = field(default_factory=list)
    gguf: GgufSection | None = None
    resources: dict[str, Any] = field(default_factory=dict)  # util/resources.usage: not in the card

    def sections(self) -> dict[str, Any]:
        """The report keys this outcome sets, as written."""
        long = self.validated.long_eval
        return {
            "gguf": self.gguf,
            "evaluation": self.validated.evaluation,
            "finetune": self.finetune,
            "validation": self.validated.validation,
            "long_eval": long.as_dict() if long is not None else None,
            "plots": self.plots,
            "verification": self.verification.as_dict() if self.verification else None,
        }


@dataclass(frozen=True)
class Report:
    """The conversion's facts and the measured outcome: typed until `as_dict` writes them."""

    source_label: str
    plan: Plan
    layers: list[LayerStats]
    outcome: Outcome = field(default_factory=Outcome)
    warnings: list[str] = field(default_factory=list)
    calibration: Calibration | None = None
    engines: list[dict[str, str]] = field(default_factory=list)
    source_facts: dict[str, Any] = field(default_factory=dict)  # name, hub_id, license (see source_facts)
    texts: list[dict[str, Any]] = field(default_factory=list)  # the text files read (source/text.py TextFile)
    report_paths: bool = False  # --report-paths: full local paths in the report (never in the card)
    long_context: dict[str, Any] | None = None  # plan/preview.long_context: what fits in --memory (card: 24 GiB)

    @property
    def calibrated(self) -> bool:
        return any(layer.attn_output_error is not None for layer in self.layers)

    def kv_cache(self) -> dict[str, Any]:
        before, after = self.plan.geometry.kv_elements, self.plan.kv_elements
        original_bytes, converted_bytes = self.plan.kv_bytes_per_token()
        return {
            "original_elements_per_token_per_layer": before,
            "converted_elements_per_token_per_layer": after,
            "ratio": after / before,
            "dtype_bytes": self.plan.dtype.itemsize,
            "original_bytes_per_token": original_bytes,
            "converted_bytes_per_token": converted_bytes,
        }

    def summary(self) -> dict[str, float]:
        def stat(key: str, fn: Any) -> float:
            return float(fn([getattr(layer, key) for layer in self.layers]))

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs)

        out = {
            "k_rel_error_mean": stat("k_rel_error", mean),
            "k_rel_error_max": stat("k_rel_error", max),
            "v_rel_error_mean": stat("v_rel_error", mean),
            "v_rel_error_max": stat("v_rel_error", max),
            "rope_energy_kept_mean": stat("rope_energy_kept", mean),
            "rope_energy_kept_min": stat("rope_energy_kept", min),
            "rope_energy_near_mean": stat("rope_energy_near", mean),
        }
        if self.calibrated:
            for key in ("k_act_error", "v_act_error", "attn_output_error"):
                out[f"{key}_mean"] = stat(key, mean)
                out[f"{key}_max"] = stat(key, max)
            far = [layer.far_attn_output_error for layer in self.layers if layer.far_attn_output_error is not None]
            if far:
                out["far_attn_output_error_mean"], out["far_attn_output_error_max"] = float(mean(far)), float(max(far))
            moe = [layer.moe_output_error for layer in self.layers if layer.moe_output_error is not None]
            if moe:
                out["moe_output_error_mean"], out["moe_output_error_max"] = float(mean(moe)), float(max(moe))
        return out

    def as_dict(self) -> dict[str, Any]:
        plan, geo = self.plan, self.plan.geometry
        sections = self.outcome.sections()
        return {
            "schema_version": 2,
            "tool": {"name": "mla-convert", "version": VERSION},
            "source": {
                **({"path": full_path(self.source_label)} if self.report_paths else {}),
                **self.source_facts,
                "architecture": geo.arch,
                "layers": geo.layers,
                "heads": geo.heads,
                "kv_heads": geo.kv_heads,
                "head_dim": geo.head_dim,
                **({} if geo.experts is None else {"experts": dataclasses.asdict(geo.experts)}),
            },
            "settings": {
                "target": plan.target,
                "target_class": geo.target_class,
                "kv_lora_rank": plan.latent_width,
                "latent_rank": plan.kv_rank,
                "qk_rope_head_dim": plan.rope_dim,
                "engine": plan.engine,
                "rope_theta": plan.rope_theta,
                "rotary_stride": plan.stride,
                "rotary_density": plan.density,
                "dtype": TORCH_DTYPE_NAMES[plan.dtype],
                "split_reason": plan.split_reason,
                "lossless_kv_rank": plan.full_kv_rank,
                "rotary_slots": [list(s) if s is not None else None for s in plan.slots],
            },
            "texts": self.texts,
            "kv_cache": self.kv_cache(),
            "long_context": self.long_context,
            "engines": self.engines,
            "gguf": sections["gguf"],
            "layers": self.layer_rows(),
            "summary": self.summary(),
            "calibration": self.calibration,
            "evaluation": sections["evaluation"],
            "finetune": sections["finetune"],
            "validation": sections["validation"],
            "long_eval": sections["long_eval"],
            "plots": sections["plots"],
            "verification": sections["verification"],
            "warnings": self.warnings if self.report_paths else [strip_paths(w) for w in self.warnings],
            **({"resources": self.outcome.resources} if self.outcome.resources else {}),
        }

    def layer_rows(self) -> list[dict[str, Any]]:
        """The report's `layers` section (the layer plot draws it too)."""
        return layer_rows(self.layers)


def layer_rows(layers: list[LayerStats]) -> list[dict[str, Any]]:
    """Each layer's measured errors as the report writes them (keys present only where measured)."""
    return [
        {
            "index": layer.index,
            "k_rel_error": layer.k_rel_error,
            "v_rel_error": layer.v_rel_error,
            "rope_energy_kept": layer.rope_energy_kept,
            "rope_energy_near": layer.rope_energy_near,
            "k_act_error": layer.k_act_error,
            "v_act_error": layer.v_act_error,
            "attn_output_error": layer.attn_output_error,
            **({} if layer.far_attn_output_error is None else {"far_attn_output_error": layer.far_attn_output_error}),
            **(
                {}
                if layer.query_error_before is None
                else {
                    "query_refit_error_before": layer.query_error_before,
                    "query_refit_error_after": layer.query_error_after,
                }
            ),
            **(
                {}
                if layer.reconstruction_steps is None
                else {
                    "reconstruction_steps": layer.reconstruction_steps,
                    "held_out_error_before": layer.held_out_error_before,
                    "held_out_error_after": layer.held_out_error_after,
                }
            ),
            **({} if layer.moe_output_error is None else {"moe_output_error": layer.moe_output_error}),
            **(
                {}
                if layer.expert_scale is None
                else {
                    "expert_scale": layer.expert_scale,
                    "routing_weight_error_before": layer.routing_weight_error_before,
                    "routing_weight_error_after": layer.routing_weight_error_after,
                }
            ),
        }
        for layer in layers
    ]


def healed_report(pending: dict[str, Any], outcome: Outcome, drop_warning: str) -> dict[str, Any]:
    """The report of a fine-tuned model: the pending report the conversion wrote (read back, so a resumed run
    has it too) with the heal's sections in place of the ones it measured again, and drop_warning gone."""
    sections = outcome.sections()
    again = {k: v for k, v in sections.items() if v is not None and k != "plots"}
    warnings = [w for w in pending["warnings"] if w != drop_warning]
    if outcome.gguf is not None:
        warnings += [w for w in outcome.gguf["warnings"] if w not in warnings]
    return {**pending, **again, "plots": outcome.plots, "warnings": warnings, "resources": outcome.resources}


def write_report(out_dir: Path, report: dict[str, Any], name: str) -> dict[str, Any]:
    """Write the model card, then the report with the sha256 of every other file written (the card included);
    returns the report as written."""
    written = {**report, "files": None}
    write_text(out_dir / "README.md", model_card(written, name))
    written["files"] = file_hashes(out_dir)
    write_json(out_dir / "mla_report.json", written)
    return written


def full_path(label: str) -> str:
    """MODEL_IN for --report-paths: a local path made absolute, a hub id as it is."""
    path = Path(label).expanduser()
    return str(path.resolve()) if path.exists() else label


def source_facts(source: Source) -> dict[str, Any]:
    """What the model card may publish about the source: a name and hub id that hold no local path, and its
    license as the source declares it (null when it declares none: the card then states none)."""
    label = source.label
    local = Path(label).expanduser().exists()  # resolve() took an existing path as local, anything else as a hub id
    raw = _raw_config(source.root) if source.gguf_file is None else {}
    declared = raw.get("_name_or_path") or getattr(source.config, "_name_or_path", None)
    if not local:
        hub_id: str | None = label
    elif isinstance(declared, str) and OWNED_HUB_ID.match(declared) and not _is_local(declared, source.root):
        hub_id = declared  # e.g. a local copy saved from the hub, whose config still names its repo
    else:
        hub_id = None
    facts: dict[str, Any] = {
        "name": Path(label).expanduser().resolve().name if local else label,
        "hub_id": hub_id,
        "license": None,
    }
    if source.gguf_path is not None:  # the file's own metadata; a README beside it may be anyone's
        return {**facts, **gguf_facts(gguf_general(source.gguf_path))}
    readme = source.root / "README.md"
    meta = _front_matter(readme) if readme.is_file() else (_front_matter(_hub_readme(label)) if not local else {})
    declared_license = meta.get("license") if isinstance(meta.get("license"), str) else raw.get("license")
    if isinstance(declared_license, str) and declared_license.strip():
        facts["license"] = declared_license.strip()
        if facts["license"] == "other":
            for key in ("license_name", "license_link"):
                if isinstance(meta.get(key), str):
                    facts[key] = meta[key]
            link = facts.get("license_link")
            if link and not link.startswith(("http://", "https://")):  # a file of the source repo
                if hub_id is None:
                    del facts["license_link"]
                else:
                    facts["license_link"] = f"https://huggingface.co/{hub_id}/blob/main/{link.lstrip('./')}"
    return facts


def _is_local(name: str, root: Path) -> bool:
    return Path(name).exists() or (root.parent / name).exists()


def _raw_config(root: Path) -> dict[str, Any]:
    """config.json as written (transformers replaces `_name_or_path` with the directory it loads from)."""
    try:
        data = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hub_readme(repo_id: str) -> Path | None:
    """A hub source's model card (the download fetches weights and tokenizer only); None when it cannot be had."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, "README.md"))
    except Exception:
        return None


def _front_matter(readme: Path | None) -> dict[str, Any]:
    """The YAML metadata block at the top of a model card, {} without one (or when it does not parse)."""
    if readme is None:
        return {}
    from huggingface_hub import metadata_load

    try:
        return metadata_load(readme) or {}
    except Exception:  # unreadable file, bad YAML, a block that is not a mapping
        return {}


def layer_table(report: dict[str, Any]) -> Table:
    """The per-layer reconstruction table of a report (mla_report.json data)."""
    table = Table(title="Per-layer reconstruction", show_footer=True)
    summary = report["summary"]
    calibrated = "attn_output_error_mean" in summary
    table.add_column("layer", footer="mean / worst", justify="right")
    table.add_column("K rel. error", footer=_pair(summary["k_rel_error_mean"], summary["k_rel_error_max"]))
    table.add_column("V rel. error", footer=_pair(summary["v_rel_error_mean"], summary["v_rel_error_max"]))
    table.add_column(
        "rotary energy kept",
        footer=f"{summary['rope_energy_kept_mean']:.1%} / {summary['rope_energy_kept_min']:.1%}",
    )
    keys = (
        ("k_act_error", "K err (activations)"),
        ("v_act_error", "V err (activations)"),
        ("attn_output_error", "attn output err"),
    )
    if calibrated:
        for key, title in keys:
            table.add_column(title, footer=_pair(summary[f"{key}_mean"], summary[f"{key}_max"]))
    for layer in report["layers"]:
        row = [
            str(layer["index"]),
            f"{layer['k_rel_error']:.2e}",
            f"{layer['v_rel_error']:.2e}",
            f"{layer['rope_energy_kept']:.1%}",
        ]
        if calibrated:
            row += [f"{layer[key]:.2e}" for key, _ in keys]
        table.add_row(*row)
    return table


def cache_table(report: dict[str, Any]) -> Table:
    kv = report["kv_cache"]
    table = Table(title="KV cache per token")
    for col in ("", "elements / layer", "bytes (all layers)"):
        table.add_column(col, justify="right")
    table.add_row(
        "source", str(kv["original_elements_per_token_per_layer"]), human_bytes(kv["original_bytes_per_token"])
    )
    table.add_row(
        "converted", str(kv["converted_elements_per_token_per_layer"]), human_bytes(kv["converted_bytes_per_token"])
    )
    table.add_row("ratio", f"{kv['ratio']:.3f}", f"{kv['ratio']:.3f}")
    return table


def validation_table(report: dict[str, Any]) -> Table | None:
    v = report.get("validation")
    if not v:
        return None
    table = Table(title=f"Validation on {v['tokens']} held-out tokens ({v['text']})")
    for col in ("model", "perplexity", "ratio to source", "KL to source", "top-1 agreement"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in v["models"]:
        table.add_row(
            row["model"],
            f"{row['perplexity']:.3f}",
            f"{row['perplexity_ratio']:.3f}",
            "" if row["kl_to_source"] is None else f"{row['kl_to_source']:.4f}",
            "" if row["top1_agreement"] is None else f"{row['top1_agreement']:.1%}",
        )
    return table


def long_eval_table(report: dict[str, Any]) -> Table | None:
    """Perplexity ratio to the source by position, then passkey accuracy per length, one row per model."""
    long = report.get("long_eval")
    if not long or not (long.get("buckets") or long.get("passkey")):
        return None
    buckets, passkey = long.get("buckets") or [], long.get("passkey")
    table = Table(title=f"Long context: ratio to source by position ({long['windows']} x {long['length']} tokens)")
    table.add_column("model")
    for b in buckets:
        table.add_column(f"{b['start']}-{b['end']}", justify="right")
    if passkey:
        for n in passkey["lengths"]:
            table.add_column(f"passkey {n}", justify="right")
    names = list(passkey["correct"]) if passkey else ["source", *buckets[0]["models"]]
    for name in names:
        cells = ["1.000" if name == "source" else f"{b['models'][name]['perplexity_ratio']:.3f}" for b in buckets]
        if passkey:
            cells += [f"{c}/{passkey['trials']}" for c in passkey["correct"][name]]
        table.add_row(name, *cells)
    return table


def generation_table(report: dict[str, Any]) -> Table | None:
    g = (report.get("validation") or {}).get("generation")
    if not g:
        return None
    table = Table(title=f"Greedy continuation of: {g['prompt']}")
    table.add_column("model")
    table.add_column("continuation")
    for name, text in g["outputs"].items():
        table.add_row(name, text)
    return table


def _pair(mean: float, worst: float) -> str:
    return f"{mean:.2e} / {worst:.2e}"
