"""Evaluate: how close the written checkpoint is to its source.

Takes a written checkpoint, the source and held-out text; gives the verification (logits on a fixed text,
the live cache width), the validation (perplexity, KL, top-1 agreement, greedy samples) and the integrity
check of a finished folder (`integrity.py`: `mla-convert verify`). Models are
loaded exactly as a user would, with stock transformers. Open `verify.py` first.
"""
