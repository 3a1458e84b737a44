"""Load: what goes in.

Takes MODEL_IN (a local directory, a hub id or a `.gguf` file) and the user's text files; gives a `Source`
(config, family, lazy tensors, tokenizer), the source one decoder layer at a time, and token windows for
calibration, training and evaluation. Nothing here knows about MLA. Open `checkpoint.py` first.
"""
