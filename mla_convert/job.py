"""The conversion job from MODEL_IN to MODEL_OUT: resolve, plan, convert, write, verify, report.

The CLI calls `run` and only prints; everything that can fail with a user-facing message raises
ConversionError before MODEL_OUT is touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .card import model_card
from .convert import LayerStats, convert, key_energies
from .plan import Plan, geometry_of, make_plan
from .report import Report
from .source import Source, resolve
from .target_config import deepseek_config
from .verify import verify
from .writer import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    atomic_output,
    check_output_path,
    copy_file,
    write_json,
    write_text,
)


@dataclass
class Options:
    target: str = "portable"
    kv_rank: int | None = None
    rope_dim: int | None = None
    kv_budget: float | None = None
    dtype: str = "auto"
    force: bool = False
    seed: int = 0
    verify: bool = True
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    device: str = "cpu"


@dataclass
class Hooks:
    """Progress callbacks so the job stays free of printing."""

    on_plan: Callable[[Plan], None] = lambda plan: None
    on_layer: Callable[[LayerStats], None] = lambda stats: None
    on_stage: Callable[[str], None] = lambda text: None


def plan_for(source: Source, options: Options) -> Plan:
    geo = geometry_of(source.config)
    return make_plan(
        source.config,
        target=options.target,
        kv_rank=options.kv_rank,
        rope_dim=options.rope_dim,
        kv_budget=options.kv_budget,
        dtype=options.dtype,
        key_energy=lambda: key_energies(source, geo, keep_bias=geo.qkv_bias and options.target == "transformers"),
    )


def run(model_in: str, model_out: Path, options: Options, hooks: Hooks | None = None) -> Report:
    import torch

    hooks = hooks or Hooks()
    torch.manual_seed(options.seed)
    local_in = Path(model_in).expanduser()
    check_output_path(local_in if local_in.exists() else None, model_out, options.force)
    hooks.on_stage("reading the source")
    source = resolve(model_in)
    plan = plan_for(source, options)
    hooks.on_plan(plan)
    with atomic_output(model_out, options.force) as tmp:
        writer = ShardWriter(tmp, plan.dtype, options.max_shard_bytes)
        stats = convert(source, plan, writer.add, hooks.on_layer, device=options.device)
        hooks.on_stage("writing the checkpoint")
        writer.finish()
        write_json(tmp / "config.json", deepseek_config(plan, source.config))
        _copy_tokenizer(source, tmp)
        report = Report(source_label=source.label, plan=plan, layers=stats, warnings=list(plan.warnings))
        if options.verify:
            hooks.on_stage("checking the written model against the source")
            report.verification = verify(source, tmp, seed=options.seed)
        write_json(tmp / "mla_report.json", report.as_dict())
        write_text(tmp / "README.md", model_card(report, model_out.name))
    return report


def _copy_tokenizer(source: Source, out: Path) -> None:
    files = list(source.tokenizer_files())
    for path in files:
        copy_file(path, out)
    gen = source.generation_config_file()
    if gen is not None:
        copy_file(gen, out)
    if source.gguf_file is not None:
        from transformers import GenerationConfig

        tokenizer = source.tokenizer()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        GenerationConfig.from_model_config(source.config).save_pretrained(str(out))
