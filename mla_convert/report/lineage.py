"""What a GGUF file states about its own model, for the report and the model card: its name, license and lineage.

GGUF files carry llama.cpp's `general.*` metadata (gguf-py's `Keys.General`): `general.name`, `basename`,
`size_label`, `organization`, `finetune`, `license` (with `license.name` / `license.link` for `other`), the
repository it was converted from (`source.huggingface.repository`, `source.repo_url`) and its base models
(`base_model.N.name` / `.organization` / `.repo_url`). A hub id is taken only where the file states one (a
repository or a huggingface.co URL); names and organizations are display titles ("Smollm2 135M"), never
joined into a guessed id.
"""

from __future__ import annotations

import re
from typing import Any

HUB_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*)/?$")
OWNED_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*$")  # a hub id with its owner: "org/name"
NOT_MODELS = ("datasets/", "spaces/")
MAX_BASE_MODELS = 64


def hub_id_of(value: object) -> str | None:
    """`org/name` from a huggingface.co model URL or an `org/name` string; None for anything else."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    match = HUB_URL.match(text)
    found = match.group(1) if match else (text if OWNED_HUB_ID.match(text) else None)
    return None if found is None or found.startswith(NOT_MODELS) else found


def gguf_facts(general: dict[str, Any]) -> dict[str, Any]:
    """The report's source facts a GGUF states: model_name, organization, license (license_name, license_link),
    hub_id (the repository it was converted from) and base_models [{name, organization, hub_id}]."""

    def text(key: str) -> str | None:
        value = general.get(f"general.{key}")
        return value.strip() if isinstance(value, str) and value.strip() else None

    facts: dict[str, Any] = {}
    name = text("name") or " ".join(part for part in (text("basename"), text("size_label")) if part) or None
    if name:
        facts["model_name"] = name
    if text("organization"):
        facts["organization"] = text("organization")
    if text("license"):
        facts["license"] = text("license")
        if text("license.name"):
            facts["license_name"] = text("license.name")
        link = text("license.link")
        if link and link.startswith(("http://", "https://")):
            facts["license_link"] = link
    repo = hub_id_of(text("source.huggingface.repository")) or hub_id_of(text("source.repo_url"))
    repo = repo or hub_id_of(text("source.url"))
    if repo:
        facts["hub_id"] = repo
    count = general.get("general.base_model.count")
    bases = []
    for i in range(min(count, MAX_BASE_MODELS) if isinstance(count, int) else MAX_BASE_MODELS):
        entry = {key: text(f"base_model.{i}.{key}") for key in ("name", "organization", "repo_url")}
        if not any(entry.values()):
            if isinstance(count, int):
                continue
            break
        hub_id = hub_id_of(entry["repo_url"])
        bases.append({"name": entry["name"], "organization": entry["organization"], "hub_id": hub_id})
    if bases:
        facts["base_models"] = bases
    return facts
