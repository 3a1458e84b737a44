"""Model quality on held-out text: perplexity, KL divergence to the source and top-1 agreement, plus a
greedy continuation of a fixed prompt so a reader can see what the numbers mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PROMPT = "The old lighthouse keeper climbed the stairs every evening, and"


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
def compare_many(source: Any, candidates: dict[str, Any], ids: torch.Tensor, batch: int = 8) -> dict[str, Comparison]:
    """Run the source once and every candidate over the windows `ids` [count, seq_len]; compare predictions."""
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in candidates}
    nll_src = 0.0
    count = 0
    for first in range(0, ids.shape[0], batch):
        chunk = ids[first : first + batch]
        target = chunk[:, 1:, None]
        ref = source(chunk).logits[:, :-1].float().log_softmax(-1)
        nll_src -= float(ref.gather(-1, target).sum())
        for name, model in candidates.items():
            out = model(chunk).logits[:, :-1].float().log_softmax(-1)
            sums[name]["nll"] -= float(out.gather(-1, target).sum())
            sums[name]["kl"] += float((ref.exp() * (ref - out)).sum())
            sums[name]["agree"] += float((ref.argmax(-1) == out.argmax(-1)).sum())
        count += target.numel()
    source_ppl = float(torch.tensor(nll_src / count).exp())
    return {
        name: Comparison(
            source_ppl=source_ppl,
            converted_ppl=float(torch.tensor(s["nll"] / count).exp()),
            kl=s["kl"] / count,
            top1_agreement=s["agree"] / count,
            tokens=count,
        )
        for name, s in sums.items()
    }


def compare(source: Any, converted: Any, ids: torch.Tensor, batch: int = 8) -> Comparison:
    return compare_many(source, {"converted": converted}, ids, batch)["converted"]


@torch.no_grad()
def greedy_samples(models: dict[str, Any], tokenizer: Any, fallback_ids: torch.Tensor, new_tokens: int = 32) -> dict:
    """Each model's greedy continuation of PROMPT (of token ids when there is no tokenizer)."""
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids if tokenizer is not None else None
    if prompt_ids is not None and prompt_ids.shape[1] > 0:
        prompt = PROMPT
    else:  # no tokenizer, or one that cannot encode the prompt: show token ids
        tokenizer = None
        prompt_ids = fallback_ids[:1, :8]
        prompt = " ".join(str(int(t)) for t in prompt_ids[0])
    outputs = {}
    for name, model in models.items():
        seq = model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )[0, prompt_ids.shape[1] :]
        text = (
            tokenizer.decode(seq, skip_special_tokens=True)
            if tokenizer is not None
            else " ".join(map(str, seq.tolist()))
        )
        outputs[name] = text
    return {"prompt": prompt, "max_new_tokens": new_tokens, "outputs": outputs}
