"""The dry run's long-context lines: the longest context that fits in a memory size, source beside
conversion, counted from the written model itself, and the measured speed ratio it quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mla_convert
from mla_convert.plan import measured_speed

GIB = 2**30


def _parameters(folder: Path) -> int:
    return sum(t.numel() for f in folder.glob("*.safetensors") for t in load_file(str(f)).values())


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_longest_context_counts_the_weights_and_cache_the_output_really_has(
    tiny_llama: Path, tmp_path: Path, budget: float
) -> None:
    found = mla_convert.dry_run(tiny_llama, kv_budget=budget, memory="1GiB")
    lc = found["long_context"]
    out = tmp_path / "out"
    mla_convert.convert(tiny_llama, out, kv_budget=budget, method="svd", finetune_steps=0, verify=False, validate=False)
    config = json.loads((out / "config.json").read_text())
    width = torch.finfo(getattr(torch, config["dtype"])).bits // 8
    cache = (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * width * config["num_hidden_layers"]
    weights = _parameters(out) * width
    assert lc["converted"]["weights_bytes"] == weights
    assert lc["converted"]["kv_bytes_per_token"] == cache
    assert lc["converted"]["tokens"] == (GIB - weights) // cache
    source = json.loads((tiny_llama / "config.json").read_text())
    source_cache = 2 * source["num_key_value_heads"] * (source["hidden_size"] // source["num_attention_heads"])
    source_cache *= width * source["num_hidden_layers"]
    assert lc["source"]["tokens"] == (GIB - _parameters(tiny_llama) * width) // source_cache
    assert lc["converted"]["tokens"] > lc["source"]["tokens"]


def test_the_dry_run_prints_the_longest_context_for_the_memory_given(cli, tiny_llama, tmp_path) -> None:
    result = cli(tiny_llama, tmp_path / "out", "--kv-budget", "0.25", "--memory", "2GiB", "--dry-run")
    assert result.exit_code == 0, result.output
    found = mla_convert.dry_run(tiny_llama, kv_budget=0.25, memory="2GiB")["long_context"]
    line = next(x for x in result.stdout.splitlines() if x.startswith("longest context in 2.0 GiB (given)"))
    assert f"source {found['source']['tokens']:,} tokens, converted {found['converted']['tokens']:,}" in line
    speed = next(x for x in result.stdout.splitlines() if "decode speed, converted / source" in x)
    assert "measured on CPU" in speed and found["measured_speed"]["model"] in speed


def test_without_memory_the_dry_run_plans_for_this_machine(tiny_llama: Path) -> None:
    lc = mla_convert.dry_run(tiny_llama, kv_budget=0.5)["long_context"]
    with open("/proc/meminfo") as fh:
        total_kib = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1])
    assert lc["memory_given"] is False
    assert abs(lc["memory_bytes"] - total_kib * 1024) < 64 * 2**20


@pytest.mark.parametrize("bad", ["lots", "-4GB", "0"])
def test_a_memory_size_that_cannot_be_read_is_one_line(cli, tiny_llama, tmp_path, bad) -> None:
    result = cli(tiny_llama, tmp_path / "out", "--memory", bad, "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--memory" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_the_quoted_speed_is_the_measurement_nearest_in_cache_and_work() -> None:
    assert measured_speed.MEASURED, "no measurement to quote"
    for m in measured_speed.MEASURED:
        assert measured_speed.nearest(m.kv_ratio, m.work_ratio) is m
        assert m.speed_ratio.keys() == m.best_ratio.keys()
        for context, ratio in m.speed_ratio.items():
            assert measured_speed.at_context(m, context) == (context, ratio, m.best_ratio[context])
    first = measured_speed.MEASURED[0]
    contexts = sorted(first.speed_ratio)
    assert measured_speed.at_context(first, 10**9)[0] == contexts[-1]
    assert measured_speed.at_context(first, 1)[0] == contexts[0]


def test_the_quoted_speeds_are_the_benchmark_results_as_committed() -> None:
    """The table the dry run quotes is bench/long_context.py's committed curve, rounded: no drift."""
    curve = json.loads((Path(__file__).parents[1] / "bench" / "results" / "long_context.json").read_text())["curve"]
    for m in measured_speed.MEASURED:
        pair = curve["pairs"][m.bench_pair]
        on, off = pair["fa on"], pair["python default (fa off)"]
        for context in m.speed_ratio:
            c = str(context)
            speed = {(s, r): p[r]["contexts"][c]["tokens_per_second"] for s, p in (("on", on), ("off", off))
                     for r in ("source", "converted")}  # fmt: skip
            assert m.speed_ratio[context] == round(speed["on", "converted"] / speed["on", "source"], 2)
            best = max(speed["on", "converted"], speed["off", "converted"])
            assert m.best_ratio[context] == round(best / max(speed["on", "source"], speed["off", "source"]), 2)
