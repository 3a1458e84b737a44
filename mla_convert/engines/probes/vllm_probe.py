"""Run checkpoints in vLLM and print what it computes, as one JSON line on stdout.

Standalone on purpose: it runs with the Python of vLLM's own virtual environment, where mla_convert is
not installed. Input (argv[1], a JSON file): {"runs": [{"model": dir, "prompts": [[token ids]],
"max_tokens": n, "dtype": "float32", "max_model_len": n, "throughput": [{"batch", "context", "new_tokens"}]
(optional: time decoding instead of comparing)}], "kv_cache_gib": n}; the models load one after
the other in this one process (vLLM's import and start-up cost most of the time). Output:
{"engine": "vllm", "version", "runs": [{"prompt_logprobs": [[logprob of token t given tokens < t, for
t >= 1]], "greedy": [[ids]], "greedy_logprobs": [[...]], "attention_backend", "kv_cache_tokens"} or
{"error": "ExceptionType: first line"} for a model vLLM refused]}.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    # One process, no pinning, a small cache: what a CPU test machine allows (see docs/results.md).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 1)))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import vllm

    runs = []
    for run in spec["runs"]:
        try:
            runs.append(_run(run))
        except Exception as exc:  # a refusal is a result too: the caller checks it against the prediction
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            runs.append({"error": f"{type(exc).__name__}: {first}"})
        gc.collect()
    print("MLA_PROBE_RESULT " + json.dumps({"engine": "vllm", "version": vllm.__version__, "runs": runs}), flush=True)


def _run(run: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=run["model"],
        dtype=run.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=run.get("max_model_len", 512),
        skip_tokenizer_init=True,
        seed=0,
        enable_prefix_caching=True,  # the throughput timing relies on it (see _throughput)
        **({"max_num_batched_tokens": run["max_num_batched_tokens"]} if "max_num_batched_tokens" in run else {}),
    )
    try:
        if run.get("throughput"):
            return {
                "kv_cache_tokens": _cache_tokens(llm),
                "attention_backend": _backend_name(llm),
                "throughput": [_throughput(llm, **case) for case in run["throughput"]],
            }
        params = SamplingParams(
            temperature=0.0, max_tokens=run["max_tokens"], prompt_logprobs=0, logprobs=0, detokenize=False
        )
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in run["prompts"]], params, use_tqdm=False)
        result = {
            "prompt_logprobs": [],
            "greedy": [],
            "greedy_logprobs": [],
            "attention_backend": _backend_name(llm),
            "kv_cache_tokens": _cache_tokens(llm),
        }
        for ids, out in zip(run["prompts"], outputs, strict=True):
            steps = out.prompt_logprobs[1:]  # the first token has no prediction
            result["prompt_logprobs"].append([float(step[t].logprob) for step, t in zip(steps, ids[1:], strict=True)])
            gen = out.outputs[0]
            result["greedy"].append(list(gen.token_ids))
            chosen = zip(gen.logprobs, gen.token_ids, strict=True)
            result["greedy_logprobs"].append([float(step[t].logprob) for step, t in chosen])
        return result
    finally:
        del llm


def _throughput(llm: object, batch: int, context: int, new_tokens: int, vocab: int = 1000) -> dict:
    """Decode speed of `batch` sequences of `context` tokens, with the prefill taken out.

    The prompts are prefilled once (timed: prefill_seconds), which leaves them in the prefix cache; the
    same prompts then run for 1 and for new_tokens tokens, both re-reading the cached prefix, and the
    difference of the two times is new_tokens - 1 decode steps of the whole batch.
    """
    import random

    from vllm import SamplingParams

    rng = random.Random(context)
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(context)]} for _ in range(batch)]

    def timed(count: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=count, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)  # type: ignore[attr-defined]
        return time.perf_counter() - start

    prefill = timed(1)
    short, long = timed(1), timed(new_tokens)
    # Where the backend does not reuse the cached prefix (vLLM 0.32's CPU MLA path), both runs prefill
    # again and their difference is noise, not decoding: then say so rather than print a speed.
    separable = short < 0.5 * prefill and long > short
    return {
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "prefill_seconds": prefill,
        "cached_prefill_seconds": short,
        "generate_seconds": long,
        "decode_seconds": long - short if separable else None,
        "decode_tokens_per_second": batch * (new_tokens - 1) / (long - short) if separable else None,
    }


def _backend_name(llm: object) -> str | None:
    """The attention backend vLLM picked, for the record (None where this vLLM hides it)."""
    try:
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner  # type: ignore[attr-defined]
        groups = runner.attn_groups
        return groups[0][0].backend.get_name()
    except Exception:
        return None


def _cache_tokens(llm: object) -> int | None:
    """How many tokens of KV cache vLLM allocated (blocks x block size), None where it is not exposed."""
    try:
        config = llm.llm_engine.vllm_config.cache_config  # type: ignore[attr-defined]
        return int(config.num_gpu_blocks) * int(config.block_size)
    except Exception:
        return None


if __name__ == "__main__":
    main()
