"""How fast a real run obeys SIGTERM or SIGINT: SmolLM2-135M-Instruct converted from its GGUF (latent 128, calibrated
on this project's method notes, then a 4-step fine-tune), signalled a few seconds into a stage, timed until the
process has exited; then what it left beside MODEL_OUT. Not a test: run it by hand, e.g.

    python bench/stop.py --stages calibration fine-tune --delay 3
    python bench/stop.py --code /path/to/another/checkout      # the same runs with another version's code

Prints one JSON line per run: stage, signal, seconds from the signal to the exit, exit code, whether MODEL_OUT
exists (it should only during a fine-tune: the converted model and its checkpoint, for --resume) and the
staging folders left beside it (none).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from assets import smollm2_gguf

TEXT = Path(__file__).parent.parent / "tests" / "data" / "technical.txt"
STAGE_LINES = {"calibration": "converting layers", "fine-tune": "fine-tuning"}  # what each stage prints first
FLAGS = [
    "--kv-rank", "128", "--rope-dim", "64", "--calib-data", str(TEXT), "--calib-tokens", "2048",
    "--calib-seq-len", "256", "--no-verify", "--finetune-steps", "4", "--batch-size", "4",
    "--micro-batch-size", "4", "--train-tokens", "4096", "--save-every", "1",
]  # fmt: skip


def run(stage: str, signum: int, delay: float, code: Path | None, root: Path) -> dict:
    out = root / f"out-{stage}-{signum}"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    cmd = [sys.executable, "-m", "mla_convert.cli", str(smollm2_gguf()), str(out), *FLAGS]
    # cwd: `-m` puts the current folder first on sys.path, which would shadow --code from a checkout
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=root)
    assert proc.stderr is not None
    for line in proc.stderr:
        if STAGE_LINES[stage] in line:
            break
    else:
        raise SystemExit(f"the run ended before {stage}: exit {proc.wait()}")
    time.sleep(delay)
    sent = time.monotonic()
    proc.send_signal(signum)
    tail = proc.stderr.read()
    code_ = proc.wait()
    seconds = time.monotonic() - sent
    return {
        "stage": stage,
        "signal": signal.Signals(signum).name,
        "seconds_to_exit": round(seconds, 2),
        "exit_code": code_,
        "model_out_exists": out.exists(),
        "left_beside_it": sorted(p.name for p in root.iterdir() if p.name.startswith(".mla-convert-tmp")),
        "last_line": tail.strip().splitlines()[-1][:160] if tail.strip() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGE_LINES), choices=list(STAGE_LINES))
    parser.add_argument("--signals", nargs="+", default=["SIGTERM"], choices=["SIGTERM", "SIGINT"])
    parser.add_argument("--delay", type=float, default=3.0, help="seconds into the stage")
    parser.add_argument("--code", type=Path, help="run this checkout's mla_convert instead")
    args = parser.parse_args()
    for stage in args.stages:
        for name in args.signals:
            with tempfile.TemporaryDirectory(prefix="mla-stop-") as root:
                print(json.dumps(run(stage, getattr(signal, name), args.delay, args.code, Path(root))), flush=True)


if __name__ == "__main__":
    main()
