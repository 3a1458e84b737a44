"""A GGUF source's card publishes what the file itself states: `general.license`, the base models it names by
repository, and its model name in the title; nothing is guessed (names and organizations are display titles,
never joined into a hub id), and a README.md that happens to lie beside the file is not the model's."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from mla_convert.report.lineage import gguf_facts, hub_id_of

from .helpers import front_matter, write_llama_gguf

CHEAP = ("--no-verify", "--method", "svd", "--finetune-steps", "0", "--no-validate")


def smollm2_like(writer: gguf.GGUFWriter) -> None:
    """The keys llama.cpp's converter writes for a fine-tune of a hub model."""
    writer.add_organization("HuggingFaceTB")
    writer.add_basename("smollm2")
    writer.add_size_label("135M")
    writer.add_finetune("instruct")
    writer.add_license("apache-2.0")
    writer.add_base_model_count(2)
    writer.add_base_model_name(0, "SmolLM2 135M")
    writer.add_base_model_organization(0, "HuggingFaceTB")
    writer.add_base_model_repo_url(0, "https://huggingface.co/HuggingFaceTB/SmolLM2-135M")
    writer.add_base_model_name(1, "Some Merge")  # named, with no repository: text only
    writer.add_base_model_organization(1, "Someone")


def convert_beside(cli, gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """`mla-convert model.gguf model-mla` in the GGUF's folder, as a new user does; returns the card."""
    monkeypatch.chdir(gguf_file.parent)
    result = cli(gguf_file.name, "model-mla", *CHEAP)
    assert result.exit_code == 0, result.output
    return (gguf_file.parent / "model-mla" / "README.md").read_text()


def test_card_of_a_gguf_publishes_its_license_base_model_and_name(cli, tmp_path, monkeypatch) -> None:
    gguf_file = write_llama_gguf(tmp_path / "model.gguf", describe=smollm2_like)
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# the user's own project\n")  # not the model's
    card = convert_beside(cli, gguf_file, monkeypatch)
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"  # the one base model stated by repository
    assert "\n# model-mla: tiny llama in Multi-head Latent Attention\n" in card  # the title
    assert "*tiny llama* by HuggingFaceTB" in card
    assert "[`HuggingFaceTB/SmolLM2-135M`](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)" in card
    assert "Some Merge by Someone" in card and "Someone/" not in card
    assert "License: `apache-2.0`, as the source declares it" in card


def test_a_gguf_that_states_no_repository_gets_no_base_model(cli, tmp_path, monkeypatch) -> None:
    def named_only(writer: gguf.GGUFWriter) -> None:
        writer.add_organization("HuggingFaceTB")
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, "SmolLM2 135M")
        writer.add_base_model_organization(0, "HuggingFaceTB")

    card = convert_beside(cli, write_llama_gguf(tmp_path / "model.gguf", describe=named_only), monkeypatch)
    meta = front_matter(card)
    assert "base_model" not in meta and "license" not in meta
    assert "declares none" in card and "SmolLM2 135M by HuggingFaceTB" in card


def test_name_falls_back_to_basename_and_size_and_links_only_hub_urls() -> None:
    facts = gguf_facts(
        {
            "general.basename": "smollm2",
            "general.size_label": "135M",
            "general.license": "other",
            "general.license.name": "custom",
            "general.license.link": "LICENSE",  # a file of some repository: not a link anyone can follow
            "general.source.huggingface.repository": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "general.base_model.0.repo_url": "https://github.com/someone/model",
        }
    )
    assert facts["model_name"] == "smollm2 135M"
    assert (facts["license"], facts["license_name"]) == ("other", "custom") and "license_link" not in facts
    assert facts["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert facts["base_models"] == [{"name": None, "organization": None, "hub_id": None}]
    assert hub_id_of("https://huggingface.co/datasets/org/data") is None
    assert hub_id_of("https://hf.co/org/model/") == "org/model"
    assert gguf_facts({}) == {}
