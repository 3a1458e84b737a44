"""The job from MODEL_IN to MODEL_OUT: `run` calls the stages in order, each from its own package, and hands
each the typed result of the ones before (docs/development.md draws the flow).

    prepare (source/, plan/)  ->  texts (source/text.py)  ->  split (plan/split.py, measured by conversion/)
    ->  convert and write (write/converted.py)  ->  verify, validate (evaluate/)  ->  heal (train/)
    ->  report (report/)

The options arrive checked (api.py runs `check_options` and `check_paths`, the only check of the options);
what needs the source's config is judged in `prepare`, before any weight is read. Everything that can fail
with a user-facing message about the input raises ConversionError before MODEL_OUT is touched. With a
fine-tune, MODEL_OUT first holds the complete converted model from before training (plus the training state
under .finetune/), and is replaced by the trained one only when training and validation have finished.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .conversion.driver import source_key_energy
from .engines.export import check_gguf_request, gguf_beside
from .errors import ConversionError
from .evaluate.validation import LongText, Validated, measured
from .evaluate.verify import load_converted, verify
from .hooks import Hooks
from .options import Options, TrainSettings, check_context, finetune_defaults, max_shard_bytes, per_process_windows
from .plan.long_eval import LongEvalPlan, long_eval_plan
from .plan.plan import Plan, plan_for, structurally_lossless
from .plan.preview import CARD_MEMORY, describe, finetune_line, finetune_summary, long_context
from .plan.serving import Verdict, engine_verdicts, engine_warnings
from .profiles import method
from .report import plots
from .report.report import Calibration, Outcome, Report, healed_report, layer_rows, source_facts, write_report
from .source.checkpoint import Source, resolve
from .source.paths import check_model_in
from .source.text import TextNeeds, TextSets, read_text_sets
from .train import finetune
from .train.distill import is_main_process
from .train.finetune import StagedText
from .util import resources
from .write.converted import write_converted
from .write.writer import atomic_output


@dataclass(frozen=True)
class Setup:
    """What is settled before any weight is read: the source, its data-free plan, the resolved options and
    the fine-tune settings (None: no fine-tune)."""

    source: Source
    plan: Plan
    options: Options
    settings: TrainSettings | None

    @property
    def heals(self) -> bool:
        """A fine-tune follows: one was asked for and the conversion approximates something."""
        return self.settings is not None and not structurally_lossless(self.plan)

    @property
    def calibrates(self) -> bool:
        return method(self.options.method).fits_activations and not structurally_lossless(self.plan)


def run(model_in: str, model_out: Path, options: Options, hooks: Hooks | None = None) -> dict[str, Any]:
    """Convert (and fine-tune, and validate); return the report as written to mla_report.json."""
    hooks, started = hooks or Hooks(), time.monotonic()
    options, settings = resolved(options)
    if options.resume:
        assert settings is not None
        return _heal(resolve(model_in, options.allow_pickle), model_out, settings, options, hooks, started, True)
    torch.manual_seed(options.seed)
    hooks.on_stage("reading the source")
    if check_model_in(model_in) is None:  # a hub id: judge the flags on its config before fetching weights
        prepare(model_in, options, settings, weights=False)
    setup = prepare(model_in, options, settings)
    _check_memory(setup)
    hooks.on_engines(engine_verdicts(setup.plan, options.gguf))
    if setup.heals:
        assert settings is not None
        estimate = finetune_summary(setup.source.parameter_count(), settings, options.device)
        hooks.on_note("estimate: " + finetune_line(estimate, options.device))
    report = finetune.main_process_first(lambda: _convert(setup, model_out, hooks, started), enabled=setup.heals)
    if not setup.heals:
        assert report is not None
        return report
    assert settings is not None
    return _heal(setup.source, model_out, settings, options, hooks, started, False)


def preview(model_in: str, options: Options) -> dict[str, Any]:
    """What `run` would do, from the config and the tensor headers alone (no weight is read)."""
    options, settings = resolved(options)
    setup = prepare(model_in, options, settings, weights=False)
    found = engine_verdicts(setup.plan, options.gguf)
    parameters = setup.source.parameter_count()
    return describe(setup.plan, found, parameters, options, settings, setup.heals, long_eval_of(setup.source, options))


def prepare(model_in: str, options: Options, settings: TrainSettings | None, weights: bool = True) -> Setup:
    """The source (config and headers only) and its data-free plan; the checks that need the config run here,
    before any weight is read (weights=False: not even downloaded)."""
    source = resolve(model_in, options.allow_pickle, weights=weights)
    setup = Setup(source, plan_for(source.config, options, source_key_energy(source)), options, settings)
    check_context(options, getattr(source.config, "max_position_embeddings", None), training=setup.heals)
    if options.gguf:
        check_gguf_request(source.root, setup.plan.geometry.vocab, source.gguf_path)
    return setup


def _convert(setup: Setup, model_out: Path, hooks: Hooks, started: float) -> dict[str, Any]:
    """Write the converted checkpoint to MODEL_OUT, verified and validated; with a fine-tune to follow, its
    data and a pending report instead of the validation."""
    source, options = setup.source, setup.options
    whole_fit = whole_models_fit(source)  # else verification and validation are skipped, with a warning
    long_plan = long_eval_of(source, options)
    texts = _texts(setup, whole_fit, long_plan, hooks)
    calib = texts.calib if texts is not None and setup.calibrates else None
    long_ids = texts.calib_long.ids if texts is not None and texts.calib_long is not None else None
    plan = _calibrated(setup, calib.ids, long_ids, hooks) if calib is not None else setup.plan
    hooks.on_plan(plan)
    with atomic_output(model_out, options.force) as tmp:
        calib_ids = texts.calib.ids if texts is not None and texts.calib is not None else None
        layers = write_converted(source, plan, options, hooks, tmp, calib_ids, long_ids)
        gguf = _gguf(tmp, model_out, source, options, hooks) if options.gguf and not setup.heals else None
        verification = None
        if options.verify and whole_fit:
            hooks.on_stage("checking the written model against the source")
            verification = verify(source, tmp, seed=options.seed)
        validated = Validated()
        if setup.heals:
            assert texts is not None and texts.train is not None
            finetune.stage_data(tmp, StagedText(texts.train, texts.evaluation, texts.long, texts.long_note))
        elif options.validate and whole_fit and texts is not None and texts.evaluation is not None:
            hooks.on_stage(_validating(long_plan))
            long = LongText(long_plan, texts.long, texts.long_note, options.seed)
            validated = measured(source, {"converted": load_converted(tmp)}, texts.evaluation, long)
        long_eval = validated.long_eval.as_dict() if validated.long_eval is not None else None
        drawn = plots.draw(tmp, layer_rows(layers), long_eval, None, None)
        outcome = Outcome(verification, validated, None, drawn, gguf, resources.usage(started))
        found = engine_verdicts(plan, options.gguf)
        report = Report(
            source_label=source.label,
            plan=plan,
            layers=layers,
            outcome=outcome,
            warnings=_warnings(setup, plan, found, texts, gguf, whole_fit),
            calibration=_calibration(plan, texts),
            engines=[v.as_dict() for v in found],
            source_facts=source_facts(source),
            texts=[f.as_dict(options.report_paths) for f in texts.files] if texts is not None else [],
            report_paths=options.report_paths,
            long_context=long_context(plan, source.parameter_count(), options.memory or CARD_MEMORY),
        )
        return write_report(tmp, report.as_dict(), model_out.name)


def _heal(
    source: Source,
    model_out: Path,
    settings: TrainSettings,
    options: Options,
    hooks: Hooks,
    started: float,
    resume: bool,
) -> dict[str, Any]:
    """Fine-tune the converted model in MODEL_OUT, check and validate it, and write the result in its place."""
    pending = finetune.pending_report(model_out, resume)
    staged = finetune.load_data(model_out)
    hooks.on_stage("fine-tuning", settings.steps)
    student = load_converted(model_out)
    trained = finetune.fine_tune(
        student,
        source,
        staged.train,
        settings,
        model_out,
        save_every=options.save_every,
        resume=resume,
        device=options.device,
        on_step=hooks.on_step,
    )
    if not is_main_process():
        return pending
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[pending["settings"]["dtype"]]
    long_plan = long_eval_of(source, options)
    with atomic_output(model_out, force=True) as tmp:
        hooks.on_stage("writing the fine-tuned checkpoint")
        finetune.write_trained(student, model_out, tmp, dtype, max_shard_bytes(options.max_shard_size))
        del student
        verification = None
        if options.verify:
            hooks.on_stage("checking the fine-tuned model against the source")
            verification = verify(source, tmp, seed=options.seed)
        models = {}
        if options.validate and staged.evaluation is not None:
            hooks.on_stage(_validating(long_plan))
            models = {"converted": load_converted(model_out), "fine-tuned": load_converted(tmp)}
        long = LongText(long_plan, staged.long, staged.long_note, options.seed)
        validated = measured(source, models, staged.evaluation, long)
        long_eval = validated.long_eval.as_dict() if validated.long_eval is not None else pending.get("long_eval")
        drawn = plots.draw(tmp, pending["layers"], long_eval, trained.losses, trained.resumed_from)
        gguf = _gguf(tmp, model_out, source, options, hooks) if options.gguf else None
        section = finetune.section(trained, settings, staged.train)
        outcome = Outcome(verification, validated, section, drawn, gguf, resources.usage(started))
        return write_report(tmp, healed_report(pending, outcome, finetune.PENDING), model_out.name)


def resolved(options: Options) -> tuple[Options, TrainSettings | None]:
    """The checked options with the device and its fine-tune defaults resolved, and the fine-tune settings
    (None when it is skipped)."""
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
    per_process_windows(settings, int(os.environ.get("WORLD_SIZE", "1")))  # --device auto's default batch
    return options, settings


def resolve_device(device: str) -> str:
    """cpu, cuda, or for auto whichever is there."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return device


def whole_models_fit(source: Source) -> bool:
    """Whether the source and the converted model fit in memory side by side in float32."""
    return resources.fits(resources.float32_models_bytes(source.parameter_count()))


def _check_memory(setup: Setup) -> None:
    """Refuse, before writing anything, the stages that need whole float32 models the machine cannot hold.

    Conversion and calibration on --calib-data stream the checkpoint layer by layer; the fine-tune holds
    the source and the converted model, and sampling calibration text holds the source.
    """
    if setup.heals:
        models, stage = 2, "the fine-tune holds the source and the converted model"
        fix = "--finetune-steps 0 (the conversion itself streams layer by layer)"
    elif setup.calibrates and not setup.options.calib_data:
        models, stage = 1, "sampling calibration text (no --calib-data) holds the whole source model"
        fix = "pass --calib-data FILE (calibration then reads one layer at a time) or use --method svd"
    else:
        return
    need = resources.float32_models_bytes(setup.source.parameter_count(), models)
    if resources.fits(need):
        return
    have = resources.gigabytes(resources.available_memory_bytes())
    raise ConversionError(
        f"{stage} in float32 (about {resources.gigabytes(need)}) and only {have} is available; "
        f"to resolve, {fix}, or use a machine with more memory"
    )


def _texts(setup: Setup, whole_fit: bool, long_plan: LongEvalPlan | None, hooks: Hooks) -> TextSets | None:
    """The windows this run reads (None when it reads none)."""
    options, settings = setup.options, setup.settings
    evaluate = setup.calibrates or (options.validate and whole_fit)
    if not (evaluate or options.eval_data or setup.heals):
        return None
    long_calib = calib_long_len(setup.source, options)
    needs = TextNeeds(
        calibrate=setup.calibrates,
        evaluate=evaluate,
        sample_eval=(options.validate and whole_fit) or setup.heals,
        train_tokens=_train_tokens(options, settings) if setup.heals else 0,
        train_seq_len=settings.seq_len if settings is not None else 0,
        long_len=long_plan.length if long_plan is not None else 0,
        long_windows=long_plan.windows if long_plan is not None else 0,
        calib_long_len=long_calib,
        calib_long_windows=options.calib_long_windows if long_calib else 0,
    )
    hooks.on_stage("preparing calibration text" if setup.calibrates else "preparing text")
    return read_text_sets(setup.source, options, needs, hooks)


def _calibrated(setup: Setup, ids: torch.Tensor, long_ids: torch.Tensor | None, hooks: Hooks) -> Plan:
    """The plan with its split measured on the calibration windows (plan/split.py decides)."""
    from .conversion.budget import CalibrationMeasure  # imports transformers' DeepSeek modeling: seconds
    from .plan.split import calibrated_plan

    measure = CalibrationMeasure(setup.source, ids, setup.options.device, long_ids)
    return calibrated_plan(setup.source.config, setup.options, setup.plan, measure, hooks)


def _gguf(tmp: Path, model_out: Path, source: Source, options: Options, hooks: Hooks) -> Any:
    """Write the GGUF for llama.cpp beside the checkpoint in `tmp`; returns the report's gguf section."""
    assert options.gguf is not None
    hooks.on_stage(f"writing the {options.gguf} GGUF for llama.cpp")
    return gguf_beside(tmp, model_out.name, options.gguf, source.gguf_path)


def _warnings(
    setup: Setup, plan: Plan, verdicts: list[Verdict], texts: TextSets | None, gguf: Any, whole_fit: bool
) -> list[str]:
    """Everything the report and the card warn about, in the order the stages found it."""
    options = setup.options
    found = list(plan.warnings) + engine_warnings(verdicts)
    if gguf is not None:
        found += gguf["warnings"]
    if options.calib_data and not setup.calibrates:
        why = method(options.method).data_free_reason or "the conversion is lossless"
        found.append(f"--calib-data was not used: {why}")
    if texts is not None:
        found += texts.notes
    skipped = [name for name, on in (("--verify", options.verify), ("--validate", options.validate)) if on]
    if not whole_fit and skipped:
        need = resources.gigabytes(resources.float32_models_bytes(setup.source.parameter_count()))
        found.append(
            f"skipped {' and '.join(skipped)}: they hold the source and the converted model in float32 "
            f"(about {need}), more than this machine has available"
        )
    if setup.heals:
        found.append(finetune.PENDING)
    return found


def _calibration(plan: Plan, texts: TextSets | None) -> Calibration | None:
    """The report's calibration section (None without calibration windows)."""
    if texts is None or texts.calib is None:
        return None
    section = Calibration(method=plan.method, source=texts.calib.origin, tokens=texts.calib.tokens)
    if texts.calib_long is not None:
        count, length = texts.calib_long.ids.shape
        section["long_windows"] = {"count": count, "tokens": length}
    return section


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
