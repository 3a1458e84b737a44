"""The source's tensors under Llama's names and with Llama's meaning, whatever the family stores.

The conversion reads only this view, so every family reaches it as a plain Llama layer: Phi-3's fused
q/k/v and gate/up projections are split, a MoE family's router and experts appear under DeepSeek's names
(`mlp.gate`, `mlp.experts.{j}.gate_proj/up_proj/down_proj`), and Granite's constant multipliers are folded
into the weights they multiply (exactly: each is a scalar on a linear map):
- `embedding_multiplier` scales the embedding table;
- `attention_multiplier` replaces the softmax scale 1/sqrt(head_dim): the queries are multiplied by
  attention_multiplier * sqrt(head_dim);
- `residual_multiplier` scales what attention and the MLP add to the residual stream: o_proj and down_proj;
- `logits_scaling` divides the logits: the output head (untied, as every converted head is).
The source's own modules (source/layers.py) still compute the source exactly as stored; `scales` says how
their outputs relate to this view's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..util.tensors import scaled
from .checkpoint import Source
from .families import EMBED, LAYER_TENSORS, LM_HEAD, Family, family_for, head_dim_of

_LAYER = "model.layers."


@dataclass(frozen=True)
class Scales:
    """Constant factors between a family's computation and Llama's (all 1.0 for most families)."""

    embedding: float = 1.0  # the residual stream starts as embedding * this
    query: float = 1.0  # queries are multiplied by this to use the softmax scale 1/sqrt(head_dim)
    residual: float = 1.0  # attention and MLP outputs are multiplied by this before they are added
    logits: float = 1.0  # logits are multiplied by this

    @classmethod
    def of(cls, family: Family, config: Any) -> Scales:
        if not family.multipliers:
            return cls()
        head_dim = head_dim_of(config)
        return cls(
            embedding=float(getattr(config, "embedding_multiplier", 1.0)),
            query=float(getattr(config, "attention_multiplier", head_dim**-0.5)) * math.sqrt(head_dim),
            residual=float(getattr(config, "residual_multiplier", 1.0)),
            logits=1.0 / float(getattr(config, "logits_scaling", 1.0)),
        )


class Canonical:
    """`get` and `has` by Llama tensor name, over a Source that may store the family's own names."""

    def __init__(self, source: Source):
        self.source = source
        self.family = family_for(source.config, allow_full_attention=True)  # the plan has judged the window
        self.scales = Scales.of(self.family, source.config)
        config = source.config
        head_dim = head_dim_of(config)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        q_rows, kv_rows = config.num_attention_heads * head_dim, kv_heads * head_dim
        self._qkv = {"q": (0, q_rows), "k": (q_rows, q_rows + kv_rows), "v": (q_rows + kv_rows, q_rows + 2 * kv_rows)}

    @property
    def streams(self) -> bool:
        """Whether a tensor from `get` is the caller's own (fresh from disk, or computed here)."""
        return self.source.streams

    def has(self, name: str) -> bool:
        stored = self._stored(name)
        return stored is not None and self.source.has(stored[0])

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` means in a Llama checkpoint."""
        stored = self._stored(name)
        if stored is None:
            return self.source.get(name)
        stored_name, rows, factor = stored
        tensor = self.source.get(stored_name)
        if rows is not None:
            tensor = tensor[rows[0] : rows[1]]
            tensor = tensor.clone() if self.source.streams else tensor.contiguous()
        return scaled(tensor, factor, tensor.dtype, in_place=self.source.streams)  # owned: fresh from disk

    def _stored(self, name: str) -> tuple[str, tuple[int, int] | None, float] | None:
        """(stored name, row range or None, factor) for a Llama name; None when the name is not one we map."""
        s, f = self.scales, self.family
        if name == EMBED:
            return EMBED, None, s.embedding
        if name == LM_HEAD:
            tied = bool(getattr(self.source.config, "tie_word_embeddings", False))
            return EMBED if tied or not self.source.has(LM_HEAD) else LM_HEAD, None, s.logits
        if not name.startswith(_LAYER):
            return None
        index = name[len(_LAYER) :].split(".", 1)[0]
        if (
            f.moe is not None
            and name.startswith(f"{_LAYER}{index}.mlp.")
            and ("mlp.gate." in name or ".experts." in name)
        ):
            return self._stored_expert(name, index), None, 1.0
        key = next((k for k, t in LAYER_TENSORS.items() if name.startswith(t.format(i=index) + ".")), None)
        if key is None:
            return None
        suffix = name[len(LAYER_TENSORS[key].format(i=index)) :]  # ".weight" or ".bias"
        prefix = f"{_LAYER}{index}."
        if key in ("q", "k", "v") and f.fused_qkv:
            return f"{prefix}self_attn.qkv_proj{suffix}", self._qkv[key], s.query if key == "q" else 1.0
        if key in ("gate", "up") and f.fused_gate_up:
            rows = int(self.source.config.intermediate_size)
            span = (0, rows) if key == "gate" else (rows, 2 * rows)
            return f"{prefix}mlp.gate_up_proj{suffix}", span, 1.0
        factor = {"q": s.query, "o": s.residual, "down": s.residual}.get(key, 1.0)
        return name, None, factor

    def _stored_expert(self, name: str, index: str) -> str:
        """The stored name of a router or expert tensor named the canonical (DeepSeek) way."""
        moe = self.family.moe
        assert moe is not None
        block = f"{_LAYER}{index}.{moe.block}."
        rest = name[len(f"{_LAYER}{index}.mlp.") :]
        for canonical_part, stored_part in zip(("gate_proj", "up_proj", "down_proj"), moe.parts, strict=True):
            rest = rest.replace(f".{canonical_part}.", f".{stored_part}.")
        return block + rest


def canonical(source: Source) -> Canonical:
    """The Llama view of `source`, made once per source."""
    view = getattr(source, "_canonical", None)
    if view is None:
        view = Canonical(source)
        source._canonical = view  # type: ignore[attr-defined]
    return view
