"""Serving engines, beside the pipeline: the GGUF a finished checkpoint is also written as (`export.py`,
`gguf_export.py`), and installing and probing real vLLM and llama.cpp to prove they compute what
transformers computes (`runtime.py`, `probes/`). Which engines serve a plan is decided in `plan/serving.py`.
"""
