"""The model card (README.md) can be published on the Hugging Face Hub as it is: Hub metadata in its YAML
front matter, the source's license when the source declares one, and no local path anywhere."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest

from mla_convert import Options, convert
from mla_convert.report.card import TAGS, model_card
from mla_convert.report.report import source_facts
from mla_convert.source.checkpoint import resolve

from .helpers import front_matter

CHEAP = {"verify": False, "method": "svd", "finetune_steps": 0, "validate": False}
HUB_ID = "HuggingFaceTB/SmolLM2-135M"


def write_source(src, readme: str | None = None, **config_keys) -> None:
    if readme is not None:
        (src / "README.md").write_text(readme)
    config = json.loads((src / "config.json").read_text())
    config.update(config_keys)
    (src / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def hub_copy(tiny_models, tmp_path_factory):
    """A local copy saved from the hub: its README declares a license, its config.json names its repo."""
    root = tmp_path_factory.mktemp("card")
    src = root / "SmolLM2-135M-copy"
    shutil.copytree(tiny_models["llama_gqa_tied"], src)
    write_source(src, "---\nlicense: apache-2.0\nlanguage:\n- en\n---\n\n# SmolLM2\n", _name_or_path=HUB_ID)
    (root / "out").mkdir()
    out = root / "out" / "SmolLM2-135M-mla"
    report = convert(src, out, Options(**CHEAP))
    return src, out, report


def test_front_matter_has_hub_metadata_and_the_source_license(hub_copy) -> None:
    _, out, report = hub_copy
    meta = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"mla", "deepseek_v3", "kv-cache-compression", "mla-convert"} <= set(meta["tags"]) == set(TAGS)
    assert meta["license"] == "apache-2.0"  # from the source's README.md
    assert meta["base_model"] == HUB_ID  # from config.json's _name_or_path
    assert "base_model_relation" not in meta  # the Hub infers it; no documented value names a conversion
    source = report["source"]
    assert (source["name"], source["hub_id"], source["license"]) == ("SmolLM2-135M-copy", HUB_ID, "apache-2.0")


def test_card_of_a_local_source_holds_no_local_path(hub_copy) -> None:
    src, out, _ = hub_copy
    card = (out / "README.md").read_text()
    for local in (src, src.parent, out.parent):
        assert str(local) not in card
    assert "Source: `SmolLM2-135M-copy`" in card
    # serving table rows keep their three cells (a `|` inside a cell is escaped)
    rows = [line for line in card.splitlines() if line.startswith(("| vLLM |", "| llama.cpp |"))]
    assert rows and all(len(re.findall(r"(?<!\\)\|", row)) == 4 for row in rows)


def test_text_files_and_warnings_are_named_without_their_directories(hub_copy, tmp_path) -> None:
    """Calibration and evaluation text given as local files, and warnings that quote paths."""
    src, _, report = hub_copy
    data = tmp_path / "corpus" / "calib.txt"
    r = copy.deepcopy(report)
    r["calibration"] = {"method": "activation", "source": str(data), "tokens": 1024}
    r["validation"] = {
        "text": f"{data} (held-out tail)",
        "tokens": 512,
        "models": [
            {
                "model": "source",
                "perplexity": 9.0,
                "perplexity_ratio": 1.0,
                "kl_to_source": None,
                "top1_agreement": None,
            },
            {
                "model": "converted",
                "perplexity": 9.9,
                "perplexity_ratio": 1.1,
                "kl_to_source": 0.05,
                "top1_agreement": 0.9,
            },
        ],
    }
    r["warnings"] = [f"{data} gave 512 calibration tokens, fewer than asked", f"read {src}/config.json"]
    card = model_card(r, "SmolLM2-135M-mla")
    assert str(tmp_path) not in card and str(src.parent) not in card
    assert "calibrated on 1024 tokens of `calib.txt`" in card
    assert "Measured on 512 tokens of the held-out tail of `calib.txt`, unseen by calibration" in card
    assert "| converted | 9.900 | 1.100 | 0.0500 | 90.0% |" in card
    assert "- calib.txt gave 512 calibration tokens" in card and "read config.json" in card
    r["source"]["path"] = str(src)  # a report written with --report-paths: its path becomes the source's name
    assert "read SmolLM2-135M-copy/config.json" in model_card(r, "SmolLM2-135M-mla")


def test_hub_id_source_is_the_base_model(hub_copy) -> None:
    _, _, report = hub_copy
    r = copy.deepcopy(report)
    r["source"].update(path=HUB_ID, name=HUB_ID, hub_id=HUB_ID, license=None)
    card = model_card(r, "SmolLM2-135M-mla")
    meta = front_matter(card)
    assert meta["base_model"] == HUB_ID and "license" not in meta
    assert f"conversion of [`{HUB_ID}`](https://huggingface.co/{HUB_ID})" in card
    # a report written before source.name/hub_id/license existed
    for key in ("name", "hub_id", "license"):
        del r["source"][key]
    assert front_matter(model_card(r, "x"))["base_model"] == HUB_ID
    r["source"]["path"] = "/root/models/SmolLM2-135M"
    card = model_card(r, "x")
    assert "base_model" not in front_matter(card) and "/root/" not in card and "`SmolLM2-135M`" in card


def test_undeclared_license_and_repo_are_omitted_not_guessed(tiny_models) -> None:
    src = tiny_models["llama_gqa_tied"]  # saved by save_pretrained: no README, no _name_or_path
    facts = source_facts(resolve(str(src)))
    assert facts == {"name": src.name, "hub_id": None, "license": None}


def test_license_other_keeps_its_name_and_links_the_source_repo(tiny_models, tmp_path) -> None:
    src = tmp_path / "llama-copy"
    shutil.copytree(tiny_models["llama_gqa_tied"], src)
    readme = "---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n---\n"
    write_source(src, readme, _name_or_path="meta-llama/Meta-Llama-3-8B")
    facts = source_facts(resolve(str(src)))
    link = "https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/LICENSE"
    assert facts["license"] == "other" and facts["license_name"] == "llama3" and facts["license_link"] == link
    # no README: config.json's license; a _name_or_path that is a local path is no hub id
    (src / "README.md").unlink()
    write_source(src, license="mit", _name_or_path=str(tmp_path / "elsewhere" / "model"))
    assert source_facts(resolve(str(src))) == {"name": "llama-copy", "hub_id": None, "license": "mit"}
