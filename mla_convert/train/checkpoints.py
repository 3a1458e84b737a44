"""Training checkpoints: the trainable parameters (safetensors), optimizer and schedule state, history.

Each checkpoint is written into a temporary directory and renamed into place, so a run killed while
saving leaves the previous checkpoint usable. Only the newest two are kept. State files are read with
`weights_only=True`: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConversionError
from ..util import signals

PREFIX = "step-"
KEEP = 2


def step_of(path: Path | None) -> int | None:
    return int(path.name[len(PREFIX) :]) if path is not None else None


def all_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{PREFIX}*") if p.name[len(PREFIX) :].isdigit() and (p / "meta.json").is_file()]
    return sorted(found, key=step_of)


def latest(directory: Path) -> Path | None:
    found = all_checkpoints(directory)
    return found[-1] if found else None


def save(
    directory: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    settings: Any,
    losses: list[float],
    lrs: list[float],
) -> Path:
    final = directory / f"{PREFIX}{step:06d}"
    tmp = directory / f".{final.name}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with signals.partial(lambda: shutil.rmtree(tmp, ignore_errors=True)):
            params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(params, str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "state.pt")
            meta = {"step": step, "settings": settings.fingerprint(), "losses": losses, "lrs": lrs}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            with signals.committing():
                tmp.rename(final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "no space left on the device" if exc.errno == 28 else str(exc)
        raise ConversionError(
            f"cannot save the training checkpoint in {directory}: {why}. "
            "The converted model from before training is unchanged"
        ) from exc
    for old in all_checkpoints(directory)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model: Any, optimizer: Any, scheduler: Any, settings: Any) -> dict[str, Any]:
    """Restore a checkpoint into the model and optimizer; refuse one made with other settings."""
    meta = json.loads((path / "meta.json").read_text())
    mine = settings.fingerprint()
    differ = sorted(k for k in set(mine) | set(meta["settings"]) if mine.get(k) != meta["settings"].get(k))
    if differ:
        raise ConversionError(
            f"--resume: the checkpoint in {path} was made with different settings ({', '.join(differ)}); "
            "resume with the same flags or start again without --resume"
        )
    params = load_file(str(path / "trainable.safetensors"))
    current = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            current[name].copy_(value)
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return meta
