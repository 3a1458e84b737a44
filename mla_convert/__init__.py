"""mla-convert: turn Llama-family MHA/GQA checkpoints into stock DeepSeek-V3 MLA checkpoints."""

__version__ = "0.1.0"
