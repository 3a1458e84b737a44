"""Fixed conversions whose output bytes are recorded, so that a change meant to keep behaviour (a refactor, a
move) is proved to keep it: `tests/test_job_same_outputs.py` reruns them and compares the hashes.

Run `python -m tests.same_outputs [SMOLLM2_SAFETENSORS_DIR]` to record this machine's hashes (beside other machines'
records) after a change that is meant to alter outputs; say so in the commit message.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from typer.testing import CliRunner

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "same_outputs.json"

# Every written file except the ones that carry wall-clock times and local paths by design.
VOLATILE = {"mla_report.json", "README.md", "mla_convert_log.txt"}

# The recorded bytes are the fit without long calibration windows (`--calib-long-len 0`, the default, which leaves
# the conversion byte for byte as it was before issue 30). The long-context validation writes no hashed file (its
# plot is a PNG), so it is off to save time.
RECORDED_FIT = ["--calib-long-len", "0", "--long-eval", "off"]
TINY_FLAGS = [
    "--kv-budget", "0.5", "--layer-steps", "3", "--calib-tokens", "1024", "--calib-seq-len", "32",
    "--eval-tokens", "256", "--finetune-steps", "2", "--train-seq-len", "32", "--batch-size", "4",
    "--micro-batch-size", "2", "--warmup-steps", "1", "--train-tokens", "1024", *RECORDED_FIT,
]  # fmt: skip
SMOLLM2_FLAGS = [
    "--kv-budget", "0.5", "--calib-tokens", "1024", "--calib-seq-len", "128", "--eval-tokens", "256",
    "--finetune-steps", "2", "--train-seq-len", "64", "--batch-size", "2", "--micro-batch-size", "2",
    "--warmup-steps", "1", "--train-tokens", "512", *RECORDED_FIT,
]  # fmt: skip


def hashes(out: Path) -> dict[str, str]:
    """sha256 of every file under `out` that does not carry times or paths, by relative name."""
    found = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = path.relative_to(out).as_posix()
        if path.name in VOLATILE or path.suffix == ".png":
            continue
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def convert(model_in: Path, out: Path, text: Path, flags: list[str]) -> dict[str, str]:
    from mla_convert.cli import app

    args = [str(model_in), str(out), "--calib-data", str(text), "--train-data", str(text), *flags]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise AssertionError(result.output)
    return hashes(out)


def tiny_case(root: Path) -> tuple[Path, Path]:
    """The tiny GQA Llama with its own BPE tokenizer, and generated prose to calibrate and train on."""
    from .helpers import build_text_model, documents, write_txt

    return build_text_model(root), write_txt(root / "tiny.txt", documents(200, seed=5))


def machine() -> str:
    """What the bytes depend on besides our code: float reductions differ by torch build and CPU kernels, and
    the tokenizer files by the transformers that writes them."""
    import transformers

    cpu = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, {cpu}, transformers {transformers.__version__}"


def recorded() -> dict[str, dict[str, dict[str, str]]]:
    """Every machine's recorded hashes: {machine: {case: {file: sha256}}}."""
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


def one_thread(run: Callable[[], dict[str, str]]) -> dict[str, str]:
    """Run on one thread: the order of float sums, and so the bytes, depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def tiny(root: Path) -> dict[str, str]:
    model, text = tiny_case(root)
    return one_thread(lambda: convert(model, root / "tiny-out", text, TINY_FLAGS))


def smollm2(root: Path, smollm2_hf: Path) -> dict[str, str]:
    return one_thread(lambda: convert(smollm2_hf, root / "smollm2-out", DATA / "prose.txt", SMOLLM2_FLAGS))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        smollm2_hf = Path(sys.argv[1]) if len(sys.argv) > 1 else None
        cases = {"tiny": tiny(Path(tmp))}
        if smollm2_hf is not None:
            cases["smollm2"] = smollm2(Path(tmp), smollm2_hf)
    everything = recorded()
    everything[machine()] = cases
    GOLDEN.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} for {machine()}: {sorted(cases)}")
