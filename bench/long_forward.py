"""Peak memory and time of one long forward pass through stock transformers, as the long-context validation
runs it (docs/results.md, "Long context kept").

    python bench/long_forward.py MODEL_DIR [--length 8192] [--how validation|logits]

Runs in a child process per measurement, so each peak resident size is that pass's own: `validation` is
what evaluate/long_context.py does (the layers once with sdpa attention and no KV cache, then the output head
1,024 positions at a time, log-softmax per chunk); `logits` is the plain `model(ids).logits.log_softmax(-1)`
over the whole window that the validation avoids. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(model_dir: str, length: int, how: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mla_convert.evaluate.long_context import HEAD_POSITIONS, final_hidden, head_log_probs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    started = time.monotonic()
    with torch.no_grad():
        if how == "validation":
            hidden = final_hidden(model, ids)
            for first in range(0, length, HEAD_POSITIONS):
                head_log_probs(model, hidden[0, first : first + HEAD_POSITIONS])
        else:
            model(ids).logits.float().log_softmax(-1)
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": Path(model_dir).name,
        "attention": model.config._attn_implementation,
        "how": how,
        "length": length,
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "peak_above_loaded_bytes": peak - loaded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--how", choices=("validation", "logits"), nargs="+", default=["validation", "logits"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model_dir, args.length, args.how[0])))
        return
    for how in args.how:
        command = [sys.executable, __file__, args.model_dir, "--length", str(args.length), "--how", how, "--child"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)


if __name__ == "__main__":
    main()
