"""The `mla-convert` command: generated from `Options` (options.py), it parses flags, calls the API and
prints. No conversion logic lives here. `mla-convert verify OUT` checks a written folder (api.verify_output)."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from .errors import ConversionError
from .options import RUNTIME, Options, TrainSettings, cli_fields, from_flags
from .source.families import supported_list
from .util import signals
from .util.version import VERSION

out = Console()
err = Console(stderr=True)

EPILOG = f"""Examples:

  mla-convert model.gguf model-mla --kv-budget 0.25        # a quarter of the KV cache, calibrated, fine-tuned
  mla-convert org/model model-mla --dry-run                 # widths, cache, engines, time; writes nothing
  mla-convert ./model model-mla --engine vllm --gguf bf16   # serve in vLLM, and a GGUF for llama.cpp
  mla-convert verify model-mla                              # every file against its recorded sha256, then a load

Choosing a budget: without one the conversion is lossless (the cache shrinks only where the source's keys
repeat across heads). With in-domain --calib-data and a 40-step CPU fine-tune, SmolLM2-135M measured 1.08x
the source perplexity at 0.5 and 1.45x at 0.25; without text of your domain expect worse (README,
"Choosing a budget", has the table).

Supported families: {supported_list()}; sliding-window sources with --allow-full-attention. MoE sources are
written as DeepseekV2ForCausalLM (OLMoE's routing exactly; Mixtral's and Qwen3-MoE's renormalized top-k with the
same experts, approximate weights). Gemma 2/3, OLMo-2, Cohere and Qwen2-MoE are refused by design (DeepSeek's
layer cannot express their norms or gates); docs/usage.md lists why."""


# Typer 0.29 parses with its own copy of click; older releases use click itself. Catch both.
USAGE_ERRORS = tuple({click.ClickException, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})
ABORTS = tuple({click.exceptions.Abort, typer.Abort})
PARSE_MESSAGES = {
    "Input should be a valid number": "expects a number, such as 0.25",
    "Input should be a valid integer": "expects a whole number",
}


VERIFY = "verify"


class Command(TyperCommand):
    """Usage errors (a mistyped value, an unknown flag) read like the tool's own: one `error:` line, exit 2.

    `mla-convert verify OUT` is routed here to its own command: MODEL_IN is a free positional, so a click group
    would read `verify` as a model (a local folder named `verify` is still reached as `./verify`)."""

    routes = True

    def main(self, args: Any = None, *more: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        if self.routes and words[:1] == [VERIFY] and not Path(VERIFY).exists():
            kwargs["prog_name"] = f"{kwargs.get('prog_name') or 'mla-convert'} {VERIFY}"
            return verify_command().main(words[1:], *more, standalone_mode=standalone_mode, **kwargs)
        try:
            code = super().main(args, *more, standalone_mode=False, **kwargs)
        except USAGE_ERRORS as exc:
            if not standalone_mode:
                raise
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                err.print(f"[red]error[/red]: {escape(_usage_message(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except ABORTS:
            if not standalone_mode:
                raise
            err.print("[red]interrupted[/red]")
            sys.exit(130)
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)
        return code


def _usage_message(exc: Any) -> str:
    if isinstance(exc, click.BadParameter | typer.BadParameter) and exc.param is not None:
        hint = "/".join(getattr(exc.param, "opts", []) or [exc.param.name or ""])
        message = exc.message.removeprefix("Value error, ")
        for typer_words, ours in PARSE_MESSAGES.items():
            message = ours if message.startswith(typer_words) else message
        text = f"{hint}: {message}"
    else:
        text = exc.format_message()
    text = text.rstrip(".")
    return f"{text[:1].lower()}{text[1:]} (mla-convert --help lists every option)"


def _version(value: bool) -> None:
    if value:
        out.print(f"mla-convert {VERSION}")
        raise typer.Exit()


def _parameters() -> list[inspect.Parameter]:
    """Typer parameters for MODEL_IN, MODEL_OUT, every Options field and the run-only flags."""
    hints = {**typing.get_type_hints(TrainSettings), **typing.get_type_hints(Options)}
    params = [
        inspect.Parameter(
            "model_in",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[str, typer.Argument(help="Local model directory, Hugging Face model id, or .gguf.")],
        ),
        inspect.Parameter(
            "model_out",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[
                Path | None,
                typer.Argument(help="Directory to write the DeepSeek-V3 checkpoint to (not needed with --dry-run)."),
            ],
            default=None,
        ),
    ]
    for path, default, meta in cli_fields():
        name = (meta["name"] or path.rpartition(".")[2]).replace("-", "_")
        kind = hints[path.rpartition(".")[2]]
        flag = "--" + name.replace("_", "-")
        if meta["choices"]:
            kind = Enum(name.title().replace("_", ""), {c: c for c in meta["choices"]}, type=str)  # type: ignore[misc]
            default = None if default is None else kind(default)
            kind = kind | None if default is None else kind
        elif kind is bool:
            flag = f"{flag}/--no-{flag[2:]}" if default else flag
        elif path == "max_shard_size":
            kind = str
        option = typer.Option(
            flag, help=_help(meta["help"]), rich_help_panel=meta["panel"], show_default=default is not None
        )
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option], default=default)
        )
    runtime = [
        ("dry_run", "--dry-run", "Print the plan (widths, KV cache at 8K-256K, engines, memory, time) and exit."),
        ("quiet", "--quiet", "Print only errors and the final line."),
        ("verbose", "--verbose", "More detail; tracebacks on errors."),
    ]
    for name, flag, text in runtime:
        decls = (flag, "-q") if name == "quiet" else (flag, "-v") if name == "verbose" else (flag,)
        option = typer.Option(*decls, help=text, rich_help_panel=RUNTIME)
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[bool, option], default=False)
        )
    version = typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.", rich_help_panel=RUNTIME
    )
    params.append(
        inspect.Parameter("version", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[bool, version], default=False)
    )
    return params


def _help(text: str) -> str:
    return escape(text)  # help is rendered as rich markup: keep ID[:CONFIG] literal


def convert(
    model_in: str, model_out: Path | None, dry_run: bool, quiet: bool, verbose: bool, version: bool, **flags: Any
) -> None:
    """Convert an MHA/GQA checkpoint (Llama, Mistral, Qwen2, Phi-3, Granite, ...) into a stock DeepSeek-V3 (MLA)
    checkpoint."""
    options = from_flags({k: v.value if isinstance(v, Enum) else v for k, v in flags.items()})
    if dry_run:
        _dry_run(model_in, model_out, options, verbose)
        return
    if model_out is None:
        _fail("missing argument MODEL_OUT (or pass --dry-run to only see the plan)")
    assert model_out is not None
    _convert(model_in, model_out, options, quiet, verbose)


convert.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]
convert.__annotations__ = {p.name: p.annotation for p in convert.__signature__.parameters.values()}  # type: ignore[attr-defined]
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
app.command(cls=Command, epilog=EPILOG, no_args_is_help=True)(convert)


class VerifyCommand(Command):
    routes = False


def verify(
    model_out: Annotated[Path, typer.Argument(help="The MODEL_OUT folder that mla-convert wrote.")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors.")] = False,
) -> None:
    """Check a converted folder before publishing or serving it: every file against the sha256 that
    mla_report.json recorded when it was written, then a load with stock transformers (no remote code)."""
    from . import api

    try:
        _quiet_libraries(verbose)
        found = api.verify_output(model_out)
    except ConversionError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    for name in found["extra"]:
        err.print(f"[yellow]warning[/yellow]: {escape(name)} is not among the files mla-convert wrote", soft_wrap=True)
    out.print(
        f"verified {escape(str(model_out))}: {found['files']} files match the sha256 in mla_report.json; it loads "
        f"with stock transformers as {found['architecture']} ({found['parameters']:,} parameters)",
        soft_wrap=True,
        highlight=False,
    )


def verify_command() -> click.Command:
    verify_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
    verify_app.command(cls=VerifyCommand, no_args_is_help=True)(verify)
    return typer.main.get_command(verify_app)


def _dry_run(model_in: str, model_out: Path | None, options: Options, verbose: bool) -> None:
    from . import api

    try:
        _quiet_libraries(verbose)
        found = api.dry_run(model_in, options, model_out=model_out)
    except ConversionError as exc:
        _fail(str(exc))
    from .plan.preview import preview_lines  # imports torch: only once the flags have passed

    for line in preview_lines(found, options.device):
        out.print(escape(line), soft_wrap=True, highlight=False)
    out.print("dry run: nothing was written", highlight=False)


def _convert(model_in: str, model_out: Path, options: Options, quiet: bool, verbose: bool) -> None:
    from . import api
    from .hooks import Hooks
    from .progress import StageDisplay

    main_process = int(os.environ.get("RANK", "0")) == 0  # under a multi-process launch only it reports
    display = StageDisplay(err, quiet or not main_process)
    signals.farewell(lambda: _interrupted_line(model_out))  # if a signal has to end the run from outside
    try:
        _quiet_libraries(verbose)
        with display:
            hooks = Hooks(
                on_stage=display.stage,
                on_progress=lambda done, total: display.advance(done, total),
                on_plan=lambda plan: _show_plan(plan, display),
                on_engines=lambda found: _show_engines(found, display),
                on_note=display.note,
                on_layer=lambda stats: display.advance(),
                on_step=lambda info: display.advance(info.step, info.total, _step_detail(info)),
            )
            report = api.convert(model_in, model_out, options, hooks=hooks)
    except ConversionError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        signals.farewell(None)
        line = _interrupted_line(model_out)
        err.print(f"[red]interrupted[/red]{escape(line.removeprefix('interrupted'))}", soft_wrap=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # anything unexpected still gets one line unless -v
        if verbose:
            raise
        _fail(
            f"unexpected failure: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(run with -v for the traceback)"
        )
    _show_result(report, model_out, quiet)
    if not quiet and main_process:
        for line in display.summary():
            err.print(escape(line), highlight=False, soft_wrap=True)


def _interrupted_line(model_out: Path) -> str:
    """What an interrupted run leaves: nothing, or (during a fine-tune) the model to --resume from."""
    finetune = sys.modules.get("mla_convert.train.finetune")  # imported by then if a fine-tune had begun
    note = finetune.interrupted_note(model_out) if finetune is not None else None
    return f"interrupted: {note or 'nothing was written to MODEL_OUT'}"


def _step_detail(info: Any) -> str:
    return f"loss {info.loss:.4f}, lr {info.lr:.2e}, {info.tokens_per_second:,.0f} tok/s"


def _show_result(report: dict[str, Any], model_out: Path, quiet: bool) -> None:
    from .report.report import cache_table, generation_table, layer_table, long_eval_table, validation_table

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
        for table in (validation_table(report), generation_table(report), long_eval_table(report)):
            if table is not None:
                out.print(table)
    kv = report["kv_cache"]
    peak = report["resources"]["peak_rss_bytes"] / 1024**3
    out.print(
        f"wrote {escape(str(model_out))} (KV cache {kv['ratio']:.3f}x of the source; peak memory {peak:.2f} GB; "
        "report in mla_report.json)",
        soft_wrap=True,
    )


def _show_plan(plan: Any, display: Any) -> None:
    display.note(
        f"plan: target {plan.target}, kv_lora_rank {_latent(plan)} (lossless {plan.full_kv_rank}), "
        f"qk_rope_head_dim {plan.rope_dim}, rope_theta {plan.rope_theta:g} — {plan.split_reason}"
    )


def _show_engines(found: list[Any], display: Any) -> None:
    """One line per engine, before any heavy work: does the planned checkpoint serve there, and why not."""
    if display.quiet:
        return
    colours = {"serves": "green", "untested": "yellow"}
    for v in found:
        colour = colours.get(v.status, "red")
        display.console.print(
            f"engine {v.engine}: [{colour}]{v.status}[/{colour}] — {escape(v.detail)}", soft_wrap=True, highlight=False
        )


def _latent(plan: Any) -> str:
    if plan.latent_width > plan.kv_rank:
        return f"{plan.latent_width} ({plan.kv_rank} real, {plan.latent_width - plan.kv_rank} zero)"
    return str(plan.kv_rank)


def _quiet_libraries(verbose: bool) -> None:
    """Quiet transformers and the hub without importing them: the API checks every flag first, and a bad
    one must not wait for torch and transformers to load."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization uses a bare tqdm
    if "transformers" in sys.modules:  # already loaded (an in-process caller): set it directly
        transformers = sys.modules["transformers"]
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")


def _fail(message: str) -> None:
    # Messages quote user paths, which may hold '[...]' that rich would read as markup.
    err.print(f"[red]error[/red]: {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def main() -> None:
    signals.install()  # SIGTERM cleans up like Ctrl-C, and either ends the run within seconds
    if not {"-v", "--verbose"} & set(sys.argv[1:]):
        # tqdm reads this when it is first imported, so it must be set before transformers loads.
        os.environ.setdefault("TQDM_DISABLE", "1")
    app(prog_name="mla-convert")


if __name__ == "__main__":
    sys.exit(main())
