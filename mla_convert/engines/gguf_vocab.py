"""The tokenizer metadata a GGUF carries: a source .gguf's own keys copied as they are, or keys built from the
checkpoint's tokenizer.json (byte-level BPE as llama.cpp's "gpt2", SentencePiece-style BPE as its "llama").

llama.cpp selects its text splitting by the pre-tokenizer's name, not by regex, so a tokenizer it would split
differently is refused rather than guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ..errors import ConversionError

# Pre-tokenizer regexes as Hugging Face tokenizer.json files write them (llama.cpp's src/llama-vocab.cpp
# quotes the same strings as the "original regex from tokenizer.json" of its llama3 and qwen2 types).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


@dataclass
class Field:
    """One metadata key with its exact GGUF type (sub_type for arrays)."""

    key: str
    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


@dataclass
class Vocab:
    """The tokenizer metadata to write, complete and checked before the file is opened."""

    fields: list[Field] = field(default_factory=list)
    source: str = ""

    def apply(self, writer: gguf.GGUFWriter) -> None:
        """Add every key to the file's metadata, with its exact type."""
        for f in self.fields:
            writer.add_key_value(f.key, f.value, f.vtype, sub_type=f.sub_type)


def read_vocab(checkpoint: Path, n_vocab: int, tokenizer_gguf: Path | None) -> Vocab:
    """A source .gguf's own tokenizer when there is one (exactly what llama.cpp ran), else the HF files."""
    if tokenizer_gguf is not None:
        return vocab_from_gguf(tokenizer_gguf, n_vocab)
    return vocab_from_files(checkpoint, n_vocab)


def vocab_from_gguf(path: Path, n_vocab: int) -> Vocab:
    """Every tokenizer key of the source GGUF, copied with its type: llama.cpp tokenizes as it did there."""
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ConversionError(
            f"--gguf: cannot read the tokenizer of {path} ({exc}); to resolve, pass the source .gguf"
        ) from exc
    fields = []
    for key, f in reader.fields.items():
        if key.startswith(("tokenizer.ggml.", "tokenizer.chat_template")):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            fields.append(Field(key, f.contents(), f.types[0], sub))
    vocab = Vocab(fields, source=f"copied from {path.name}")
    if not any(f.key == gguf.Keys.Tokenizer.LIST for f in fields):
        raise ConversionError(f"--gguf: {path} has no tokenizer; to resolve, write the GGUF from the tokenizer files")
    _pad_copied(vocab, n_vocab)
    return vocab


def _pad_copied(vocab: Vocab, n_vocab: int) -> None:
    """Fill the token arrays up to the embedding rows with unused tokens (HF models often have spare rows)."""
    by_key = {f.key: f for f in vocab.fields}
    tokens = by_key[gguf.Keys.Tokenizer.LIST].value
    _check_size(len(tokens), n_vocab)
    pad = range(len(tokens), n_vocab)
    tokens.extend(f"[PAD{i}]" for i in pad)
    if (types := by_key.get(gguf.Keys.Tokenizer.TOKEN_TYPE)) is not None:
        types.value.extend(int(gguf.TokenType.UNUSED) for _ in pad)
    if (scores := by_key.get(gguf.Keys.Tokenizer.SCORES)) is not None:
        scores.value.extend(-1000.0 for _ in pad)


def _check_size(n_tokens: int, n_vocab: int) -> None:
    if n_tokens > n_vocab:
        raise ConversionError(
            f"--gguf: the tokenizer has {n_tokens} tokens but the model only {n_vocab} embedding rows; "
            "to resolve, use the tokenizer the model was trained with"
        )


def vocab_from_files(checkpoint: Path, n_vocab: int) -> Vocab:
    """The tokenizer from the checkpoint's tokenizer.json: byte-level BPE ("gpt2") or SentencePiece-style BPE."""
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(
            f"--gguf needs a tokenizer, and {checkpoint} has no tokenizer.json; to resolve, convert from a model "
            "with its tokenizer files (or from a .gguf, whose tokenizer is copied)"
        )
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(
            f"--gguf does not support {model.get('type')} tokenizers (only BPE); to resolve, convert from a .gguf "
            "of this model, whose tokenizer is copied as is"
        )
    if model.get("byte_fallback", False):
        return _spm_vocab(checkpoint, tok, n_vocab)
    return _bpe_vocab(checkpoint, tok, n_vocab)


def _bpe_vocab(checkpoint: Path, tok: dict[str, Any], n_vocab: int) -> Vocab:
    """Byte-level BPE: llama.cpp's "gpt2" model with a pre-tokenizer it knows by name."""
    pre = identify_pre_tokenizer(tok)
    tokens, types = _tokens_and_types(tok, n_vocab)
    fields = _token_fields("gpt2", pre, tokens, types, None)
    fields += _special_fields(checkpoint, n_vocab, merges=True)
    fields.append(Field(gguf.Keys.Tokenizer.ADD_PREFIX, False, gguf.GGUFValueType.BOOL))
    return Vocab(fields, source=f"tokenizer.json (gpt2 BPE, pre-tokenizer {pre})")


def identify_pre_tokenizer(tok: dict[str, Any]) -> str:
    """llama.cpp's name for this tokenizer.json's pre-tokenizer (it splits text by name, not by regex)."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    normalizer = (tok.get("normalizer") or {}).get("type")
    decoder = (tok.get("decoder") or {}).get("type")
    name = _name_of(steps) if decoder == "ByteLevel" else None
    allowed = (None, "NFC") if name == "qwen2" else (None,)  # Qwen2 declares NFC; llama.cpp's qwen2 skips it
    if name is None or normalizer not in allowed:
        raise ConversionError(
            f"--gguf does not recognise this tokenizer's pre-tokenizer ({_describe(steps)}, normalizer "
            f"{normalizer}); llama.cpp selects its text splitting by name, so a guess would tokenize differently; "
            "to resolve, convert from a .gguf of this model (its tokenizer is copied as is)"
        )
    return name


def _name_of(steps: list[dict[str, Any]]) -> str | None:
    """Match the pre-tokenizer steps against the forms llama.cpp implements (src/llama-vocab.cpp)."""
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space", False) for s in steps):
        return None
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex alone
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # every digit alone, then GPT-2's regex (SmolLM, SmolLM2, StarCoder-style)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        if split.get("behavior") != "Isolated" or split.get("invert", False):
            return None
        regex = (split.get("pattern") or {}).get("Regex")
        return {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}.get(regex)
    return None


def _describe(steps: list[dict[str, Any]]) -> str:
    return " + ".join(str(s.get("type")) for s in steps) or "none"


def _tokens_and_types(tok: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id (byte-level text as tokenizer.json holds it) and llama.cpp token types."""
    tt = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (text, int(tt.NORMAL)) for text, i in tok["model"]["vocab"].items()}
    for added in tok.get("added_tokens", []):
        by_id[int(added["id"])] = (added["content"], int(tt.CONTROL if added.get("special") else tt.USER_DEFINED))
    _check_size(max(by_id) + 1, n_vocab)
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", int(tt.UNUSED)))
        tokens.append(text)
        types.append(kind)
    return tokens, types


def _token_fields(model: str, pre: str, tokens: list[str], types: list[int], scores: list[float] | None) -> list[Field]:
    k, v = gguf.Keys.Tokenizer, gguf.GGUFValueType
    fields = [
        Field(k.MODEL, model, v.STRING),
        Field(k.PRE, pre, v.STRING),
        Field(k.LIST, tokens, v.ARRAY, v.STRING),
        Field(k.TOKEN_TYPE, types, v.ARRAY, v.INT32),
    ]
    if scores is not None:
        fields.append(Field(k.SCORES, scores, v.ARRAY, v.FLOAT32))
    return fields


def _special_fields(checkpoint: Path, n_vocab: int, merges: bool) -> list[Field]:
    """Merges, special token ids, add_bos/add_eos and the chat template, read by gguf's SpecialVocab."""
    k, v = gguf.Keys.Tokenizer, gguf.GGUFValueType
    special = gguf.SpecialVocab(checkpoint, load_merges=merges, n_vocab=n_vocab)
    fields = []
    if merges:
        if not special.merges:
            raise ConversionError("--gguf: tokenizer.json has no BPE merges; to resolve, save the tokenizer again")
        fields.append(Field(k.MERGES, list(special.merges), v.ARRAY, v.STRING))
    ids = {"bos": k.BOS_ID, "eos": k.EOS_ID, "unk": k.UNK_ID, "sep": k.SEP_ID, "pad": k.PAD_ID}
    ids |= {"mask": k.MASK_ID, "eot": k.EOT_ID, "eom": k.EOM_ID}
    fields += [Field(ids[t], int(i), v.UINT32) for t, i in special.special_token_ids.items() if t in ids]
    # What transformers adds is what llama.cpp must add: unset means the tokenizer adds nothing.
    adds = {"bos": False, "eos": False} | special.add_special_token
    keys = {"bos": k.ADD_BOS, "eos": k.ADD_EOS, "sep": k.ADD_SEP}
    fields += [Field(keys[t], bool(on), v.BOOL) for t, on in adds.items() if t in keys]
    if isinstance(special.chat_template, str):
        fields.append(Field(k.CHAT_TEMPLATE, special.chat_template, v.STRING))
    return fields


def _spm_vocab(checkpoint: Path, tok: dict[str, Any], n_vocab: int) -> Vocab:
    """SentencePiece-style BPE with byte fallback (Llama-2, Mistral): llama.cpp's "llama" model.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest, so each
    token's score is minus the rank of the first merge that makes it: the order tokenizer.json merges in.
    """
    tt = gguf.TokenType
    prefix = _spm_prefix(tok)
    tokens, types = _tokens_and_types(tok, n_vocab)
    unk = _unk_text(checkpoint, tok)
    for i, text in enumerate(tokens):
        if text == unk:
            types[i] = int(tt.UNKNOWN)
        elif types[i] == tt.NORMAL and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = int(tt.BYTE)
    scores = _merge_scores(tok, tokens)
    fields = _token_fields("llama", "default", tokens, types, scores)
    fields += _special_fields(checkpoint, n_vocab, merges=False)
    fields.append(Field(gguf.Keys.Tokenizer.ADD_PREFIX, prefix, gguf.GGUFValueType.BOOL))
    return Vocab(fields, source="tokenizer.json (SentencePiece-style BPE with byte fallback)")


def _unk_text(checkpoint: Path, tok: dict[str, Any]) -> str | None:
    """The unknown token: tokenizer.json's model names it, or else tokenizer_config.json does."""
    config = checkpoint / "tokenizer_config.json"
    unk = json.loads(config.read_text()).get("unk_token") if config.is_file() else None
    unk = unk.get("content") if isinstance(unk, dict) else unk
    return tok["model"].get("unk_token") or unk


def _spm_prefix(tok: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text; anything other than the two usual forms is refused."""
    pre = tok.get("pre_tokenizer") or {}
    norm = tok.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and not norm:
        return pre.get("prepend_scheme", "always") != "never"
    norm_steps = [s.get("type") for s in norm.get("normalizers", [])]
    if not pre and norm_steps in (["Prepend", "Replace"], ["Replace"]):
        return norm_steps[0] == "Prepend"
    raise ConversionError(
        "--gguf does not recognise this tokenizer's pre-tokenizer (a byte-fallback BPE with "
        f"{pre.get('type')} / {norm.get('type')}); to resolve, convert from a .gguf of this model "
        "(its tokenizer is copied as is)"
    )


def _merge_scores(tok: dict[str, Any], tokens: list[str]) -> list[float]:
    """Score = minus the rank of the first merge producing the token; tokens no merge makes score 0."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(tok["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]
