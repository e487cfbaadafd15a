"""Standard evaluation sets kept locally: fetched once through `datasets` (online), then read offline.

Each set is stored as JSON lines `{"text": ...}` in `<cache_dir>/eval_sets/<name>.jsonl`, written to a temporary
name and renamed, so a half-downloaded set is never read.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from data.errors import DataError


@dataclass(frozen=True, kw_only=True)
class EvalSet:
    """One standard evaluation set on the Hugging Face hub."""

    hub_path: str
    """Dataset repository for datasets.load_dataset."""
    hub_config: str | None
    """Its configuration name."""
    split: str
    """The split used for evaluation."""
    description: str
    """What it measures, for listings and reports."""


EVAL_SETS: dict[str, EvalSet] = {
    # Merity et al. 2016 (arXiv:1609.07843); the raw variant keeps the original text, as bits per byte needs.
    "wikitext103_test": EvalSet(hub_path="Salesforce/wikitext", hub_config="wikitext-103-raw-v1", split="test",
                                description="WikiText-103 test articles (bits per byte, perplexity)"),
    # Paperno et al. 2016 (arXiv:1606.06031), in the OpenAI formatting GPT-2 was evaluated on.
    "lambada_test": EvalSet(hub_path="EleutherAI/lambada_openai", hub_config="default", split="test",
                            description="LAMBADA test passages (last-word accuracy)"),
}

_WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")


def eval_set_path(cache_dir: str | Path, name: str) -> Path:
    return Path(cache_dir) / "eval_sets" / f"{name}.jsonl"


def wikitext_articles(lines: list[str]) -> list[str]:
    """WikiText's one-line-per-row test split joined back into articles (a new one at each ' = Title = ')."""
    articles: list[list[str]] = []
    for line in lines:
        if _WIKITEXT_HEADING.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [text for text in ("".join(a).strip() for a in articles) if text]


def fetch_eval_set(name: str, cache_dir: str | Path) -> Path:
    """Download `name` through datasets and store its texts; DataError when offline or unknown."""
    if name not in EVAL_SETS:
        raise DataError(f"unknown evaluation set {name!r}; known: {', '.join(EVAL_SETS)}")
    spec = EVAL_SETS[name]
    import datasets

    try:
        rows = datasets.load_dataset(spec.hub_path, spec.hub_config, split=spec.split)
    except Exception as err:  # connection, offline mode and hub errors all mean "could not fetch"
        raise DataError(f"could not fetch {name} ({spec.hub_path}): {type(err).__name__}: {err}") from None
    texts = list(rows["text"])
    if name.startswith("wikitext"):
        texts = wikitext_articles(texts)
    return write_eval_set(name, texts, cache_dir)


def write_eval_set(name: str, texts: list[str], cache_dir: str | Path) -> Path:
    path = eval_set_path(cache_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for text in texts:
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_eval_set(name: str, cache_dir: str | Path, max_documents: int | None = None) -> list[str] | None:
    """The stored texts of `name`, or None when it has not been fetched."""
    path = eval_set_path(cache_dir, name)
    if not path.is_file():
        return None
    texts = []
    with path.open(encoding="utf-8") as rows:
        for line in rows:
            texts.append(json.loads(line)["text"])
            if max_documents is not None and len(texts) >= max_documents:
                break
    return texts


def lambada_split(text: str) -> tuple[str, str]:
    """(context, ' ' + last word) of a LAMBADA passage: the target is the final whitespace-separated word."""
    context, _, word = text.rstrip().rpartition(" ")
    if not context:
        raise DataError(f"LAMBADA passage without a context: {text[:60]!r}")
    return context, " " + word


def hub_reachable(timeout_s: float = 5.0) -> tuple[bool, str]:
    """(whether the Hugging Face hub can be reached, why not). Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE /
    TRANSFORMERS_OFFLINE) answers at once; otherwise one TCP connection to the hub's endpoint decides, so that an
    offline machine fails in seconds instead of after datasets' retries (~23 s per file)."""
    import socket
    from urllib.parse import urlparse

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes", "on"):
            return False, f"{variable} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as err:
        return False, f"cannot connect to {host}:443 ({err})"
    return True, ""
