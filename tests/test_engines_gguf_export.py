"""The GGUF writer (engines/gguf_writer.py, gguf_layout.py, gguf_vocab.py), read back with gguf's own reader;
llama.cpp itself runs the files in tests/test_engines_llamacpp.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from transformers import LlamaConfig

from mla_convert import Options, convert
from mla_convert.engines import gguf_layout, gguf_vocab
from mla_convert.engines.gguf_writer import write_gguf
from mla_convert.errors import ConversionError

from .conftest import build_moe, build_tiny
from .helpers import messages, save_bpe_tokenizer

FAST = {"method": "svd", "finetune_steps": 0, "validate": False}
ARCH = "deepseek2"
Q = gguf.GGMLQuantizationType
# Two layers, 4 heads of 32 in 2 KV groups: big enough that every matrix fills whole q8_0 blocks.
TINY = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny model (portable profile) with a byte-level BPE tokenizer smaller than its vocabulary."""
    root = tmp_path_factory.mktemp("gguf")
    build_tiny(LlamaConfig(**TINY)).save_pretrained(root / "source")
    out = root / "mla"
    convert(root / "source", out, Options(**FAST))
    save_bpe_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


def weights(checkpoint: Path) -> dict[str, np.ndarray]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def read(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> ReaderTensor)."""
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def f32_file(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("f32") / "model-f32.gguf"
    return out, write_gguf(checkpoint, out, quant="f32")


def test_metadata_is_deepseek2_mla_without_experts(f32_file: tuple[Path, dict], config: dict) -> None:
    path, summary = f32_file
    fields, _ = read(path)
    rank, rope, nope, v = (config[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"))
    expected = {
        "general.architecture": ARCH,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        f"{ARCH}.block_count": config["num_hidden_layers"],
        f"{ARCH}.context_length": config["max_position_embeddings"],
        f"{ARCH}.embedding_length": config["hidden_size"],
        f"{ARCH}.feed_forward_length": config["intermediate_size"],
        f"{ARCH}.vocab_size": config["vocab_size"],
        f"{ARCH}.attention.head_count": config["num_attention_heads"],
        f"{ARCH}.attention.head_count_kv": 1,
        f"{ARCH}.attention.kv_lora_rank": rank,
        f"{ARCH}.attention.q_lora_rank": 0,
        f"{ARCH}.attention.key_length": rank + rope,
        f"{ARCH}.attention.value_length": rank,
        f"{ARCH}.attention.key_length_mla": nope + rope,
        f"{ARCH}.attention.value_length_mla": v,
        f"{ARCH}.rope.dimension_count": rope,
        f"{ARCH}.leading_dense_block_count": config["num_hidden_layers"],
        f"{ARCH}.expert_feed_forward_length": config["intermediate_size"],
        f"{ARCH}.expert_shared_count": 0,
    }
    assert {k: fields.get(k) for k in expected} == expected
    assert fields[f"{ARCH}.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert fields[f"{ARCH}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    # llama.cpp asserts n_expert_groups < n_expert once n_expert > 0: a dense model writes no expert keys.
    assert not [k for k in fields if "expert_count" in k or "expert_used" in k or "expert_group" in k]
    assert not [k for k in fields if ".rope.scaling" in k]
    assert summary["file"] == path.name and summary["bytes"] == path.stat().st_size and summary["type"] == "f32"
    assert any("--tensor-type attn_kv_a_mqa=f32" in w for w in summary["warnings"])


def test_tensors_have_llama_cpp_names_and_shapes(f32_file: tuple[Path, dict], config: dict) -> None:
    _, tensors = read(f32_file[0])
    h, heads, inter = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    rank, rope, nope, v = (config[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"))
    # GGUF shapes as llama.cpp's create_tensor calls in src/models/deepseek2.cpp state them (fastest first).
    expected = {
        "token_embd.weight": [h, config["vocab_size"]],
        "output_norm.weight": [h],
        "output.weight": [h, config["vocab_size"]],
    }
    for i in range(config["num_hidden_layers"]):
        expected |= {
            f"blk.{i}.attn_norm.weight": [h],
            f"blk.{i}.attn_q.weight": [h, heads * (nope + rope)],
            f"blk.{i}.attn_kv_a_mqa.weight": [h, rank + rope],
            f"blk.{i}.attn_kv_a_norm.weight": [rank],
            f"blk.{i}.attn_k_b.weight": [nope, rank, heads],
            f"blk.{i}.attn_v_b.weight": [rank, v, heads],
            f"blk.{i}.attn_output.weight": [heads * v, h],
            f"blk.{i}.ffn_norm.weight": [h],
            f"blk.{i}.ffn_gate.weight": [h, inter],
            f"blk.{i}.ffn_up.weight": [h, inter],
            f"blk.{i}.ffn_down.weight": [inter, h],
        }
    assert {name: [int(n) for n in t.shape] for name, t in tensors.items()} == expected
    assert {t.tensor_type for t in tensors.values()} == {Q.F32}


def test_k_b_and_v_b_reassemble_kv_b_proj_exactly(f32_file: tuple[Path, dict], checkpoint: Path, config: dict) -> None:
    _, tensors = read(f32_file[0])
    source = weights(checkpoint)
    heads, rank = config["num_attention_heads"], config["kv_lora_rank"]
    for i in range(config["num_hidden_layers"]):
        k_b = np.asarray(tensors[f"blk.{i}.attn_k_b.weight"].data)  # [heads, rank, nope]
        v_b = np.asarray(tensors[f"blk.{i}.attn_v_b.weight"].data)  # [heads, v, rank]
        rebuilt = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, rank)
        np.testing.assert_array_equal(rebuilt, source[f"model.layers.{i}.self_attn.kv_b_proj.weight"])
        assert k_b.shape[0] == heads
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data), source["lm_head.weight"])


def test_q8_0_keeps_kv_a_float32_with_its_tiny_latent_rows(checkpoint: Path, config: dict, tmp_path: Path) -> None:
    out = tmp_path / "model-q8_0.gguf"
    summary = write_gguf(checkpoint, out, quant="q8_0")
    _, tensors = read(out)
    rank = config["kv_lora_rank"]
    for i in range(config["num_hidden_layers"]):
        kv_a = tensors[f"blk.{i}.attn_kv_a_mqa.weight"]
        assert kv_a.tensor_type == Q.F32
        latent = np.abs(np.asarray(kv_a.data)[:rank])
        assert latent.max() < 1e-6  # the epsilon-regime latent: what f16 scales would flush to zero
        assert (latent.max(axis=1) > 0).all()
        assert tensors[f"blk.{i}.attn_q.weight"].tensor_type == Q.Q8_0
        assert tensors[f"blk.{i}.attn_norm.weight"].tensor_type == Q.F32
        assert f"blk.{i}.attn_kv_a_mqa.weight" in summary["kept_float32"]
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0
    assert "blk.0.attn_q.weight" not in summary["kept_float32"]


def test_bf16_stores_matrices_in_bf16_and_norms_in_float32(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model-bf16.gguf"
    summary = write_gguf(checkpoint, out, quant="bf16")
    _, tensors = read(out)
    kinds = {name: t.tensor_type for name, t in tensors.items()}
    assert kinds["blk.0.attn_kv_a_mqa.weight"] == Q.BF16 and kinds["blk.0.attn_kv_a_norm.weight"] == Q.F32
    assert sorted(summary["kept_float32"]) == sorted(n for n, k in kinds.items() if k == Q.F32)


def test_a_zeroed_latent_is_caught_before_the_file_lands(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forcing kv_a to q8_0 (f16 block scales) zeroes its latent rows: the writer refuses, leaving nothing."""
    plan = gguf_layout._planned

    def q8_everything(base: str, source: str, part: str, shape: tuple[int, ...], quant: str) -> object:
        p = plan(base, source, part, shape, quant)
        kind = "q8_0" if base.endswith(gguf_layout.KV_A) else p.kind
        return gguf_layout.Planned(p.name, p.source, p.part, p.shape, kind)

    monkeypatch.setattr(gguf_layout, "_planned", q8_everything)
    with pytest.raises(ConversionError, match=r"latent rows of blk\.0\.attn_kv_a_mqa\.weight would be stored as zeros"):
        write_gguf(checkpoint, tmp_path / "model.gguf", quant="q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quant", ["f16", "q4_0"])
def test_unsupported_types_are_refused(checkpoint: Path, tmp_path: Path, quant: str) -> None:
    with pytest.raises(ConversionError, match="to resolve") as err:
        write_gguf(checkpoint, tmp_path / "model.gguf", quant=quant)
    if quant == "f16":
        assert "zero" in str(err.value) and "bf16" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_transformers_profile_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mla"
    convert(tiny_models["llama_mha_untied"], out, Options(target="transformers", **FAST))
    with pytest.raises(ConversionError, match=r"longrope.*--target portable"):
        write_gguf(out, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_no_tokenizer_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mla"
    convert(tiny_models["llama_mha_untied"], out, Options(**FAST))
    with pytest.raises(ConversionError, match="needs a tokenizer"):
        write_gguf(out, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_unknown_pre_tokenizer_is_refused_with_nothing_written(checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "mla"
    copy.mkdir()
    for f in checkpoint.iterdir():
        if f.is_file():
            (copy / f.name).symlink_to(f)
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": r"\w+|\s+"}, "behavior": "Isolated", "invert": False}
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConversionError, match="does not recognise this tokenizer's pre-tokenizer"):
        write_gguf(copy, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
    assert not [f for f in copy.iterdir() if "partial" in f.name]


@pytest.mark.parametrize(
    ("steps", "name"),
    [
        ([{"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}], "gpt-2"),
        ([{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}], "smollm"),
        ([{"type": "Split", "pattern": {"Regex": gguf_vocab.LLAMA3_REGEX}, "behavior": "Isolated"}], "llama-bpe"),
        ([{"type": "Split", "pattern": {"Regex": gguf_vocab.QWEN2_REGEX}, "behavior": "Isolated"}], "qwen2"),
        ([{"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}], None),
    ],
)
def test_pre_tokenizer_names(steps: list[dict], name: str | None) -> None:
    if steps[0]["type"] == "Split":
        steps = [*steps, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]
    tok = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}, "decoder": {"type": "ByteLevel"}}
    if name is None:
        with pytest.raises(ConversionError):
            gguf_vocab.identify_pre_tokenizer(tok)
    else:
        assert gguf_vocab.identify_pre_tokenizer(tok) == name


def test_tokenizer_from_files_is_padded_to_the_embedding_rows(f32_file: tuple[Path, dict], checkpoint: Path) -> None:
    fields, _ = read(f32_file[0])
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    n = len(tok["model"]["vocab"])
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == TINY["vocab_size"] > n
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert tokens[:n] == sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    assert tokens[n] == f"[PAD{n}]" and set(types[n:]) == {int(gguf.TokenType.UNUSED)}
    eos = tok["model"]["vocab"]["<|endoftext|>"]
    assert types[eos] == int(gguf.TokenType.CONTROL) and fields["tokenizer.ggml.eos_token_id"] == eos
    assert len(fields["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    assert fields["tokenizer.ggml.add_bos_token"] is False  # transformers adds none here, so llama.cpp must not


def tokenizer_gguf(path: Path, n_tokens: int) -> dict:
    """A vocabulary-only GGUF with keys of several types, as a source .gguf would lend them."""
    writer = gguf.GGUFWriter(str(path), "llama")
    keys = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(n_tokens)],
        "tokenizer.ggml.token_type": [1] * (n_tokens - 1) + [3],
        "tokenizer.ggml.merges": ["t 1", "t1 2"],
        "tokenizer.ggml.bos_token_id": n_tokens - 1,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{{ messages }}",
    }
    writer.add_tokenizer_model(keys["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(keys["tokenizer.ggml.pre"])
    writer.add_token_list(keys["tokenizer.ggml.tokens"])
    writer.add_token_types(keys["tokenizer.ggml.token_type"])
    writer.add_token_merges(keys["tokenizer.ggml.merges"])
    writer.add_bos_token_id(keys["tokenizer.ggml.bos_token_id"])
    writer.add_add_bos_token(keys["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(keys["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return keys


def test_tokenizer_keys_are_copied_from_a_gguf(checkpoint: Path, tmp_path: Path) -> None:
    keys = tokenizer_gguf(tmp_path / "source.gguf", n_tokens=290)
    out = tmp_path / "model.gguf"
    summary = write_gguf(checkpoint, out, tokenizer_gguf=tmp_path / "source.gguf")
    source = gguf.GGUFReader(str(tmp_path / "source.gguf")).fields
    written = gguf.GGUFReader(str(out)).fields
    for key, value in keys.items():
        assert written[key].types == source[key].types, key
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            padding = range(290, TINY["vocab_size"])
            unused = int(gguf.TokenType.UNUSED)
            pad = [f"[PAD{i}]" if key.endswith("tokens") else unused for i in padding]
            assert written[key].contents() == value + pad
        else:
            assert written[key].contents() == value, key
    assert "source.gguf" in summary["tokenizer"]


def test_sentencepiece_style_tokenizer_becomes_llama_with_merge_scores(checkpoint: Path, tmp_path: Path) -> None:
    """Byte-fallback BPE (Llama-2, Mistral): llama.cpp merges by score, so scores follow the merge order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    pieces = ["▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "▁hell", "▁hello"]
    vocab |= {p: 259 + i for i, p in enumerate(pieces)}
    merges = [("▁", "h"), ("l", "l"), ("▁h", "e"), ("▁he", "ll"), ("▁hell", "o")]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    folder = tmp_path / "spm"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        folder
    )
    fields = {f.key: f.value for f in gguf_vocab.vocab_from_files(folder, TINY["vocab_size"]).fields}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    types, scores = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.scores"]
    tt = gguf.TokenType
    assert types[0] == tt.UNKNOWN and types[1] == types[2] == tt.CONTROL
    assert set(types[3:259]) == {tt.BYTE} and types[259 + pieces.index("▁hello")] == tt.NORMAL
    assert [scores[vocab[a + b]] for a, b in merges] == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.unknown_token_id"] == 0


def test_sharded_checkpoints_give_the_same_file(checkpoint: Path, f32_file: tuple[Path, dict], tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    convert(checkpoint.parent / "source", sharded, Options(max_shard_size=300_000, **FAST))
    save_bpe_tokenizer(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "model.gguf"
    write_gguf(sharded, out)
    _, ours = read(out)
    _, single = read(f32_file[0])
    assert ours.keys() == single.keys()
    for name, tensor in ours.items():
        np.testing.assert_array_equal(np.asarray(tensor.data), np.asarray(single[name].data), err_msg=name)


# ---------------------------------------------------------------- --gguf on the command line


@pytest.fixture(scope="module")
def source_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "tiny-with-tokenizer"
    build_tiny(LlamaConfig(**TINY)).save_pretrained(folder)
    save_bpe_tokenizer(folder)
    return folder


def test_cli_writes_the_gguf_beside_the_checkpoint(cli, source_with_tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-mla"
    flags = ("--method", "svd", "--finetune-steps", "0", "--no-validate", "--gguf", "q8_0")
    result = cli(source_with_tokenizer, out, *flags)
    assert result.exit_code == 0, result.output
    assert "engine llama.cpp: serves" in result.stderr  # the plan says so before the work
    file = out / "tiny-mla-q8_0.gguf"
    report = json.loads((out / "mla_report.json").read_text())
    assert report["gguf"]["file"] == file.name and report["gguf"]["bytes"] == file.stat().st_size
    assert "blk.0.attn_kv_a_mqa.weight" in report["gguf"]["kept_float32"]
    assert {r["engine"]: r["status"] for r in report["engines"]}["llama.cpp"] == "serves"
    assert any("llama-quantize" in w for w in report["warnings"])
    card = (out / "README.md").read_text()
    assert file.name in card and "attn_kv_a_mqa" in card
    _, tensors = read(file)
    assert tensors["blk.0.attn_kv_a_mqa.weight"].tensor_type == Q.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q8_0


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--target", "transformers"), "--gguf needs --target portable"),
        (("--kv-rank", "8"), "--gguf needs a tokenizer"),  # tiny_models have none
    ],
)
def test_cli_refuses_a_gguf_it_cannot_write_before_any_work(cli, tiny_models, tmp_path, flags, fragment) -> None:
    out = tmp_path / "out"
    base = ("--method", "svd", "--finetune-steps", "0", "--gguf", "f32")
    result = cli(tiny_models["llama_gqa_tied"], out, *base, *flags)
    assert result.exit_code == 2, result.output
    (line,) = messages(result.stderr)  # no engine lines: refused before the plan was shown
    assert line.startswith("error: ")
    assert fragment in result.stderr and not out.exists() and "Traceback" not in result.output


def test_a_fine_tuned_run_writes_the_trained_weights_to_the_gguf(source_with_tokenizer: Path, tmp_path: Path) -> None:
    """The GGUF is written after the fine-tune, from the weights that replaced the converted ones."""
    out = tmp_path / "healed"
    steps = dict(finetune_steps=2, batch_size=2, micro_batch_size=2, train_seq_len=32, train_tokens=512)
    report = convert(source_with_tokenizer, out, method="svd", kv_rank=24, gguf="f32", validate=False, **steps)
    assert report["finetune"]["steps"] == 2 and report["gguf"]["file"] == "healed-f32.gguf"
    assert sorted(p.name for p in out.glob("*.gguf")) == ["healed-f32.gguf"]
    _, tensors = read(out / "healed-f32.gguf")
    trained = weights(out)["model.layers.1.self_attn.o_proj.weight"]
    assert np.array_equal(np.asarray(tensors["blk.1.attn_output.weight"].data), trained)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_moe_gguf_stacks_the_experts_and_writes_the_routing(family: str, tmp_path: Path) -> None:
    """Experts stacked per layer under llama.cpp's names, routing keys written out (gating, renormalization,
    one expert group below the expert count, so llama.cpp's n_expert_groups < n_expert holds), the shared
    expert llama.cpp's loader requires written as zeros, dense leading layers as dense."""
    build_moe(family, {**TINY, "intermediate_size": 64}).save_pretrained(tmp_path / "source")
    out = tmp_path / "mla"
    convert(tmp_path / "source", out, Options(**FAST))
    save_bpe_tokenizer(out)
    config = json.loads((out / "config.json").read_text())
    write_gguf(out, tmp_path / "moe.gguf", quant="f32")
    fields, tensors = read(tmp_path / "moe.gguf")
    v3 = config["model_type"] == "deepseek_v3"
    dense = config["first_k_dense_replace"]
    expected = {
        f"{ARCH}.expert_count": 4,
        f"{ARCH}.expert_used_count": 2,
        f"{ARCH}.expert_group_count": 1,
        f"{ARCH}.expert_group_used_count": 1,
        f"{ARCH}.expert_shared_count": 1,
        f"{ARCH}.leading_dense_block_count": dense,
        f"{ARCH}.expert_feed_forward_length": config["moe_intermediate_size"],
        f"{ARCH}.expert_weights_norm": v3,
        f"{ARCH}.expert_gating_func": int(
            gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX
        ),
    }
    assert {k: fields.get(k) for k in expected} == expected
    assert fields[f"{ARCH}.expert_group_count"] < fields[f"{ARCH}.expert_count"]
    assert fields[f"{ARCH}.expert_weights_scale"] == pytest.approx(1.0)
    w = weights(out)
    for i in range(config["num_hidden_layers"]):
        if i < dense:
            assert f"blk.{i}.ffn_gate.weight" in tensors and f"blk.{i}.ffn_gate_exps.weight" not in tensors
            continue
        for part, name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            stacked = np.stack([w[f"model.layers.{i}.mlp.experts.{j}.{part}.weight"] for j in range(4)])
            np.testing.assert_array_equal(np.asarray(tensors[f"blk.{i}.ffn_{name}_exps.weight"].data), stacked)
            assert not np.asarray(tensors[f"blk.{i}.ffn_{name}_shexp.weight"].data).any()
        router = np.asarray(tensors[f"blk.{i}.ffn_gate_inp.weight"].data)
        np.testing.assert_array_equal(router, w[f"model.layers.{i}.mlp.gate.weight"])
        assert (f"blk.{i}.exp_probs_b.bias" in tensors) == v3
