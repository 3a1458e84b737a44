"""One-shot quality (no training) of SmolLM2-135M conversions: --method svd against the default
activation-aware method, at KV budgets 0.5, 0.25 and 0.125, portable and transformers profiles.

Calibration: Python standard-library docstrings (technical text). Evaluation: held-out English news
prose (the Lee corpus). Each row is one `mla-convert` run through the command line, timed; the figures
come from its mla_report.json. Not a test: run it by hand, e.g.

    python bench/one_shot.py --budgets 0.5 0.25 0.125 --out bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from assets import english_prose, smollm2_dir, technical_docs


def convert(
    model: Path, out: Path, budget: float, method: str, target: str, calib: Path, prose: Path, tokens: int, steps: int
):
    cmd = [
        sys.executable, "-m", "mla_convert.cli", str(model), str(out), "--force", "-q", "--no-verify",
        "--kv-budget", str(budget), "--method", method, "--target", target, "--finetune-steps", "0",
        "--calib-data", str(calib), "--calib-tokens", str(tokens), "--eval-data", str(prose), "--eval-tokens", "8192",
    ]  # fmt: skip
    if steps:
        cmd += ["--layer-steps", str(steps)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - start
    report = json.loads((out / "mla_report.json").read_text())
    return report, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--methods", nargs="+", default=["svd", "activation"])
    parser.add_argument("--targets", nargs="+", default=["portable", "transformers"])
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--layer-steps", type=int, nargs="+", default=[0], help="--layer-steps values to compare")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    model, prose, calib = smollm2_dir(), english_prose(), technical_docs()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    header = "| budget | target | method | layer steps | latent + rope | held-out ppl (src -> out) | ratio | KL |"
    header += " top-1 | time |"
    header += "\n"
    header += "|---|---|---|---:|---|---|---:|---:|---:|---:|"
    print(header, flush=True)
    for budget in args.budgets:
        for target in args.targets:
            for method in args.methods:
                for steps in args.layer_steps if method == "activation" else [0]:
                    out = args.out / f"b{budget}-{target}-{method}-ls{steps}"
                    report, seconds = convert(
                        model, out, budget, method, target, calib, prose, args.calib_tokens, steps
                    )
                    e, s = report["evaluation"], report["settings"]
                    row = (
                        f"| {budget} | {target} | {method} | {steps} | {s['kv_lora_rank']} + {s['qk_rope_head_dim']} | "
                        f"{e['source_perplexity']:.2f} -> {e['converted_perplexity']:.2f} | "
                        f"{e['perplexity_ratio']:.3f} | {e['kl_to_source']:.3f} | {e['top1_agreement']:.1%} | "
                        f"{seconds:.0f} s |"
                    )
                    rows.append(row)
                    print(row, flush=True)
    (args.out / "one_shot.md").write_text(header + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
