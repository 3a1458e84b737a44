"""One report object rendered three ways: a rich table, mla_report.json and the model card section.

Schema of mla_report.json (version 1):
  schema_version, tool {name, version}, source {path, architecture, layers, heads, kv_heads, head_dim},
  settings {target, kv_lora_rank, qk_rope_head_dim, rope_theta, dtype, split_reason, lossless_kv_rank,
            rotary_slots [[frequency_index, component] | null]},
  kv_cache {original_elements_per_token_per_layer, converted_elements_per_token_per_layer, ratio,
            original_bytes_per_token, converted_bytes_per_token, dtype_bytes},
  layers [{index, k_rel_error, v_rel_error, rope_energy_kept, k_act_error, v_act_error, attn_output_error}]
         (the last three null without calibration),
  summary {k_rel_error_mean, k_rel_error_max, v_rel_error_mean, v_rel_error_max, rope_energy_kept_mean,
           rope_energy_kept_min, and with calibration k_act_error_*, v_act_error_*, attn_output_error_* (mean, max)},
  calibration {method, source, tokens} or null,
  evaluation {text, tokens, source_perplexity, converted_perplexity, perplexity_ratio, kl_to_source,
              top1_agreement} or null,
  verification {tokens, max_abs_logit_diff, top1_agreement, kl_mean, measured_cache_elements_per_token_per_layer}
               or null when skipped,
  warnings [str]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from . import __version__
from .convert import LayerStats
from .plan import Plan
from .target_config import DTYPE_NAMES


@dataclass
class Verification:
    tokens: int
    max_abs_logit_diff: float
    top1_agreement: float
    kl_mean: float
    measured_cache_elements: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "top1_agreement": self.top1_agreement,
            "kl_mean": self.kl_mean,
            "measured_cache_elements_per_token_per_layer": self.measured_cache_elements,
        }


@dataclass
class Report:
    source_label: str
    plan: Plan
    layers: list[LayerStats]
    verification: Verification | None = None
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None

    @property
    def calibrated(self) -> bool:
        return any(layer.attn_output_error is not None for layer in self.layers)

    def kv_cache(self) -> dict[str, Any]:
        geo = self.plan.geometry
        width = {"float32": 4, "bfloat16": 2, "float16": 2}[DTYPE_NAMES[self.plan.dtype]]
        before, after = geo.kv_elements, self.plan.kv_elements
        return {
            "original_elements_per_token_per_layer": before,
            "converted_elements_per_token_per_layer": after,
            "ratio": after / before,
            "dtype_bytes": width,
            "original_bytes_per_token": before * width * geo.layers,
            "converted_bytes_per_token": after * width * geo.layers,
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
        }
        if self.calibrated:
            for key in ("k_act_error", "v_act_error", "attn_output_error"):
                out[f"{key}_mean"] = stat(key, mean)
                out[f"{key}_max"] = stat(key, max)
        return out

    def as_dict(self) -> dict[str, Any]:
        plan, geo = self.plan, self.plan.geometry
        return {
            "schema_version": 1,
            "tool": {"name": "mla-convert", "version": __version__},
            "source": {
                "path": self.source_label,
                "architecture": geo.arch,
                "layers": geo.layers,
                "heads": geo.heads,
                "kv_heads": geo.kv_heads,
                "head_dim": geo.head_dim,
            },
            "settings": {
                "target": plan.target,
                "kv_lora_rank": plan.kv_rank,
                "qk_rope_head_dim": plan.rope_dim,
                "rope_theta": plan.rope_theta,
                "dtype": DTYPE_NAMES[plan.dtype],
                "split_reason": plan.split_reason,
                "lossless_kv_rank": plan.full_kv_rank,
                "rotary_slots": [list(s) if s is not None else None for s in plan.slots],
            },
            "kv_cache": self.kv_cache(),
            "layers": [
                {
                    "index": layer.index,
                    "k_rel_error": layer.k_rel_error,
                    "v_rel_error": layer.v_rel_error,
                    "rope_energy_kept": layer.rope_energy_kept,
                    "k_act_error": layer.k_act_error,
                    "v_act_error": layer.v_act_error,
                    "attn_output_error": layer.attn_output_error,
                }
                for layer in self.layers
            ],
            "summary": self.summary(),
            "calibration": self.calibration,
            "evaluation": self.evaluation,
            "verification": self.verification.as_dict() if self.verification else None,
            "warnings": self.warnings,
        }

    def layer_table(self) -> Table:
        table = Table(title="Per-layer reconstruction", show_footer=True)
        summary = self.summary()
        table.add_column("layer", footer="mean / worst", justify="right")
        table.add_column("K rel. error", footer=_pair(summary["k_rel_error_mean"], summary["k_rel_error_max"]))
        table.add_column("V rel. error", footer=_pair(summary["v_rel_error_mean"], summary["v_rel_error_max"]))
        table.add_column(
            "rotary energy kept",
            footer=f"{summary['rope_energy_kept_mean']:.1%} / {summary['rope_energy_kept_min']:.1%}",
        )
        if self.calibrated:
            for key, title in (
                ("k_act_error", "K err (activations)"),
                ("v_act_error", "V err (activations)"),
                ("attn_output_error", "attn output err"),
            ):
                table.add_column(title, footer=_pair(summary[f"{key}_mean"], summary[f"{key}_max"]))
        for layer in self.layers:
            row = [
                str(layer.index),
                f"{layer.k_rel_error:.2e}",
                f"{layer.v_rel_error:.2e}",
                f"{layer.rope_energy_kept:.1%}",
            ]
            if self.calibrated:
                row += [f"{layer.k_act_error:.2e}", f"{layer.v_act_error:.2e}", f"{layer.attn_output_error:.2e}"]
            table.add_row(*row)
        return table

    def cache_table(self) -> Table:
        kv = self.kv_cache()
        table = Table(title="KV cache per token")
        for col in ("", "elements / layer", "bytes (all layers)"):
            table.add_column(col, justify="right")
        table.add_row(
            "source", str(kv["original_elements_per_token_per_layer"]), _bytes(kv["original_bytes_per_token"])
        )
        table.add_row(
            "converted", str(kv["converted_elements_per_token_per_layer"]), _bytes(kv["converted_bytes_per_token"])
        )
        table.add_row("ratio", f"{kv['ratio']:.3f}", f"{kv['ratio']:.3f}")
        return table

    def card_section(self) -> str:
        kv, summary, plan = self.kv_cache(), self.summary(), self.plan
        lines = [
            "## Conversion",
            "",
            f"- Source: `{self.source_label}` ({plan.geometry.arch}, {plan.geometry.layers} layers, "
            f"{plan.geometry.heads} query heads, {plan.geometry.kv_heads} KV heads, head_dim {plan.geometry.head_dim})",
            f"- Target profile: `{plan.target}`; kv_lora_rank {plan.kv_rank} (lossless {plan.full_kv_rank}), "
            f"qk_rope_head_dim {plan.rope_dim}, rope_theta {plan.rope_theta:g}, dtype {DTYPE_NAMES[plan.dtype]}",
            f"- Split: {plan.split_reason}",
            f"- KV cache per token per layer: {kv['original_elements_per_token_per_layer']} -> "
            f"{kv['converted_elements_per_token_per_layer']} elements (ratio {kv['ratio']:.3f}); "
            f"{_bytes(kv['original_bytes_per_token'])} -> {_bytes(kv['converted_bytes_per_token'])} per token "
            "over all layers",
            f"- Key reconstruction error (relative Frobenius): mean {summary['k_rel_error_mean']:.2e}, "
            f"worst {summary['k_rel_error_max']:.2e}",
            f"- Value reconstruction error: mean {summary['v_rel_error_mean']:.2e}, "
            f"worst {summary['v_rel_error_max']:.2e}",
            f"- Rotary key energy that still rotates: mean {summary['rope_energy_kept_mean']:.1%}, "
            f"lowest {summary['rope_energy_kept_min']:.1%}",
        ]
        if self.calibration:
            c = self.calibration
            lines.append(f"- Method: {c['method']}, calibrated on {c['tokens']} tokens ({c['source']})")
        if self.calibrated:
            lines.append(
                f"- On calibration activations: key error mean {summary['k_act_error_mean']:.2e}, value error "
                f"mean {summary['v_act_error_mean']:.2e}, attention output error mean "
                f"{summary['attn_output_error_mean']:.2e}"
            )
        if self.evaluation:
            e = self.evaluation
            lines.append(
                f"- One-shot perplexity on {e['tokens']} held-out tokens ({e['text']}): "
                f"source {e['source_perplexity']:.3f}, converted {e['converted_perplexity']:.3f} "
                f"(ratio {e['perplexity_ratio']:.3f}); KL to source "
                f"{e['kl_to_source']:.4f} nats, top-1 agreement {e['top1_agreement']:.1%}"
            )
        if self.verification:
            v = self.verification
            lines.append(
                f"- Check against the source on {v.tokens} tokens (float32): max |Δlogit| "
                f"{v.max_abs_logit_diff:.2e}, top-1 agreement {v.top1_agreement:.1%}, mean KL {v.kl_mean:.2e}; "
                f"live cache holds {v.measured_cache_elements} elements per token per layer"
            )
        lines += ["", "| layer | K rel. error | V rel. error | rotary energy kept |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {x.index} | {x.k_rel_error:.2e} | {x.v_rel_error:.2e} | {x.rope_energy_kept:.1%} |" for x in self.layers
        ]
        if self.warnings:
            lines += ["", "### Warnings", ""] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def _pair(mean: float, worst: float) -> str:
    return f"{mean:.2e} / {worst:.2e}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
