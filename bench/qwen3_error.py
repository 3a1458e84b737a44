"""What Qwen3's per-head q/k norms cost when converted: a seeded random Qwen3 (no real Qwen3 checkpoint
installs from the registries here), converted at full size (both profiles) and at budget 0.5, with the
measured head scales alone, with the query refit, and with layer-wise steps; and, for comparison, with the
norms simply dropped. Calibration and evaluation on seeded random token windows (the model is random too).
Not a test: run it by hand, e.g.

    python bench/qwen3_error.py --out bench-out/qwen3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mla_convert.conversion.driver as driver
from mla_convert import Options, convert
from tests.conftest import build_qwen3

SHAPE = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
)
CALIB = dict(calib_tokens=8192, calib_seq_len=128, eval_tokens=4096, finetune_steps=0)
ROWS = [
    ("full, transformers, scales only", dict(target="transformers", query_refit=False)),
    ("full, transformers, + query refit", dict(target="transformers")),
    ("full, transformers, + refit + 200 layer steps", dict(target="transformers", layer_steps=200)),
    ("full, portable, + query refit", dict(target="portable")),
    ("budget 0.5, portable, + query refit", dict(target="portable", kv_budget=0.5)),
    ("budget 0.5, portable, + refit + 200 layer steps", dict(target="portable", kv_budget=0.5, layer_steps=200)),
]


def source(root: Path) -> Path:
    model = build_qwen3(Qwen3Config(**SHAPE))  # seed 0, norm gains drawn from U(0.5, 1.5)
    path = root / "qwen3-random"
    model.save_pretrained(path)
    return path


def measure(model: Path, out: Path, settings: dict) -> dict:
    report = convert(model, out, Options(**CALIB, **settings, force=True))
    errors = [layer["attn_output_error"] for layer in report["layers"]]
    v = report["verification"]
    return {
        "kv_ratio": report["kv_cache"]["ratio"],
        "attn_error_mean": sum(errors) / len(errors),
        "attn_error_max": max(errors),
        "max_abs_logit_diff": v["max_abs_logit_diff"],
        "kl": report["evaluation"]["kl_to_source"],
        "top1": report["evaluation"]["top1_agreement"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/qwen3"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = source(args.out)
    results = {}
    for name, settings in ROWS:
        results[name] = measure(model, args.out / name.replace(" ", "_").replace(",", ""), settings)
        print(name, json.dumps(results[name]), flush=True)
    driver.linearized = lambda weight, *rest: weight  # as if the norms were not there
    name = "full, transformers, norms dropped (no scales)"
    results[name] = measure(model, args.out / "dropped", dict(target="transformers", query_refit=False))
    print(name, json.dumps(results[name]), flush=True)
    (args.out / "qwen3_error.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
