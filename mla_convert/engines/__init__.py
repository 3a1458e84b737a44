"""Serving engines, beside the pipeline: the GGUF a finished checkpoint is also written as (`export.py`, then
`gguf_writer.py` with its tensors from `gguf_layout.py` and its tokenizer from `gguf_vocab.py`), and installing
and probing real vLLM and llama.cpp to prove they compute what transformers computes (`runtime.py`,
`probes/`). Which engines serve a plan is decided in `plan/serving.py`.
"""
