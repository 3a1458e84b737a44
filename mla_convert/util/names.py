"""How written files name local things: a file or folder by its base name, a hub id as it is.

Every file of MODEL_OUT may be uploaded to a model hub as it is, so none of them may hold the user's directory
layout or user name; only `--report-paths` puts full paths in mla_report.json, on request.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePath

READ_BYTES = 8 * 1024**2
# An absolute path in free text: /a/b, ~/a or C:\a, not inside a word, a URL or a ratio such as K/V.
ABSOLUTE = re.compile(r"(?<![\w./:~-])(?:~|[A-Za-z]:)?[/\\](?=[^\s/\\])[^\s`'\"()|,;<>]*")


def looks_local(spec: str) -> bool:
    """A local path rather than a hub id: it exists, or is written as a path (absolute, relative, home)."""
    return spec.startswith(("/", ".", "~", "\\")) or bool(re.match(r"[A-Za-z]:", spec)) or Path(spec).exists()


def public_name(spec: str) -> str:
    """A local file or folder by its base name (`./a/b/model.gguf` -> `model.gguf`); a hub id as it is."""
    if not looks_local(spec):
        return spec
    path = PurePath(spec.replace("\\", "/"))
    return path.name or Path(spec).expanduser().resolve().name


def strip_paths(text: str) -> str:
    """Free text (a warning, a reason) with every absolute path replaced by its base name."""
    return ABSOLUTE.sub(lambda m: PurePath(m.group(0).replace("\\", "/")).name or m.group(0), text)


def sha256_of(path: Path) -> str:
    """The file's sha256, read in chunks (a shard may be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
