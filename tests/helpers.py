"""Plain helpers shared by test files (fixtures live in conftest.py; no test file imports another):

- a saved model's logits, and a converted checkpoint loaded with stock transformers;
- what the CLI says: its messages without the progress lines, a clean one-line refusal, MODEL_IN and MODEL_OUT
  left untouched, no temporary folder left behind;
- text to calibrate on, in every format, and the tiny Llama that has a tokenizer to read it;
- small builders: SmolLM2's shapes, a byte-level BPE tokenizer, a tiny Llama GGUF, a card's front matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mla_convert.report import report as report_module
from mla_convert.write.writer import TMP_PREFIX

from .conftest import COMMON, build_tiny

DATA = Path(__file__).parent / "data"

# ---------------------------------------------------------------- models and logits


def load(path: Path, **kwargs: object) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def max_logit_diff(source: Path, converted: Path, ids: torch.Tensor) -> float:
    ref = load(source)(ids).logits
    out = load(converted)(ids).logits
    return float((ref - out).abs().max())


def random_ids(vocab: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


# SmolLM2-135M's shapes, for plans made from the config alone
SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    vocab_size=49152,
)

# ---------------------------------------------------------------- what the command line says and leaves behind

FAST = ("--no-verify", "--method", "svd")
SUBPROCESS_TIMEOUT = 180
PROGRESS_LINE = re.compile(r"^(\[\d[^\]]*\] |  |time by stage|estimate: )")


def messages(stderr: str) -> list[str]:
    """stderr without the progress a run prints when it is not on a terminal (stage lines with their
    clock, counts, estimates and the closing time summary): what is left is what the tool has to say."""
    return [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]


def snapshot(path: Path) -> dict[str, str] | None:
    """A hash of every file (and the set of directories) under path; None when nothing is there."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    tree = {}
    for item in sorted(path.rglob("*")):
        rel = str(item.relative_to(path))
        tree[rel] = hashlib.sha256(item.read_bytes()).hexdigest() if item.is_file() else "<dir>"
    return tree


def temp_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(TMP_PREFIX))


class Untouched:
    """Snapshot MODEL_IN and MODEL_OUT before a run; `check` asserts the run changed neither."""

    def __init__(self, model_in: Path, model_out: Path):
        self.model_in, self.model_out = model_in, model_out
        self.in_before = snapshot(model_in)
        self.out_before = snapshot(model_out)

    def check(self) -> None:
        assert snapshot(self.model_in) == self.in_before, "MODEL_IN was modified"
        if self.out_before is None:
            assert not os.path.lexists(self.model_out), "MODEL_OUT was created"
        else:
            assert snapshot(self.model_out) == self.out_before, "the existing MODEL_OUT was modified"
        assert temp_dirs(self.model_out.parent) == [], "a temporary directory was left behind"


def one_line(result: object, *fragments: str, code: int = 2, prefix: str = "error: ", after_plan: bool = False) -> str:
    """Assert a clean refusal: exit code, nothing on stdout, exactly one stderr line holding every fragment.

    after_plan: the run got as far as printing its plan (the engine lines, then the plan line) before failing.
    """
    output = result.output  # type: ignore[attr-defined]
    assert result.exit_code == code, output  # type: ignore[attr-defined]
    exc = result.exception  # type: ignore[attr-defined]
    assert exc is None or isinstance(exc, SystemExit), f"uncaught {exc!r}"
    assert "Traceback" not in output
    assert result.stdout == ""  # type: ignore[attr-defined]
    # the per-engine lines come once the flags have passed the plan's checks: information, not errors
    lines = [line for line in messages(result.stderr) if not line.startswith("engine ")]  # type: ignore[attr-defined]
    if after_plan:
        assert any(line.startswith("plan: ") for line in lines), lines
        lines = [line for line in lines if not line.startswith("plan: ")]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith(prefix), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def as_from_a_terminal() -> None:
    """Give the child SIGINT's default action, as a terminal does: a test runner started in the background
    (`cmd &` in a script) ignores SIGINT, its children inherit that, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---------------------------------------------------------------- text, and a tiny model with a tokenizer

# the text model's quick conversion (tests/test_source_text.py, tests/test_source_bad_text.py)
SEQ = 32
CALIB_TOKENS = 500  # 15 whole windows of 32: the report must say 480
EVAL_TOKENS = 96
RANKS = ("--kv-rank", "12", "--rope-dim", "8", "--no-verify")
QUICK = (
    *RANKS,
    "--calib-tokens",
    str(CALIB_TOKENS),
    "--calib-seq-len",
    str(SEQ),
    "--eval-tokens",
    str(EVAL_TOKENS),
    "--finetune-steps",
    "0",
)

PROSE = (
    "the model reads a long sentence about keys values and rotary positions while its cache stays small "
    "every layer turns queries into latent vectors so that attention keeps quality at lower memory cost "
    "river mountain garden window yellow quiet bright seven winter market"
)
WORDS = PROSE.split(" ")


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(count)]


def documents(count: int, seed: int, per_doc: int = 4) -> list[str]:
    lines = sentences(count * per_doc, seed)
    return [" ".join(lines[i : i + per_doc]) for i in range(0, len(lines), per_doc)]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, column: d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], column: str = "text") -> Path:
    pq.write_table(pa.table({"id": list(range(len(docs))), column: docs}), path)
    return path


def build_text_model(parent: Path) -> Path:
    """The tiny GQA Llama (4 heads, 2 KV heads, head_dim 16) with an offline byte-level BPE tokenizer trained on
    generated prose, saved under `parent`; the same bytes on every call."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(documents(30, seed=99), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**COMMON, "vocab_size": len(tokenizer)},
    )
    root = parent / "llama_with_tokenizer"
    build_tiny(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def save_bpe_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    """A small byte-level BPE (GPT-2's pre-tokenizer) trained on the test prose, saved as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([(DATA / "prose.txt").read_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)


# ---------------------------------------------------------------- a tiny Llama GGUF

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 96, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS


def write_llama_gguf(
    path: Path, tied: bool = True, seed: int = 0, describe: Callable[[gguf.GGUFWriter], None] | None = None
) -> Path:
    """A float32 Llama GGUF (the shapes above) named as llama.cpp names Llama tensors (shapes given in torch
    order); `describe` adds metadata (general.license, general.base_model.*, ...)."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    if describe is not None:
        describe(writer)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_tensor("token_embd.weight", rand(VOCAB, HIDDEN))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_output.weight", rand(HIDDEN, HEADS * HEAD_DIM))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    if not tied:
        writer.add_tensor("output.weight", rand(VOCAB, HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- the model card


def front_matter(card: str) -> dict:
    """The card's YAML metadata, parsed with PyYAML when installed, else by hand (keys, scalars, lists)."""
    assert card.startswith("---\n")
    block = card[4 : card.index("\n---\n", 3)]
    try:
        import yaml
    except ImportError:
        return _parse_simple(block)
    meta = yaml.safe_load(block)
    assert isinstance(meta, dict)
    return meta


def _parse_simple(block: str) -> dict:
    meta: dict = {}
    key = None
    for line in block.splitlines():
        if line.startswith("- "):
            assert key is not None and isinstance(meta[key], list), line
            meta[key].append(_scalar(line[2:]))
        else:
            key, _, value = line.partition(":")
            assert key and _ == ":", line
            meta[key] = _scalar(value.strip()) if value.strip() else []
    return meta


def _scalar(text: str) -> str:
    return json.loads(text) if text.startswith('"') else text


# The report's keys against its schema
NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# maps whose keys are data (file names, model names), not schema
DATA_KEYS = {"files", "outputs", "correct"}


def schema_words() -> set[str]:
    """The words of the report schema written at the top of report/report.py."""
    assert report_module.__doc__ is not None
    return set(re.findall(NAME, report_module.__doc__))


def key_paths(value: Any, path: str = "") -> set[str]:
    """Every key path of a report, with the keys of data maps (a model's name, a file's) left out."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            found.add(f"{path}.{key}")
            if key in DATA_KEYS:
                continue
            if key == "models" and isinstance(inner, dict):  # {model name: figures}
                for figures in inner.values():
                    found |= key_paths(figures, f"{path}.models.*")
                continue
            found |= key_paths(inner, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            found |= key_paths(item, f"{path}[]")
    return found


def undocumented(report: dict[str, Any]) -> list[str]:
    """The key paths of `report` whose key the schema does not name (tests/test_report_schema.py)."""
    words = schema_words()
    return sorted(p for p in key_paths(report) if p.rpartition(".")[2] not in words)
