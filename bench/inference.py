"""What the conversion buys at inference: live KV-cache bytes per token and greedy decode speed.

    python bench/inference.py [--budgets 0.5 0.25] [--contexts 512 2048 8160] [--new-tokens 32]

For SmolLM2-135M (float32, from the GGUF; bench/assets.py fetches it) and its conversions at each
budget, it prefills a context of English news text, then decodes greedily token by token with stock
transformers on the CPU, timing only the decode steps. The cache bytes come from the tensors the live
cache holds after the prefill (not from the config). SmolLM2's context is 8192 tokens, so "8K" is 8160
plus the decoded tokens.

Conversions are data-free (`--method svd --finetune-steps 0`): speed and cache size depend on the
shapes, not on the weights' quality. Where a CUDA GPU and vLLM are present, the script also serves each
converted checkpoint with vLLM (stock, no plugin), reports its decode throughput and whether its greedy
output matches transformers' on the same GPU; elsewhere it says it skipped that part. Writes a markdown
table and bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mla_convert.util.hf_compat import cache_keyword, output_cache

sys.path.insert(0, str(Path(__file__).parent))
from assets import CACHE, english_prose, smollm2_dir


def convert(model: Path, out: Path, budget: float) -> None:
    cmd = [sys.executable, "-m", "mla_convert.cli", str(model), str(out), "--force", "-q", "--kv-budget", str(budget)]
    cmd += ["--method", "svd", "--finetune-steps", "0", "--no-validate", "--no-verify"]
    subprocess.run(cmd, check=True)


def cache_bytes(cache: object) -> int:
    """Bytes of every tensor the live cache holds."""
    total = 0
    for layer in cache.layers:  # type: ignore[attr-defined]
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def decode(model: object, ids: torch.Tensor, new_tokens: int) -> tuple[int, float, list[int]]:
    """(live cache bytes after the prefill, decode tokens/s, the greedy tokens)."""
    out = model(ids, use_cache=True)  # type: ignore[operator]
    cache = output_cache(out)
    size = cache_bytes(cache)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    keyword = cache_keyword(model)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(token, use_cache=True, **{keyword: cache})  # type: ignore[operator]
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    seconds = time.perf_counter() - start
    return size, (new_tokens - 1) / seconds, tokens


def vllm_part(models: dict[str, Path], prompt_ids: list[int], new_tokens: int) -> dict | str:
    """Serve each checkpoint with vLLM and compare its greedy tokens with transformers' on the GPU."""
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        return "skipped: needs a CUDA GPU and vLLM, and this machine has " + (
            "no CUDA GPU" if not torch.cuda.is_available() else "no vllm package"
        )
    from vllm import LLM, SamplingParams

    results = {}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for name, path in models.items():
        llm = LLM(model=str(path), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5)
        start = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt_ids}], params)[0].outputs[0]
        seconds = time.perf_counter() - start
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
        _, _, hf_tokens = decode(hf, torch.tensor([prompt_ids]).cuda(), new_tokens)
        results[name] = {
            "tokens_per_second": new_tokens / seconds,
            "greedy_matches_transformers": list(out.token_ids) == hf_tokens,
            "first_divergence": next(
                (i for i, (a, b) in enumerate(zip(out.token_ids, hf_tokens, strict=True)) if a != b), None
            ),
        }
        del llm, hf
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8160])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=CACHE / "bench-inference")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "inference.json")
    args = parser.parse_args()

    source = smollm2_dir()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = {"source": source}
    for budget in args.budgets:
        out = args.workdir / f"mla-{budget}"
        convert(source, out, budget)
        models[f"MLA {budget}"] = out
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = english_prose().read_text()
    all_ids = tokenizer(text, return_tensors="pt").input_ids
    assert all_ids.shape[1] >= max(args.contexts), "not enough text for the longest context"

    rows = []
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        row: dict = {"model": name, "threads": torch.get_num_threads(), "contexts": {}}
        for context in args.contexts:
            size, speed, _ = decode(model, all_ids[:, :context], args.new_tokens)
            row["contexts"][context] = {"cache_bytes": size, "cache_bytes_per_token": size / context, "tok_s": speed}
            print(f"{name} @ {context}: cache {size / context:,.0f} B/token, {speed:.1f} tok/s", flush=True)
        rows.append(row)
        del model

    base = rows[0]["contexts"]
    lines = [
        "| model | live KV cache per token | vs source | "
        + " | ".join(f"decode tok/s @ {c} (vs source)" for c in args.contexts)
        + " |",
        "|---|---:|---:|" + "---:|" * len(args.contexts),
    ]
    for row in rows:
        first = row["contexts"][args.contexts[0]]
        cells = [
            f"{row['contexts'][c]['tok_s']:.1f} ({row['contexts'][c]['tok_s'] / base[c]['tok_s']:.2f}x)"
            for c in args.contexts
        ]
        ratio = first["cache_bytes_per_token"] / base[args.contexts[0]]["cache_bytes_per_token"]
        lines.append(
            f"| {row['model']} | {first['cache_bytes_per_token']:,.0f} B | {ratio:.3f}x | " + " | ".join(cells) + " |"
        )
    vllm = vllm_part({k: v for k, v in models.items() if k != "source"}, all_ids[0, :512].tolist(), args.new_tokens)
    print("\n".join(lines))
    print(f"vLLM: {vllm if isinstance(vllm, str) else json.dumps(vllm, indent=2)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "vllm": vllm}, indent=2) + "\n")


if __name__ == "__main__":
    main()
