"""Small helpers shared by tests: logits of a saved model, and loading a converted checkpoint stock."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def load(path: Path, **kwargs: object) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def max_logit_diff(source: Path, converted: Path, ids: torch.Tensor) -> float:
    ref = load(source)(ids).logits
    out = load(converted)(ids).logits
    return float((ref - out).abs().max())


def random_ids(vocab: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


PROGRESS_LINE = re.compile(r"^(\[\d[^\]]*\] |  |time by stage|estimate: )")


def messages(stderr: str) -> list[str]:
    """stderr without the progress a run prints when it is not on a terminal (stage lines with their
    clock, counts, estimates and the closing time summary): what is left is what the tool has to say."""
    return [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]
