"""The options of a conversion, defined once: the Python API takes `Options`, and the command line is
generated from the same fields (their help text, group and choices live in each field's metadata).

Nothing here imports torch or transformers, so every check that needs neither weights nor a config
(`check_options`) runs in a fraction of a second, before anything heavy is loaded.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .profiles import ENGINE_WIDTHS, METHOD_RULES, PROFILES, method, profile

COMPRESSION = "Compression"
TEXT = "Calibration and evaluation text"
FINETUNE = "Fine-tune"
OUTPUT = "Output and serving"
RUNTIME = "Runtime"

TARGETS = tuple(PROFILES)
METHODS = tuple(METHOD_RULES)
ENGINES = tuple(ENGINE_WIDTHS)  # --engine: widths fixed by what the engine's kernels run
GGUF_TYPES = ("f32", "bf16", "q8_0")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "auto")
SCOPES = ("attention", "all")
LONG_EVAL_MODES = ("off", "quick", "full")
TEXT_SUFFIXES = (".txt", ".md", ".text")
# Fine-tune defaults by device: (steps, windows per step). On 2 CPU cores 40 x 4 x 256 tokens took 4 to 8.5
# min for SmolLM2-135M (docs/results.md); a GPU affords the larger default.
DATASETS_MISSING = (
    "'{spec}' is no local file, so it is read as a hub dataset, which needs the datasets extra: "
    "pip install 'mla-convert[datasets]'"
)
FLOAT16_REFUSED = (
    "--dtype float16 cannot hold the tiny latent scale that keeps DeepSeek's latent norm linear; "
    "to resolve, use --dtype bfloat16 (same size) or float32"
)
FINETUNE_DEFAULTS = {"cpu": (40, 4), "cuda": (100, 8)}


def _per_device(field_index: int) -> str:
    """'40 on cpu, 100 on cuda': one of FINETUNE_DEFAULTS' numbers for each device, for the help text."""
    return ", ".join(f"{numbers[field_index]} on {device}" for device, numbers in FINETUNE_DEFAULTS.items())


def flag(default: Any, help: str, panel: str, *, name: str | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A field that is also a command-line flag (`--NAME`, from the field name unless given)."""
    return field(default=default, metadata={"help": help, "panel": panel, "name": name, "choices": choices})


@dataclass
class TrainSettings:
    """Everything that decides the trained weights; a resumed run must match it exactly."""

    steps: int = 100  # set from Options.finetune_steps
    lr: float = flag(1e-3, "Peak learning rate, relative to each weight tensor's RMS (AdamW).", FINETUNE)
    warmup_steps: int | None = flag(
        None, "Linear warmup steps before the cosine decay. Default: a tenth of the steps.", FINETUNE
    )
    batch_size: int | None = flag(
        None,
        "Windows per optimizer step, over all processes. Default: " + _per_device(1) + ".",
        FINETUNE,
    )
    micro_batch_size: int = flag(4, "Windows per forward pass (gradient accumulation).", FINETUNE)
    seq_len: int = flag(256, "Tokens per fine-tune window.", FINETUNE, name="train-seq-len")
    scope: str = flag(
        "attention",
        "attention: train the converted attention only; all: every weight.",
        FINETUNE,
        name="train",
        choices=SCOPES,
    )
    distill_weight: float = flag(
        1.0, "Weight of the KL-to-source loss (0 to 1); the rest is the language-model loss.", FINETUNE
    )
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0  # set from Options.seed
    gradient_checkpointing: bool = flag(False, "Recompute activations in the backward pass to save memory.", FINETUNE)

    def fingerprint(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Options:
    """How to convert; every field but `train` is a flag of `mla-convert` (same name, dashes for underscores)."""

    kv_budget: float | None = flag(
        None,
        "KV cache per token as a fraction of the source's (0 < F <= 1); the tool splits it between latent and "
        "rotary key by measurement. Measured on SmolLM2-135M with in-domain --calib-data and a 40-step fine-tune: "
        "0.5 gave 1.08x the source perplexity, 0.25 gave 1.45x (README, 'Choosing a budget').",
        COMPRESSION,
    )
    kv_rank: int | None = flag(None, "Latent width (kv_lora_rank). Default: lossless.", COMPRESSION)
    rope_dim: int | None = flag(None, "Width of the shared rotary key (qk_rope_head_dim), even.", COMPRESSION)
    target: str = flag(
        "portable",
        "portable: computed identically by transformers, vLLM, SGLang, llama.cpp. transformers: exact (Qwen3: "
        "approximate, its per-head q/k norms have no stock form), served by transformers only.",
        COMPRESSION,
        choices=TARGETS,
    )
    method: str = flag(
        "activation",
        "activation: fit to calibration activations; svd: data-free weight SVD (fast, much worse when compressing).",
        COMPRESSION,
        choices=METHODS,
    )
    engine: str | None = flag(
        None,
        "Widths this serving engine runs: vllm = latent 512 + rotary 64 (real components up to --kv-rank or the "
        "lossless rank, zeros beyond).",
        COMPRESSION,
        choices=ENGINES,
    )
    allow_full_attention: bool = flag(
        False,
        "Convert a sliding-window source (Mistral v0.1, Qwen2 with use_sliding_window, Phi-3 4K) to full "
        "attention: exact on contexts up to the window, different beyond it; the plan and the card say so. "
        "Without it such a source is refused.",
        COMPRESSION,
    )
    layer_steps: int = flag(
        0,
        "After each layer's closed-form fit, this many Adam steps on that attention layer so its output matches "
        "the source layer's on the calibration text (early stopping on held-out calibration windows; "
        "--method activation only). 0: the closed form alone.",
        COMPRESSION,
    )
    query_refit: bool = flag(
        True,
        "When the latent is compressed, refit each layer's query map after its closed-form fit, by least squares "
        "so its attention logits match the source layer's on the calibration text with the keys fixed; kept only "
        "where held-out calibration windows improve. Measured on SmolLM2-135M: budget 0.25 one-shot 13.3x -> "
        "9.6x the source perplexity; at full size it never improved a layer, so it is skipped there.",
        COMPRESSION,
    )
    calib_data: str | None = flag(
        None,
        "Calibration text: .txt, .jsonl or .parquet (text column), or a hub dataset ID[:CONFIG][@SPLIT] "
        "(needs pip install 'mla-convert[datasets]'). Default: text sampled from the source model, slow on a CPU.",
        TEXT,
    )
    calib_tokens: int = flag(8192, "Calibration tokens to use.", TEXT)
    calib_seq_len: int = flag(256, "Tokens per calibration window.", TEXT)
    calib_long_len: int = flag(
        0,
        "Tokens per long calibration window beside the --calib-seq-len ones (e.g. 4096, at most the source's "
        "context): the fit and the split measurement also score far positions on them. 0 (the default): none. "
        "Measured on SmolLM2-135M: at budget 0.5 (4096) the loss at 4K-8K fell from 2.76x to 2.17x the source "
        "perplexity for 1.7% more at 256 tokens; at 0.25 it picked a wider rotary key, worse at every position.",
        TEXT,
    )
    calib_long_windows: int = flag(1, "Long calibration windows (of --calib-long-len tokens).", TEXT)
    calib_sampled: float = flag(
        0.0,
        "With --calib-data: this share of the calibration windows is text sampled from the source model instead "
        "(0 <= F < 1), so the fit also sees what the model itself writes.",
        TEXT,
    )
    eval_data: str | None = flag(
        None, "Held-out evaluation text (same formats). Default: held-out calibration text.", TEXT
    )
    eval_tokens: int = flag(8192, "Evaluation tokens to use at most.", TEXT)
    text_column: str = flag("text", "Field or column holding the text in .jsonl, .parquet and datasets.", TEXT)
    finetune_steps: int | None = flag(
        None,
        "Distillation steps after converting; 0 skips the fine-tune (a lossless conversion never trains). Default: "
        + _per_device(0)
        + ".",
        FINETUNE,
    )
    train_data: str | None = flag(
        None, "Fine-tune text (same formats). Default: --calib-data, else the sampled text.", FINETUNE
    )
    train_tokens: int = flag(65536, "Fine-tune tokens to read at most (repeated if needed).", FINETUNE)
    train: TrainSettings = field(default_factory=TrainSettings)  # its flags are listed with the fine-tune ones
    save_every: int = flag(25, "Save a training checkpoint every N steps (0: only at the end).", FINETUNE)
    resume: bool = flag(False, "Continue the unfinished fine-tune in MODEL_OUT from its last checkpoint.", FINETUNE)
    dtype: str = flag(
        "auto", "Output dtype; auto keeps the source's (float16 becomes bfloat16).", OUTPUT, choices=DTYPE_NAMES
    )
    gguf: str | None = flag(
        None,
        "Also write MODEL_OUT/NAME-TYPE.gguf for llama.cpp. q8_0 keeps attn_kv_a_mqa in float32 (f16 would "
        "erase its tiny latent rows).",
        OUTPUT,
        choices=GGUF_TYPES,
    )
    max_shard_size: str | int = flag("5GB", "Largest output shard, e.g. 5GB, 500MB (or bytes).", OUTPUT)
    memory: str | None = flag(
        None,
        "Memory to plan contexts for, e.g. 24GiB: the dry run and the card give the longest context that fits "
        "in it, source and conversion (default: this machine's memory).",
        OUTPUT,
    )
    force: bool = flag(False, "Replace MODEL_OUT if it exists.", OUTPUT)
    report_paths: bool = flag(
        False,
        "Record the full local paths of MODEL_IN and the text files in mla_report.json (only there, never in the "
        "card). Off by default: the output names them by base name, so it can be published as it is.",
        OUTPUT,
    )
    verify: bool = flag(True, "Check the written model's logits against the source.", OUTPUT)
    validate: bool = flag(True, "Measure quality (perplexity, KL, top-1) on held-out text at the end.", OUTPUT)
    long_eval: str = flag(
        "quick",
        "Long-context validation: perplexity ratio and KL to the source by position on long held-out windows, and "
        "passkey retrieval at 1K, 2K, 4K... tokens. quick: one window and 2 passkeys per length, up to 4,096 tokens; "
        "full: up to 4 windows and 4 passkeys per length, up to 16,384; off. The dry run gives its cost.",
        OUTPUT,
        choices=LONG_EVAL_MODES,
    )
    long_eval_len: int | None = flag(
        None,
        "Longest context the long-context validation measures (default: 4096 quick, 16384 full), capped by the "
        "source's context.",
        OUTPUT,
    )
    device: str = flag(
        "cpu",
        "Where the factorization, calibration and fine-tune run: cpu, cuda, or auto (cuda when a GPU is "
        "visible). Also picks the fine-tune defaults.",
        RUNTIME,
        choices=DEVICES,
    )
    seed: int = flag(
        0,
        "Seed for everything random: sampled calibration and evaluation text, fine-tune order, check tokens.",
        RUNTIME,
    )
    allow_pickle: bool = flag(
        False, "Read .bin/.pt weights (loaded with weights_only: tensors only, no code).", RUNTIME
    )


def max_shard_bytes(size: str | int) -> int:
    """--max-shard-size as bytes: an int, or text like 5GB, 500MB, 2GiB."""
    return size_bytes(size, "--max-shard-size")


def size_bytes(size: str | int, flag_name: str) -> int:
    """A size flag as bytes: an int, or text like 5GB, 500MB, 2GiB (one clear line when it cannot be read)."""
    if isinstance(size, int):
        value = size
    else:
        units = {"kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "b": 1}
        lowered = size.strip().lower()
        unit = next((u for u in sorted(units, key=len, reverse=True) if lowered.endswith(u)), "b")
        number = lowered[: -len(unit)].strip() if lowered.endswith(unit) else lowered
        try:
            value = int(float(number) * units[unit])
        except ValueError:
            raise ConversionError(f"{flag_name}: cannot read size '{size}' (examples: 5GB, 500MB, 24GiB)") from None
    if value <= 0:
        raise ConversionError(f"{flag_name} must be positive, got {size}")
    return value


def finetune_defaults(options: Options, device: str) -> Options:
    """Fill the fine-tune settings left to the device (steps, windows per step)."""
    steps, windows = FINETUNE_DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    train = options.train if options.train.batch_size is not None else replace(options.train, batch_size=windows)
    if train.micro_batch_size > train.batch_size:
        train = replace(train, micro_batch_size=train.batch_size)
    return replace(
        options, finetune_steps=steps if options.finetune_steps is None else options.finetune_steps, train=train
    )


def check_options(options: Options) -> None:
    """Refuse every bad flag that needs no model, with one line that says how to fix it. The only check of the
    options: everything downstream trusts a checked Options."""
    check_types(options)
    _check_choice("target", options.target, TARGETS)
    _check_choice("method", options.method, METHODS)
    _check_choice("dtype", options.dtype, DTYPE_NAMES)
    _check_choice("device", options.device, DEVICES)
    _check_choice("long-eval", options.long_eval, LONG_EVAL_MODES)
    if options.long_eval_len is not None and options.long_eval_len < 64:
        raise ConversionError(f"--long-eval-len must be at least 64 tokens, got {options.long_eval_len}")
    if options.gguf is not None:
        _check_choice("gguf", options.gguf, GGUF_TYPES, "; f16 is refused: it erases the latent")
    check_ranks(options.kv_budget, options.kv_rank, options.rope_dim)
    if options.dtype == "float16":
        raise ConversionError(FLOAT16_REFUSED)
    if options.engine is not None:
        check_engine(options.engine, options.target, options.kv_rank, options.rope_dim)
    if options.gguf:
        profile(options.target).refuse_gguf()
    max_shard_bytes(options.max_shard_size)
    if options.memory is not None:
        size_bytes(options.memory, "--memory")
    for name in ("calib_tokens", "eval_tokens", "train_tokens"):
        if getattr(options, name) <= 0:
            raise ConversionError(f"--{name.replace('_', '-')} must be positive, got {getattr(options, name)}")
    if options.calib_long_len < 0:
        raise ConversionError(f"--calib-long-len must be 0 (none) or positive, got {options.calib_long_len}")
    if options.calib_long_windows < 0:
        raise ConversionError(f"--calib-long-windows must not be negative, got {options.calib_long_windows}")
    if options.calib_seq_len < 16:
        raise ConversionError(f"--calib-seq-len must be at least 16, got {options.calib_seq_len}")
    if not 0.0 <= options.calib_sampled < 1.0:
        raise ConversionError(f"--calib-sampled must be a share, 0 <= F < 1, got {options.calib_sampled}")
    if options.calib_tokens < options.calib_seq_len:
        raise ConversionError(
            f"--calib-tokens {options.calib_tokens} is less than one window of --calib-seq-len {options.calib_seq_len}"
        )
    if options.finetune_steps is not None and options.finetune_steps < 0:
        raise ConversionError(
            f"--finetune-steps must be positive, or 0 to skip the fine-tune; got {options.finetune_steps}"
        )
    if options.layer_steps < 0:
        raise ConversionError(f"--layer-steps must be 0 (closed form only) or positive, got {options.layer_steps}")
    if options.layer_steps and not method(options.method).fits_activations:
        raise ConversionError("--layer-steps fits layers to calibration text; it needs --method activation")
    if options.save_every < 0:
        raise ConversionError(f"--save-every must be positive (0: only at the end), got {options.save_every}")
    if options.resume and options.finetune_steps == 0:
        raise ConversionError("--resume continues a fine-tune, but --finetune-steps is 0")
    for spec in (options.calib_data, options.eval_data, options.train_data):
        if spec is not None:
            check_text_spec(spec)
    if options.finetune_steps != 0:
        # the defaults depend on the device; "auto" is resolved with torch, after this check (job.resolved)
        device = "cpu" if options.device == "auto" else options.device
        check_settings(replace(finetune_defaults(options, device).train, steps=options.finetune_steps or 1))


def _check_choice(name: str, value: str, choices: tuple[str, ...], note: str = "") -> None:
    if value not in choices:
        raise ConversionError(f"--{name} must be one of {', '.join(choices)}, got '{value}'{note}")


def check_ranks(kv_budget: float | None, kv_rank: int | None, rope_dim: int | None) -> None:
    """The compression flags, as far as they can be judged without the model."""
    if kv_budget is not None:
        if not 0 < kv_budget <= 1 or not math.isfinite(kv_budget):
            raise ConversionError(
                f"--kv-budget must be in (0, 1], a fraction of the source's KV cache, got {kv_budget}"
            )
        if kv_rank is not None or rope_dim is not None:
            raise ConversionError(
                "--kv-budget chooses --kv-rank and --rope-dim itself; pass either the budget or ranks"
            )
    if kv_rank is not None and kv_rank < 1:
        raise ConversionError(f"--kv-rank must be a positive number, got {kv_rank}")
    if rope_dim is not None and (rope_dim < 2 or rope_dim % 2):
        raise ConversionError(f"--rope-dim must be a positive even number, got {rope_dim}")


def check_engine(engine: str, target: str, kv_rank: int | None, rope_dim: int | None) -> None:
    """--engine fixes the widths; the flags that contradict them are refused before any work."""
    _check_choice("engine", engine, ENGINES)
    ENGINE_WIDTHS[engine].refuse(target, kv_rank, rope_dim)


def check_context(options: Options, max_positions: int | None, training: bool) -> None:
    """The window lengths against the model's context: the part of the options check that needs the config."""
    if max_positions is None:
        return
    if training and options.train.seq_len > max_positions:
        raise ConversionError(
            f"--train-seq-len {options.train.seq_len} is longer than the model's context ({max_positions})"
        )
    if options.calib_seq_len > max_positions:
        raise ConversionError(
            f"--calib-seq-len {options.calib_seq_len} is longer than the model's context ({max_positions})"
        )


def check_settings(s: TrainSettings) -> None:
    """Refuse impossible fine-tune settings before any work is done."""
    if s.steps <= 0:
        raise ConversionError(f"--finetune-steps must be positive (0 skips the fine-tune), got {s.steps}")
    _check_choice("train", s.scope, SCOPES)
    if not s.lr > 0 or not math.isfinite(s.lr):
        raise ConversionError(f"--lr must be a positive number, got {s.lr}")
    if s.batch_size is None or s.batch_size <= 0 or s.micro_batch_size <= 0:
        raise ConversionError("--batch-size and --micro-batch-size must be positive")
    if not 0.0 <= s.distill_weight <= 1.0:
        raise ConversionError(f"--distill-weight must be between 0 and 1, got {s.distill_weight}")
    if s.seq_len < 16:
        raise ConversionError(f"--train-seq-len must be at least 16, got {s.seq_len}")
    if s.warmup_steps is not None and s.warmup_steps < 0:
        raise ConversionError(f"--warmup-steps must not be negative, got {s.warmup_steps}")
    per_process_windows(s, int(os.environ.get("WORLD_SIZE", "1")))


def per_process_windows(settings: TrainSettings, world: int) -> int:
    """Windows each process takes per step; the global batch must split evenly."""
    assert settings.batch_size is not None
    if settings.batch_size % world:
        raise ConversionError(f"--batch-size {settings.batch_size} does not split over {world} processes")
    per_process = settings.batch_size // world
    if per_process % min(settings.micro_batch_size, per_process):
        raise ConversionError(
            f"--micro-batch-size {settings.micro_batch_size} does not divide the {per_process} windows per process"
        )
    return per_process


def check_text_spec(spec: str) -> Path | None:
    """The local file a text option names (None for a hub dataset id), refused now if it cannot be one."""
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.exists():
        if path.is_dir():
            raise ConversionError(f"text data must be a file (.txt, .jsonl, .parquet), got a directory: {path}")
        if suffix not in (*TEXT_SUFFIXES, "", ".jsonl", ".parquet"):
            raise ConversionError(f"unsupported text data format '{suffix}' ({path}); use .txt, .jsonl or .parquet")
        return path
    if suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet") or _looks_like_path(spec):
        raise ConversionError(f"text data file not found: {path}")
    if importlib.util.find_spec("datasets") is None:
        raise ConversionError(DATASETS_MISSING.format(spec=spec))
    return None


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a hub dataset id `[OWNER/]NAME[:CONFIG][@SPLIT]` (at most one '/' in the name)."""
    name = spec.partition("@")[0].partition(":")[0]
    return spec.startswith(("/", ".", "~")) or "\\" in spec or name.count("/") > 1


def cli_fields() -> list[tuple[str, Any, dict[str, Any]]]:
    """(path, default, metadata) of every flag, in --help order: Options' fields with TrainSettings' inside
    the fine-tune group. `path` is "name" or "train.name"."""
    out: list[tuple[str, Any, dict[str, Any]]] = []
    for f in fields(Options):
        if f.name == "train":
            out += [(f"train.{t.name}", t.default, dict(t.metadata)) for t in fields(TrainSettings) if t.metadata]
        elif f.metadata:
            out.append((f.name, f.default, dict(f.metadata)))
    return out


def flag_paths() -> dict[str, str]:
    """{flag name with underscores: field path} ("kv_budget": "kv_budget", "train_seq_len": "train.seq_len")."""
    return {(meta["name"] or path.rpartition(".")[2]).replace("-", "_"): path for path, _, meta in cli_fields()}


def with_flags(options: Options, values: dict[str, Any]) -> Options:
    """`options` with {flag name with underscores: value} applied, as the API's keywords give them; an unknown
    name or a value of the wrong type is one ConversionError line. `train=` may also be a whole TrainSettings."""
    if isinstance(values.get("train"), TrainSettings):
        values = dict(values)
        options = replace(options, train=values.pop("train"))
    paths = flag_paths()
    unknown = sorted(set(values) - set(paths))
    if unknown:
        raise ConversionError(f"unknown option(s): {', '.join(unknown)} (the API's keywords are the flags' names)")
    top = {paths[k]: v for k, v in values.items() if not paths[k].startswith("train.")}
    inner = {paths[k].removeprefix("train."): v for k, v in values.items() if paths[k].startswith("train.")}
    changed = replace(options, **top, train=replace(options.train, **inner))
    check_types(changed)
    return changed


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_types(options: Options) -> None:
    """Every setting holds a value of its declared type (one line naming the flag otherwise): the API takes
    keywords and whole Options objects, which nothing else types."""
    for path, _, meta in [*cli_fields(), *((f.name, None, {"name": None}) for f in fields(Options) if not f.metadata)]:
        holder, name = (options.train, path[6:]) if path.startswith("train.") else (options, path)
        if name == "train":
            continue
        value = getattr(holder, name)
        declared = next(f.type for f in fields(holder) if f.name == name)
        allowed = [t.strip() for t in str(declared).split("|")]
        if value is None and "None" in allowed:
            continue
        if any(
            isinstance(value, _TYPES[t]) and not (isinstance(value, bool) and t != "bool")
            for t in allowed
            if t in _TYPES
        ):
            continue
        flag_name = (meta["name"] or name).replace("_", "-")
        wanted = " or ".join(
            {"int": "an integer", "float": "a number", "str": "text", "bool": "true or false", "None": "None"}.get(t, t)
            for t in allowed
        )
        raise ConversionError(f"--{flag_name} must be {wanted}, got {value!r}")


def from_flags(values: dict[str, Any]) -> Options:
    """Options from {flag name with underscores: value}, as the command line parses them."""
    top: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for path, _, meta in cli_fields():
        key = (meta["name"] or path.rpartition(".")[2]).replace("-", "_")
        if key in values:
            if path.startswith("train."):
                train[path.removeprefix("train.")] = values[key]
            else:
                top[path] = values[key]
    return Options(**top, train=TrainSettings(**train))
