"""An output folder can be uploaded as it is: no written file (report, card, configs, tokenizer, plots, GGUF,
the training state of an unfinished fine-tune) holds a local path. Sources and texts are named by base name,
texts also by byte count and sha256; `--report-paths` puts full paths in the report, and only there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mla_convert import Hooks, Options, TrainSettings, convert
from mla_convert.write.writer import TMP_PREFIX

from .helpers import build_text_model, documents, write_txt

TRAINED = dict(
    kv_budget=0.5,
    calib_tokens=1024,
    calib_seq_len=32,
    eval_tokens=256,
    finetune_steps=2,
    train_tokens=1024,
    save_every=1,
    gguf="f32",
)
TRAIN = dict(seq_len=32, batch_size=4, micro_batch_size=2, warmup_steps=1)


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A model and its text deep inside folders whose names must not leak: (that folder, model, text)."""
    root = tmp_path_factory.mktemp("leak") / "home-of-someone" / "private projects" / "deeply" / "nested"
    root.mkdir(parents=True)
    return root, build_text_model(root), write_txt(root / "my-notes.txt", documents(200, seed=5))


def converted(model: Path, text: Path, out: Path, hooks: Hooks | None = None, **settings: object) -> dict:
    """Convert and fine-tune on `text` (TRAINED, with `settings`, named as the flags, on top)."""
    options = Options(**TRAINED, calib_data=str(text), train_data=str(text), train=TrainSettings(**TRAIN))
    return convert(model, out, options, hooks=hooks, **settings)


def leaks(out: Path, *needles: str) -> list[str]:
    """Every file under `out` (hidden ones too, read as bytes) that holds one of the needles."""
    found = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.relative_to(out)}: {n}" for n in needles if n.encode() in data]
    return found


def forbidden(root: Path) -> tuple[str, ...]:
    home = str(Path.home())
    return (str(root), "home-of-someone", "private projects", TMP_PREFIX, *([home + "/"] if home != "/" else []))


def test_no_written_file_holds_a_local_path(nested: tuple[Path, Path, Path]) -> None:
    root, model, text = nested
    out = root / "published"
    report = converted(model, text, out)
    assert leaks(out, *forbidden(root)) == []
    assert report["source"]["name"] == "llama_with_tokenizer" and "path" not in report["source"]
    data = text.read_bytes()
    assert report["texts"] == [{"name": "my-notes.txt", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    assert report["calibration"]["source"] == report["finetune"]["text"] == "my-notes.txt"
    assert report["validation"]["text"] == "my-notes.txt (held-out tail)"
    assert {"model.safetensors", "published-f32.gguf", "README.md"} <= set(report["files"])


def test_an_unfinished_fine_tune_holds_no_local_path(nested: tuple[Path, Path, Path]) -> None:
    """MODEL_OUT of an interrupted fine-tune: the converted model, its pending report and the training state."""
    root, model, text = nested
    out = root / "interrupted"

    def stop(info: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        converted(model, text, out, Hooks(on_step=stop))
    assert list((out / ".finetune" / "checkpoints").glob("step-*")), "a training checkpoint should be kept"
    assert leaks(out, *forbidden(root)) == []


def test_report_paths_puts_full_paths_in_the_report_only(nested: tuple[Path, Path, Path]) -> None:
    root, model, text = nested
    out = root / "with-paths"
    report = converted(model, text, out, report_paths=True, finetune_steps=0, gguf=None, validate=False)
    written = json.loads((out / "mla_report.json").read_text())
    assert written["source"]["path"] == str(model.resolve())
    assert written["texts"][0]["path"] == str(text.resolve()) and report["texts"] == written["texts"]
    assert leaks(out, str(root)) == ["mla_report.json: " + str(root)]
