"""Calibration and evaluation text: every input format end to end, the self-sampled fallback, and the split between
calibration and held-out text (bad text input is refused in tests/test_source_bad_text.py).

The tiny models in conftest ship no tokenizer, so a module fixture (conftest.text_model) builds one that does: a
byte-level BPE trained offline on generated prose, wrapped in PreTrainedTokenizerFast and saved beside a tiny GQA
Llama.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mla_convert import Options, convert
from mla_convert.errors import ConversionError
from mla_convert.source.checkpoint import resolve
from mla_convert.source.text import read_texts, split_windows, spread, text_sets, tokenize_windows

from .helpers import (
    CALIB_TOKENS,
    EVAL_TOKENS,
    QUICK,
    RANKS,
    SEQ,
    documents,
    messages,
    sentences,
    temp_dirs,
    write_jsonl,
    write_parquet,
    write_txt,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WHOLE = CALIB_TOKENS // SEQ * SEQ


# ---------------------------------------------------------------- counting tokens, converting with text


def token_count(tokenizer: object, docs: list[str]) -> int:
    """Tokens the tool sees for these documents: their ids plus one EOS after each."""
    return sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in docs)  # type: ignore[operator]


def docs_with_tokens(tokenizer: object, low: int, high: int, seed: int = 5) -> list[str]:
    """One document holding between low and high tokens (EOS included), grown a word at a time."""
    words = " ".join(sentences(1000, seed)).split(" ")
    for end in range(1, len(words) + 1):
        n = token_count(tokenizer, [" ".join(words[:end])])
        if n >= low:
            assert n < high, f"{n} tokens overshoot [{low}, {high})"
            return [" ".join(words[:end])]
    raise AssertionError("not enough words")


QUICK_OPTIONS = Options(
    kv_rank=12, rope_dim=8, verify=False, calib_tokens=CALIB_TOKENS, calib_seq_len=SEQ, eval_tokens=EVAL_TOKENS,
    finetune_steps=0,
)  # fmt: skip


def converted(model: Path, out: Path, **flags: object) -> dict:
    """Convert through the API with QUICK_OPTIONS, and `flags` (named as the command line's) on top."""
    convert(model, out, QUICK_OPTIONS, **flags)
    return json.loads((out / "mla_report.json").read_text())


def assert_calibrated(report: dict, source: str, tokens: int) -> None:
    assert report["calibration"] == {"method": "activation", "source": source, "tokens": tokens}
    assert all(layer["attn_output_error"] is not None for layer in report["layers"])


# ---------------------------------------------------------------- every format through the full pipeline


FORMATS: list[tuple[str, Callable[[Path, list[str], str], Path], str, str]] = [
    ("txt", lambda d, docs, col: write_txt(d / "calib.txt", docs), "text", ".txt"),
    ("jsonl", lambda d, docs, col: write_jsonl(d / "calib.jsonl", docs, col), "text", ".jsonl"),
    ("parquet", lambda d, docs, col: write_parquet(d / "calib.parquet", docs, col), "text", ".parquet"),
    ("jsonl-custom-column", lambda d, docs, col: write_jsonl(d / "calib.jsonl", docs, col), "content", ".jsonl"),
    ("parquet-custom-column", lambda d, docs, col: write_parquet(d / "calib.parquet", docs, col), "body", ".parquet"),
]


@pytest.mark.parametrize(("write", "column", "suffix"), [f[1:] for f in FORMATS], ids=[f[0] for f in FORMATS])
def test_calibration_format(text_model: Path, tokenizer: object, tmp_path: Path, write, column, suffix) -> None:
    docs = documents(40, seed=1)
    assert token_count(tokenizer, docs) > 2 * WHOLE  # room for the calibration windows and a held-out tail
    data = write(tmp_path, docs, column)
    assert data.suffix == suffix
    report = converted(text_model, tmp_path / "out", calib_data=str(data), text_column=column)
    assert_calibrated(report, data.name, WHOLE)
    evaluation = report["evaluation"]
    assert evaluation is not None
    assert evaluation["text"] == f"{data.name} (held-out tail)"
    assert 0 < evaluation["tokens"] <= EVAL_TOKENS
    assert not any("fewer than" in w or "no --calib-data" in w for w in report["warnings"])
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_custom_column_and_eval_data_via_cli(cli, text_model: Path, tmp_path: Path) -> None:
    """--text-column applies to --calib-data and --eval-data; the evaluation is then on the eval file."""
    calib = write_parquet(tmp_path / "calib.parquet", documents(40, seed=1), "body")
    held = write_jsonl(tmp_path / "eval.jsonl", documents(10, seed=2), "body")
    out = tmp_path / "out"
    result = cli(text_model, out, QUICK, "--calib-data", calib, "--eval-data", held, "--text-column", "body")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    lines = messages(result.stderr)
    assert [line[:6] for line in lines if not line.startswith("engine ")] == ["plan: ", "warnin"], result.stderr
    assert len([line for line in lines if line.startswith("engine ")]) == 4  # one per engine, before the plan
    assert "warning: vLLM refuses" in result.stderr  # the only warning: this width is not one vLLM serves
    assert "Validation on" in result.stdout and held.name in result.stdout.replace("\n", "")
    report = json.loads((out / "mla_report.json").read_text())
    assert_calibrated(report, calib.name, WHOLE)
    assert report["evaluation"]["text"] == held.name
    assert [w[:12] for w in report["warnings"]] == ["vLLM refuses"]
    assert temp_dirs(tmp_path) == []


def test_eval_data_leaves_the_whole_calibration_file_for_calibration(
    text_model: Path, tokenizer: object, tmp_path: Path
) -> None:
    """A file with just enough tokens: without --eval-data a tail is held out (fewer tokens, a warning)."""
    data = write_txt(tmp_path / "calib.txt", docs_with_tokens(tokenizer, WHOLE, WHOLE + SEQ))
    held = write_txt(tmp_path / "eval.txt", documents(10, seed=2))

    with_eval = converted(text_model, tmp_path / "with_eval", calib_data=str(data), eval_data=str(held))
    assert_calibrated(with_eval, data.name, WHOLE)
    assert with_eval["evaluation"]["text"] == held.name
    assert [w[:12] for w in with_eval["warnings"]] == ["vLLM refuses"]  # the width, not the text

    alone = converted(text_model, tmp_path / "alone", calib_data=str(data))
    windows = WHOLE // SEQ
    assert_calibrated(alone, data.name, (windows - windows // 5) * SEQ)
    assert alone["evaluation"]["text"] == f"{data.name} (held-out tail)"
    (warning,) = [w for w in alone["warnings"] if "fewer than" in w]
    assert f"fewer than the {WHOLE} asked for" in warning and "held out for evaluation" in warning


# ---------------------------------------------------------------- fewer tokens than asked


def test_fewer_tokens_than_asked_warns_and_succeeds(cli, text_model: Path, tokenizer: object, tmp_path: Path) -> None:
    docs = docs_with_tokens(tokenizer, 5 * SEQ, 6 * SEQ)
    data = write_txt(tmp_path / "short.txt", docs)
    windows = token_count(tokenizer, docs) // SEQ
    expected = (windows - max(1, windows // 5)) * SEQ  # the rest is held out for evaluation
    out = tmp_path / "out"
    result = cli(text_model, out, QUICK, "-q", "--calib-data", data)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == result.stderr.splitlines()
    (warning,) = [w for w in warnings if not w.startswith("warning: vLLM refuses")]
    assert f"{data.name} gave {expected} calibration tokens, fewer than the {WHOLE} asked for" in warning
    report = json.loads((out / "mla_report.json").read_text())
    assert_calibrated(report, data.name, expected)
    assert any("fewer than" in w for w in report["warnings"])
    assert report["evaluation"]["text"] == f"{data.name} (held-out tail)"


def test_single_window_file_calibrates_and_samples_the_evaluation(
    text_model: Path, tokenizer: object, tmp_path: Path
) -> None:
    data = write_txt(tmp_path / "one_window.txt", docs_with_tokens(tokenizer, SEQ, 2 * SEQ))
    report = converted(text_model, tmp_path / "out", calib_data=str(data))
    assert_calibrated(report, data.name, SEQ)
    assert any(f"fewer than the {WHOLE} asked for" in w for w in report["warnings"])
    assert report["evaluation"]["text"] == "sampled from the source (separate seed)"


# ---------------------------------------------------------------- no --calib-data: sampled from the source


SAMPLED = {"calib_tokens": 256, "calib_seq_len": SEQ, "eval_tokens": 64}


def test_sampled_fallback_without_tokenizer(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["llama_gqa_tied"]
    assert not (model / "tokenizer.json").exists() and not (model / "tokenizer_config.json").exists()
    report = converted(model, tmp_path / "out", **SAMPLED)
    assert_calibrated(report, "sampled from the source", 256)
    assert any("no --calib-data" in w and "sampled from the source model" in w for w in report["warnings"])
    assert report["evaluation"]["text"] == "sampled from the source (separate seed)"


def test_sampled_fallback_is_deterministic(cli, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["llama_gqa_tied"]
    flags = (*RANKS, "-q", "--calib-tokens", 256, "--calib-seq-len", SEQ, "--eval-tokens", 64, "--finetune-steps", 0)
    first = cli(model, tmp_path / "a", flags)
    assert first.exit_code == 0, first.output
    assert any(line.startswith("warning: no --calib-data") for line in first.stderr.splitlines()), first.stderr
    converted(model, tmp_path / "b", **SAMPLED)  # seed 0 too, through the API
    other = cli(model, tmp_path / "c", flags, "--seed", 1)
    assert other.exit_code == 0, other.output

    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"], "the same seed must give the same checkpoint"
    assert weights["a"] != weights["c"], "another seed samples other calibration text"


# ---------------------------------------------------------------- calibration text is never evaluation text


def test_split_windows_never_overlap() -> None:
    for available in range(0, 24):
        windows = torch.arange(available * SEQ).view(available, SEQ)
        for wanted in range(1, 12):
            for want_eval in (True, False):
                if available == 0:
                    with pytest.raises(ConversionError, match="fewer than 32 tokens, not one calibration window"):
                        split_windows(windows, wanted * SEQ, SEQ, "data", want_eval)
                    continue
                calib, held, warnings = split_windows(windows, wanted * SEQ + SEQ - 1, SEQ, "data", want_eval)
                take = calib.ids.shape[0]
                assert 1 <= take <= wanted
                assert bool(warnings) == (take < wanted)
                starts = calib.ids[:, 0] // SEQ  # which windows calibration took, in file order
                assert starts.tolist() == sorted(set(starts.tolist())) and starts[0] == 0
                assert torch.equal(calib.ids, windows[starts])
                if not want_eval:
                    assert held is None and take == min(wanted, available)
                    assert starts[-1] == available - 1 or take == 1  # spread over the whole file
                    continue
                if available > 1:
                    assert held is not None and take < available  # something is always held out
                    count = held.ids.shape[0]
                    assert torch.equal(held.ids, windows[available - count :])  # the file's last windows
                    assert held.held_span == ((available - count) * SEQ, available * SEQ)
                    assert 1 <= count <= wanted
                    assert take == 1 or starts[-1] == available - count - 1  # spread up to the tail
                    assert set(calib.ids.flatten().tolist()).isdisjoint(held.ids.flatten().tolist())
                    assert held.origin == "data (held-out tail)"
                else:
                    assert held is None and take == 1


def test_text_sets_hold_out_the_tail_of_the_file(text_model: Path, tokenizer: object, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "calib.jsonl", documents(40, seed=3))
    windows = tokenize_windows(read_texts(str(data)), tokenizer, SEQ)
    assert windows.shape[0] > 2 * (WHOLE // SEQ)
    source = resolve(str(text_model))
    common = {"calib_tokens": CALIB_TOKENS, "seq_len": SEQ, "column": "text", "seed": 0, "need_eval": True}

    sets = text_sets(source, calib_data=str(data), eval_data=None, eval_tokens=EVAL_TOKENS, **common)
    take, count = WHOLE // SEQ, windows.shape[0]
    held = min(take, count - take)
    assert sets.calib.origin == data.name and torch.equal(sets.calib.ids, windows[spread(take, count - held)])
    assert sets.evaluation is not None and sets.evaluation.origin == f"{data.name} (held-out tail)"
    assert torch.equal(sets.evaluation.ids, windows[count - held :][: EVAL_TOKENS // SEQ])
    calib_rows = {tuple(row) for row in sets.calib.ids.tolist()}
    assert calib_rows.isdisjoint(tuple(row) for row in sets.evaluation.ids.tolist())
    assert sets.notes == []

    held = write_txt(tmp_path / "eval.txt", documents(10, seed=4))
    sets = text_sets(source, calib_data=str(data), eval_data=str(held), eval_tokens=EVAL_TOKENS, **common)
    assert torch.equal(sets.calib.ids, windows[spread(take, count)])  # nothing held out: the whole file
    assert sets.evaluation is not None and sets.evaluation.origin == held.name
    expected = tokenize_windows(read_texts(str(held)), tokenizer, SEQ)[: EVAL_TOKENS // SEQ]
    assert torch.equal(sets.evaluation.ids, expected)


def test_a_share_of_the_calibration_text_can_be_sampled_from_the_source(
    text_model: Path, tokenizer: object, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "calib.jsonl", documents(40, seed=3))
    windows = tokenize_windows(read_texts(str(data)), tokenizer, SEQ)
    source = resolve(str(text_model))
    common = {"calib_tokens": CALIB_TOKENS, "seq_len": SEQ, "column": "text", "seed": 0, "need_eval": True}
    sets = text_sets(source, calib_data=str(data), eval_data=None, eval_tokens=EVAL_TOKENS, sampled_share=0.2, **common)
    take, sampled = WHOLE // SEQ, round(0.2 * (WHOLE // SEQ))
    assert sets.calib.ids.shape == (take, SEQ) and sets.calib.origin == f"{data.name} and text sampled from the source"
    file_rows = {tuple(row) for row in windows.tolist()}
    rows = [tuple(row) for row in sets.calib.ids.tolist()]
    assert all(row in file_rows for row in rows[: take - sampled])
    assert not any(row in file_rows for row in rows[take - sampled :])  # generated, not read
    assert sets.notes == [f"{sampled * SEQ} of the {take * SEQ} calibration tokens are sampled from the source"]
    # the held-out tail is the one the file gives without sampling: evaluation never changes with the share
    plain = text_sets(source, calib_data=str(data), eval_data=None, eval_tokens=EVAL_TOKENS, **common)
    assert sets.evaluation is not None and plain.evaluation is not None
    assert torch.equal(sets.evaluation.ids, plain.evaluation.ids)


def test_jsonl_nulls_are_skipped(tmp_path: Path) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": null}\n\n{"text": "kept"}\n{"text": "  "}\n', encoding="utf-8")
    assert read_texts(str(data)) == ["kept"]
