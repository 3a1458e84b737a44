"""The model card (README.md) written beside the converted checkpoint."""

from __future__ import annotations

from .report import Report
from .target_config import TRANSFORMERS_ONLY


def model_card(report: Report, model_out_name: str) -> str:
    plan = report.plan
    serving = (
        f"> **Warning.** {TRANSFORMERS_ONLY}\n"
        if plan.target == "transformers"
        else (
            "This checkpoint uses only settings that transformers, vLLM and SGLang compute identically: the plain "
            "rotary frequency ladder, interleaved rotary pairs, no attention biases, an untied output head and "
            "`rms_norm_eps` equal to the latent-norm epsilon. " + _kernel_note(plan.kv_rank + plan.rope_dim)
        )
    )
    return f"""---
library_name: transformers
tags:
- mla
- deepseek_v3
- mla-convert
---

# {model_out_name}

Multi-head Latent Attention (DeepSeek-V3 layout) conversion of `{report.source_label}`, made with
mla-convert {__import__("mla_convert").__version__}. It is a stock `DeepseekV3ForCausalLM` checkpoint:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{model_out_name}")  # no trust_remote_code needed
tokenizer = AutoTokenizer.from_pretrained("{model_out_name}")
```

{serving}

{report.card_section()}
The full figures are in `mla_report.json`.
"""


def _kernel_note(cache_width: int) -> str:
    if cache_width in (576, 320):
        return f"Its cache width per token ({cache_width}) is one that vLLM's MLA kernels accept."
    return (
        f"Note: its cache width per token ({cache_width} = kv_lora_rank + qk_rope_head_dim) is not one that "
        "current vLLM MLA backends declare support for (576 or 320); check your engine's supported sizes "
        "before serving it there."
    )
