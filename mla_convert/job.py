"""The job from MODEL_IN to MODEL_OUT, stage by stage: load the source, plan, calibrate and convert, write,
verify, then fine-tune (train/), validate (evaluate/) and report (report/). Each stage is a subpackage; this
module only calls them in order and hands each what it needs.

The CLI calls `run` and only prints. Everything that can fail with a user-facing message about the
input raises ConversionError before MODEL_OUT is touched. With a fine-tune, MODEL_OUT first holds the
complete converted model from before training (plus the training state under .finetune/), and is
replaced by the trained one only when training and validation have finished.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .conversion.driver import convert, key_energies
from .engines.export import check_gguf_request, gguf_beside
from .errors import ConversionError
from .evaluate import validation
from .evaluate.validation import LongText
from .evaluate.verify import load_converted, verify
from .hooks import Hooks
from .options import Options, TrainSettings, check_options, check_settings, finetune_defaults, max_shard_bytes
from .plan.long_eval import LongEvalPlan, long_eval_plan
from .plan.plan import Plan, geometry_of, make_plan, resolve_dtype
from .plan.preview import CARD_MEMORY, describe, finetune_line, finetune_summary, long_context
from .plan.serving import REFUSES, Verdict, verdicts
from .plan.target_config import deepseek_config
from .report import plots
from .report.card import model_card
from .report.report import Report, source_facts
from .source.checkpoint import Source, resolve
from .source.paths import check_model_in, check_paths
from .source.text import TextSets, TokenWindows, check_lengths, text_sets
from .train import finetune
from .train.distill import is_main_process
from .train.finetune import StagedText
from .util import resources
from .write.manifest import file_hashes
from .write.tokenizer import copy_tokenizer
from .write.writer import (
    ShardWriter,
    atomic_output,
    write_json,
    write_text,
)


def plan_for(
    source: Source,
    options: Options,
    covariances: list[torch.Tensor] | None = None,
    stride: int = 1,
    density: int = 1,
) -> Plan:
    """The plan for these options; covariances make the transformers profile's rotary choice activation-aware."""
    geo = geometry_of(source.config, options.allow_full_attention)
    keep_bias = geo.qkv_bias and options.target == "transformers"
    plan = make_plan(
        source.config,
        target=options.target,
        kv_rank=options.kv_rank,
        rope_dim=options.rope_dim,
        kv_budget=options.kv_budget,
        dtype=options.dtype,
        stride=stride,
        density=density,
        key_energy=lambda: key_energies(
            source, geo, keep_bias, covariances, resolve_dtype(options.dtype, source.config)
        ),
        engine=options.engine,
        allow_full_attention=options.allow_full_attention,
    )
    plan.method = options.method
    return plan


def engine_verdicts(plan: Plan, options: Options) -> list[Verdict]:
    """Which engines serve this plan's checkpoint (widths and profile decide; see plan/serving.py)."""
    return verdicts(plan.target, plan.latent_width, plan.rope_dim, options.gguf, plan.geometry.target_class)


def engine_warnings(found: list[Verdict]) -> list[str]:
    """A checkpoint that an engine loads and then refuses, or computes wrongly, is never written silently."""
    return [f"{v.engine} {v.status}: {v.detail}" for v in found if v.engine == "vLLM" and v.status == REFUSES]


def structurally_lossless(plan: Plan) -> bool:
    """Nothing to approximate: every rotary component has a slot, the latent has full rank, and the family has
    nothing DeepSeek-V3 lacks (Qwen3's per-head q/k norms, a renormalized expert router)."""
    geo = plan.geometry
    every_component = plan.target == "transformers" and plan.rope_dim == geo.kv_heads * geo.rotary_dim
    single_head = plan.target == "portable" and geo.kv_heads == 1 and all(s is not None for s in plan.slots)
    exact_family = not geo.family.qk_norm and not (geo.experts is not None and geo.experts.renormalize)
    return not plan.compressed and exact_family and (every_component or single_head)


def run(model_in: str, model_out: Path, options: Options, hooks: Hooks | None = None) -> dict[str, Any]:
    """Convert (and fine-tune, and validate); return the report as written to mla_report.json."""
    started = time.monotonic()
    hooks = hooks or Hooks()
    options, settings = _check_options(options)
    if options.resume:
        assert settings is not None
        source = resolve(model_in, options.allow_pickle)
        return _heal(source, model_out, settings, options, hooks, resume=True, started=started)
    torch.manual_seed(options.seed)
    check_paths(model_in, model_out, options.force)
    hooks.on_stage("reading the source")
    if check_model_in(model_in) is None:  # a hub id: judge the flags on its config before fetching weights
        _prepare(model_in, options, settings, weights=False)
    source, plan, wants_finetune = _prepare(model_in, options, settings)
    _check_memory(source, options, plan, wants_finetune)
    found = engine_verdicts(plan, options)
    hooks.on_engines(found)
    if wants_finetune:
        estimate = finetune_summary(source.parameter_count(), settings, options.device)
        hooks.on_note("estimate: " + finetune_line(estimate, options.device))
    report = finetune.main_process_first(
        lambda: _convert_stage(source, model_out, options, plan, settings, hooks, started), enabled=wants_finetune
    )
    if not wants_finetune:  # a lossless conversion has nothing to heal
        assert report is not None
        return report
    assert settings is not None
    return _heal(source, model_out, settings, options, hooks, resume=False, started=started)


def preview(model_in: str, options: Options, model_out: Path | None = None) -> dict[str, Any]:
    """What `run` would do, from the config and the tensor headers alone (no weight is read)."""
    options, settings = _check_options(options)
    if model_out is not None:
        check_paths(model_in, model_out, options.force)
    source, plan, wants_finetune = _prepare(model_in, options, settings, weights=False)
    found = engine_verdicts(plan, options)
    return describe(
        plan, found, source.parameter_count(), options, settings, wants_finetune, long_eval_of(source, options)
    )


def _prepare(
    model_in: str, options: Options, settings: TrainSettings | None, weights: bool = True
) -> tuple[Source, Plan, bool]:
    """The source (config and headers only), the data-free plan and whether a fine-tune follows; every check
    that needs the config runs here, before any weight is read (weights=False: not even downloaded)."""
    source = resolve(model_in, options.allow_pickle, weights=weights)
    plan = plan_for(source, options)
    wants_finetune = settings is not None and not structurally_lossless(plan)
    if wants_finetune:
        assert settings is not None
        check_settings(settings, getattr(source.config, "max_position_embeddings", None))
    check_lengths(options.calib_seq_len, getattr(source.config, "max_position_embeddings", None))
    if options.gguf:
        check_gguf_request(plan.target, source.root, plan.geometry.vocab, source.gguf_path)
    return source, plan, wants_finetune


def whole_models_fit(source: Source) -> bool:
    """Whether the source and the converted model fit in memory side by side in float32."""
    return resources.fits(resources.float32_models_bytes(source.parameter_count()))


def _check_memory(source: Source, options: Options, plan: Plan, wants_finetune: bool) -> None:
    """Refuse, before writing anything, the stages that need whole float32 models the machine cannot hold.

    Conversion and calibration on --calib-data stream the checkpoint layer by layer; the fine-tune holds
    the source and the converted model, and sampling calibration text holds the source.
    """
    sampling = options.method == "activation" and not structurally_lossless(plan) and not options.calib_data
    if wants_finetune:
        models, stage = 2, "the fine-tune holds the source and the converted model"
        fix = "--finetune-steps 0 (the conversion itself streams layer by layer)"
    elif sampling:
        models, stage = 1, "sampling calibration text (no --calib-data) holds the whole source model"
        fix = "pass --calib-data FILE (calibration then reads one layer at a time) or use --method svd"
    else:
        return
    need = resources.float32_models_bytes(source.parameter_count(), models)
    if resources.fits(need):
        return
    have = resources.gigabytes(resources.available_memory_bytes())
    raise ConversionError(
        f"{stage} in float32 (about {resources.gigabytes(need)}) and only {have} is available; "
        f"to resolve, {fix}, or use a machine with more memory"
    )


def _check_options(options: Options) -> tuple[Options, TrainSettings | None]:
    """The options with the device and its fine-tune defaults resolved, and the fine-tune settings (None
    when it is skipped), after every check that needs no model."""
    check_options(options)
    device = resolve_device(options.device)
    options = finetune_defaults(replace(options, device=device), device)
    if options.finetune_steps == 0:
        return options, None
    assert options.finetune_steps is not None
    warmup = options.train.warmup_steps
    settings = replace(
        options.train,
        steps=options.finetune_steps,
        seed=options.seed,
        warmup_steps=max(1, options.finetune_steps // 10) if warmup is None else warmup,
    )
    check_settings(settings, None)
    return options, settings


def resolve_device(device: str) -> str:
    """cpu, cuda, or for auto whichever is there."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return device


def _convert_stage(
    source: Source,
    model_out: Path,
    options: Options,
    plan: Plan,
    settings: TrainSettings | None,
    hooks: Hooks,
    started: float,
) -> dict[str, Any]:
    """Write the converted checkpoint to MODEL_OUT; with a fine-tune to follow, also its data and a pending note."""
    calibrated = options.method == "activation" and not structurally_lossless(plan)
    training = settings is not None and not structurally_lossless(plan)
    whole_fit = whole_models_fit(source)  # else verification and validation are skipped, with a warning
    need_eval = calibrated or (options.validate and whole_fit)
    long_plan = long_eval_of(source, options)
    long_calib = calib_long_len(source, options)
    texts: TextSets | None = None
    if need_eval or options.eval_data or training:
        hooks.on_stage("preparing calibration text" if calibrated else "preparing text")
        texts = text_sets(
            source,
            calib_data=options.calib_data,
            calib_tokens=options.calib_tokens,
            seq_len=options.calib_seq_len,
            eval_data=options.eval_data,
            eval_tokens=options.eval_tokens,
            column=options.text_column,
            seed=options.seed,
            need_eval=need_eval,
            sample_eval=(options.validate and whole_fit) or training,
            need_calib=calibrated,
            train_data=options.train_data,
            train_tokens=_train_tokens(options, settings) if training else 0,
            train_seq_len=settings.seq_len if settings is not None else 0,
            hooks=hooks,
            sampled_share=options.calib_sampled,
            long_len=long_plan.length if long_plan is not None else 0,
            long_windows=long_plan.windows if long_plan is not None else 0,
            calib_long_len=long_calib,
            calib_long_windows=options.calib_long_windows if long_calib else 0,
        )
    long_ids = texts.calib_long.ids if texts is not None and texts.calib_long is not None else None
    if calibrated:
        assert texts is not None and texts.calib is not None
        plan = _calibrated_plan(source, options, plan, texts.calib.ids, hooks, long_ids)
    hooks.on_plan(plan)
    with atomic_output(model_out, options.force) as tmp:
        calibrator = None
        if texts and texts.calib:
            from .conversion.calibrator import SequentialCalibrator  # imports transformers' DeepSeek modeling: seconds

            calibrator = SequentialCalibrator(
                source,
                plan,
                texts.calib.ids,
                options.device,
                options.layer_steps,
                # at full size it measured no gain, except where per-head q/k norms were replaced by scales
                options.query_refit and (plan.compressed or plan.geometry.family.qk_norm),
                long_ids=long_ids,
            )
        hooks.on_stage("converting layers", plan.geometry.layers)
        with ShardWriter(tmp, plan.dtype, max_shard_bytes(options.max_shard_size)) as writer:
            stats = convert(source, plan, writer.add, hooks.on_layer, device=options.device, calibrator=calibrator)
            hooks.on_stage("writing the checkpoint")
            writer.finish()
        write_json(tmp / "config.json", deepseek_config(plan, source.config))
        copy_tokenizer(source, tmp)
        found = engine_verdicts(plan, options)
        report = Report(
            source_label=source.label,
            source_facts=source_facts(source),
            plan=plan,
            layers=stats,
            warnings=list(plan.warnings) + engine_warnings(found),
            engines=[v.as_dict() for v in found],
            texts=[f.as_dict(options.report_paths) for f in texts.files] if texts is not None else [],
            report_paths=options.report_paths,
            long_context=long_context(plan, source.parameter_count(), options.memory or CARD_MEMORY),
        )
        if options.gguf and not training:
            hooks.on_stage(f"writing the {options.gguf} GGUF for llama.cpp")
            report.gguf = gguf_beside(tmp, model_out.name, options.gguf, source.gguf_path)
            report.warnings += report.gguf["warnings"]
        if options.calib_data and not calibrated:
            why = "--method svd is data-free" if options.method == "svd" else "the conversion is lossless"
            report.warnings.append(f"--calib-data was not used: {why}")
        if texts is not None:
            report.warnings += texts.notes
            if texts.calib is not None:
                report.calibration = {"method": plan.method, "source": texts.calib.origin, "tokens": texts.calib.tokens}
                if texts.calib_long is not None:
                    count, length = texts.calib_long.ids.shape
                    report.calibration["long_windows"] = {"count": count, "tokens": length}
        if not whole_fit:
            skipped = [name for name, on in (("--verify", options.verify), ("--validate", options.validate)) if on]
            if skipped:
                need = resources.gigabytes(resources.float32_models_bytes(source.parameter_count()))
                report.warnings.append(
                    f"skipped {' and '.join(skipped)}: they hold the source and the converted model in float32 "
                    f"(about {need}), more than this machine has available"
                )
        if options.verify and whole_fit:
            hooks.on_stage("checking the written model against the source")
            report.verification = verify(source, tmp, seed=options.seed)
        data = report.as_dict()
        if training:
            assert texts is not None and texts.train is not None
            finetune.stage_data(tmp, StagedText(texts.train, texts.evaluation, texts.long, texts.long_note))
            data["warnings"].append(finetune.PENDING)
        elif options.validate and whole_fit and texts is not None and texts.evaluation is not None:
            hooks.on_stage(_validating(long_plan))
            long = LongText(long_plan, texts.long, texts.long_note, options.seed)
            data = _validated(data, source, {"converted": load_converted(tmp)}, texts.evaluation, tmp, long=long)
        else:
            data = _validated(data, None, {}, None, tmp)
        data["resources"] = resources.usage(started)
        _write_report(tmp, data, model_out.name)
    return data


def _train_tokens(options: Options, settings: TrainSettings | None) -> int:
    """Text the fine-tune reads: --train-tokens of a file; of sampled text (slow to make) only what the
    steps consume, each window once."""
    if settings is None or settings.batch_size is None:
        return 0
    if options.train_data or options.calib_data:
        return options.train_tokens
    return min(options.train_tokens, settings.steps * settings.batch_size * settings.seq_len)


def calib_long_len(source: Source, options: Options) -> int:
    """Tokens per long calibration window: --calib-long-len up to the source's context; 0 when none is asked
    for or none would be longer than the short windows."""
    context = getattr(source.config, "max_position_embeddings", None)
    length = min(options.calib_long_len, context) if context else options.calib_long_len
    return length if length > options.calib_seq_len else 0


def _calibrated_plan(
    source: Source, options: Options, plan: Plan, ids: torch.Tensor, hooks: Hooks, long_ids: torch.Tensor | None
) -> Plan:
    """Redo the plan with activation statistics: rotary components and, for a budget, the measured split."""
    from .conversion.budget import budget_candidates, full_size_candidates, pick, score_candidates, stride_candidates
    from .conversion.calibrator import SourceWalk, second_moment

    covariances = None
    if options.target == "transformers" and plan.compressed:
        hooks.on_stage("measuring rotary energy on calibration text")
        walk = SourceWalk(source, ids[:8], options.device)
        covariances = [second_moment(walk.step(i)[0]).cpu() for i in range(plan.geometry.layers)]
        plan = plan_for(source, options, covariances)
    geo = plan.geometry
    max_rope = geo.rotary_dim if options.target == "portable" else geo.kv_heads * geo.rotary_dim

    def make(rope_dim: int, kv_rank: int, stride: int, density: int = 1) -> Plan:
        ranks = replace(options, kv_budget=None, kv_rank=kv_rank, rope_dim=rope_dim)
        return plan_for(source, ranks, covariances, stride, density)

    fixed_width = options.engine is not None or (options.target == "portable" and options.rope_dim is not None)
    if fixed_width:  # the widths are fixed: measure which source frequencies the ladder holds
        candidates = stride_candidates(make, plan.rope_dim, plan.kv_rank, geo.rotary_dim)
        flag = f"--engine {options.engine}" if options.engine is not None else f"--rope-dim {plan.rope_dim}"
        why = f"measuring {len(candidates)} rotary ladders for {flag}"
        prefix = plan.split_reason
    elif options.target == "portable" and not plan.compressed and options.kv_rank is None:
        # full size: a denser ladder gives more rotary components a slot in the same cache
        candidates = full_size_candidates(make, plan, geo.rotary_dim, geo.kv_heads)
        why = f"measuring {len(candidates)} rotary ladders at full size"
        prefix = plan.split_reason
    elif options.kv_budget is None or (plan.rope_dim == max_rope and not plan.compressed):
        return plan  # ranks given, or the budget covers the lossless map
    else:
        total = math.floor(options.kv_budget * geo.kv_elements)
        candidates = budget_candidates(make, total, geo.rotary_dim, max_rope, portable=options.target == "portable")
        why = f"measuring {len(candidates)} ways to split the budget"
        prefix = f"budget {options.kv_budget} of {geo.kv_elements} = {total} elements"
    if len(candidates) == 1:
        return candidates[0]
    layers = plan.geometry.layers
    hooks.on_stage(f"{why}, layer by layer", layers)
    on_layer = lambda i: hooks.on_progress(i + 1, layers)  # noqa: E731
    scored = score_candidates(source, candidates, ids, on_layer, device=options.device, long_ids=long_ids)
    best, reason = pick(scored)
    best.split_reason = f"{prefix}; {reason}"
    return best


def _heal(
    source: Source,
    model_out: Path,
    settings: TrainSettings,
    options: Options,
    hooks: Hooks,
    *,
    resume: bool,
    started: float,
) -> dict[str, Any]:
    """Fine-tune the converted model in MODEL_OUT, check and validate it, and write the result in its place."""
    report = finetune.pending_report(model_out, resume)
    staged = finetune.load_data(model_out)
    train_text, evaluation = staged.train, staged.evaluation
    hooks.on_stage("fine-tuning", settings.steps)
    student = load_converted(model_out)
    result = finetune.fine_tune(
        student,
        source,
        train_text,
        settings,
        model_out,
        save_every=options.save_every,
        resume=resume,
        device=options.device,
        on_step=hooks.on_step,
    )
    if not is_main_process():
        return report
    report["warnings"] = [w for w in report["warnings"] if w != finetune.PENDING]
    report["finetune"] = finetune.section(result, settings, train_text)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[report["settings"]["dtype"]]
    with atomic_output(model_out, force=True) as tmp:
        hooks.on_stage("writing the fine-tuned checkpoint")
        finetune.write_trained(student, model_out, tmp, dtype, max_shard_bytes(options.max_shard_size))
        del student
        if options.verify:
            hooks.on_stage("checking the fine-tuned model against the source")
            report["verification"] = verify(source, tmp, seed=options.seed).as_dict()
        models = {}
        if options.validate and evaluation is not None:
            hooks.on_stage(_validating(long_eval_of(source, options)))
            models = {"converted": load_converted(model_out), "fine-tuned": load_converted(tmp)}
        long = LongText(long_eval_of(source, options), staged.long, staged.long_note, options.seed)
        report = _validated(report, source, models, evaluation, tmp, result.losses, result.resumed_from, long)
        if options.gguf:
            hooks.on_stage(f"writing the {options.gguf} GGUF for llama.cpp")
            report["gguf"] = gguf_beside(tmp, model_out.name, options.gguf, source.gguf_path)
            report["warnings"] += [w for w in report["gguf"]["warnings"] if w not in report["warnings"]]
        report["resources"] = resources.usage(started)
        _write_report(tmp, report, model_out.name)
    return report


def _write_report(out_dir: Path, report: dict[str, Any], name: str) -> None:
    """The model card, then the report with the sha256 of every other file written (the card included)."""
    write_text(out_dir / "README.md", model_card(report, name))
    report["files"] = file_hashes(out_dir)
    write_json(out_dir / "mla_report.json", report)


def _validated(
    report: dict[str, Any],
    source: Source | None,
    models: dict[str, Any],
    text: TokenWindows | None,
    out_dir: Path,
    losses: list[float] | None = None,
    resumed_from: int | None = None,
    long: LongText | None = None,
) -> dict[str, Any]:
    """Measure `models` against the source on `text` (when given) and at long context, then draw the plots."""
    return plots.draw(validation.measured(report, source, models, text, long), out_dir, losses, resumed_from)


def _validating(long: LongEvalPlan | None) -> str:
    if long is None:
        return "validating on held-out text"
    return f"validating on held-out text, and at long context up to {long.length} tokens ({long.mode})"


def long_eval_of(source: Source, options: Options) -> LongEvalPlan | None:
    """The long-context validation this run does (None with --no-validate or --long-eval off)."""
    if not options.validate:
        return None
    return long_eval_plan(
        options.long_eval, options.long_eval_len, getattr(source.config, "max_position_embeddings", None)
    )
