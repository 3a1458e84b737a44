"""The `mla-convert` command: parse flags, call the job, print. No conversion logic lives here."""

from __future__ import annotations

import logging
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import __version__
from .errors import ConversionError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
out = Console()
err = Console(stderr=True)


class Target(str, Enum):
    portable = "portable"
    transformers = "transformers"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Method(str, Enum):
    activation = "activation"
    svd = "svd"


class TrainScope(str, Enum):
    attention = "attention"
    all = "all"


class Engine(str, Enum):
    vllm = "vllm"


class GgufType(str, Enum):
    f32 = "f32"
    bf16 = "bf16"
    q8_0 = "q8_0"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


def _parse_size(text: str) -> int:
    units = {"kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "b": 1}
    lowered = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if lowered.endswith(unit):
            number = lowered[: -len(unit)].strip()
            break
    else:
        unit, number = "b", lowered
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise typer.BadParameter(f"cannot read size '{text}' (examples: 5GB, 500MB)") from None
    if value <= 0:
        raise typer.BadParameter("must be positive")
    return value


def _version(value: bool) -> None:
    if value:
        out.print(f"mla-convert {__version__}")
        raise typer.Exit()


@app.command()
def convert(
    model_in: Annotated[str, typer.Argument(help="Local model directory, Hugging Face model id, or .gguf file.")],
    model_out: Annotated[Path, typer.Argument(help="Directory to write the DeepSeek-V3 checkpoint to.")],
    kv_rank: Annotated[int | None, typer.Option(help="Latent width (kv_lora_rank). Default: lossless.")] = None,
    rope_dim: Annotated[
        int | None, typer.Option(help="Width of the shared rotary key (qk_rope_head_dim), even.")
    ] = None,
    kv_budget: Annotated[
        float | None,
        typer.Option(help="KV cache per token as a fraction of the source's (0 < F <= 1); splits latent/rope."),
    ] = None,
    target: Annotated[
        Target, typer.Option(help="portable: identical in transformers, vLLM, SGLang. transformers: always exact.")
    ] = Target.portable,
    method: Annotated[
        Method, typer.Option(help="activation: fit to calibration activations (default); svd: data-free weight SVD.")
    ] = Method.activation,
    engine: Annotated[
        Engine | None,
        typer.Option(
            help="Widths this serving engine runs: vllm = latent 512 + rotary 64 (real components up to "
            "--kv-rank or the lossless rank, zeros beyond)."
        ),
    ] = None,
    gguf: Annotated[
        GgufType | None,
        typer.Option(
            help="Also write MODEL_OUT/NAME-TYPE.gguf for llama.cpp. q8_0 keeps attn_kv_a_mqa in float32 "
            "(f16 would erase its tiny latent rows)."
        ),
    ] = None,
    calib_data: Annotated[
        str | None,
        typer.Option(
            help="Calibration text: .txt, .jsonl or .parquet (text column), or a hub dataset ID[:CONFIG][@SPLIT]."
        ),
    ] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens to use.")] = 8192,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    eval_data: Annotated[
        str | None, typer.Option(help="Held-out evaluation text (same formats); default: held-out calibration text.")
    ] = None,
    eval_tokens: Annotated[int, typer.Option(help="Evaluation tokens to use at most.")] = 8192,
    text_column: Annotated[
        str, typer.Option(help="Field or column holding the text in .jsonl/.parquet/datasets.")
    ] = "text",
    finetune_steps: Annotated[
        int, typer.Option(help="Distillation steps after converting; 0 skips the fine-tune (lossless never trains).")
    ] = 100,
    train_data: Annotated[
        str | None, typer.Option(help="Fine-tune text (same formats); default: --calib-data, else sampled text.")
    ] = None,
    train_tokens: Annotated[int, typer.Option(help="Fine-tune tokens to read at most (repeated if needed).")] = 65536,
    train_seq_len: Annotated[int, typer.Option(help="Tokens per fine-tune window.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Windows per optimizer step, over all processes.")] = 8,
    micro_batch_size: Annotated[int, typer.Option(help="Windows per forward pass (gradient accumulation).")] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate, relative to each weight tensor's RMS (AdamW).")] = 1e-3,
    warmup_steps: Annotated[
        int | None, typer.Option(help="Linear warmup steps before the cosine decay. Default: a tenth of the steps.")
    ] = None,
    train: Annotated[
        TrainScope, typer.Option(help="attention: the converted attention only (default); all: every weight.")
    ] = TrainScope.attention,
    distill_weight: Annotated[
        float, typer.Option(help="Weight of the KL-to-source loss; the rest is the language-model loss.")
    ] = 1.0,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations to save memory.")
    ] = False,
    save_every: Annotated[int, typer.Option(help="Save a training checkpoint every N steps (0: never).")] = 25,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the unfinished fine-tune in MODEL_OUT from its last checkpoint.")
    ] = False,
    validate: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Measure quality on held-out text at the end.")
    ] = True,
    dtype: Annotated[DType, typer.Option(help="Output dtype; auto keeps the source's.")] = DType.auto,
    device: Annotated[Device, typer.Option(help="Where to compute the factorization.")] = Device.cpu,
    force: Annotated[bool, typer.Option("--force", help="Replace MODEL_OUT if it exists.")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Read .bin/.pt weights (loaded with weights_only: tensors only, no code)."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed (used for the check tokens without a tokenizer).")] = 0,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Check the written model's logits against the source.")
    ] = True,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the final line.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail; tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Convert a Llama-family MHA/GQA checkpoint into a stock DeepSeek-V3 (MLA) checkpoint."""
    _quiet_libraries(verbose)
    try:
        from .job import Hooks, Options, run
        from .train import TrainSettings

        resolved_device = _resolve_device(device.value)
        options = Options(
            target=target.value,
            kv_rank=kv_rank,
            rope_dim=rope_dim,
            kv_budget=kv_budget,
            dtype=dtype.value,
            force=force,
            seed=seed,
            verify=verify,
            max_shard_bytes=_parse_size(max_shard_size),
            device=resolved_device,
            method=method.value,
            calib_data=calib_data,
            calib_tokens=calib_tokens,
            calib_seq_len=calib_seq_len,
            eval_data=eval_data,
            eval_tokens=eval_tokens,
            text_column=text_column,
            finetune_steps=finetune_steps,
            train=TrainSettings(
                lr=lr,
                warmup_steps=warmup_steps,
                batch_size=batch_size,
                micro_batch_size=micro_batch_size,
                seq_len=train_seq_len,
                scope=train.value,
                distill_weight=distill_weight,
                gradient_checkpointing=gradient_checkpointing,
            ),
            train_data=train_data,
            train_tokens=train_tokens,
            save_every=save_every,
            resume=resume,
            validate=validate,
            allow_pickle=allow_pickle,
            engine=None if engine is None else engine.value,
            gguf=None if gguf is None else gguf.value,
        )
        with _progress(quiet) as progress:
            task = progress.add_task("starting", total=None)
            hooks = Hooks(
                on_stage=lambda text: progress.update(task, description=text),
                on_plan=lambda plan: _show_plan(plan, progress, task, quiet),
                on_engines=lambda found: _show_engines(found, progress, quiet),
                on_layer=lambda stats: progress.advance(task),
                on_train_start=lambda total: progress.update(task, total=total, completed=0),
                on_step=lambda info: _show_step(info, progress, task, quiet),
            )
            report = run(model_in, model_out, options, hooks)
    except ConversionError as exc:
        _fail(str(exc), verbose)
    except typer.BadParameter as exc:
        _fail(f"--max-shard-size: {exc}", verbose)
    except KeyboardInterrupt:
        from .finetune import interrupted_note

        note = interrupted_note(model_out) or "nothing was written to MODEL_OUT"
        err.print(f"[red]interrupted[/red]: {escape(note)}", soft_wrap=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # anything unexpected still gets one line unless -v
        if verbose:
            raise
        _fail(
            f"unexpected failure: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(run with -v for the traceback)",
            verbose,
        )

    from .report import cache_table, generation_table, layer_table, validation_table

    if int(os.environ.get("RANK", "0")) != 0:
        return  # under a multi-process launch only the main process reports
    for warning in report["warnings"]:
        err.print(f"[yellow]warning[/yellow]: {escape(warning)}", soft_wrap=True)
    if not quiet:
        out.print(layer_table(report))
        out.print(cache_table(report))
        if report.get("verification"):
            v = report["verification"]
            out.print(
                f"check on {v['tokens']} tokens: max |Δlogit| {v['max_abs_logit_diff']:.2e}, top-1 agreement "
                f"{v['top1_agreement']:.1%}, KL {v['kl_mean']:.2e}, "
                f"live cache {v['measured_cache_elements_per_token_per_layer']} elements/token/layer"
            )
        if report.get("finetune"):
            f = report["finetune"]
            out.print(
                f"fine-tune: {f['steps']} steps, {f['tokens']} tokens in {f['seconds']:.0f} s, "
                f"loss {f['losses'][0]:.4f} -> {f['losses'][-1]:.4f}"
            )
        for table in (validation_table(report), generation_table(report)):
            if table is not None:
                out.print(table)
    kv = report["kv_cache"]
    peak = report["resources"]["peak_rss_bytes"] / 1024**3
    out.print(
        f"wrote {escape(str(model_out))} (KV cache {kv['ratio']:.3f}x of the source; peak memory {peak:.2f} GB; "
        "report in mla_report.json)",
        soft_wrap=True,
    )


def _show_step(info, progress, task, quiet: bool) -> None:  # type: ignore[no-untyped-def]
    progress.update(
        task,
        completed=info.step,
        description=f"fine-tuning: loss {info.loss:.4f}, {info.tokens_per_second:,.0f} tok/s",
    )
    # Without a live bar (logs, CI) print about ten lines over the run, from the main process only.
    milestone = info.step % max(1, info.total // 10) == 0 or info.step == info.total
    if progress.disable and not quiet and int(os.environ.get("RANK", "0")) == 0 and milestone:
        err.print(
            f"fine-tune step {info.step}/{info.total}: loss {info.loss:.4f}, lr {info.lr:.2e}, "
            f"{info.tokens_per_second:,.0f} tok/s, about {info.seconds_left / 60:.1f} min left",
            highlight=False,
        )


def _show_plan(plan, progress, task, quiet: bool) -> None:  # type: ignore[no-untyped-def]
    progress.update(task, description="converting layers", total=plan.geometry.layers, completed=0)
    if not quiet:
        progress.console.print(
            f"plan: target {plan.target}, kv_lora_rank {_latent(plan)} (lossless {plan.full_kv_rank}), "
            f"qk_rope_head_dim {plan.rope_dim}, rope_theta {plan.rope_theta:g} — {plan.split_reason}",
            soft_wrap=True,  # one line in logs too; a terminal wraps it itself
        )


def _show_engines(found, progress, quiet: bool) -> None:  # type: ignore[no-untyped-def]
    """One line per engine, before any heavy work: does the planned checkpoint serve there, and why not."""
    if quiet:
        return
    colours = {"serves": "green", "untested": "yellow"}
    for v in found:
        colour = colours.get(v.status, "red")
        progress.console.print(
            f"engine {v.engine}: [{colour}]{v.status}[/{colour}] — {escape(v.detail)}", soft_wrap=True, highlight=False
        )


def _latent(plan) -> str:  # type: ignore[no-untyped-def]
    if plan.latent_width > plan.kv_rank:
        return f"{plan.latent_width} ({plan.kv_rank} real, {plan.latent_width - plan.kv_rank} zero)"
    return str(plan.kv_rank)


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        # Off when stderr is not a terminal: a transient bar shows nothing there, and rich would still
        # print a stray blank line on stop, ahead of any error message.
        disable=quiet or not err.is_interactive,
        transient=True,
    )


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return device


def _quiet_libraries(verbose: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization uses a bare tqdm
    import warnings

    warnings.filterwarnings("ignore")


def _fail(message: str, verbose: bool) -> None:
    # Messages quote user paths, which may hold '[...]' that rich would read as markup.
    err.print(f"[red]error[/red]: {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)  # a kill from a scheduler cleans up like Ctrl-C
    if not {"-v", "--verbose"} & set(sys.argv[1:]):
        # tqdm reads this when it is first imported, so it must be set before transformers loads.
        os.environ.setdefault("TQDM_DISABLE", "1")
    app(prog_name="mla-convert")


if __name__ == "__main__":
    sys.exit(main())
