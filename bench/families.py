"""Exactness per source family under both profiles, at full size: max |Δlogit| in float32 against the source
on random token ids, for the tests' tiny random models of every family (tests/conftest.py builds them).
Not a test (tests/test_conversion_exact.py asserts the bounds); run it by hand to get the figures for
docs/results.md:

    python bench/families.py --out bench-out/families
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mla_convert import Options, convert
from tests.conftest import COMMON, DEPENDENT_CONFIGS, TINY_CONFIGS, build_qwen3, build_tiny

CALIB = dict(calib_tokens=2048, calib_seq_len=64, eval_tokens=512, finetune_steps=0, verify=False, validate=False)


@torch.no_grad()
def max_logit_diff(source: Path, converted: Path) -> float:
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(1))
    load = lambda p: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()  # noqa: E731
    return float((load(source)(ids).logits - load(converted)(ids).logits).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/families"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = {name: lambda make=make: build_tiny(make()) for name, make in TINY_CONFIGS.items()}
    models |= {
        name: lambda make=make: build_tiny(make(), dependent_heads=True) for name, make in DEPENDENT_CONFIGS.items()
    }
    models["qwen3_gqa"] = lambda: build_qwen3(Qwen3Config(num_key_value_heads=2, **COMMON))
    results = {}
    for name, make in models.items():
        source = args.out / name
        make().save_pretrained(source)
        results[name] = {}
        for target in ("transformers", "portable"):
            out = args.out / f"{name}-{target}"
            convert(source, out, Options(target=target, force=True, **CALIB))
            results[name][target] = max_logit_diff(source, out)
        print(name, json.dumps(results[name]), flush=True)
    (args.out / "families.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
