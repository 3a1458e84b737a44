"""The schema of mla_report.json written at the top of report/report.py stays the truth: every key a real
report holds, and every field of the typed sections the stages return, is named there (a key added to the
code and not to the schema, as routing_agreement once was, fails here). The MoE reports are checked where
tests/test_conversion_moe.py makes them."""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any

import pytest

import mla_convert
from mla_convert.evaluate.long_context import LongEval
from mla_convert.evaluate.validation import Evaluation, ModelRow, ValidationSection
from mla_convert.report.report import Calibration, GgufSection
from mla_convert.train.finetune import FinetuneSection

from .helpers import build_text_model, documents, schema_words, undocumented, write_txt


@pytest.fixture(scope="module")
def healed_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A report with every optional section a dense source can fill: calibration with a long window, a
    fine-tune, validation at short and long range, and a GGUF."""
    root = tmp_path_factory.mktemp("schema")
    model, text = build_text_model(root), write_txt(root / "text.txt", documents(200, seed=5))
    return mla_convert.convert(
        model, root / "out", kv_budget=0.5, calib_data=str(text), calib_tokens=1024, calib_seq_len=32,
        calib_long_len=128, eval_tokens=256, long_eval_len=128, finetune_steps=2, train_seq_len=32, batch_size=2,
        micro_batch_size=2, warmup_steps=1, train_tokens=512, gguf="f32",
    )  # fmt: skip


def test_every_key_of_a_healed_report_is_in_the_schema(healed_report: dict[str, Any]) -> None:
    for section in ("finetune", "validation", "long_eval", "gguf", "calibration", "verification", "long_context"):
        assert healed_report[section], section  # the case really fills what it is meant to check
    assert "far_attn_output_error" in healed_report["layers"][0]
    assert undocumented(healed_report) == []


@pytest.mark.parametrize(
    "section", [Evaluation, ModelRow, ValidationSection, FinetuneSection, Calibration, GgufSection, LongEval]
)
def test_every_field_of_the_typed_sections_is_in_the_schema(section: type) -> None:
    names = (
        [f.name for f in fields(section)]
        if hasattr(section, "__dataclass_fields__")
        else list(typing.get_type_hints(section))
    )
    assert names and not [n for n in names if n not in schema_words()]


def test_the_check_finds_a_key_the_schema_lacks() -> None:
    assert undocumented({"settings": {"target": "portable", "routing_agreementx": 1.0}}) == [
        ".settings.routing_agreementx"
    ]
