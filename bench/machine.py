"""The machine a benchmark ran on, recorded beside its figures.

Speeds from different machines do not compare: bench/serve.py's vLLM prefill of 2K-token prompts on
2026-11-29 and the same model, settings and batch rerun on 2026-12-07 differed 30-fold per prompt, and
the first machine's processor was not recorded. So every results file now says which machine it is.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The instruction sets that decide CPU matrix speed in bf16 and int8 (oneDNN in vLLM, ggml in llama.cpp).
MATRIX_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def machine() -> dict[str, Any]:
    """Processor name, core count, memory and the matrix-relevant CPU flags (Linux; less elsewhere)."""
    info: dict[str, Any] = {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = dict(
            line.split(":", 1) for line in cpuinfo.read_text().splitlines() if ":" in line
        )  # the last core's values: all cores are alike here
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["processor"] = fields.get("model name", info["processor"])
        flags = set(fields.get("flags", "").split())
        info["matrix_flags"] = [f for f in MATRIX_FLAGS if f in flags]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total = next((line for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")), "")
        if total:
            info["memory_gib"] = round(int(total.split()[1]) / 2**20, 1)
    return info
