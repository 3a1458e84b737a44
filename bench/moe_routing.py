"""MoE sources: how close each conversion routes and computes, on the tests' tiny random MoE models (Mixtral,
Qwen3-MoE with a leading dense layer, OLMoE; tests/conftest.py builds them, routers spread like a trained
model's). Per family and setting: the stock class written, max |Δlogit| against the source on the built-in
check text's random ids (float32), routing agreement (share of tokens whose expert set is unchanged, mean over
MoE layers) and the fitted expert scales with the routing weights' error before and after them, and, when
calibrated, the MoE block's output error on the same inputs.
Not a test (tests/test_conversion_moe.py asserts the bounds); run it by hand for docs/results.md:

    python bench/moe_routing.py --out bench-out/moe --json bench/results/moe_routing.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mla_convert import Options, convert
from tests.conftest import MOE_CONFIGS, build_moe

CALIB = dict(calib_tokens=2048, calib_seq_len=64, eval_tokens=512, finetune_steps=0, validate=False)
SETTINGS = {
    "full size, --target transformers (data-free)": dict(target="transformers", method="svd"),
    "full size, --target transformers (calibrated)": dict(target="transformers"),
    "full size, portable (calibrated)": dict(),
    "budget 0.5, portable (calibrated)": dict(kv_budget=0.5),
}


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/moe"))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "moe_routing.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in MOE_CONFIGS:
        source = args.out / family
        build_moe(family).save_pretrained(source)
        for label, settings in SETTINGS.items():
            out = args.out / f"{family}-{len(rows)}"
            report = convert(source, out, Options(force=True, **CALIB, **settings))
            v, layers = report["verification"], report["layers"]
            row = {
                "family": family,
                "setting": label,
                "target_class": report["settings"]["target_class"],
                "max_abs_logit_diff": v["max_abs_logit_diff"],
                "top1_agreement": v["top1_agreement"],
                "routing_agreement": v["routing_agreement"],
                "routing_agreement_per_layer": v["routing_agreement_per_layer"],
                "moe_output_error_mean": mean([x["moe_output_error"] for x in layers if "moe_output_error" in x]),
                "expert_scales": [x["expert_scale"] for x in layers if "expert_scale" in x],
                "routing_weight_error": [
                    [x["routing_weight_error_before"], x["routing_weight_error_after"]]
                    for x in layers
                    if "expert_scale" in x
                ],
                "attn_output_error_mean": mean([x["attn_output_error"] for x in layers if x["attn_output_error"]]),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
