"""The sha256 of every file written into MODEL_OUT, recorded in mla_report.json so that a copy of the folder (an
upload, a download, a disk) can be checked against what the run wrote, file by file.

The report cannot hash itself, and hidden entries (`.finetune/`, the training state of an unfinished fine-tune,
and files a hub client adds such as `.gitattributes`) are not part of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..util.names import sha256_of

REPORT = "mla_report.json"


def published_files(directory: Path) -> list[Path]:
    """The files of the output, sorted: everything but the report and hidden entries."""
    found = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and relative.as_posix() != REPORT and not any(p.startswith(".") for p in relative.parts):
            found.append(path)
    return found


def file_hashes(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative name: {bytes, sha256}} of every published file under `directory`."""
    return {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in published_files(directory)
    }


def mismatches(directory: Path, recorded: dict[str, dict[str, Any]]) -> list[str]:
    """One phrase per recorded file that is missing, of another size (cut short, grown) or of other content."""
    problems = []
    for name, facts in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != facts["bytes"]:
            cut = "truncated" if size < facts["bytes"] else "longer than written"
            problems.append(f"{name} is {cut}: {size} bytes, {facts['bytes']} written")
        elif sha256_of(path) != facts["sha256"]:
            problems.append(f"{name} was modified: its sha256 differs from the one written")
    return problems
