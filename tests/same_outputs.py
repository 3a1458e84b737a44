"""Fixed conversions whose output bytes are recorded, so that a change meant to keep behaviour (a refactor, a
move) is proved to keep it: `tests/test_job_same_outputs.py` reruns them and compares the hashes.

Float sums, and so the bytes, depend on the CPU kernels that compute them. The conversions therefore run in a
child process whose environment pins those kernels (PINS): torch's own at AVX2, MKL's (every matrix product
and decomposition) on its COMPATIBLE branch, one thread. That makes the bytes one record for every x86-64
machine with AVX2 of the same vendor, AVX-512 or not. The record's key names that environment, the CPU's vendor
and the versions the bytes depend on (`environment()`); `.ci/run` installs those versions.

Where no record matches (a CPU of another vendor, whose MKL kernels this project has not measured under the
pins; another torch), the test makes its reference on the spot: the same cases converted, in the same pinned
environment on the same machine, by the package as it was at the commit that last recorded bytes
(`reference_commit`: the record and the code that wrote it are committed together). It never skips; without
git history to make that reference it fails and says so.

Run `python -m tests.same_outputs [SMOLLM2_SAFETENSORS_DIR]` to record this environment's hashes (beside other
environments' records) after a change that is meant to alter outputs; say so in the commit message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from pathlib import Path

DATA = Path(__file__).parent / "data"
CODE = "SAME_OUTPUTS_PACKAGE"  # the child's package folder, when it converts with a reference commit's code
GOLDEN = DATA / "same_outputs.json"
REPO = Path(__file__).parent.parent

# What the conversions' float sums depend on besides our code, fixed in the child process that runs them
# (measured on an AVX-512 AMD EPYC, docs/development.md):
PINS = {
    # torch's vectorized kernels, else the widest the CPU has: AVX-512 changed the tiny model's weights
    "ATEN_CPU_CAPABILITY": "avx2",
    # MKL's GEMM and LAPACK: COMPATIBLE (SSE2 without the approximate instructions whose results differ between
    # vendors) is the one fixed branch MKL runs on AMD CPUs as on Intel ones; its AVX2 branch is Intel-only (an
    # AMD CPU ignores it, and MKL_ENABLE_INSTRUCTIONS too, and keeps its own kernels)
    "MKL_CBWR": "COMPATIBLE",
    # oneDNN: no op of these conversions reaches it today; pinned so that a torch that routes one there still
    # gives the same bytes
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # one thread (`one_thread` sets torch's too): the order of float sums depends on the thread count
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

# Every written file except the ones that carry wall-clock times and local paths by design. The report is
# compared without its times (`steady_report`).
VOLATILE = {"mla_report.json", "README.md", "mla_convert_log.txt"}
REPORT = "mla_report.json (no times)"

# The recorded bytes are the fit without long calibration windows (`--calib-long-len 0`, the default, which leaves
# the conversion byte for byte as it was before issue 30). The long-context validation writes no hashed file (its
# plot is a PNG), so it is off to save time.
RECORDED_FIT = ["--calib-long-len", "0", "--long-eval", "off"]
TINY_TEXT = ["--calib-tokens", "1024", "--calib-seq-len", "32", "--eval-tokens", "256", *RECORDED_FIT]
TINY_FINETUNE = [
    "--finetune-steps", "2", "--train-seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2",
    "--warmup-steps", "1", "--train-tokens", "1024",
]  # fmt: skip
TINY_FIT = ["--kv-budget", "0.5", "--layer-steps", "3", *TINY_TEXT]
# The tiny GQA Llama, every case a few seconds: both profiles, both GGUF paths (written after a fine-tune, and
# by a one-shot conversion), and the vLLM widths (latent 512 + rotary 64: a budget cannot hold them, a rank does).
TINY_CASES = {
    "tiny": [*TINY_FIT, *TINY_FINETUNE, "--gguf", "q8_0"],  # portable, the default profile
    "tiny-transformers": ["--target", "transformers", *TINY_FIT, "--finetune-steps", "0"],
    "tiny-vllm": ["--engine", "vllm", "--kv-rank", "16", *TINY_TEXT, "--finetune-steps", "0", "--gguf", "f32"],
}
SMOLLM2_TEXT = ["--calib-tokens", "1024", "--calib-seq-len", "128", "--eval-tokens", "256", *RECORDED_FIT]
# SmolLM2: the budget measured and a 2-step fine-tune (portable), and the transformers profile one-shot at the widths
# that budget picks for it, given (measuring the split would cost two more minutes)
SMOLLM2_CASES = {
    "smollm2": [
        "--kv-budget", "0.5", *SMOLLM2_TEXT, "--finetune-steps", "2", "--train-seq-len", "64", "--batch-size", "2",
        "--micro-batch-size", "2", "--warmup-steps", "1", "--train-tokens", "512",
    ],
    "smollm2-transformers": [
        "--target", "transformers", "--kv-rank", "128", "--rope-dim", "64", *SMOLLM2_TEXT, "--finetune-steps", "0",
    ],
}  # fmt: skip


def cpu_vendor() -> str:
    """GenuineIntel, AuthenticAMD, ...: MKL picks its kernels by vendor, so a record holds for one vendor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown vendor"


def environment() -> str:
    """What the bytes depend on besides our code, as this process runs: the CPU kernels (the child's pinned
    ones) and vendor, torch, and the transformers, tokenizers and gguf that write the tokenizer files and the
    GGUF."""
    import torch

    kernels = torch.backends.cpu.get_cpu_capability()
    mkl = f"MKL_CBWR={os.environ.get('MKL_CBWR', 'unset')}" if torch.backends.mkl.is_available() else "no MKL"
    versions = ", ".join(f"{name} {version(name)}" for name in ("transformers", "tokenizers", "gguf"))
    where = f"{platform.machine()} {cpu_vendor()}"
    return f"{where} {kernels} kernels, {mkl}, 1 thread; torch {torch.__version__}, {versions}"


def steady_report(path: Path) -> bytes:
    """mla_report.json without what differs between identical runs: the run's time and memory, the fine-tune's
    time, the hashes of the card (it prints that time) and of the plots; and without the tool's version and the
    source's name (its folder's: the tests' SmolLM2 copy and a recording's are named differently)."""
    report = json.loads(path.read_text())
    report.pop("resources", None)
    report.get("source", {}).pop("name", None)
    report.get("tool", {}).pop("version", None)
    if report.get("finetune"):
        report["finetune"].pop("seconds", None)
    files = report.get("files", {})
    report["files"] = {name: f for name, f in files.items() if name not in VOLATILE and not name.endswith(".png")}
    return json.dumps(report, sort_keys=True).encode()


def hashes(out: Path) -> dict[str, str]:
    """sha256 of every file under `out` that does not carry times or paths, by relative name, and of the
    report without its times."""
    found = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = path.relative_to(out).as_posix()
        if path.name in VOLATILE or path.suffix == ".png":
            continue
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    found[REPORT] = hashlib.sha256(steady_report(out / "mla_report.json")).hexdigest()
    return found


def convert(model_in: Path, out: Path, text: Path, flags: list[str]) -> dict[str, str]:
    from typer.testing import CliRunner

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


def one_thread(run: Callable[[], dict[str, str]]) -> dict[str, str]:
    """Run on one thread: the order of float sums, and so the bytes, depends on the thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def _convert_cases(cases: list[str], root: Path, smollm2_hf: Path | None) -> dict[str, dict[str, str]]:
    """The child's work: each case converted under `root`, its hashes by case name."""
    found = {}
    if any(case in TINY_CASES for case in cases):
        model, text = tiny_case(root)
    for case in cases:
        if case in TINY_CASES:
            run = partial(convert, model, root / f"{case}-out", text, TINY_CASES[case])
        else:
            assert smollm2_hf is not None, "the SmolLM2 cases need its safetensors folder"
            run = partial(convert, smollm2_hf, root / f"{case}-out", DATA / "prose.txt", SMOLLM2_CASES[case])
        found[case] = one_thread(run)
    return found


def convert_pinned(
    cases: list[str], root: Path, smollm2_hf: Path | None = None, code: Path | None = None
) -> tuple[str, dict]:
    """Convert `cases` under `root` in a child process with the CPU kernels pinned (PINS), with the package in
    `code` (a folder holding an `mla_convert/`) instead of this checkout's when given; returns the child's
    `environment()` and {case: {file: sha256}}."""
    root.mkdir(parents=True, exist_ok=True)
    answer = root / "same_outputs.json"
    command = [sys.executable, "-m", "tests.same_outputs", "--child", str(answer), "--work", str(root)]
    command += ["--cases", ",".join(cases)]
    if smollm2_hf is not None:
        command.append(str(smollm2_hf))
    package = {CODE: str(code)} if code is not None else {}
    done = subprocess.run(command, cwd=REPO, env={**os.environ, **PINS, **package}, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"the pinned conversions failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    found = json.loads(answer.read_text())
    return found["environment"], found["cases"]


def reference_commit() -> str | None:
    """The last commit that recorded bytes: its package wrote them (a change meant to alter outputs records
    them in the same commit). None without git or its history."""
    try:
        done = subprocess.run(
            ["git", "log", "-1", "--format=%H", "--", str(GOLDEN.relative_to(REPO))],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def package_at(commit: str, into: Path) -> Path:
    """The package as it was at `commit`, extracted under `into` (which then holds `mla_convert/`)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit, "mla_convert"], cwd=REPO, capture_output=True, timeout=120)
    if archive.returncode != 0:
        raise AssertionError(f"cannot read the package at {commit}: {archive.stderr.decode()[-500:]}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=120)
    return into


def recorded() -> dict[str, dict[str, dict[str, str]]]:
    """Every environment's recorded hashes: {environment: {case: {file: sha256}}}."""
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


def unrecorded(environment: str) -> str:
    """Why the bytes cannot be checked here, and what to do: one message."""
    known = "\n".join(f"  {key}" for key in recorded()) or "  (none)"
    return (
        f"no output bytes are recorded for this environment:\n  {environment}\nrecorded:\n{known}\n"
        "and no git history to convert at the commit that recorded them. Install the versions .ci/run pins, "
        "or record this environment's bytes at a commit whose outputs are right with "
        "`python -m tests.same_outputs SMOLLM2_SAFETENSORS_DIR` (tests/same_outputs.py)."
    )


def differences(record: dict[str, dict[str, str]], found: dict[str, dict[str, str]]) -> list[str]:
    """One line per file whose hash is not the recorded one (or that is missing on either side)."""
    lines = []
    for case in sorted(found):
        if case not in record:
            lines.append(f"{case}: not recorded")
            continue
        for name in sorted(set(record[case]) | set(found[case])):
            was, now = record[case].get(name), found[case].get(name)
            if was != now:
                lines.append(f"{case}/{name}: recorded {was and was[:12]}, now {now and now[:12]}")
    return lines


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.same_outputs", description=__doc__)
    parser.add_argument("smollm2", nargs="?", type=Path, help="SmolLM2's safetensors folder, to record it too")
    # the pinned child's arguments (convert_pinned)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        if os.environ.get(CODE):  # the reference package first, before anything imports this checkout's
            sys.path.insert(0, os.environ[CODE])
        found = _convert_cases(args.cases.split(","), args.work, args.smollm2)
        args.child.write_text(json.dumps({"environment": environment(), "cases": found}))
        return
    cases = list(TINY_CASES) + (list(SMOLLM2_CASES) if args.smollm2 is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        here, found = convert_pinned(cases, Path(tmp), args.smollm2)
    everything = recorded()
    everything[here] = {**everything.get(here, {}), **found}
    GOLDEN.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} for {here}: {sorted(found)}")


if __name__ == "__main__":
    _main()
