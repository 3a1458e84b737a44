"""The whole job on the real SmolLM2-135M: convert, fine-tune by distillation, validate, at KV budgets 0.5
and 0.25, sized to finish within 30 minutes on 2 CPU cores. Prints the validation table.

Text: the Lee news corpus (English prose) cut by whole articles; the first 239 articles are calibration
and fine-tune text, the last 60 are held out for the validation pass only (they are never calibrated or
trained on, and no setting was tuned on them). Each row is one `mla-convert` run through the command
line, timed; the figures come from its mla_report.json. Not a test: run it by hand, e.g.

    python bench/finetune.py --budgets 0.5 0.25 --steps 40 --out bench-out
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
from assets import english_prose_split, smollm2_dir


def job(model: Path, out: Path, budget: float, args: argparse.Namespace, train: Path, held: Path) -> dict:
    cmd = [
        sys.executable, "-m", "mla_convert.cli", str(model), str(out), "--force",
        "--kv-budget", str(budget), "--calib-data", str(train), "--calib-tokens", str(args.calib_tokens),
        "--train-data", str(train), "--eval-data", str(held), "--eval-tokens", str(args.eval_tokens),
        "--finetune-steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--micro-batch-size", str(args.batch_size), "--train-seq-len", str(args.seq_len), "--lr", str(args.lr),
        "--warmup-steps", str(max(1, args.steps // 10)), "--save-every", str(args.save_every),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    report = json.loads((out / "mla_report.json").read_text())
    report["bench_seconds"] = time.perf_counter() - start
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    model = smollm2_dir()
    train, held = english_prose_split()
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    rows = []
    for budget in args.budgets:
        report = job(model, args.out / f"finetune-{budget}", budget, args, train, held)
        rows.append((budget, report))
    total = time.perf_counter() - began
    print()
    print("| budget | latent + rope | model | perplexity | ratio to source | KL to source | top-1 | run time |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for budget, report in rows:
        s = report["settings"]
        for row in report["validation"]["models"]:
            kl = "" if row["kl_to_source"] is None else f"{row['kl_to_source']:.3f}"
            top1 = "" if row["top1_agreement"] is None else f"{row['top1_agreement']:.1%}"
            print(
                f"| {budget} | {s['kv_lora_rank']}+{s['qk_rope_head_dim']} | {row['model']} | "
                f"{row['perplexity']:.2f} | {row['perplexity_ratio']:.3f} | {kl} | {top1} | "
                f"{report['bench_seconds'] / 60:.1f} min |"
            )
    for budget, report in rows:
        f = report["finetune"]
        print(
            f"\nbudget {budget}: {f['steps']} steps x {f['batch_size']} x {f['seq_len']} tokens = {f['tokens']} "
            f"tokens in {f['seconds'] / 60:.1f} min; loss {f['losses'][0]:.3f} -> {f['losses'][-1]:.3f}"
        )
        for name, text in report["validation"]["generation"]["outputs"].items():
            print(f"  {name}: {text!r}")
    print(f"\ntotal wall time {total / 60:.1f} min for {len(rows)} budgets")
    (args.out / "finetune_bench.json").write_text(
        json.dumps({str(b): {k: r[k] for k in ("validation", "finetune", "settings")} for b, r in rows}, indent=1)
    )


if __name__ == "__main__":
    main()
