"""The validation pass: the source, the converted model (and the fine-tuned one) on held-out text, side by
side: perplexity, KL to the source, top-1 agreement, a greedy continuation."""

from __future__ import annotations

from typing import Any

from ..source.checkpoint import Source
from ..source.text import TokenWindows
from .metrics import Comparison, compare_many, greedy_samples


def measured(
    report: dict[str, Any], source: Source | None, models: dict[str, Any], text: TokenWindows | None
) -> dict[str, Any]:
    """The report with `models` measured against the source on `text` (when there is anything to measure)."""
    report = dict(report)
    if source is not None and text is not None and models:
        results = compare_many(source.model(), models, text.ids)
        report["validation"] = validation(source, models, text, results)
        before = results[next(iter(models))]  # the first model is the converted one, before any fine-tune
        report["evaluation"] = {"text": text.origin, **before.as_dict()}
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
