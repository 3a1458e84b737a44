"""Streaming through bounded memory, byte-identical reruns, and the safetensors reader/writer beneath them."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mla_convert import Options
from mla_convert.conversion.driver import convert
from mla_convert.plan.plan import plan_for
from mla_convert.source.checkpoint import Source, resolve
from mla_convert.source.layers import SourceLayers
from mla_convert.util import resources
from mla_convert.util.safetensors_io import HEADER_CAPACITY, SafetensorsError, ShardFile, TensorFile, read_header

from .conftest import QUICK_CALIB
from .helpers import documents, one_line

SVD = ("--method", "svd", "--kv-budget", "0.5", "--finetune-steps", "0", "--no-validate", "-q")


def output_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a written checkpoint, read with the safetensors package itself."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def vm_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------- the shard reader and writer


def test_shard_file_is_read_by_safetensors_and_back(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.float64),
        "b.weight": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(12, dtype=torch.int64).reshape(2, 2, 3),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "x.safetensors"
    shard = ShardFile(path)
    for name, tensor in tensors.items():
        shard.add(name, tensor)
    shard.close()
    theirs = load_file(path)
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    ours = TensorFile(path)
    assert set(theirs) == set(ours.entries) == set(tensors)
    for name, tensor in tensors.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor)
        assert torch.equal(ours.get(name), tensor)
    # data starts right after the reserved, space-padded header, aligned to 8 bytes
    assert int.from_bytes(path.read_bytes()[:8], "little") == HEADER_CAPACITY
    assert (8 + HEADER_CAPACITY) % 8 == 0


def test_reader_agrees_with_safetensors_on_its_own_files(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(4, i + 1).to(dtype) for i, dtype in enumerate([torch.float32, torch.float16])}
    save_file(tensors, str(tmp_path / "s.safetensors"))
    ours = TensorFile(tmp_path / "s.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(ours.get(name), tensor)


def test_reader_refuses_truncated_and_inconsistent_files(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match="truncated"):
        read_header(tmp_path / "cut.safetensors")
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["w"]["shape"] = [64, 65]
    text = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_len :])
    with pytest.raises(SafetensorsError, match="do not match its shape"):
        read_header(tmp_path / "bad.safetensors")


def test_reading_a_shard_tensor_by_tensor_does_not_keep_it_resident(tmp_path: Path) -> None:
    """The reason for our reader: a memory-mapped shard stays resident as it is read, ours does not."""
    path = tmp_path / "big.safetensors"
    count, rows = 8, 2048  # 8 tensors of 32 MiB: 256 MiB in all
    save_file({f"t{i}": torch.full((rows, 4096), float(i)) for i in range(count)}, str(path))
    gc.collect()
    before = vm_rss()
    file = TensorFile(path)
    grew = 0
    for i in range(count):
        tensor = file.get(f"t{i}")
        assert float(tensor[-1, -1]) == float(i)
        del tensor
        grew = max(grew, vm_rss() - before)
    assert grew < path.stat().st_size / 3, f"RSS grew by {grew / 2**20:.0f} MiB while reading"


# ---------------------------------------------------------------- streaming conversion


def sharded_copy(tiny: Path, tmp_path: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(tiny)
    out = tmp_path / "sharded_in"
    model.save_pretrained(out, max_shard_size="40KB")
    assert len(list(out.glob("*.safetensors"))) > 3
    return out


def in_memory_source(directory: Path) -> Source:
    """The same checkpoint loaded whole by transformers and held in memory, as the GGUF path holds it."""
    model = AutoModelForCausalLM.from_pretrained(directory)
    tensors = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    return Source(label=str(directory), root=directory, config=model.config, _tensors=tensors)


def test_streaming_a_sharded_checkpoint_equals_the_in_memory_path(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_in = sharded_copy(tiny_llama, tmp_path)
    model_out = tmp_path / "out"
    result = cli(model_in, model_out, *SVD, "--max-shard-size", "30KB")
    assert result.exit_code == 0, result.output
    written = output_tensors(model_out)
    assert len(list(model_out.glob("*.safetensors"))) > 3
    index = json.loads((model_out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(written)

    source = in_memory_source(model_in)
    plan = plan_for(source.config, Options(kv_budget=0.5, method="svd"))
    held: dict[str, torch.Tensor] = {}
    convert(source, plan, lambda name, tensor: held.__setitem__(name, tensor.to(plan.dtype).contiguous()))
    assert set(held) == set(written)
    for name, tensor in held.items():
        assert torch.equal(written[name], tensor), name
    report = json.loads((model_out / "mla_report.json").read_text())
    assert report["resources"]["peak_rss_bytes"] >= resources.peak_rss_bytes() // 100
    assert report["resources"]["seconds"] > 0


def rerun_files(cli, model_in: Path, tmp_path: Path, name: str, *args: str) -> dict[str, bytes]:
    (tmp_path / name).mkdir()
    model_out = tmp_path / name / "mla"  # the card names the directory, so every run uses the same name
    result = cli(model_in, model_out, *args)
    assert result.exit_code == 0, result.output
    return {p.name: p.read_bytes() for p in sorted(model_out.iterdir())}


@pytest.mark.slow  # three whole calibrated runs
def test_same_input_and_seed_give_byte_identical_files(cli, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    args = ["--kv-budget", "0.5", "-q", *(f"--{k.replace('_', '-')}={v}" for k, v in QUICK_CALIB.items())]
    model_in = tiny_models["qwen2_gqa_bias"]
    first = rerun_files(cli, model_in, tmp_path, "a", *args, "--seed", "3")
    second = rerun_files(cli, model_in, tmp_path, "b", *args, "--seed", "3")
    assert set(first) == set(second) and "model.safetensors" in first and "layer_error.png" in first
    for name in first:
        if name == "mla_report.json":  # the measured resources differ; everything else may not
            a, b = (json.loads(x) for x in (first[name], second[name]))
            assert a.pop("resources") and b.pop("resources")
            assert a == b
        else:
            assert first[name] == second[name], f"{name} differs between identical runs"
    other_seed = rerun_files(cli, model_in, tmp_path, "c", *args, "--seed", "4")
    assert other_seed["model.safetensors"] != first["model.safetensors"], "the seed should matter here"


# ---------------------------------------------------------------- pickle weights


def pickle_copy(tiny: Path, tmp_path: Path) -> Path:
    path = tmp_path / "pickled"
    path.mkdir()
    for item in tiny.iterdir():
        if item.suffix != ".safetensors":
            (path / item.name).write_bytes(item.read_bytes())
    torch.save(load_file(tiny / "model.safetensors"), path / "pytorch_model.bin")
    return path


def test_allow_pickle_loads_weights_only_and_matches_safetensors(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_in = pickle_copy(tiny_llama, tmp_path)
    refused = cli(model_in, tmp_path / "refused", *SVD)
    one_line(refused, "pickle", "--allow-pickle")
    assert not (tmp_path / "refused").exists()
    result = cli(model_in, tmp_path / "from_pickle", *SVD, "--allow-pickle")
    assert result.exit_code == 0, result.output
    reference = cli(tiny_llama, tmp_path / "from_safetensors", *SVD)
    assert reference.exit_code == 0, reference.output
    ours, theirs = output_tensors(tmp_path / "from_pickle"), output_tensors(tmp_path / "from_safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    # verification loaded the pickle source as a model too, and saw what it saw from safetensors
    checks = [json.loads((tmp_path / d / "mla_report.json").read_text())["verification"] for d in ours_theirs()]
    assert checks[0] is not None and checks[0] == checks[1]


def ours_theirs() -> tuple[str, str]:
    return "from_pickle", "from_safetensors"


class Payload:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_allow_pickle_still_never_runs_code_from_the_file(cli, tiny_llama: Path, tmp_path: Path) -> None:
    model_in = pickle_copy(tiny_llama, tmp_path)
    marker = tmp_path / "code-ran"
    state = load_file(tiny_llama / "model.safetensors")
    state["model.norm.weight"] = Payload(marker)  # type: ignore[assignment]
    torch.save(state, model_in / "pytorch_model.bin")
    result = cli(model_in, tmp_path / "out", *SVD, "--allow-pickle")
    one_line(result, "pytorch_model.bin", "weights_only")
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- memory-bound stages


def test_whole_model_stages_are_refused_or_skipped_when_memory_is_short(
    cli, tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 1000)
    refused = cli(tiny_llama, tmp_path / "sampled", "--kv-budget", "0.5", "--finetune-steps", "0")
    one_line(refused, "sampling calibration text", "--calib-data", "--method svd")
    assert not (tmp_path / "sampled").exists()
    refused = cli(tiny_llama, tmp_path / "healed", "--kv-budget", "0.5", "--method", "svd")
    one_line(refused, "the fine-tune", "--finetune-steps 0")
    assert not (tmp_path / "healed").exists()
    result = cli(tiny_llama, tmp_path / "streamed", "--kv-budget", "0.5", "--method", "svd", "--finetune-steps", "0")
    assert result.exit_code == 0, result.output
    assert "skipped --verify and --validate" in result.stderr
    report = json.loads((tmp_path / "streamed" / "mla_report.json").read_text())
    assert report["verification"] is None and report["validation"] is None
    assert any("skipped --verify" in w for w in report["warnings"])


@pytest.mark.parametrize("family", ["llama_gqa_tied", "llama3_mqa", "mistral_gqa", "qwen2_gqa_bias"])
def test_source_layers_built_one_at_a_time_compute_what_the_whole_model_does(
    tiny_models: dict[str, Path], family: str
) -> None:
    whole = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    layers = SourceLayers(resolve(str(tiny_models[family])))
    ids = torch.randint(0, whole.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        h = whole.model.embed_tokens(ids)
        mine = layers.embed(ids)
        assert torch.equal(mine, h)
        pos = whole.model.rotary_emb(h, positions)
        assert all(torch.equal(a, b) for a, b in zip(layers.rotary(h, positions), pos, strict=True))
        for i, reference in enumerate(whole.model.layers):
            layer = layers.layer(i)
            assert layer is not reference
            out = layer(h, position_embeddings=pos)
            assert torch.equal(out, reference(h, position_embeddings=pos)), (family, i)
            layers.release(i)
            assert all(p.is_meta for p in layer.parameters()), "a released layer keeps its weights"
            h = out


def test_calibrating_on_a_file_streams_the_source_layer_by_layer(
    cli,
    text_model: Path,
    tmp_path: Path,
    monkeypatch,
) -> None:
    """With --calib-data the activation-aware path never builds the whole source model, and its output does
    not depend on whether the machine could have held it (verification and validation only read it)."""
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(documents(60, seed=4)) + "\n", encoding="utf-8")
    args = ["--kv-budget", "0.5", "--calib-data", data, "--calib-tokens", "512", "--calib-seq-len", "32"]
    args += ["--finetune-steps", "0", "-q"]
    roomy = rerun_files(cli, text_model, tmp_path, "roomy", *args)

    def whole_model(self: Source) -> None:
        raise AssertionError("the whole source model was built")

    monkeypatch.setattr(Source, "model", whole_model)
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 1000)
    tight = rerun_files(cli, text_model, tmp_path, "tight", *args)
    report = json.loads(tight["mla_report.json"])
    assert report["calibration"]["source"] == data.name  # named without its folder
    assert "measured on calibration windows" in report["settings"]["split_reason"]
    assert any("skipped --verify and --validate" in w for w in report["warnings"])
    assert json.loads(roomy["mla_report.json"])["verification"] is not None
    weights = [name for name in roomy if name.endswith(".safetensors")]
    assert weights and all(tight[name] == roomy[name] for name in weights)


def test_a_bf16_checkpoint_converts_losslessly_with_float32_math(cli, tmp_path: Path) -> None:
    """16-bit outputs take the float32 path (convert.work_dtype); the map must stay exact up to bf16 rounding."""
    from .conftest import TINY_CONFIGS, build_tiny

    model_in = tmp_path / "bf16"
    build_tiny(TINY_CONFIGS["smollm_like_mqa"]()).to(torch.bfloat16).save_pretrained(model_in)
    outputs = {}
    for dtype in ("auto", "float32"):  # bf16 output (float32 math) and float32 output (float64 math)
        out = tmp_path / dtype
        result = cli(model_in, out, "--method", "svd", "--finetune-steps", "0", "--no-validate", "--dtype", dtype)
        assert result.exit_code == 0, result.output
        outputs[dtype] = json.loads((out / "mla_report.json").read_text())["verification"]
    assert output_tensors(tmp_path / "auto")["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert outputs["float32"]["max_abs_logit_diff"] < 1e-4  # exact: float64 math, float32 weights
    assert outputs["auto"]["top1_agreement"] == 1.0 and outputs["auto"]["kl_mean"] < 1e-5
    assert outputs["auto"]["max_abs_logit_diff"] < 0.05


# ---------------------------------------------------------------- the background writer


def test_background_writer_keeps_order_bounds_its_queue_and_hands_errors_back() -> None:
    import threading

    from mla_convert.write.writer import Background

    done: list[int] = []
    gate = threading.Event()
    background = Background(limit=10)
    background.submit(lambda: (gate.wait(5), done.append(0)), 6)
    blocked = threading.Thread(target=lambda: background.submit(lambda: done.append(1), 6))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive(), "a submit beyond the queue limit should wait"
    gate.set()
    blocked.join(5)
    background.submit(lambda: done.append(2), 50)  # larger than the limit: written before submit returns
    assert done == [0, 1, 2]

    def fail() -> None:
        raise OSError(28, "No space left on device")

    background.submit(fail, 1)
    with pytest.raises(OSError, match="No space"):
        background.drain()
    background.stop()
