"""Memory scaling and I/O bound of the data-free conversion, on synthetic Llama-shaped checkpoints.

    python bench/scaling.py --sizes tiny 0.5B 1.5B 3B 7B-8L 7B-16L 7B --io 0.5B 1.5B 3B 7B
    python bench/scaling.py --sizes 7B-4L 7B-8L --io --calibrated 7B-4L 7B-8L \
        --json bench/results/scaling_calibrated.json

MoE2.5B is a synthetic Mixtral-shaped MoE of 2.5B parameters (16 layers of 16 experts, top-2; Mixtral's tensor
names, so the per-expert renaming is exercised) and Dense2.5B its dense counterpart (one MLP as wide as the 16
experts together, the same parameter count):

    python bench/scaling.py --sizes MoE2.5B Dense2.5B --io --json bench/results/scaling_moe.json

A size NAME-kL is NAME's shape with k layers (the same layer, more or fewer of them); `tiny` measures
what the process itself takes. For each size it writes a random bf16 checkpoint with the real shapes
(5 GB shards, as the hub does), converts it data-free with the CLI in a fresh process (`--method svd
--kv-budget 0.25 --finetune-steps 0 --no-verify --no-validate`) and reads peak RSS from the report.
For the sizes given to --io it also times `cp -r` of the checkpoint and a transformers load-and-save
(bf16) of it. Every timed command starts with a cold page cache (sync; drop_caches, which needs root)
and includes the final `sync`, so writes count until they reach the disk. Checkpoints are deleted
after use; the largest needs about 30 GB of disk at once. Prints a markdown table and writes
bench/results/scaling.json.

For the sizes given to --calibrated it also converts activation-aware on a calibration file (a word-level
tokenizer and random words, written beside the checkpoint), with the budget-0.25 split given as ranks so
that the run measures the layer-by-layer calibration rather than the search over splits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# Real shapes: Qwen2.5-0.5B/1.5B (as Llama, tied), Llama-3.2-3B (tied), Mistral-7B (untied).
SHAPES = {
    "tiny": dict(hidden=256, inter=768, layers=4, heads=4, kv=2, vocab=32000, tied=False, theta=10000.0),
    "0.5B": dict(hidden=896, inter=4864, layers=24, heads=14, kv=2, vocab=151936, tied=True, theta=1e6),
    "1.5B": dict(hidden=1536, inter=8960, layers=28, heads=12, kv=2, vocab=151936, tied=True, theta=1e6),
    "3B": dict(hidden=3072, inter=8192, layers=28, heads=24, kv=8, vocab=128256, tied=True, theta=5e5),
    "7B": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=32000, tied=False, theta=1e6),
    "MoE2.5B": dict(hidden=2048, inter=1408, layers=16, heads=16, kv=4, vocab=32000, tied=False, theta=1e6, experts=16),
    "Dense2.5B": dict(hidden=2048, inter=16 * 1408, layers=16, heads=16, kv=4, vocab=32000, tied=False, theta=1e6),
}
SHARD_BYTES = 5 * 10**9
CONVERT = ["--method", "svd", "--kv-budget", "0.25", "--finetune-steps", "0", "--no-verify", "--no-validate", "-q"]
CALIBRATE = ["--method", "activation", "--calib-tokens", "2048", "--calib-seq-len", "256"]
CALIBRATE += ["--finetune-steps", "0", "--no-verify", "--no-validate", "-q"]
WORDS = ["the", "a", "cache", "layer", "key", "value", "latent", "rotary", "head", "query", "model", "token"]


def layer_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h, d = s["hidden"], s["hidden"] // s["heads"]
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (s["heads"] * d, h),
        "self_attn.k_proj.weight": (s["kv"] * d, h),
        "self_attn.v_proj.weight": (s["kv"] * d, h),
        "self_attn.o_proj.weight": (h, s["heads"] * d),
        "post_attention_layernorm.weight": (h,),
        **(expert_shapes(s) if s.get("experts") else {}),
        **(
            {}
            if s.get("experts")
            else {
                "mlp.gate_proj.weight": (s["inter"], h),
                "mlp.up_proj.weight": (s["inter"], h),
                "mlp.down_proj.weight": (h, s["inter"]),
            }
        ),
    }


def expert_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """Mixtral's router and experts, under its own names (w1: gate, w3: up, w2: down)."""
    h, out = s["hidden"], {"block_sparse_moe.gate.weight": (s["experts"], s["hidden"])}
    for j in range(s["experts"]):
        out[f"block_sparse_moe.experts.{j}.w1.weight"] = (s["inter"], h)
        out[f"block_sparse_moe.experts.{j}.w3.weight"] = (s["inter"], h)
        out[f"block_sparse_moe.experts.{j}.w2.weight"] = (h, s["inter"])
    return out


def tensor_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (s["vocab"], s["hidden"])}
    for i in range(s["layers"]):
        out.update({f"model.layers.{i}.{k}": v for k, v in layer_shapes(s).items()})
    out["model.norm.weight"] = (s["hidden"],)
    if not s["tied"]:
        out["lm_head.weight"] = (s["vocab"], s["hidden"])
    return out


def write_checkpoint(path: Path, s: dict, seed: int = 0) -> int:
    """A random bf16 Llama (or Mixtral) checkpoint in 5 GB shards; returns its tensor bytes."""
    from transformers import LlamaConfig, MixtralConfig

    path.mkdir(parents=True)
    moe = {"num_local_experts": s["experts"], "num_experts_per_tok": 2} if s.get("experts") else {}
    (MixtralConfig if moe else LlamaConfig)(
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        vocab_size=s["vocab"],
        tie_word_embeddings=s["tied"],
        rope_theta=s["theta"],
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
        **moe,
    ).save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, shape in tensor_shapes(s).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * (1 / math.sqrt(shape[1]))).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size and size + nbytes > SHARD_BYTES:
            _flush(path, shards, len(shards))
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    _flush(path, shards, len(shards))
    _finish(path, shards, total)
    return total


def _flush(path: Path, shards: list[dict], index: int) -> None:
    save_file(shards[-1], str(path / f"part-{index}.tmp"), {"format": "pt"})
    shards[-1] = dict.fromkeys(shards[-1])  # keep the names, drop the tensors


def _finish(path: Path, shards: list[dict], total: int) -> None:
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(path / f"part-{i}.tmp", path / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_text_data(path: Path, words: int = 8000, seed: int = 0) -> Path:
    """A word-level tokenizer saved into the checkpoint and a calibration file of random words from it."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    rng = random.Random(seed)
    text = path.parent / f"{path.name}-calib.txt"
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return text


def budget_ranks(s: dict, budget: float = 0.25) -> list[str]:
    """--rope-dim and --kv-rank for the budget: half a head of rotary key, the latent takes the rest."""
    head_dim = s["hidden"] // s["heads"]
    total = int(budget * 2 * s["kv"] * head_dim)
    rope = min(head_dim // 2, total // 2)
    return ["--rope-dim", str(rope), "--kv-rank", str(total - rope)]


def cold_cache() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds including the final sync, peak RSS in bytes from /usr/bin/time or 0)."""
    prefix = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    proc = subprocess.run(prefix + cmd, capture_output=True, text=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    rss = int(proc.stderr.strip().splitlines()[-1]) * 1024 if prefix else 0
    return seconds, rss


LOAD_SAVE = (
    "import sys, torch; from transformers import AutoModelForCausalLM; "
    "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).save_pretrained(sys.argv[2])"
)


def shape_of(name: str) -> dict:
    base, _, layers = name.partition("-")
    shape = dict(SHAPES[base])
    if layers:
        shape["layers"] = int(layers.rstrip("L"))
    return shape


def run_size(name: str, workdir: Path, io: bool, calibrated: bool = False) -> dict:
    s = shape_of(name)
    src, out = workdir / f"src-{name}", workdir / f"out-{name}"
    for p in (src, out):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    total = write_checkpoint(src, s)
    print(f"{name}: wrote {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    layer = sum(math.prod(v) for v in layer_shapes(s).values()) * 2
    embeddings = s["vocab"] * s["hidden"] * 2 * (1 if s["tied"] else 2)
    row: dict = {
        "size": name,
        "shape": s,
        "checkpoint_bytes": total,
        "largest_layer_bytes": layer,
        "embedding_bytes": embeddings,
        "bound_bytes": int(1.5 * (layer + embeddings)),
    }
    row["cold_cache"] = cold_cache()
    cli = [sys.executable, "-m", "mla_convert.cli", str(src), str(out)]
    row["convert_seconds"], row["convert_time_rss"] = timed([*cli, *CONVERT])
    report = json.loads((out / "mla_report.json").read_text())
    row["peak_rss_bytes"] = report["resources"]["peak_rss_bytes"]
    row["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{name}: converted in {row['convert_seconds']:.1f} s, peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB")
    shutil.rmtree(out)
    if calibrated:
        text = write_text_data(src)
        cold_cache()
        cmd = [*cli, *CALIBRATE, "--calib-data", str(text), *budget_ranks(s)]
        row["calibrated_seconds"], _ = timed(cmd)
        report = json.loads((out / "mla_report.json").read_text())
        row["calibrated_peak_rss_bytes"] = report["resources"]["peak_rss_bytes"]
        rss = row["calibrated_peak_rss_bytes"] / 1e9
        print(f"{name}: calibrated in {row['calibrated_seconds']:.1f} s, peak RSS {rss:.2f} GB")
        shutil.rmtree(out)
        text.unlink()
    if io:
        copy = workdir / f"copy-{name}"
        cold_cache()
        row["cp_seconds"], _ = timed(["cp", "-r", str(src), str(copy)])
        shutil.rmtree(copy)
        cold_cache()
        row["load_save_seconds"], row["load_save_rss"] = timed([sys.executable, "-c", LOAD_SAVE, str(src), str(copy)])
        shutil.rmtree(copy)
        print(f"{name}: cp {row['cp_seconds']:.1f} s, transformers load-and-save {row['load_save_seconds']:.1f} s")
    shutil.rmtree(src)
    return row


def table(rows: list[dict]) -> str:
    gb = 1e9
    lines = [
        "| shape | checkpoint | largest layer + embeddings | bound (1.5x) | peak RSS | convert | cp | load-and-save |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cp = f"{r['cp_seconds']:.1f} s" if "cp_seconds" in r else "-"
        ls = f"{r['load_save_seconds']:.1f} s" if "load_save_seconds" in r else "-"
        lines.append(
            f"| {r['size']} | {r['checkpoint_bytes'] / gb:.2f} GB | "
            f"{(r['largest_layer_bytes'] + r['embedding_bytes']) / gb:.2f} GB | {r['bound_bytes'] / gb:.2f} GB | "
            f"{r['peak_rss_bytes'] / gb:.2f} GB | {r['convert_seconds']:.1f} s | {cp} | {ls} |"
        )
    calibrated = [r for r in rows if "calibrated_seconds" in r]
    if calibrated:
        lines += ["", "| shape | calibrated: peak RSS | time |", "|---|---:|---:|"]
        for r in calibrated:
            lines.append(
                f"| {r['size']} | {r['calibrated_peak_rss_bytes'] / gb:.2f} GB | {r['calibrated_seconds']:.1f} s |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "0.5B", "1.5B", "3B", "7B-8L", "7B-16L", "7B"])
    parser.add_argument("--io", nargs="*", default=["0.5B", "1.5B", "3B", "7B"])
    parser.add_argument("--calibrated", nargs="*", default=[])
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "mla-convert" / "bench-scaling")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "scaling.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [run_size(name, args.workdir, name in args.io, name in args.calibrated) for name in args.sizes]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
