"""Long context kept, not only fitted: quality by position and passkey retrieval, source beside each model.

Calibration and the short validation windows see a few hundred tokens, where a compressed rotary key and
unrotated leftovers cost least; what a user converts for is the far end of a long context. So the
validation also scores long windows of held-out text by position (perplexity ratio and KL to the source in
buckets, plan/long_eval.bucket_edges) and hides a passkey at several depths of prompts of several lengths.

Memory: every model runs its layers once over a window (sdpa attention, no cache kept), and the output
head is applied in chunks of HEAD_POSITIONS positions, so the [tokens, vocab] logits of a whole window never exist.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan.long_eval import LongEvalPlan, bucket_edges, near_far

HEAD_POSITIONS = 1024  # positions per output-head chunk: [HEAD_POSITIONS, vocab] float32 logits at a time
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about it.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8  # greedy tokens generated after the question; the prompt leaves room for them


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: torch.Tensor  # [tokens] the whole prompt, ending with the question
    key: str
    depth: float  # where the needle sits, as a share of the filler before it


def passkey_keys(count: int, seed: int) -> list[str]:
    """`count` five-digit keys, the same for every model and every run with this seed."""
    generator = torch.Generator().manual_seed(seed)
    return [str(int(k)) for k in torch.randint(10000, 100000, (count,), generator=generator)]


def passkey_depths(trials: int) -> list[float]:
    """Needle depths spread over the prompt: the middles of `trials` equal parts."""
    return [(i + 0.5) / trials for i in range(trials)]


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of at most length - ANSWER_TOKENS tokens: filler sentences with the key hidden at `depth`.

    The pieces are tokenized separately and joined as ids, so the filler repeats whole and the needle's
    tokens are the same at every depth and length."""

    def encode(text: str, special: bool = False) -> list[int]:
        return list(tokenizer(text, add_special_tokens=special).input_ids)

    intro, filler, question = encode(INTRO, special=True), encode(FILLER), encode(QUESTION)
    needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    room = length - ANSWER_TOKENS - len(intro) - len(needle) - len(question)
    repeats = room // len(filler) if filler else 0
    if repeats < 1:
        raise ValueError(f"a passkey prompt needs more than {length} tokens with this tokenizer")
    before = round(depth * repeats)
    ids = intro + filler * before + needle + filler * (repeats - before) + question
    return PasskeyPrompt(torch.tensor(ids, dtype=torch.long), key, depth)


def passkey_answer(text: str) -> str | None:
    """The first number in a model's continuation (None when it wrote none)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


@torch.no_grad()
def passkey_correct(model: Any, tokenizer: Any, prompt: PasskeyPrompt) -> bool:
    """Whether the model's greedy continuation of the prompt starts its first number with the key."""
    ids = prompt.ids[None].to(model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=ANSWER_TOKENS,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    return passkey_answer(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)) == prompt.key


def final_hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states [1, T, hidden] of one window, without keeping a KV cache."""
    return model.model(ids.to(model.device), use_cache=False).last_hidden_state


def head_log_probs(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token from hidden states (Granite divides its logits by a scale)."""
    logits = model.lm_head(hidden).float()
    scaling = getattr(model.config, "logits_scaling", None)
    return (logits / scaling if scaling else logits).log_softmax(-1)


@dataclass
class PositionSums:
    """Per prediction position, summed over windows: NLL, and for a model measured against the source its KL
    and top-1 agreement."""

    nll: torch.Tensor
    kl: torch.Tensor | None = None
    agree: torch.Tensor | None = None


@torch.no_grad()
def position_sums(source: Any, models: dict[str, Any], windows: torch.Tensor) -> tuple[PositionSums, dict]:
    """Run the source and each model over every window [count, T]; sums per prediction position (T - 1 of
    them)."""
    count, length = windows.shape
    src = PositionSums(torch.zeros(length - 1, dtype=torch.float64))
    out = {name: PositionSums(*(torch.zeros(length - 1, dtype=torch.float64) for _ in range(3))) for name in models}
    for w in range(count):
        ids = windows[w : w + 1]
        target = ids[0, 1:]
        src_hidden = final_hidden(source, ids)
        hidden = {name: final_hidden(model, ids) for name, model in models.items()}
        for first in range(0, length - 1, HEAD_POSITIONS):
            last = min(first + HEAD_POSITIONS, length - 1)
            ref = head_log_probs(source, src_hidden[0, first:last].to(source.device)).cpu()
            picked = target[first:last, None]
            src.nll[first:last] -= ref.gather(-1, picked)[:, 0].double()
            for name, model in models.items():
                got = head_log_probs(model, hidden[name][0, first:last]).cpu()
                sums = out[name]
                assert sums.kl is not None and sums.agree is not None
                sums.nll[first:last] -= got.gather(-1, picked)[:, 0].double()
                sums.kl[first:last] += (ref.exp() * (ref - got)).sum(-1).double()
                sums.agree[first:last] += (ref.argmax(-1) == got.argmax(-1)).double()
    return src, out


def _ppl(nll: torch.Tensor, count: int) -> float:
    return float(torch.exp(nll.sum() / max(1, nll.numel() * count)))


@dataclass
class LongEval:
    """The report's long_eval section."""

    mode: str
    length: int
    text: str | None
    windows: int
    note: str | None
    buckets: list[dict[str, Any]] = field(default_factory=list)
    spans: dict[str, Any] = field(default_factory=dict)  # near and far ratio per model, and far / near
    passkey: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def by_position(src: PositionSums, sums: dict[str, PositionSums], count: int) -> tuple[list[dict], dict]:
    """Bucketed perplexity, ratio, KL and top-1 per model, and each model's near and far ratio."""
    predictions = src.nll.numel()
    length = predictions + 1
    buckets = []
    edges = bucket_edges(length)
    for start, end in itertools.pairwise(edges):
        part = slice(start, min(end, predictions))
        source_ppl = _ppl(src.nll[part], count)
        row: dict[str, Any] = {"start": start, "end": end, "source_perplexity": source_ppl, "models": {}}
        for name, s in sums.items():
            assert s.kl is not None and s.agree is not None
            ppl = _ppl(s.nll[part], count)
            tokens = max(1, s.nll[part].numel() * count)
            row["models"][name] = {
                "perplexity": ppl,
                "perplexity_ratio": ppl / source_ppl,
                "kl_to_source": float(s.kl[part].sum()) / tokens,
                "top1_agreement": float(s.agree[part].sum()) / tokens,
            }
        buckets.append(row)
    (n0, n1), (f0, f1) = near_far(length)
    spans: dict[str, Any] = {"near": [n0, n1], "far": [f0, f1], "models": {}}
    for name, s in sums.items():
        near = _ppl(s.nll[n0 : min(n1, predictions)], count) / _ppl(src.nll[n0 : min(n1, predictions)], count)
        far = _ppl(s.nll[f0:predictions], count) / _ppl(src.nll[f0:predictions], count)
        spans["models"][name] = {"near_ratio": near, "far_ratio": far, "far_over_near": far / near}
    return buckets, spans


@torch.no_grad()
def passkey_table(plan: LongEvalPlan, models: dict[str, Any], tokenizer: Any, seed: int) -> dict[str, Any]:
    """Correct answers per model and length, over plan.passkey_trials depths (the same prompts for all)."""
    keys = passkey_keys(len(plan.passkey_lengths) * plan.passkey_trials, seed)
    depths = passkey_depths(plan.passkey_trials)
    correct: dict[str, list[int]] = {name: [] for name in models}
    for i, length in enumerate(plan.passkey_lengths):
        prompts = [
            passkey_prompt(tokenizer, length, depth, keys[i * plan.passkey_trials + t])
            for t, depth in enumerate(depths)
        ]
        for name, model in models.items():
            correct[name].append(sum(passkey_correct(model, tokenizer, p) for p in prompts))
    return {"lengths": list(plan.passkey_lengths), "trials": plan.passkey_trials, "depths": depths, "correct": correct}


def measure(
    plan: LongEvalPlan,
    source: Any,
    models: dict[str, Any],
    windows: torch.Tensor | None,
    text: str | None,
    note: str | None,
    tokenizer: Any,
    seed: int,
) -> LongEval:
    """The long_eval section: `models` (converted, fine-tuned) against the source on long windows and passkeys."""
    result = LongEval(plan.mode, plan.length, text, 0, note)
    if windows is not None and windows.shape[0] and windows.shape[1] > 1:
        windows = windows[: plan.windows]
        result.windows, result.length = int(windows.shape[0]), int(windows.shape[1])
        src, sums = position_sums(source, models, windows)
        result.buckets, result.spans = by_position(src, sums, windows.shape[0])
    if tokenizer is not None:
        try:
            result.passkey = passkey_table(plan, {"source": source, **models}, tokenizer, seed)
        except ValueError as exc:  # a tokenizer so coarse that even the shortest prompt cannot be built
            result.note = "; ".join(n for n in (result.note, f"no passkey: {exc}") if n)
    else:
        result.note = "; ".join(n for n in (result.note, "no passkey: the source has no tokenizer") if n)
    return result
