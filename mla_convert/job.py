"""The conversion job from MODEL_IN to MODEL_OUT: resolve, plan, calibrate, convert, write, verify, report.

The CLI calls `run` and only prints; everything that can fail with a user-facing message raises
ConversionError before MODEL_OUT is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .calibrate import TextSets, text_sets
from .card import model_card
from .choose import budget_candidates, pick, score_candidates
from .convert import LayerStats, convert, key_energies
from .errors import ConversionError
from .evaluate import compare
from .plan import Plan, geometry_of, make_plan
from .report import Report
from .sequential import SequentialCalibrator, SourceWalk, second_moment
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

METHODS = ("activation", "svd")


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
    method: str = "activation"
    calib_data: str | None = None
    calib_tokens: int = 8192
    calib_seq_len: int = 256
    eval_data: str | None = None
    eval_tokens: int = 8192
    text_column: str = "text"


@dataclass
class Hooks:
    """Progress callbacks so the job stays free of printing."""

    on_plan: Callable[[Plan], None] = lambda plan: None
    on_layer: Callable[[LayerStats], None] = lambda stats: None
    on_stage: Callable[[str], None] = lambda text: None


def plan_for(source: Source, options: Options, covariances: list[torch.Tensor] | None = None, stride: int = 1) -> Plan:
    """The plan for these options; covariances make the transformers profile's rotary choice activation-aware."""
    geo = geometry_of(source.config)
    keep_bias = geo.qkv_bias and options.target == "transformers"
    plan = make_plan(
        source.config,
        target=options.target,
        kv_rank=options.kv_rank,
        rope_dim=options.rope_dim,
        kv_budget=options.kv_budget,
        dtype=options.dtype,
        stride=stride,
        key_energy=lambda: key_energies(source, geo, keep_bias, covariances),
    )
    plan.method = options.method
    return plan


def structurally_lossless(plan: Plan) -> bool:
    """Nothing to approximate: every rotary component has a slot and the latent has full rank."""
    geo = plan.geometry
    every_component = plan.target == "transformers" and plan.rope_dim == geo.kv_heads * geo.head_dim
    single_head = plan.target == "portable" and geo.kv_heads == 1 and all(s is not None for s in plan.slots)
    return not plan.compressed and (every_component or single_head)


def run(model_in: str, model_out: Path, options: Options, hooks: Hooks | None = None) -> Report:
    hooks = hooks or Hooks()
    if options.method not in METHODS:
        raise ConversionError(f"--method must be one of {', '.join(METHODS)}, got '{options.method}'")
    torch.manual_seed(options.seed)
    local_in = Path(model_in).expanduser()
    check_output_path(local_in if local_in.exists() else None, model_out, options.force)
    hooks.on_stage("reading the source")
    source = resolve(model_in)
    plan = plan_for(source, options)  # validates every flag before any heavy work
    calibrated = options.method == "activation" and not structurally_lossless(plan)
    texts: TextSets | None = None
    if calibrated or options.eval_data:
        hooks.on_stage("preparing calibration text" if calibrated else "preparing evaluation text")
        texts = text_sets(
            source,
            calib_data=options.calib_data,
            calib_tokens=options.calib_tokens,
            seq_len=options.calib_seq_len,
            eval_data=options.eval_data,
            eval_tokens=options.eval_tokens,
            column=options.text_column,
            seed=options.seed,
            need_eval=calibrated,
            need_calib=calibrated,
        )
    if calibrated:
        assert texts is not None and texts.calib is not None
        plan = _calibrated_plan(source, options, plan, texts.calib.ids, hooks)
    hooks.on_plan(plan)
    with atomic_output(model_out, options.force) as tmp:
        writer = ShardWriter(tmp, plan.dtype, options.max_shard_bytes)
        calibrator = SequentialCalibrator(source, plan, texts.calib.ids) if texts and texts.calib else None
        hooks.on_stage("converting layers")
        stats = convert(source, plan, writer.add, hooks.on_layer, device=options.device, calibrator=calibrator)
        hooks.on_stage("writing the checkpoint")
        writer.finish()
        write_json(tmp / "config.json", deepseek_config(plan, source.config))
        _copy_tokenizer(source, tmp)
        report = Report(source_label=source.label, plan=plan, layers=stats, warnings=list(plan.warnings))
        if options.calib_data and not calibrated:
            why = "--method svd is data-free" if options.method == "svd" else "the conversion is lossless"
            report.warnings.append(f"--calib-data was not used: {why}")
        if texts is not None:
            report.warnings += texts.notes
            if texts.calib is not None:
                report.calibration = {"method": plan.method, "source": texts.calib.origin, "tokens": texts.calib.tokens}
        if options.verify:
            hooks.on_stage("checking the written model against the source")
            report.verification = verify(source, tmp, seed=options.seed)
        if texts is not None and texts.evaluation is not None:
            hooks.on_stage("measuring one-shot perplexity on held-out text")
            converted = _load(tmp)
            result = compare(source.model(), converted, texts.evaluation.ids)
            report.evaluation = {"text": texts.evaluation.origin, **result.as_dict()}
        write_json(tmp / "mla_report.json", report.as_dict())
        write_text(tmp / "README.md", model_card(report, model_out.name))
    return report


def _calibrated_plan(source: Source, options: Options, plan: Plan, ids: torch.Tensor, hooks: Hooks) -> Plan:
    """Redo the plan with activation statistics: rotary components and, for a budget, the measured split."""
    covariances = None
    if options.target == "transformers" and plan.compressed:
        hooks.on_stage("measuring rotary energy on calibration text")
        walk = SourceWalk(source, ids[:8])
        covariances = [second_moment(walk.step(i)[0]) for i in range(plan.geometry.layers)]
        plan = plan_for(source, options, covariances)
    geo = plan.geometry
    max_rope = geo.head_dim if options.target == "portable" else geo.kv_heads * geo.head_dim
    if options.kv_budget is None or (plan.rope_dim == max_rope and not plan.compressed):
        return plan  # ranks given, or the budget covers the lossless map
    total = math.floor(options.kv_budget * geo.kv_elements)

    def make(rope_dim: int, kv_rank: int, stride: int) -> Plan:
        ranks = replace(options, kv_budget=None, kv_rank=kv_rank, rope_dim=rope_dim)
        return plan_for(source, ranks, covariances, stride)

    candidates = budget_candidates(make, total, geo.head_dim, max_rope, portable=options.target == "portable")
    if len(candidates) == 1:
        return candidates[0]
    hooks.on_stage(f"measuring {len(candidates)} ways to split the budget")
    best, reason = pick(score_candidates(source, candidates, ids))
    best.split_reason = f"budget {options.kv_budget} of {geo.kv_elements} = {total} elements; {reason}"
    return best


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


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
