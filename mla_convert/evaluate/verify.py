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
    routing_agreement: list[float] | None = None  # MoE: per expert layer, share of tokens with the same experts

    def as_dict(self) -> dict[str, Any]:
        routing = {}
        if self.routing_agreement is not None:
            routing = {
                "routing_agreement_per_layer": self.routing_agreement,
                "routing_agreement": sum(self.routing_agreement) / len(self.routing_agreement),
            }
        return {
            **routing,
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
    source_model = source.model()
    with ExpertChoices(source_model) as source_choices:
        ref_logits = source_model(ids).logits.float()
    model = load_converted(converted_dir)
    with ExpertChoices(model) as choices:
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
        routing_agreement=choices.agreement(source_choices) if choices.picked else None,
    )


class ExpertChoices:
    """The experts each MoE layer picks per token, captured from its router's input during a forward pass.

    The routers of every MoE family here (and DeepSeek's, with one group and a zero selection bias) pick the
    top-k of the logits W x, so the choice is recomputed from the router's own weight and input alike on
    both sides."""

    def __init__(self, model: Any):
        self.routers = [
            (name, module)
            for name, module in model.named_modules()
            if name.endswith("mlp.gate") and isinstance(getattr(module, "weight", None), torch.Tensor)
        ]
        self.picked: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> ExpertChoices:
        for name, module in self.routers:
            self._hooks.append(module.register_forward_pre_hook(self._capture(name, module)))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()

    def _capture(self, name: str, module: Any) -> Any:
        def hook(mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            top_k = int(getattr(mod, "top_k", None) or mod.config.num_experts_per_tok)
            logits = torch.nn.functional.linear(x, module.weight.float())
            self.picked[name] = logits.topk(top_k, dim=-1).indices.sort(-1).values

        return hook

    def agreement(self, other: ExpertChoices) -> list[float]:
        """Per layer (in order), the share of tokens whose expert set is the same in both."""
        return [
            float((self.picked[name] == other.picked[name]).all(-1).float().mean())
            for name in sorted(self.picked, key=_layer_index)
            if name in other.picked
        ]


def _layer_index(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])
