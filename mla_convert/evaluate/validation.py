"""The validation pass: the source, the converted model (and the fine-tuned one) on held-out text, side by
side: perplexity, KL to the source, top-1 agreement, a greedy continuation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from ..plan.long_eval import LongEvalPlan
from ..source.checkpoint import Source
from ..source.text import TokenWindows
from . import long_context
from .metrics import Comparison, compare_many, greedy_samples


@dataclass(frozen=True)
class LongText:
    """What the long-context validation needs besides the models: its plan, long held-out windows and how
    they were made, and the seed of its passkeys."""

    plan: LongEvalPlan | None
    windows: TokenWindows | None
    note: str | None
    seed: int


class Evaluation(TypedDict):
    """The report's `evaluation` section: the converted model before any fine-tune, against the source."""

    text: str
    tokens: int
    source_perplexity: float
    converted_perplexity: float
    perplexity_ratio: float
    kl_to_source: float
    top1_agreement: float


class ModelRow(TypedDict):
    model: str
    perplexity: float
    perplexity_ratio: float
    kl_to_source: float | None
    top1_agreement: float | None


class ValidationSection(TypedDict):
    """The report's `validation` section: one row per model (the source first) and their continuations."""

    text: str
    tokens: int
    models: list[ModelRow]
    generation: dict[str, Any]


@dataclass(frozen=True)
class Validated:
    """What the validation measured: the report's evaluation, validation and long_eval sections."""

    evaluation: Evaluation | None = None
    validation: ValidationSection | None = None
    long_eval: long_context.LongEval | None = None


def measured(
    source: Source | None,
    models: dict[str, Any],
    text: TokenWindows | None,
    long: LongText | None = None,
) -> Validated:
    """`models` measured against the source on `text` (when there is anything to measure), and at long
    context when `long` plans it."""
    if source is None or text is None or not models:
        return Validated()
    results = compare_many(source.model(), models, text.ids)
    before = results[next(iter(models))]  # the first model is the converted one, before any fine-tune
    evaluation = Evaluation(text=text.origin, **before.as_dict())  # type: ignore[typeddict-item]
    long_eval = None
    if long is not None and long.plan is not None:
        windows = long.windows
        long_eval = long_context.measure(
            long.plan,
            source.model(),
            models,
            windows.ids if windows is not None else None,
            windows.origin if windows is not None else None,
            long.note,
            source.tokenizer(),
            long.seed,
        )
    return Validated(evaluation, validation(source, models, text, results), long_eval)


def validation(
    source: Source, models: dict[str, Any], text: TokenWindows, results: dict[str, Comparison]
) -> ValidationSection:
    """The report's validation section: one row per model (the source first) and their greedy continuations."""
    any_result = next(iter(results.values()))
    source_row = ModelRow(
        model="source", perplexity=any_result.source_ppl, perplexity_ratio=1.0, kl_to_source=None, top1_agreement=None
    )
    rows = [source_row]
    for name, c in results.items():
        rows.append(
            ModelRow(
                model=name,
                perplexity=c.converted_ppl,
                perplexity_ratio=c.ppl_ratio,
                kl_to_source=c.kl,
                top1_agreement=c.top1_agreement,
            )
        )
    generation = greedy_samples({"source": source.model(), **models}, source.tokenizer(), text.ids)
    return ValidationSection(text=text.origin, tokens=any_result.tokens, models=rows, generation=generation)
