"""The validation pass: the source, the converted model (and the fine-tuned one) on held-out text, side by
side: perplexity, KL to the source, top-1 agreement, a greedy continuation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def measured(
    report: dict[str, Any],
    source: Source | None,
    models: dict[str, Any],
    text: TokenWindows | None,
    long: LongText | None = None,
) -> dict[str, Any]:
    """The report with `models` measured against the source on `text` (when there is anything to measure),
    and at long context when `long` plans it."""
    report = dict(report)
    if source is not None and text is not None and models:
        results = compare_many(source.model(), models, text.ids)
        report["validation"] = validation(source, models, text, results)
        before = results[next(iter(models))]  # the first model is the converted one, before any fine-tune
        report["evaluation"] = {"text": text.origin, **before.as_dict()}
        if long is not None and long.plan is not None:
            windows = long.windows
            report["long_eval"] = long_context.measure(
                long.plan,
                source.model(),
                models,
                windows.ids if windows is not None else None,
                windows.origin if windows is not None else None,
                long.note,
                source.tokenizer(),
                long.seed,
            ).as_dict()
    return report


def validation(
    source: Source, models: dict[str, Any], text: TokenWindows, results: dict[str, Comparison]
) -> dict[str, Any]:
    """The report's validation section: one row per model (the source first) and their greedy continuations."""
    any_result = next(iter(results.values()))
    rows: list[dict[str, Any]] = [
        {
            "model": "source",
            "perplexity": any_result.source_ppl,
            "perplexity_ratio": 1.0,
            "kl_to_source": None,
            "top1_agreement": None,
        }
    ]
    for name, c in results.items():
        rows.append(
            {
                "model": name,
                "perplexity": c.converted_ppl,
                "perplexity_ratio": c.ppl_ratio,
                "kl_to_source": c.kl,
                "top1_agreement": c.top1_agreement,
            }
        )
    generation = greedy_samples({"source": source.model(), **models}, source.tokenizer(), text.ids)
    return {
        "text": text.origin,
        "tokens": any_result.tokens,
        "models": rows,
        "generation": generation,
    }
