"""Resolve MODEL_IN (local directory, hub id or .gguf file) and give lazy access to its tensors.

Safetensors checkpoints are read one tensor at a time with positioned reads (safetensors_io), so
converting never needs the whole model in memory. Pickle weights (.bin/.pt) can run code when loaded
and are refused unless the user allows them; then they are loaded with `torch.load(weights_only=True,
mmap=True)`, which unpickles only tensors and containers. GGUF files are checked and configured from
their header alone; the tensors are dequantized through transformers' GGUF support (which materialises the
model once) only when first needed.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError, first_line
from ..util.safetensors_io import SafetensorsError, TensorFile, read_header
from .gguf_header import gguf_tensor_shapes
from .paths import check_model_in

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class Source:
    """A resolved source checkpoint: its config, where it lives and how to read tensors by name."""

    label: str  # what the user passed, for reports
    root: Path  # directory holding config/tokenizer files
    config: Any  # a transformers PretrainedConfig
    gguf_file: str | None = None
    _shards: dict[str, Path] = field(default_factory=dict)  # tensor name -> shard file
    _files: dict[Path, Any] = field(default_factory=dict, repr=False)  # TensorFile, or a pickle state dict
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # GGUF: in memory once loaded
    _gguf_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # GGUF header, torch order
    _hub_parameters: int | None = field(default=None, repr=False)  # a dry run of a hub id reads no header
    _model: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    def names(self) -> list[str]:
        tensors = self._in_memory()
        return list(tensors) if tensors is not None else list(self._shards)

    @property
    def gguf_path(self) -> Path | None:
        """The input .gguf file (None for other inputs)."""
        return None if self.gguf_file is None else self.root / self.gguf_file

    @property
    def streams(self) -> bool:
        """Whether `get` reads a fresh tensor from disk each time (which the caller then owns)."""
        return self.gguf_file is None and self._tensors is None

    def parameter_count(self) -> int:
        """Elements over all tensors, from the shard (or GGUF) headers (nothing is read)."""
        if self.gguf_file is not None:
            return sum(math.prod(shape) for shape in self._gguf_shapes.values())
        if self._tensors is not None:
            return sum(t.numel() for t in self._tensors.values())
        if not self._shards and self._hub_parameters is not None:
            return self._hub_parameters
        total = 0
        for path in sorted(set(self._shards.values())):
            file = self._files.get(path)
            if file is None:
                file = self._files[path] = _open_weights(path)
            if isinstance(file, TensorFile):
                total += sum(math.prod(e.shape) for e in file.entries.values())
            else:
                total += sum(t.numel() for t in file.values())
        return total

    def has(self, name: str) -> bool:
        tensors = self._in_memory()
        return name in (tensors if tensors is not None else self._shards)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor; a missing name or a damaged shard becomes a ConversionError."""
        tensors = self._in_memory()
        if tensors is not None:
            if name not in tensors:
                raise ConversionError(f"tensor '{name}' is missing from {self.label}")
            return tensors[name]
        path = self._shards.get(name)
        if path is None:
            raise ConversionError(f"tensor '{name}' is missing from {self.label}")
        try:
            file = self._files.get(path)
            if file is None:
                file = self._files[path] = _open_weights(path)
            return file.get(name) if isinstance(file, TensorFile) else file[name].clone()
        except ConversionError:
            raise
        except Exception as exc:  # safetensors raises several types for damaged files
            raise ConversionError(f"cannot read tensor '{name}' from {path.name}: {first_line(exc)}") from exc

    def model(self) -> Any:
        """The source as a float32 transformers model (kept after the first call)."""
        if self._model is None and self.gguf_file is not None:
            self._load_gguf()
        if self._model is None:
            from transformers import AutoModelForCausalLM

            if any(path.suffix in PICKLE_SUFFIXES for path in self._shards.values()):
                # from_pretrained would unpickle with its own settings; fill the model from our safe reads
                model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
                state = {name: self.get(name).float() for name in self.names()}
                missing, unexpected = model.load_state_dict(state, strict=False)
                if unexpected or [n for n in missing if n != "lm_head.weight"]:
                    raise ConversionError(f"the weights of {self.label} do not match its config")
                if "lm_head.weight" in missing:
                    model.tie_weights()
                self._model = model.eval()
            else:
                self._model = AutoModelForCausalLM.from_pretrained(str(self.root), dtype=torch.float32).eval()
        return self._model

    def _in_memory(self) -> dict[str, torch.Tensor] | None:
        """Tensors held in memory (a GGUF's, dequantized on first use); None for checkpoints read tensor by tensor."""
        if self._tensors is None and self.gguf_file is not None:
            self._load_gguf()
        return self._tensors

    def _load_gguf(self) -> None:
        path = self.gguf_path
        assert path is not None
        log.info("dequantizing %s", path.name)
        try:
            model = _load_gguf_tensors(path)
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"cannot load GGUF file {path}: {first_line(exc)}") from exc
        tensors = {k: v.detach() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            tensors.pop("lm_head.weight", None)
        self._tensors, self._model = tensors, model.eval()

    def tokenizer(self) -> Any:
        """The source tokenizer, or None when the checkpoint ships none."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.root), gguf_file=self.gguf_file)
            except Exception as exc:
                log.info("no usable tokenizer in %s: %s", self.label, first_line(exc))
                self._tokenizer = False
        return self._tokenizer or None

    def tokenizer_files(self) -> Iterator[Path]:
        for name in TOKENIZER_FILES:
            if (self.root / name).is_file():
                yield self.root / name

    def generation_config_file(self) -> Path | None:
        path = self.root / "generation_config.json"
        return path if path.is_file() else None


def resolve(model_in: str, allow_pickle: bool = False, weights: bool = True) -> Source:
    """Turn MODEL_IN into a Source, checking that it is complete before any heavy work starts.

    Local inputs read only their config and tensor headers. A hub id is downloaded whole, or with
    weights=False (a dry run) only its JSON files, the parameter count then read from the hub's headers.
    """
    path = check_model_in(model_in)
    if path is not None and path.suffix.lower() == ".gguf":
        return _gguf_source(path)
    if path is not None:
        return _directory_source(path, label=str(path), allow_pickle=allow_pickle)
    if not weights:
        root = _download(model_in, patterns=["*.json"])
        source = Source(label=model_in, root=root, config=_load_config(root, model_in))
        source._hub_parameters = _hub_parameter_count(model_in)
        return source
    return _directory_source(_download(model_in), label=model_in, allow_pickle=allow_pickle)


def _hub_parameter_count(repo_id: str) -> int | None:
    """Parameters of a hub model from its safetensors headers (range requests; no weight is fetched)."""
    try:
        from huggingface_hub import get_safetensors_metadata

        return int(sum(get_safetensors_metadata(repo_id).parameter_count.values()))
    except Exception as exc:
        log.info("no parameter count for %s: %s", repo_id, first_line(exc))
        return None


def _download(repo_id: str, patterns: list[str] | None = None) -> Path:
    """Fetch config, tokenizer and safetensors of a hub model into the normal Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            allow_patterns=patterns or ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "README.md"],
        )
    except Exception as exc:
        raise ConversionError(
            f"cannot fetch '{repo_id}' from the Hugging Face hub ({first_line(exc)}); "
            "to resolve, pass a local directory or check the id and your network"
        ) from exc
    return Path(local)


def _directory_source(root: Path, label: str, allow_pickle: bool = False) -> Source:
    if not (root / "config.json").is_file():
        raise ConversionError(f"no config.json in {root}; MODEL_IN must be a Hugging Face model directory")
    config = _load_config(root, label)
    shards = _index_shards(root, label, allow_pickle)
    return Source(label=label, root=root, config=config, _shards=shards)


def _load_config(root: Path, label: str, gguf_file: str | None = None) -> Any:
    from transformers import AutoConfig

    try:
        if gguf_file is None and not isinstance(json.loads((root / "config.json").read_text()), dict):
            raise ConversionError(f"config.json in {label} is not a JSON object")
        return AutoConfig.from_pretrained(str(root), gguf_file=gguf_file)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"config.json in {label} is not valid JSON ({exc.msg})") from exc
    except (ValueError, KeyError, OSError) as exc:
        raise ConversionError(f"cannot read the config of {label}: {first_line(exc)}") from exc


def _index_shards(root: Path, label: str, allow_pickle: bool = False) -> dict[str, Path]:
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.is_file():
        shards = _weight_map(index, root, label)
        for file in sorted(set(shards.values())):
            _check_safetensors(file)
        return shards
    if single.is_file():
        return {name: single for name in _check_safetensors(single)}
    if any(root.glob("*.safetensors")):
        shards = {}
        for file in sorted(root.glob("*.safetensors")):
            shards.update({name: file for name in _check_safetensors(file)})
        return shards
    pickles = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles and not allow_pickle:
        raise ConversionError(
            f"{label} holds only pickle weights ({pickles[0].name}), which can run code when loaded; "
            "to resolve, convert them to safetensors, or pass --allow-pickle to load them with weights_only"
        )
    if pickles:
        pickle_index = root / "pytorch_model.bin.index.json"
        if pickle_index.is_file():
            return _weight_map(pickle_index, root, label)
        shards = {}
        for file in pickles:
            shards.update({name: file for name in _load_pickle(file)})
        return shards
    raise ConversionError(f"no safetensors weights in {label}")


def _weight_map(index: Path, root: Path, label: str) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = {name: root / file for name, file in weight_map.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # ValueError: bad JSON or UTF-8
        raise ConversionError(f"{index.name} in {label} is damaged ({first_line(exc)})") from exc
    for file in sorted(set(shards.values())):
        if not file.is_file():
            raise ConversionError(f"shard {file.name} listed in {index.name} is missing from {label}")
    return shards


def _open_weights(path: Path) -> Any:
    return _load_pickle(path) if path.suffix in PICKLE_SUFFIXES else TensorFile(path)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickle state dict through torch's restricted unpickler: tensors and plain containers only."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the old, non-zip format
    except pickle.UnpicklingError as exc:
        raise ConversionError(
            f"refusing {path.name}: weights_only loading found objects other than tensors in it, and "
            "unpickling them could run code; convert it to safetensors in a trusted environment"
        ) from exc
    except Exception as exc:  # damaged or not a torch file
        raise ConversionError(f"cannot load {path.name} with weights_only: {first_line(exc)}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path.name} is not a state dict of tensors")
    return state


def _check_safetensors(path: Path) -> list[str]:
    """The tensor names of a shard, after catching truncated or corrupt files up front."""
    try:
        return list(read_header(path))
    except OSError as exc:
        raise ConversionError(f"cannot read {path.name}: {first_line(exc)}") from exc
    except SafetensorsError as exc:
        text = str(exc)
        if text.startswith("truncated"):
            raise ConversionError(f"{path.name} is {text}") from exc
        raise ConversionError(f"{path.name} is not a valid safetensors file ({text})") from exc


def _gguf_source(path: Path) -> Source:
    """Check a GGUF file's header and build its config from the metadata; no tensor is read here."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ConversionError("reading .gguf needs the 'gguf' package: pip install gguf") from exc
    from .families import family_for

    shapes = gguf_tensor_shapes(path)
    root, name = path.parent, path.name
    try:
        config = _load_config(root, str(path), gguf_file=name)
    except ConversionError:
        raise
    except Exception as exc:  # gguf's reader raises several types on metadata it cannot parse
        raise ConversionError(f"cannot read the config of {path}: {first_line(exc)}") from exc
    family_for(config, allow_full_attention=True)  # the plan judges the window, with the user's flag
    return Source(label=str(path), root=root, config=config, gguf_file=name, _gguf_shapes=shapes)


def _load_gguf_tensors(path: Path) -> Any:
    """Dequantize every tensor of a GGUF file into a float32 transformers model (the one heavy read)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
