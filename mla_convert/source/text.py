"""Calibration and evaluation text: read it (txt, jsonl, parquet, hub dataset), tokenize it into windows,
or sample it from the source model when the user gives none.

Calibration windows and evaluation windows never overlap: evaluation uses --eval-data, else the tail of
the calibration file (calibration windows are spread over the rest of it), else a separately seeded sample.

Every origin and note names a file by its base name (they are written into the output, which may be published);
`TextSets.files` adds each file's size and sha256, so the report identifies the text without its path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import ConversionError
from ..hooks import Hooks
from ..options import DATASETS_MISSING, Options, check_text_spec
from ..util.names import public_name, sha256_of

log = logging.getLogger(__name__)


@dataclass
class TokenWindows:
    """Token ids [count, seq_len] and where they came from (for the report)."""

    ids: torch.Tensor
    origin: str  # a file by its base name, a hub dataset id as it is, or "sampled from the source"
    held_span: tuple[int, int] | None = None  # for a held-out tail: its token range in the file's stream
    held_from: str | None = None  # ... and the file (as given) that stream comes from

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())


@dataclass(frozen=True)
class TextFile:
    """A text file or hub dataset that was read: what the report says of it (the path only on request)."""

    name: str
    path: str | None  # the resolved local path; None for a hub dataset
    bytes: int | None
    sha256: str | None

    def as_dict(self, with_path: bool = False) -> dict[str, object]:
        facts: dict[str, object] = {"name": self.name, "bytes": self.bytes, "sha256": self.sha256}
        return {**facts, "path": self.path} if with_path else facts


def text_file(spec: str) -> TextFile:
    """Name, size and sha256 of the text `spec` names (a hub dataset: its id, nothing else)."""
    path = check_text_spec(spec)
    if path is None:
        return TextFile(spec, None, None, None)
    return TextFile(path.name, str(path.resolve()), path.stat().st_size, sha256_of(path))


def read_texts(spec: str, column: str = "text") -> list[str]:
    """Documents from a .txt/.md file, a .jsonl/.parquet file (field `column`) or a hub dataset id."""
    path = check_text_spec(spec)
    if path is None:
        texts = _read_hub_dataset(spec, column)
    elif path.suffix.lower() == ".jsonl":
        texts = _read_jsonl(path, column)
    elif path.suffix.lower() == ".parquet":
        texts = _read_parquet(path, column)
    else:
        texts = [_read_text_file(path)]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ConversionError(f"text data {spec} holds no text")
    return texts


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{path} is not UTF-8 text ({exc.reason})") from exc


def _read_jsonl(path: Path, column: str) -> list[str]:
    texts = []
    for number, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{path.name} line {number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or column not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise ConversionError(f"{path.name} line {number} has no '{column}' field (it has: {keys})")
        if record[column] is not None:  # a JSON null is no text (as a parquet null)
            texts.append(str(record[column]))
    return texts


def _read_parquet(path: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConversionError("reading .parquet needs pyarrow: pip install pyarrow") from exc
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise ConversionError(f"{path.name} is not a readable parquet file ({exc})") from exc
    if column not in schema.names:
        raise ConversionError(f"{path.name} has no column '{column}' (it has: {', '.join(schema.names)})")
    return [str(x) for x in pq.read_table(path, columns=[column]).column(column).to_pylist() if x is not None]


def _read_hub_dataset(spec: str, column: str) -> list[str]:
    """`ID[:CONFIG][@SPLIT]`, e.g. `wikitext:wikitext-2-raw-v1@train`, through the datasets library."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise ConversionError(DATASETS_MISSING.format(spec=spec)) from exc
    try:
        data = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:
        raise ConversionError(f"cannot load dataset '{spec}' ({str(exc).splitlines()[0][:160]})") from exc
    if column not in data.column_names:
        raise ConversionError(f"dataset '{spec}' has no column '{column}' (it has: {', '.join(data.column_names)})")
    return [str(x) for x in data[column]]


def token_stream(texts: list[str], tokenizer: Any) -> torch.Tensor:
    """The documents' token ids one after another, EOS between them (1-D)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if eos is not None:
            stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


def cut_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Full windows of seq_len from the start of a token stream [count, seq_len]; the rest is dropped."""
    count = stream.numel() // seq_len
    return stream[: count * seq_len].view(count, seq_len)


def tokenize_windows(texts: list[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Concatenate the documents (EOS between them) and cut the stream into full windows of seq_len."""
    return cut_windows(token_stream(texts, tokenizer), seq_len)


def split_windows(
    windows: torch.Tensor, calib_tokens: int, seq_len: int, origin: str, want_eval: bool
) -> tuple[TokenWindows, TokenWindows | None, list[str]]:
    """Hold out the file's last windows (up to as many as calibration takes) for evaluation, and take the
    calibration windows spread evenly over the rest, so a long file calibrates on all its parts rather than
    on its opening pages."""
    warnings: list[str] = []
    wanted = max(1, calib_tokens // seq_len)
    available = windows.shape[0]
    if available == 0:
        raise ConversionError(f"{origin} holds fewer than {seq_len} tokens, not one calibration window")
    held_from, origin = origin, public_name(origin)
    if want_eval:
        take = min(wanted, max(1, available - max(1, available // 5)) if available > 1 else 1)
    else:
        take = min(wanted, available)
    held_count = min(wanted, available - take) if want_eval else 0
    pool = available - held_count
    calib = TokenWindows(windows[spread(take, pool)], origin)
    held_out = None
    if held_count:
        span = (pool * seq_len, available * seq_len)
        held_out = TokenWindows(windows[pool:], f"{origin} (held-out tail)", span, held_from)
    if take < wanted:
        kept = f"; the remaining {(available - take) * seq_len} are held out for evaluation" if held_out else ""
        warnings.append(
            f"{origin} gave {take * seq_len} calibration tokens, fewer than the {wanted * seq_len} asked for{kept}"
        )
    return calib, held_out, warnings


def spread(count: int, pool: int) -> torch.Tensor:
    """`count` distinct indices spread evenly over range(pool), the first and last included (count <= pool)."""
    return torch.linspace(0, pool - 1, count).round().long() if count > 1 else torch.zeros(1, dtype=torch.long)


class _TokenCount(StoppingCriteria):
    """Never stops generation; reports how many tokens each sequence has so far."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self.report = report

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.report(input_ids.shape[1] - 1)  # the prompt is one token
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def sample_windows(
    model: Any,
    tokenizer: Any,
    count: int,
    seq_len: int,
    seed: int,
    batch: int = 32,
    on_tokens: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample `count` windows of seq_len tokens from the model itself, starting from BOS (or EOS).

    on_tokens(tokens done, count * seq_len) after every generated token: generation is the slowest stage
    on a CPU, and a batch of 32 windows takes minutes.
    """
    start = tokenizer.bos_token_id if tokenizer is not None and tokenizer.bos_token_id is not None else None
    if start is None:
        start = getattr(model.config, "bos_token_id", None) or getattr(model.config, "eos_token_id", None) or 0
    if isinstance(start, list):
        start = start[0]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out = []
    try:
        for first in range(0, count, batch):
            n = min(batch, count - first)
            prompt = torch.full((n, 1), int(start), dtype=torch.long)
            report = _TokenCount(lambda made, base=first * seq_len, n=n: on_tokens(base + made * n, count * seq_len))
            seqs = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                top_p=0.95,
                temperature=1.0,
                max_new_tokens=seq_len,
                min_new_tokens=seq_len,
                pad_token_id=int(start),
                stopping_criteria=StoppingCriteriaList([report]) if on_tokens is not None else None,
            )
            out.append(seqs[:, 1 : seq_len + 1])
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(out)


@dataclass
class TextSets:
    """Calibration windows, evaluation windows (if any), and notes for the user and the report."""

    calib: TokenWindows | None  # None when only evaluation text was asked for
    evaluation: TokenWindows | None
    notes: list[str]
    train: TokenWindows | None = None  # fine-tune text, disjoint from the evaluation text
    files: list[TextFile] = field(default_factory=list)  # every file or dataset read, in the order read
    calib_long: TokenWindows | None = None  # long calibration windows (--calib-long-len), from the calibration pool
    long: TokenWindows | None = None  # long held-out windows scored by position (--long-eval)
    long_note: str | None = None  # how they were made when not from documents that long


@dataclass(frozen=True)
class TextNeeds:
    """Which windows a run reads (job.py decides from the plan and the options; 0 or False: none)."""

    calibrate: bool = False  # calibration windows (--method activation, a conversion with something to fit)
    evaluate: bool = False  # held-out evaluation windows
    sample_eval: bool = False  # ... sampled from the source when no file gives them (they will be used)
    train_tokens: int = 0  # fine-tune text
    train_seq_len: int = 0
    long_len: int = 0  # long held-out windows for the long-context validation
    long_windows: int = 0
    calib_long_len: int = 0  # long calibration windows
    calib_long_windows: int = 0


def read_text_sets(source: Any, options: Options, needs: TextNeeds, hooks: Hooks) -> TextSets:
    """The windows `needs` asks for, from the text options (see text_sets)."""
    return text_sets(
        source,
        calib_data=options.calib_data,
        calib_tokens=options.calib_tokens,
        seq_len=options.calib_seq_len,
        eval_data=options.eval_data,
        eval_tokens=options.eval_tokens,
        column=options.text_column,
        seed=options.seed,
        need_eval=needs.evaluate,
        sample_eval=needs.sample_eval,
        need_calib=needs.calibrate,
        train_data=options.train_data,
        train_tokens=needs.train_tokens,
        train_seq_len=needs.train_seq_len,
        hooks=hooks,
        sampled_share=options.calib_sampled,
        long_len=needs.long_len,
        long_windows=needs.long_windows,
        calib_long_len=needs.calib_long_len,
        calib_long_windows=needs.calib_long_windows,
    )


def text_sets(
    source: Any,
    *,
    calib_data: str | None,
    calib_tokens: int,
    seq_len: int,
    eval_data: str | None,
    eval_tokens: int,
    column: str,
    seed: int,
    need_eval: bool,
    sample_eval: bool = True,
    need_calib: bool = True,
    train_data: str | None = None,
    train_tokens: int = 0,
    train_seq_len: int = 0,
    hooks: Hooks | None = None,
    sampled_share: float = 0.0,
    long_len: int = 0,
    long_windows: int = 0,
    calib_long_len: int = 0,
    calib_long_windows: int = 0,
) -> TextSets:
    """Build calibration, evaluation and fine-tune windows from files, or sample them from the source model.

    With train_tokens > 0 fine-tune windows come from --train-data, else --calib-data, else the calibration
    sample; when the evaluation text is the held-out tail of that same file, training never sees it.
    Evaluation text is sampled from the source model (which needs it whole) only when no file gives it
    and sample_eval says it will be used. With calibration text and sampled_share > 0, that share of the
    calibration windows is sampled from the source instead (the file's windows are still spread over it).
    With long_windows > 0, up to that many held-out windows of long_len tokens are cut for the long-context
    validation, from the same held-out text as the evaluation windows (see held_out_long). With
    calib_long_windows > 0, that many calibration windows of calib_long_len tokens are cut from the calibration
    text outside its held-out tail (from sampled calibration text: its windows joined), so the fit and the split
    measurement see far positions.
    """
    tokenizer = source.tokenizer()
    hooks = hooks or Hooks()

    def sample(count: int, what: str, seed: int, length: int = seq_len) -> torch.Tensor:
        """Text generated by the source, with a count the progress display turns into time left."""
        hooks.on_stage(f"sampling {count * length} tokens of {what} from the source", count * length)
        return sample_windows(source.model(), tokenizer, count, length, seed, on_tokens=hooks.on_progress)

    streams: dict[str, torch.Tensor] = {}
    files: list[TextFile] = []

    def windows_of(spec: str, length: int) -> torch.Tensor:
        """Read and tokenize each file once, whatever window lengths are cut from it."""
        if spec not in streams:
            streams[spec] = token_stream(read_texts(spec, column), tokenizer)
            files.append(text_file(spec))
        return cut_windows(streams[spec], length)

    notes: list[str] = []
    evaluation: TokenWindows | None = None
    if (calib_data or eval_data or train_data) and tokenizer is None:
        flags = (("--calib-data", calib_data), ("--eval-data", eval_data), ("--train-data", train_data))
        given = " and ".join(flag for flag, data in flags if data)
        raise ConversionError(f"{source.label} has no tokenizer, so text data cannot be used; omit {given}")
    if eval_data:
        ids = windows_of(eval_data, seq_len)
        if ids.shape[0] == 0:
            raise ConversionError(f"--eval-data {eval_data} holds fewer than {seq_len} tokens")
        evaluation = TokenWindows(ids[: max(1, eval_tokens // seq_len)], public_name(eval_data))
    if train_data and train_tokens > 0 and evaluation is None and not calib_data:
        # the held-out tail of the training text is the evaluation text
        windows = windows_of(train_data, seq_len)
        if windows.shape[0] == 0:
            raise ConversionError(f"--train-data {train_data} holds fewer than {seq_len} tokens")
        _, held_out, _ = split_windows(windows, train_tokens, seq_len, train_data, want_eval=True)
        if held_out is not None:
            evaluation = _first_tokens(held_out, eval_tokens, seq_len)
    calib: TokenWindows | None = None
    calib_long: TokenWindows | None = None
    if need_calib and calib_data:
        windows = windows_of(calib_data, seq_len)
        calib, held_out, warnings = split_windows(
            windows, calib_tokens, seq_len, calib_data, want_eval=need_eval and evaluation is None
        )
        notes += warnings
        take = calib.ids.shape[0]
        sampled = min(take - 1, round(sampled_share * take))
        if sampled:  # the file's windows that stay are still spread over it; the held-out tail is unchanged
            more = sample(sampled, "calibration text (--calib-sampled)", seed)
            kept = calib.ids[spread(take - sampled, take)]
            calib = TokenWindows(torch.cat([kept, more]), f"{public_name(calib_data)} and text sampled from the source")
            notes.append(f"{more.numel()} of the {calib.tokens} calibration tokens are sampled from the source")
        if evaluation is None and held_out is not None:
            evaluation = _first_tokens(held_out, eval_tokens, seq_len)
        if calib_long_windows > 0:
            stream = streams[calib_data]
            pool = stream[: held_out.held_span[0]] if held_out is not None and held_out.held_span else stream
            calib_long = _long_calibration(pool, calib_long_len, calib_long_windows, calib.origin)
    elif need_calib:
        count = max(1, calib_tokens // seq_len)
        notes.append(f"no --calib-data: calibrating on {count * seq_len} tokens sampled from the source model itself")
        calib = TokenWindows(
            sample(count, "calibration text (no --calib-data; give a text file to skip this)", seed),
            "sampled from the source",
        )
        if calib_long_windows > 0:
            joined = calib.ids.reshape(-1)
            calib_long = _long_calibration(joined, calib_long_len, calib_long_windows, calib.origin)
    if need_eval and sample_eval and evaluation is None:
        count = max(1, min(eval_tokens, 4096) // seq_len)
        ids = sample(count, "evaluation text (no --eval-data)", seed + 1)
        evaluation = TokenWindows(ids, "sampled from the source (separate seed)")
        notes.append("no evaluation text: quality is measured on a separate sample from the source")
    train = None
    if train_tokens > 0:
        train = _train_windows(
            sample,
            train_data or calib_data,
            windows_of,
            train_tokens,
            train_seq_len,
            calib,
            evaluation,
            seed,
            notes,
        )
    long, long_note = None, None
    if long_windows > 0 and evaluation is not None:
        long, long_note = held_out_long(evaluation, eval_data, column, tokenizer, streams, long_len, long_windows)
    return TextSets(
        calib=calib,
        evaluation=evaluation,
        notes=notes,
        train=train,
        files=files,
        calib_long=calib_long,
        long=long,
        long_note=long_note,
    )


def _long_calibration(stream: torch.Tensor, length: int, count: int, origin: str) -> TokenWindows:
    """Up to `count` windows of `length` tokens spread over a calibration stream; one shorter window of the
    whole stream when it is shorter (the report's calibration section gives what was used)."""
    windows = cut_windows(stream, length)
    if windows.shape[0] == 0:
        return TokenWindows(stream[None].clone(), origin)
    return TokenWindows(windows[spread(min(count, windows.shape[0]), windows.shape[0])], origin)


def held_out_long(
    evaluation: TokenWindows,
    eval_data: str | None,
    column: str,
    tokenizer: Any,
    streams: dict[str, torch.Tensor],
    length: int,
    count: int,
) -> tuple[TokenWindows, str | None]:
    """Up to `count` windows of `length` held-out tokens, and a note when they are not whole documents.

    --eval-data: its documents of at least `length` tokens (each one's opening), else its documents joined
    (EOS between). The held-out tail of a calibration or fine-tune file: that span of the file, never more
    (training skips exactly it). Text sampled from the source: its separately sampled windows joined. A text
    shorter than `length` gives one shorter window, and the note says so."""
    if eval_data:
        docs = [torch.tensor(tokenizer(t, add_special_tokens=False).input_ids) for t in read_texts(eval_data, column)]
        whole = [d[:length] for d in docs if d.numel() >= length][:count]
        if whole:
            return TokenWindows(torch.stack(whole), evaluation.origin), None
        stream = streams[eval_data]
        note = f"no document of {evaluation.origin} is {length} tokens long: its documents are joined, EOS between"
        if len(docs) == 1:
            note = None  # one document shorter than the window: the note below says so
    elif evaluation.held_span is not None and evaluation.held_from is not None:
        a, b = evaluation.held_span
        stream = streams[evaluation.held_from][a:b]
        note = None
    else:
        stream = evaluation.ids.reshape(-1)
        note = (
            f"windows of {evaluation.ids.shape[1]} tokens sampled separately from the source, joined: far positions "
            "follow unrelated text, so this measures how the model copes with far positions, not how it uses them"
        )
    windows = cut_windows(stream, length)[:count].clone()  # its own storage: staged beside the evaluation windows
    if windows.shape[0] == 0:
        windows = stream[None].clone()
        short = f"the held-out text holds {stream.numel()} tokens, fewer than {length}: one window of them all"
        note = "; ".join(n for n in (note, short) if n)
    return TokenWindows(windows, evaluation.origin), note


def _first_tokens(held_out: TokenWindows, tokens: int, seq_len: int) -> TokenWindows:
    """The first windows of a held-out slice, up to `tokens`, with their own token span."""
    ids = held_out.ids[: max(1, tokens // seq_len)]
    assert held_out.held_span is not None
    start = held_out.held_span[0]
    return TokenWindows(ids, held_out.origin, (start, start + ids.numel()), held_out.held_from)


def _train_windows(
    sample: Callable[..., torch.Tensor],
    data: str | None,
    windows_of: Callable[[str, int], torch.Tensor],
    tokens: int,
    seq_len: int,
    calib: TokenWindows | None,
    evaluation: TokenWindows | None,
    seed: int,
    notes: list[str],
) -> TokenWindows:
    """Fine-tune windows from `data` (skipping any window that touches the held-out span), else sampled."""
    count = max(1, tokens // seq_len)
    if data:
        windows = windows_of(data, seq_len)
        if evaluation is not None and evaluation.held_span is not None and evaluation.held_from == data:
            a, b = evaluation.held_span
            starts = torch.arange(windows.shape[0]) * seq_len
            windows = windows[(starts + seq_len <= a) | (starts >= b)]
        if windows.shape[0] == 0:
            raise ConversionError(f"--train-data {data} holds fewer than {seq_len} tokens outside the held-out text")
        if windows.shape[0] < count:
            notes.append(
                f"{public_name(data)} gave {windows.shape[0] * seq_len} fine-tune tokens, fewer than the "
                f"{count * seq_len} asked for; the fine-tune repeats them"
            )
        return TokenWindows(windows[:count], public_name(data))
    if calib is not None and calib.ids.shape[1] == seq_len and calib.origin == "sampled from the source":
        # Reuse the calibration sample, and sample more rather than repeat it: on 32 sampled windows, 40
        # steps of 4 (five passes) made SmolLM2 at budget 0.25 worse than before training (KL 0.91 -> 0.96).
        have = calib.ids.shape[0]
        if have >= count:
            notes.append("no --train-data: the fine-tune reuses the calibration text sampled from the source")
            return TokenWindows(calib.ids[:count], calib.origin)
        more = sample(count - have, "more fine-tune text (no --train-data)", seed + 2, seq_len)
        notes.append(
            f"no --train-data: the fine-tune uses the calibration text and {more.numel()} more tokens sampled "
            "from the source"
        )
        return TokenWindows(torch.cat([calib.ids, more]), calib.origin)
    count = max(1, min(tokens, 8192) // seq_len)
    notes.append(f"no --train-data: fine-tuning on {count * seq_len} tokens sampled from the source model itself")
    return TokenWindows(sample(count, "fine-tune text (no --train-data)", seed + 2, seq_len), "sampled from the source")
