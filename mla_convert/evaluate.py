"""Model quality on held-out text: perplexity, KL divergence to the source and top-1 agreement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Comparison:
    source_ppl: float
    converted_ppl: float
    kl: float  # mean KL(source || converted) per next-token distribution, nats
    top1_agreement: float
    tokens: int

    @property
    def ppl_ratio(self) -> float:
        return self.converted_ppl / self.source_ppl

    def as_dict(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "source_perplexity": self.source_ppl,
            "converted_perplexity": self.converted_ppl,
            "perplexity_ratio": self.ppl_ratio,
            "kl_to_source": self.kl,
            "top1_agreement": self.top1_agreement,
        }


@torch.no_grad()
def compare(source: Any, converted: Any, ids: torch.Tensor, batch: int = 8) -> Comparison:
    """Run both models over the windows `ids` [count, seq_len] and compare their next-token predictions."""
    nll_src = nll_out = kl = agree = 0.0
    count = 0
    for first in range(0, ids.shape[0], batch):
        chunk = ids[first : first + batch]
        ref = source(chunk).logits[:, :-1].float().log_softmax(-1)
        out = converted(chunk).logits[:, :-1].float().log_softmax(-1)
        target = chunk[:, 1:]
        nll_src -= float(ref.gather(-1, target[..., None]).sum())
        nll_out -= float(out.gather(-1, target[..., None]).sum())
        kl += float((ref.exp() * (ref - out)).sum())
        agree += float((ref.argmax(-1) == out.argmax(-1)).sum())
        count += target.numel()
    return Comparison(
        source_ppl=float(torch.tensor(nll_src / count).exp()),
        converted_ppl=float(torch.tensor(nll_out / count).exp()),
        kl=kl / count,
        top1_agreement=agree / count,
        tokens=count,
    )
