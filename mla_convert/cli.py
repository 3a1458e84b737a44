"""The `mla-convert` command: parse flags, call the job, print. No conversion logic lives here."""

from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    dtype: Annotated[DType, typer.Option(help="Output dtype; auto keeps the source's.")] = DType.auto,
    device: Annotated[Device, typer.Option(help="Where to compute the factorization.")] = Device.cpu,
    force: Annotated[bool, typer.Option("--force", help="Replace MODEL_OUT if it exists.")] = False,
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
        )
        with _progress(quiet) as progress:
            task = progress.add_task("starting", total=None)
            hooks = Hooks(
                on_stage=lambda text: progress.update(task, description=text),
                on_plan=lambda plan: _show_plan(plan, progress, task, quiet),
                on_layer=lambda stats: progress.advance(task),
            )
            report = run(model_in, model_out, options, hooks)
    except ConversionError as exc:
        _fail(str(exc), verbose)
    except typer.BadParameter as exc:
        _fail(f"--max-shard-size: {exc}", verbose)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: nothing was written to MODEL_OUT")
        raise typer.Exit(130) from None
    except Exception as exc:  # anything unexpected still gets one line unless -v
        if verbose:
            raise
        _fail(
            f"unexpected failure: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(run with -v for the traceback)",
            verbose,
        )

    for warning in report.warnings:
        err.print(f"[yellow]warning[/yellow]: {escape(warning)}", soft_wrap=True)
    if not quiet:
        out.print(report.layer_table())
        out.print(report.cache_table())
        if report.evaluation:
            e = report.evaluation
            out.print(
                f"one-shot perplexity on {e['tokens']} held-out tokens ({escape(e['text'])}): source "
                f"{e['source_perplexity']:.3f}, converted {e['converted_perplexity']:.3f} "
                f"(x{e['perplexity_ratio']:.3f}), KL {e['kl_to_source']:.4f}, "
                f"top-1 agreement {e['top1_agreement']:.1%}",
                soft_wrap=True,
            )
        if report.verification:
            v = report.verification
            out.print(
                f"check on {v.tokens} tokens: max |Δlogit| {v.max_abs_logit_diff:.2e}, top-1 agreement "
                f"{v.top1_agreement:.1%}, KL {v.kl_mean:.2e}, "
                f"live cache {v.measured_cache_elements} elements/token/layer"
            )
    kv = report.kv_cache()
    out.print(
        f"wrote {escape(str(model_out))} (KV cache {kv['ratio']:.3f}x of the source; report in mla_report.json)",
        soft_wrap=True,
    )


def _show_plan(plan, progress, task, quiet: bool) -> None:  # type: ignore[no-untyped-def]
    progress.update(task, description="converting layers", total=plan.geometry.layers, completed=0)
    if not quiet:
        progress.console.print(
            f"plan: target {plan.target}, kv_lora_rank {plan.kv_rank} (lossless {plan.full_kv_rank}), "
            f"qk_rope_head_dim {plan.rope_dim}, rope_theta {plan.rope_theta:g} — {plan.split_reason}",
            soft_wrap=True,  # one line in logs too; a terminal wraps it itself
        )


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
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


def main() -> None:
    if not {"-v", "--verbose"} & set(sys.argv[1:]):
        # tqdm reads this when it is first imported, so it must be set before transformers loads.
        os.environ.setdefault("TQDM_DISABLE", "1")
    app(prog_name="mla-convert")


if __name__ == "__main__":
    sys.exit(main())
