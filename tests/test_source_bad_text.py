"""Bad calibration and evaluation text, given on the command line: every refusal is one clear line, MODEL_IN and
MODEL_OUT are left untouched and no temporary folder is left behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .helpers import QUICK, RANKS, Untouched, documents, one_line, write_jsonl, write_txt

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- bad calibration input via the CLI


def _file(name: str, content: bytes | str) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return make


def _missing(name: str) -> Callable[[Path], Path]:
    return lambda tmp_path: tmp_path / "no-such-dir" / name


def _parquet(name: str, table: dict) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        pq.write_table(pa.table(table), tmp_path / name)
        return tmp_path / name

    return make


def _directory(tmp_path: Path) -> Path:
    (tmp_path / "texts").mkdir()
    return tmp_path / "texts"


GOOD_JSON = '{"id": 1, "text": "fine"}\n'
BAD_DATA: list[tuple[str, Callable[[Path], Path], tuple[str, ...]]] = [
    ("missing-txt", _missing("calib.txt"), ("text data file not found", "no-such-dir/calib.txt")),
    ("missing-jsonl", _missing("calib.jsonl"), ("text data file not found", "calib.jsonl")),
    ("missing-parquet", _missing("calib.parquet"), ("text data file not found", "calib.parquet")),
    ("missing-no-suffix", _missing("calib"), ("text data file not found", "no-such-dir/calib")),
    ("directory", _directory, ("must be a file", "got a directory")),
    ("empty-txt", _file("empty.txt", ""), ("empty.txt holds no text",)),
    ("whitespace-txt", _file("blank.txt", " \n\t\n   \n"), ("blank.txt holds no text",)),
    ("blank-lines-jsonl", _file("blank.jsonl", "\n  \n"), ("blank.jsonl holds no text",)),
    ("empty-strings-jsonl", _file("empty.jsonl", '{"text": ""}\n{"text": " "}\n'), ("empty.jsonl holds no text",)),
    ("not-utf8-txt", _file("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1")), ("latin1.txt is not UTF-8 text",)),
    ("not-utf8-jsonl", _file("latin1.jsonl", b'{"text": "caf\xe9"}\n'), ("latin1.jsonl is not UTF-8 text",)),
    (
        "jsonl-wrong-field",
        _file("calib.jsonl", GOOD_JSON + GOOD_JSON + '{"id": 3, "content": "x", "lang": "en"}\n'),
        ("calib.jsonl line 3 has no 'text' field", "(it has: id, content, lang)"),
    ),
    ("jsonl-not-object", _file("calib.jsonl", '["a", "b"]\n'), ("calib.jsonl line 1 has no 'text' field", "list")),
    (
        "jsonl-invalid-line",
        _file("calib.jsonl", GOOD_JSON + '{"text": "oops",}\n'),
        ("calib.jsonl line 2 is not valid JSON",),
    ),
    (
        "parquet-no-column",
        _parquet("calib.parquet", {"id": [1, 2], "content": ["a", "b"]}),
        ("calib.parquet has no column 'text'", "(it has: id, content)"),
    ),
    (
        "parquet-garbage",
        _file("calib.parquet", b"PAR1 not really\n"),
        ("calib.parquet is not a readable parquet file",),
    ),
    (
        "parquet-only-nulls",
        _parquet("calib.parquet", {"text": pa.array([None, None], pa.string())}),
        ("calib.parquet holds no text",),
    ),
    (
        "csv",
        _file("calib.csv", "text\nhello\n"),
        ("unsupported text data format '.csv'", "use .txt, .jsonl or .parquet"),
    ),
    ("too-short", _file("short.txt", "Tiny.\n"), ("short.txt holds fewer than 32 tokens, not one calibration window",)),
]


@pytest.fixture
def refuse(cli, tmp_path: Path) -> Callable[..., str]:
    """Run the CLI expecting a clean refusal; checks MODEL_IN/MODEL_OUT untouched and no temp dir left."""

    def check(model_in: Path, *args: object, fragments: tuple[str, ...]) -> str:
        model_out = tmp_path / "model_out"
        guard = Untouched(model_in, model_out)
        line = one_line(cli(model_in, model_out, *args), *fragments)
        guard.check()
        return line

    return check


@pytest.mark.parametrize(("make", "fragments"), [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA])
def test_bad_calib_data(refuse, text_model: Path, tmp_path: Path, make, fragments) -> None:
    refuse(text_model, QUICK, "--calib-data", make(tmp_path), fragments=fragments)


def test_bad_eval_data(refuse, text_model: Path, tmp_path: Path) -> None:
    calib = write_txt(tmp_path / "calib.txt", documents(40, seed=1))
    held = _file("eval.jsonl", '{"content": "x"}\n')(tmp_path)
    fragments = ("eval.jsonl line 1 has no 'text' field", "(it has: content)")
    refuse(text_model, QUICK, "--calib-data", calib, "--eval-data", held, fragments=fragments)
    short = _file("eval.txt", "Tiny.\n")(tmp_path)
    fragments = (f"--eval-data {short} holds fewer than 32 tokens",)
    refuse(text_model, QUICK, "--calib-data", calib, "--eval-data", short, fragments=fragments)


def test_text_column_missing(refuse, text_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "calib.jsonl", documents(4, seed=1))
    fragments = ("calib.jsonl line 1 has no 'body' field", "(it has: id, text)")
    refuse(text_model, QUICK, "--calib-data", data, "--text-column", "body", fragments=fragments)


LENGTH_CASES: list[tuple[str, tuple[object, ...], tuple[str, ...]]] = [
    (
        "seq-len-beyond-context",
        ("--calib-seq-len", 1024, "--calib-tokens", 2048),
        ("--calib-seq-len 1024 is longer than the model's context (512)",),
    ),
    ("seq-len-tiny", ("--calib-seq-len", 8), ("--calib-seq-len must be at least 16, got 8",)),
    (
        "tokens-below-one-window",
        ("--calib-seq-len", 64, "--calib-tokens", 63),
        ("--calib-tokens 63 is less than one window of --calib-seq-len 64",),
    ),
]


@pytest.mark.parametrize("with_data", [True, False], ids=["with-calib-data", "sampled"])
@pytest.mark.parametrize(("flags", "fragments"), [c[1:] for c in LENGTH_CASES], ids=[c[0] for c in LENGTH_CASES])
def test_bad_lengths(refuse, text_model: Path, tmp_path: Path, flags, fragments, with_data: bool) -> None:
    data = ("--calib-data", write_txt(tmp_path / "calib.txt", documents(40, seed=1))) if with_data else ()
    refuse(text_model, RANKS, data, flags, fragments=fragments)


def test_text_data_for_model_without_tokenizer(refuse, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["llama_gqa_tied"]
    data = write_txt(tmp_path / "calib.txt", documents(10, seed=1))
    refuse(model, QUICK, "--calib-data", data, fragments=("has no tokenizer", "omit --calib-data"))
    line = refuse(model, QUICK, "--method", "svd", "--eval-data", data, fragments=("has no tokenizer",))
    assert line.endswith("omit --eval-data")
