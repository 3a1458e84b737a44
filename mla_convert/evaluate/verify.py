"""Check a written checkpoint against its source: logits on a fixed text, and the live cache width.

This is the converter's own proof of exactness (or of how far the approximation goes), measured with
stock transformers on the files exactly as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..source.checkpoint import Source
from ..util.hf_compat import output_cache

CHECK_TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe built "
    "wooden machines that riders pushed along with their feet. Over the following decades, pedals, chains "
    "and air-filled tyres turned these curiosities into practical vehicles, and by the eighteen-nineties "
    "cycling clubs, races and touring guides had spread across many countries. Cities changed as well: "
    "roads were paved, repair shops opened, and workers could live farther from the factories where they "
    "worked. Today engineers still study the surprisingly subtle question of why a moving bicycle stays upright."
)


@dataclass
class Verification:
    tokens: int
    max_abs_logit_diff: float
    top1_agreement: float
    kl_mean: float
    measured_cache_elements: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "top1_agreement": self.top1_agreement,
            "kl_mean": self.kl_mean,
            "measured_cache_elements_per_token_per_layer": self.measured_cache_elements,
        }


def check_tokens(source: Source, count: int, vocab: int, seed: int) -> torch.Tensor:
    """Token ids of the built-in English text when a tokenizer is available, else seeded random ids."""
    tok = source.tokenizer()
    if tok is not None:
        ids = tok(CHECK_TEXT, return_tensors="pt").input_ids[:, :count]
        if ids.shape[1] >= 16:
            return ids
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, count), generator=gen)


def load_converted(path: Path) -> Any:
    """A written checkpoint, loaded exactly as a user would: stock transformers, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def verify(source: Source, converted_dir: Path, *, tokens: int = 128, seed: int = 0) -> Verification:
    ids = check_tokens(source, tokens, source.config.vocab_size, seed)
    ref_logits = source.model()(ids).logits.float()
    model = load_converted(converted_dir)
    out = model(ids, use_cache=True)
    logits = out.logits.float()
    layer0 = output_cache(out).layers[0]
    cache_width = layer0.keys.shape[1] * layer0.keys.shape[-1] + layer0.values.shape[1] * layer0.values.shape[-1]
    ref_logp, logp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
    return Verification(
        tokens=ids.shape[1],
        max_abs_logit_diff=float((logits - ref_logits).abs().max()),
        top1_agreement=float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        kl_mean=float(kl),
        measured_cache_elements=int(cache_width),
    )
