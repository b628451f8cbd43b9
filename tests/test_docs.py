"""Every repository path that the README, docs/ and the code's docstrings and comments name exists.

A moved or deleted file leaves its old name behind in prose; this finds it. Paths are matched by their
leading folder (bot/, model/, tests/, scripts/, docs/, deploy/) or as a top-level file; a path with a
placeholder (`<name>`, `N`, `…`) or a glob is skipped. docs/benchmarks-history.md is a dated record
whose paths are those of its time, so it is not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("bot", "model", "tests", "scripts", "docs", "deploy", ".ci")
TOP_LEVEL_FILES = ("README.md", "BENCHMARKS.md", "Makefile", "pyproject.toml", ".env.example", "Dockerfile")
HISTORY = {"docs/benchmarks-history.md", "tests/test_docs.py"}
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(f) for f in FOLDERS) + r")/[\w./-]*[\w/])")
SKIP = re.compile(r"[<>*{}…]|/N\b|\bX\b")


def named_paths(text: str) -> set[str]:
    """The repository paths a text names (folders keep their trailing slash off)."""
    found = {match.rstrip("/.") for match in PATH.findall(text)}
    return {path for path in found if not SKIP.search(path)}


def documents() -> list[Path]:
    docs = [REPO_ROOT / name for name in ("README.md", "BENCHMARKS.md")]
    docs += sorted((REPO_ROOT / "docs").glob("*.md"))
    code = [
        p
        for folder in ("bot", "model", "scripts", "tests")
        for p in sorted((REPO_ROOT / folder).rglob("*.py"))
    ]
    return [p for p in docs + code if p.relative_to(REPO_ROOT).as_posix() not in HISTORY]


def test_the_path_pattern_finds_what_prose_names() -> None:
    text = "see `model/serving/worker.py`, bot/cogs/ and (docs/ARCHITECTURE.md), not model.serving or a/bot/x"
    assert named_paths(text) == {"model/serving/worker.py", "bot/cogs", "docs/ARCHITECTURE.md"}


def test_a_missing_path_is_reported(tmp_path: Path) -> None:
    assert missing_paths("read docs/NO-SUCH-FILE.md") == ["docs/NO-SUCH-FILE.md"]


def missing_paths(text: str) -> list[str]:
    return sorted(path for path in named_paths(text) if not (REPO_ROOT / path).exists())


@pytest.mark.parametrize("document", documents(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_named_path_exists(document: Path) -> None:
    assert missing_paths(document.read_text(encoding="utf-8")) == []


TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


@pytest.mark.parametrize("document", sorted((REPO_ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_named_test_exists(document: Path) -> None:
    """docs/RELIABILITY.md names tests as path::name: each such test is defined in that file."""
    text = document.read_text(encoding="utf-8")
    missing = [
        f"{path}::{name}"
        for path, name in TEST_REFERENCE.findall(text)
        if f"def {name}(" not in (REPO_ROOT / path).read_text(encoding="utf-8")
    ]
    assert missing == []
