"""Run GGUF files in llama.cpp (through llama-cpp-python) and print what it computes, as one JSON line.

Standalone on purpose: it runs with the Python of llama-cpp-python's own virtual environment, where
mla_convert is not installed. Input (argv[1], a JSON file): {"runs": [{"model": path to .gguf, "prompts":
[[token ids]], "max_tokens": n, "n_ctx": n, "type_k": "f16" (llama.cpp's default) or "f32", "tokenize":
[texts], "throughput": [{"context", "new_tokens", "fill"}] (optional: time decoding instead), "flash_attn":
bool, "n_threads": n, "use_mmap": bool, "n_batch": n (timing only; llama-cpp-python keeps n_batch x
n_vocab float logits)}], "n_threads": n, "memory_limit_bytes": n (optional: the whole
process's data memory, RLIMIT_DATA, set before llama.cpp loads)}; the files load one after the other in
this one process. A throughput case with "fill": "tile" does not prefill its context: it prefills
"seed" tokens, saves that sequence's KV cache through llama.cpp's own state file and loads it back
repeated to `context` cells (positions 0..context-1), so decoding at a 256K context is timed without
hours of prefill; a decode step's work depends on the number of cached cells, not on their values. Output: {"engine":
"llama.cpp", "version", "runs": [{"prompt_logprobs": [[logprob of token t given tokens < t, for t >= 1]],
"greedy": [[ids]], "greedy_logprobs": [[...]], "kv_cache_bytes_per_token", "kv_cache_log", "n_vocab",
"model_desc", "tokens": [[ids of each text in "tokenize"]], "peak_rss_bytes"} or {"error": "ExceptionType: first line"}
for a file llama.cpp refused]}.

Logits are llama.cpp's raw output for every position (logits_all); log-softmax and the greedy argmax are
taken here in float64, without llama.cpp's sampler chain, so nothing but the model itself is compared.
Texts are tokenized as transformers does by default: special tokens written in the text are parsed, and
BOS/EOS are added only where the GGUF's add_bos_token/add_eos_token say so.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import sys
from typing import Any

LOG: list[str] = []


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    # ggml's CPU threads meet at an OpenMP barrier after every op; spinning there while another process
    # holds the second core made 2 threads 90x slower than 1 (measured: 637 s against 7 s). Waiting
    # threads sleep instead (set before libgomp loads with llama_cpp).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if spec.get("memory_limit_bytes"):
        import resource

        limit = int(spec["memory_limit_bytes"])
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import llama_cpp

    _capture_log(llama_cpp)
    runs = []
    for run in spec["runs"]:
        try:
            runs.append(_run(llama_cpp, run, int(run.get("n_threads", spec.get("n_threads", 2)))))
        except Exception as exc:  # a refusal is a result too: the caller checks it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            runs.append({"error": f"{type(exc).__name__}: {first}"})
        gc.collect()
    result = {"engine": "llama.cpp", "version": llama_cpp.__version__, "runs": runs}
    print("MLA_PROBE_RESULT " + json.dumps(result), flush=True)


def _run(llama_cpp: Any, run: dict[str, Any], threads: int) -> dict[str, Any]:
    LOG.clear()
    llm = _load(llama_cpp, run, threads)
    try:
        result: dict[str, Any] = {
            "prompt_logprobs": [],
            "greedy": [],
            "greedy_logprobs": [],
            "n_vocab": llm.n_vocab(),
            "model_desc": _model_desc(llama_cpp, llm),
        }
        for ids in run.get("prompts", []):
            logprobs, greedy, greedy_logprobs = _run_prompt(llm, ids, int(run.get("max_tokens", 0)))
            result["prompt_logprobs"].append(logprobs)
            result["greedy"].append(greedy)
            result["greedy_logprobs"].append(greedy_logprobs)
        texts = [text.encode("utf-8") for text in run.get("tokenize", [])]
        result["tokens"] = [llm.tokenize(text, add_bos=True, special=True) for text in texts]
        result.update(_kv_cache(dict(llm.metadata)))
        result["n_ctx"] = llm.n_ctx()
        if run.get("throughput"):
            result["throughput"] = [_throughput(llama_cpp, llm, **case) for case in run["throughput"]]
        result["peak_rss_bytes"] = _peak_rss()
        return result
    finally:
        llm.close()


def _capture_log(llama_cpp: Any) -> None:
    """Keep llama.cpp's log (the KV cache size is only reported there) and pass it on to stderr."""

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        LOG.append(line)
        sys.stderr.write(line)

    _capture_log.callback = callback  # type: ignore[attr-defined]  # keep it alive for the process
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _load(llama_cpp: Any, run: dict[str, Any], threads: int) -> Any:
    """The model with logits for every position; KV cache f16 unless asked (llama.cpp's default).

    Flash attention is off unless asked: llama-cpp-python's default, where llama.cpp's own tools default
    to "auto" (on for the CPU).
    """
    types = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}  # ggml_type (llama_cpp names no BF16)
    kv_type = types[run.get("type_k", "f16")]
    n_ctx = int(run.get("n_ctx", 512))
    timing = bool(run.get("throughput"))  # long prompts: llama.cpp's default batches, last logits only
    return llama_cpp.Llama(
        model_path=run["model"],
        n_ctx=n_ctx,
        n_batch=int(run.get("n_batch", min(n_ctx, 2048))) if timing else n_ctx,
        n_ubatch=512 if timing else n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=not timing,
        type_k=kv_type,
        type_v=types[run.get("type_v", run.get("type_k", "f16"))],
        flash_attn=bool(run.get("flash_attn", False)),
        use_mmap=bool(run.get("use_mmap", True)),
        seed=0,
        verbose=True,
    )


def _run_prompt(llm: Any, ids: list[int], max_tokens: int) -> tuple[list[float], list[int], list[float]]:
    """Prompt log-probs, then max_tokens greedy steps, from a cleared cache."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    logp = _log_softmax(np.asarray(llm.scores[: len(ids)], dtype=np.float64))
    prompt = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    greedy, greedy_logprobs = [], []
    last = logp[-1]
    for _ in range(max_tokens):
        token = int(np.argmax(last))
        greedy.append(token)
        greedy_logprobs.append(float(last[token]))
        llm.eval([token])
        last = _log_softmax(np.asarray(llm.scores[llm.n_tokens - 1 : llm.n_tokens], dtype=np.float64))[0]
    return prompt, greedy, greedy_logprobs


def _throughput(
    llama_cpp: Any, llm: Any, context: int, new_tokens: int, fill: str = "prefill", seed: int = 1024, vocab: int = 1000
) -> dict[str, Any]:
    """Single-sequence decode speed after a `context`-token prompt (prefill timed apart), or after a cache
    filled by repeating a `seed`-token prefill's cache (fill "tile")."""
    import random
    import time

    rng = random.Random(context)
    llm.reset()
    start = time.perf_counter()
    if fill == "tile" and context > seed:
        llm.eval([rng.randrange(vocab) for _ in range(seed)])
        _tile_cache(llama_cpp, llm, context)
        prefill = None
    else:
        llm.eval([rng.randrange(vocab) for _ in range(context)])
        prefill = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens):  # which token is fed does not change the work (no logits are kept here)
        start = time.perf_counter()
        llm.eval([rng.randrange(vocab)])
        steps.append(time.perf_counter() - start)
    decode = sum(steps)
    return {
        "batch": 1,
        "context": context,
        "fill": fill,
        "new_tokens": new_tokens,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "decode_step_seconds": steps,
        "decode_tokens_per_second": new_tokens / decode,
    }


def _tile_cache(llama_cpp: Any, llm: Any, context: int) -> None:
    """Replace sequence 0's cache by its own cells repeated to `context` cells, through state files.

    The files are llama.cpp's sequence-state format (llama_state_seq_save_file: magic, version, token
    count, tokens, then per stream the cell count, each cell's position and sequence ids, then per layer
    the K rows and the V rows, or V transposed). The copy is written a layer at a time, so this process
    never holds more than one layer of the long cache; llama.cpp reads it back the same way.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mla-tile-") as tmp:
        short, long = os.path.join(tmp, "seed.bin"), os.path.join(tmp, "tiled.bin")
        if not llama_cpp.llama_state_seq_save_file(llm.ctx, short.encode(), 0, None, 0):
            raise RuntimeError("llama_state_seq_save_file failed")
        _write_tiled(short, long, context)
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        count = ctypes.c_size_t(0)
        tokens = (llama_cpp.llama_token * 1)()
        if not llama_cpp.llama_state_seq_load_file(llm.ctx, long.encode(), 0, tokens, 1, ctypes.byref(count)):
            said = [line.strip() for line in LOG if "state" in line or "cells" in line or "error" in line.lower()]
            raise RuntimeError(f"llama.cpp could not load a {context}-cell cache: {' | '.join(said[-3:])}")
    memory = llama_cpp.llama_get_memory(llm.ctx)
    span = (llama_cpp.llama_memory_seq_pos_min(memory, 0), llama_cpp.llama_memory_seq_pos_max(memory, 0))
    if span != (0, context - 1):
        raise RuntimeError(f"the loaded cache spans positions {span}, not 0..{context - 1}")
    llm.n_tokens = context


def _write_tiled(source: str, target: str, context: int) -> None:
    """Copy a one-stream sequence state with its `cells` cells repeated to `context` cells."""
    import numpy as np

    with open(source, "rb") as fh:
        data = memoryview(fh.read())
    head = np.frombuffer(data[:12], dtype=np.uint32)  # magic, version, token count (0)
    at = 12 + 4 * int(head[2])
    n_stream, cells = (int(x) for x in np.frombuffer(data[at : at + 8], dtype=np.uint32))
    if n_stream != 1:
        raise RuntimeError(f"expected one KV stream, found {n_stream}")
    at += 8
    meta = np.frombuffer(data[at : at + 12 * cells], dtype=np.int32).reshape(cells, 3)  # pos, n_seq_id=1, seq 0
    if not (meta[:, 1] == 1).all():
        raise RuntimeError("expected one sequence id per cell")
    at += 12 * cells
    reps = -(-context // cells)
    with open(target, "wb") as out:
        out.write(np.array([head[0], head[1], 0, 1, context], dtype=np.uint32).tobytes())
        new_meta = np.zeros((context, 3), dtype=np.int32)
        new_meta[:, 0] = np.arange(context)
        new_meta[:, 1] = 1
        out.write(new_meta.tobytes())
        v_trans, n_layer = (int(x) for x in np.frombuffer(data[at : at + 8], dtype=np.uint32))
        out.write(data[at : at + 8])
        at += 8
        for _ in range(n_layer):  # K rows, one cell per row
            at = _tile_rows(data, at, cells, context, reps, out)
        while at < len(data):  # V (absent for MLA's latent-only cache)
            if not v_trans:
                at = _tile_rows(data, at, cells, context, reps, out)
                continue
            el, width = (int(x) for x in np.frombuffer(data[at + 4 : at + 12], dtype=np.uint32))
            out.write(data[at : at + 12])
            at += 12
            rows = np.frombuffer(data[at : at + cells * el * width], dtype=np.uint8).reshape(width, cells * el)
            for row in rows:
                out.write(np.tile(row, reps)[: context * el].tobytes())
            at += cells * el * width


def _tile_rows(data: memoryview, at: int, cells: int, context: int, reps: int, out: Any) -> int:
    """One layer's [type i32, row bytes u64, rows]: the rows repeated to `context` rows."""
    import numpy as np

    row = int(np.frombuffer(data[at + 4 : at + 12], dtype=np.uint64)[0])
    out.write(data[at : at + 12])
    at += 12
    rows = np.frombuffer(data[at : at + cells * row], dtype=np.uint8).reshape(cells, row)
    out.write(np.tile(rows, (reps, 1))[:context].tobytes())
    return at + cells * row


def _peak_rss() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _log_softmax(x: Any) -> Any:
    import numpy as np

    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _model_desc(llama_cpp: Any, llm: Any) -> str:
    buf = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llm.model, buf, ctypes.sizeof(buf))
    return buf.value.decode("utf-8", errors="replace")


def _kv_cache(metadata: dict[str, str]) -> dict[str, Any]:
    """Bytes of KV cache per token, from llama.cpp's own report of the cache it allocated.

    The report rounds to 0.01 MiB; the exact figure the metadata implies (layers x cached widths x
    element size) is returned when it agrees with the report within that rounding.
    """
    text = "".join(LOG)
    line = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells.*", text)
    if not line:
        return {"kv_cache_bytes_per_token": None, "kv_cache_log": None}
    cells = int(line.group(2))
    parts = re.findall(r"([KV]) \((\w+)\): +([\d.]+) MiB", line.group(0))
    logged = sum(float(mib) for _, _, mib in parts) * 2**20 / cells
    exact = _exact_bytes(metadata, parts)
    close = exact is not None and abs(exact - logged) <= 0.005 * 2**20 / cells * len(parts)
    return {"kv_cache_bytes_per_token": exact if close else logged, "kv_cache_log": line.group(0).strip()}


def _exact_bytes(metadata: dict[str, str], parts: list[tuple[str, str, str]]) -> float | None:
    """layers x (K width + V width) x element size, for the K/V parts the report says are allocated."""
    sizes = {"f32": 4, "f16": 2, "bf16": 2}
    arch = metadata.get("general.architecture", "")
    try:
        layers = int(metadata[f"{arch}.block_count"])
        heads_kv = int(metadata.get(f"{arch}.attention.head_count_kv", metadata[f"{arch}.attention.head_count"]))
        widths = {
            "K": int(metadata[f"{arch}.attention.key_length"]),
            "V": int(metadata[f"{arch}.attention.value_length"]),
        }
        return float(sum(layers * heads_kv * widths[kind] * sizes[t] for kind, t, mib in parts if float(mib) > 0))
    except (KeyError, ValueError):
        return None


if __name__ == "__main__":
    main()
