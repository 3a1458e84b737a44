"""Which stock router comes closest to a renormalized top-k softmax (Mixtral, Qwen3-MoE)? On Gaussian router
logits of several spreads, the relative error of the top-k weights (sqrt(sum (w - w_src)^2 / sum w_src^2))
for the two candidates, each with its one free constant fitted as the conversion fits it:
- DeepSeek-V3: renormalized sigmoids sigmoid(a l_i) / sum sigmoid(a l_j), the router scale a searched on a grid;
- DeepSeek-V2: the softmax's own top-k probabilities times c (folded into the experts; mla/routing.py).
Both pick the same experts. Run by hand for docs/method.md and docs/results.md:

    python bench/router_mapping.py --json bench/results/router_mapping.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mla_convert.mla.routing import renormalization_scale

SCALES = torch.linspace(0.1, 4.0, 40, dtype=torch.float64)


def sigmoid_error(logits: torch.Tensor, top_k: int) -> tuple[float, float]:
    """(best router scale a, relative weight error at it) for DeepSeek-V3's renormalized sigmoids."""
    top = logits.topk(top_k, dim=-1).values
    target = top.softmax(-1)

    def error(a: float) -> float:
        s = torch.sigmoid(a * top)
        return float(((s / s.sum(-1, keepdim=True) - target).square().sum() / target.square().sum()).sqrt())

    errors = [error(float(a)) for a in SCALES]
    best = min(range(len(errors)), key=errors.__getitem__)
    return float(SCALES[best]), errors[best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "router_mapping.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for experts, top_k in ((8, 2), (64, 8), (128, 8)):
        for spread in (0.5, 1.0, 2.0, 3.0, 5.0):
            logits = torch.randn(20000, experts, generator=gen, dtype=torch.float64) * spread
            a, v3 = sigmoid_error(logits, top_k)
            c, _, v2 = renormalization_scale(logits, top_k)
            rows.append(
                dict(experts=experts, top_k=top_k, spread=spread, v3_scale=a, v3_error=v3, v2_scale=c, v2_error=v2)
            )
            print(f"| {experts} | {top_k} | {spread} | {v3:.3f} (a = {a:.1f}) | {v2:.3f} (c = {c:.2f}) |", flush=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
