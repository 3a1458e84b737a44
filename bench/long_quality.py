"""Quality by position and passkey retrieval of several written checkpoints against their source, the source
run once (docs/results.md, "Long context kept").

    python bench/long_quality.py SOURCE_DIR NAME=MODEL_DIR [NAME=MODEL_DIR ...] --eval-data wiki_long.jsonl \
        [--length 8192] [--windows 4] [--trials 4] [--out bench/results/long_quality.json]

The same measurement as `mla-convert ... --long-eval full --long-eval-len LENGTH --eval-data FILE` makes in
its validation (evaluate/long_context.py, the windows cut by source/text.held_out_long from the file's first
documents of at least LENGTH tokens), for checkpoints written with `--no-validate`, so that comparing N
conversions costs N + 1 model passes instead of 2N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from machine import machine
from transformers import AutoModelForCausalLM, AutoTokenizer

from mla_convert.evaluate.long_context import measure, passkey_table
from mla_convert.evaluate.metrics import compare_many
from mla_convert.plan.long_eval import LongEvalPlan, passkey_lengths
from mla_convert.source.text import TokenWindows, cut_windows, held_out_long, read_texts, token_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("models", nargs="+", help="NAME=DIR")
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--passkey-lengths", type=int, nargs="*", help="default: 1K, 2K, ... up to --length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--short-data", nargs="*", default=[], help="texts also scored as the validation does: 256-token windows"
    )
    parser.add_argument("--short-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    source = load(args.source)
    models = {name: load(path) for name, path in (m.split("=", 1) for m in args.models)}
    stream = token_stream(read_texts(args.eval_data), tokenizer)
    evaluation = TokenWindows(stream[None, : args.length], Path(args.eval_data).name)
    windows, note = held_out_long(
        evaluation, args.eval_data, "text", tokenizer, {args.eval_data: stream}, args.length, args.windows
    )
    lengths = tuple(args.passkey_lengths or passkey_lengths(args.length))
    plan = LongEvalPlan("full", args.length, args.windows, lengths, args.trials)
    started = time.monotonic()
    result = measure(plan, source, models, windows.ids, windows.origin, note, None, args.seed).as_dict()
    for name, s in result["spans"]["models"].items():
        print(f"{name}: near {s['near_ratio']:.3f}x far {s['far_ratio']:.3f}x far/near {s['far_over_near']:.3f}")
    for b in result["buckets"]:
        print(b["start"], b["end"], {name: round(m["perplexity_ratio"], 3) for name, m in b["models"].items()})
    sys.stdout.flush()
    result["note"] = note  # measure() without a tokenizer notes that it asked no passkey: they come next
    result["passkey"] = passkey_table(plan, {"source": source, **models}, tokenizer, args.seed)
    for name, correct in result["passkey"]["correct"].items():
        print(f"{name}: passkey {correct} of {args.trials} at {result['passkey']['lengths']}")
    result["seconds"] = time.monotonic() - started
    result["machine"] = machine()
    result["short"] = {}
    for path in args.short_data:
        ids = cut_windows(token_stream(read_texts(path), tokenizer), 256)[: args.short_tokens // 256]
        compared = compare_many(source, models, ids)
        result["short"][Path(path).name] = {name: c.as_dict() for name, c in compared.items()}
        for name, c in compared.items():
            print(f"{name} on {Path(path).name}: ratio {c.ppl_ratio:.3f} KL {c.kl:.3f} top-1 {c.top1_agreement:.1%}")
    if args.out:
        found = json.loads(args.out.read_text()) if args.out.is_file() else {}
        found[",".join(models)] = result
        args.out.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
