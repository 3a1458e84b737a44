"""transformers 5.24 renamed the KV cache from `past_key_values` to `cache` (model outputs and forward
arguments; the old name is to go in 5.40). Both sides of the rename are inside the range pyproject allows,
so the few places that touch the cache go through here.
"""

from __future__ import annotations

import inspect
from typing import Any


def output_cache(out: Any) -> Any:
    """The cache a forward pass or `generate` returned, under whichever name this transformers uses."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_keyword(model: Any) -> str:
    """The keyword that passes a cache back into `model`'s forward."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
