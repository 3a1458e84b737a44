"""One-shot quality (no training) of SmolLM2-135M conversions: widths (KV budgets, or vLLM's 512 + 64),
methods, profiles, query refit and layer-wise reconstruction, each evaluated on two held-out domains.

Calibration: Python standard-library docstrings (technical text). Evaluation: English news prose (the
Lee corpus), through the tool's own --eval-data, and Usenet posts (gensim's 20 Newsgroups sample),
measured here on the written checkpoint: neither is the calibration text's domain. Each row is one
`mla-convert` run through the command line, timed (the second evaluation is not in the time); the
figures come from its mla_report.json. --calib-head calibrates on the file's opening windows instead of
windows spread over it; --natural-norm runs the latent norm in its ordinary regime (natural_norm_cli.py).
Not a test: run it by hand, e.g. (a value that starts with a dash takes "=": --extra="--calib-sampled
0.25", --tag=-sampled)

    python bench/one_shot.py --budgets 1.0 0.5 0.25 vllm --methods activation --targets portable \
        --refit off on --layer-steps 0 200 --out bench-out/matrix
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
from assets import english_prose, newsgroup_posts, smollm2_dir, technical_docs

EVAL_TOKENS = 8192
SEQ_LEN = 256


def convert(
    model: Path, out: Path, width: str, method: str, target: str, calib: Path, prose: Path, tokens: int,
    steps: int, refit: bool, finetune: int, extra: list[str], natural: bool = False,
):  # fmt: skip
    tool = [str(Path(__file__).parent / "natural_norm_cli.py")] if natural else ["-m", "mla_convert.cli"]
    env = {**os.environ, "TQDM_DISABLE": "1"} | ({"MLA_NATURAL_STEPS": str(steps)} if natural else {})
    cmd = [
        sys.executable, *tool, str(model), str(out), "--force", "-q", "--no-verify",
        "--method", method, "--target", target, "--finetune-steps", str(finetune),
        "--calib-data", str(calib), "--calib-tokens", str(tokens), "--eval-data", str(prose),
        "--eval-tokens", str(EVAL_TOKENS), "--calib-seq-len", str(SEQ_LEN),
    ]  # fmt: skip
    cmd += ["--engine", "vllm"] if width == "vllm" else ["--kv-budget", width]
    if steps or natural:  # the natural regime is entered where the layer-wise steps run
        cmd += ["--layer-steps", str(max(steps, 1))]
    cmd += ["--query-refit" if refit else "--no-query-refit"]
    cmd += extra
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - start
    report = json.loads((out / "mla_report.json").read_text())
    if finetune:  # the figures of the written (fine-tuned) model, from the validation pass
        final = next(m for m in report["validation"]["models"] if m["model"] == "fine-tuned")
        report["evaluation"] = {**(report["evaluation"] or {}), **final}
    return report, seconds


def second_domain(model: Path, out: Path, text: Path) -> dict:
    """Perplexity ratio, KL and top-1 agreement of the written checkpoint against the source on `text`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mla_convert.evaluate.metrics import compare
    from mla_convert.source.text import tokenize_windows

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenize_windows([text.read_text()], tokenizer, SEQ_LEN)[: EVAL_TOKENS // SEQ_LEN]
    source = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return compare(source, converted, ids).as_dict()


def head_of(text: Path, model: Path, tokens: int, out: Path) -> Path:
    """The text's opening `tokens` tokens (and one window more), cut at a token boundary: spreading the
    windows over this file takes the contiguous opening windows that versions before the spread read."""
    from transformers import AutoTokenizer

    full = text.read_text()
    offsets = AutoTokenizer.from_pretrained(str(model))(full, return_offsets_mapping=True)["offset_mapping"]
    out.write_text(full[: offsets[tokens + SEQ_LEN - 1][1]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["0.5", "0.25", "0.125"], help="KV budgets, or 'vllm'")
    parser.add_argument("--methods", nargs="+", default=["svd", "activation"])
    parser.add_argument("--targets", nargs="+", default=["portable", "transformers"])
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--layer-steps", type=int, nargs="+", default=[0], help="--layer-steps values to compare")
    parser.add_argument("--refit", nargs="+", choices=["off", "on"], default=["off"], help="--query-refit or not")
    parser.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps (0: one-shot)")
    parser.add_argument("--extra", default="", help="more mla-convert flags for every row, e.g. '--calib-sampled 0.25'")
    parser.add_argument(
        "--calib-head",
        action="store_true",
        help="calibrate on the file's opening calib-tokens only (contiguous windows), not windows spread over it",
    )
    parser.add_argument(
        "--natural-norm",
        action="store_true",
        help="the latent norm in its ordinary regime (bench/natural_norm_cli.py), trained by the layer steps",
    )
    parser.add_argument("--tag", default="", help="suffix of the output folders (to keep variants apart)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    model, prose, posts, calib = smollm2_dir(), english_prose(), newsgroup_posts(), technical_docs()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.calib_head:
        calib = head_of(calib, model, args.calib_tokens, args.out / "calib-head.txt")
    rows = []
    header = (
        "| width | target | method | query refit | layer steps | latent + rope (ladder) | news ppl ratio | news KL | "
        "news top-1 | posts ppl ratio | posts KL | posts top-1 | time |\n"
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    print(header, flush=True)
    for width in args.budgets:
        for target in args.targets:
            for method in args.methods:
                fitted = method == "activation"
                for refit in args.refit if fitted else ["off"]:
                    for steps in args.layer_steps if fitted else [0]:
                        name = f"{width}-{target}-{method}-qr{refit}-ls{steps}-ft{args.finetune_steps}{args.tag}"
                        out = args.out / name
                        report, seconds = convert(
                            model,
                            out,
                            width,
                            method,
                            target,
                            calib,
                            prose,
                            args.calib_tokens,
                            steps,
                            refit == "on",
                            args.finetune_steps,
                            args.extra.split(),
                            natural=args.natural_norm,
                        )
                        e, s = report["evaluation"], report["settings"]
                        p = second_domain(model, out, posts)
                        ladder = (
                            f"density {s['rotary_density']}"
                            if s.get("rotary_density", 1) > 1
                            else f"stride {s['rotary_stride']}"
                        )
                        row = (
                            f"| {width} | {target} | {method} | {refit} | {steps} | "
                            f"{s['kv_lora_rank']} + {s['qk_rope_head_dim']} ({ladder}) | "
                            f"{e['perplexity_ratio']:.3f} | {e['kl_to_source']:.3f} | {e['top1_agreement']:.1%} | "
                            f"{p['perplexity_ratio']:.3f} | {p['kl_to_source']:.3f} | {p['top1_agreement']:.1%} | "
                            f"{seconds:.0f} s |"
                        )
                        rows.append(row)
                        print(row, flush=True)
    (args.out / "one_shot.md").write_text(header + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
