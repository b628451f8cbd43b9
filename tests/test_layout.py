"""The layout holds: `model/` never imports discord, aiosqlite, dotenv or bot (docs/ARCHITECTURE.md), no
import cycle among the modules of bot/ and model/, model/fastgen/ stands alone, and no file over 400 lines
without a reason.
"""

from __future__ import annotations

import ast
import graphlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_MODEL = ("discord", "aiosqlite", "dotenv", "bot")

# Runs in a fresh interpreter: a meta-path finder makes every forbidden import fail loudly, then every
# module under model/ is imported. Prints the imported module names as JSON.
IMPORT_EVERY_MODEL_MODULE = """
import importlib, importlib.abc, json, pkgutil, sys

FORBIDDEN = {forbidden!r}

class Forbidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"model/ must not import {{name}}")
        return None

sys.meta_path.insert(0, Forbidden())
import model
names = ["model"] + [info.name for info in pkgutil.walk_packages(model.__path__, "model.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({{"imported": names, "loaded": sorted(sys.modules)}}))
"""

# What bot/ imports at start-up from model/: the interface must stay light (no torch, no transformers).
IMPORT_INTERFACE = """
import json, sys
import model.api, model.prompt, model.sampling, model.engine
print(json.dumps(sorted(sys.modules)))
"""


def run_python(code: str) -> str:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_model_package_never_imports_discord_or_bot() -> None:
    report = json.loads(run_python(IMPORT_EVERY_MODEL_MODULE.format(forbidden=set(FORBIDDEN_IN_MODEL))))
    assert {"model.loading", "model.prompt", "model.api"} <= set(report["imported"])
    leaked = [name for name in report["loaded"] if name.split(".")[0] in FORBIDDEN_IN_MODEL]
    assert leaked == []


def test_forbidden_import_would_be_caught() -> None:
    """The guard itself works: forbidding torch, which model/loading.py does import, fails the run."""
    with pytest.raises(AssertionError, match="model/ must not import torch"):
        run_python(IMPORT_EVERY_MODEL_MODULE.format(forbidden={"torch"}))


def test_interface_modules_stay_light() -> None:
    loaded = set(json.loads(run_python(IMPORT_INTERFACE)))
    assert not {"torch", "transformers", "discord"} & loaded


# -- the import graph, read from the source (TYPE_CHECKING and function-level imports included) ----------

SOURCE_PACKAGES = ("bot", "model")
MAX_LINES = 400
LONG_REASON = "Long because:"
REASON_WITHIN_DOCSTRING_LINES = 5


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name → file, for every .py under the given top-level packages of `root`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name `from ... import` names, relative imports resolved against `module`."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest known module that `name` is or lies inside (None for anything outside the tree)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imported_modules(module: str, modules: Mapping[str, Path]) -> set[str]:
    """The modules of the tree that `module` imports anywhere in its file.

    `from package import name` counts as importing `package.name` when that is a module, else `package`.
    A package's `__init__` that Python runs on the way to a submodule is not counted as imported.
    """
    path = modules[module]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path.name == "__init__.py", node)
            found.update(
                _known(f"{base}.{alias.name}", modules) or _known(base, modules) for alias in node.names
            )
    return {name for name in found if name is not None and name != module}


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module → the tree's modules it imports."""
    modules = module_files(root, packages)
    return {module: imported_modules(module, modules) for module in modules}


def import_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph has none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def edges_between(graph: Mapping[str, set[str]], sources: str, targets: tuple[str, ...]) -> list[str]:
    """`a → b` for every import from a module under `sources` into one under any of `targets`."""
    return sorted(
        f"{a} → {b}"
        for a, imported in graph.items()
        if _inside(a, sources)
        for b in imported
        if any(_inside(b, target) for target in targets)
    )


def _inside(module: str, package: str) -> bool:
    """Whether `module` is `package` or one of its submodules."""
    return module == package or module.startswith(package + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO_ROOT, SOURCE_PACKAGES)


def test_no_import_cycle_in_bot_or_model(graph: dict[str, set[str]]) -> None:
    assert {"bot.chatbot", "bot.cogs.common", "model.fastgen.engine"} <= set(graph)
    assert "bot.chatbot" in graph["bot.cogs.common"] and "bot.storage" in graph["bot.conversation"]
    assert import_cycle(graph) is None


def test_model_never_imports_bot_and_fastgen_stands_alone(graph: dict[str, set[str]]) -> None:
    assert edges_between(graph, "model", ("bot",)) == []
    assert edges_between(graph, "model.fastgen", ("model.serving", "model.training")) == []


def test_cycle_check_catches_a_planted_cycle(tmp_path: Path) -> None:
    """A cycle closed only by a TYPE_CHECKING import is found; the same tiny tree without it passes."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "sub" / "__init__.py").write_text("from pkg.sub import leaf\n")
    (package / "sub" / "leaf.py").write_text("X = 1\n")
    (package / "a.py").write_text("from pkg import b\nfrom pkg.sub.leaf import X\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n"
    )
    planted = import_cycle(import_graph(tmp_path, ("pkg",)))
    assert planted is not None and set(planted) == {"pkg.a", "pkg.b"}
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import leaf\n"
    )
    assert import_cycle(import_graph(tmp_path, ("pkg",))) is None


def test_edges_between_finds_a_forbidden_import(tmp_path: Path) -> None:
    """The one-way checks are not vacuous: a planted model → bot import is reported."""
    for (package, name), text in {
        ("model", "__init__.py"): "",
        ("model", "m.py"): "def f():\n    import bot.x\n",
        ("bot", "__init__.py"): "",
        ("bot", "x.py"): "",
    }.items():
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / name).write_text(text)
    assert edges_between(import_graph(tmp_path, ("bot", "model")), "model", ("bot",)) == ["model.m → bot.x"]


# -- file size ------------------------------------------------------------------------------------------


def long_without_reason(root: Path, packages: tuple[str, ...], max_lines: int) -> list[str]:
    """Files over `max_lines` whose module docstring does not open with a "Long because:" line."""
    found = []
    for path in module_files(root, packages).values():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") <= max_lines:
            continue
        docstring = ast.get_docstring(ast.parse(text)) or ""
        opening = docstring.splitlines()[:REASON_WITHIN_DOCSTRING_LINES]
        if not any(line.startswith(LONG_REASON) for line in opening):
            found.append(f"{path.relative_to(root)} ({text.count(chr(10))} lines)")
    return sorted(found)


def test_no_source_file_over_400_lines_without_a_reason() -> None:
    assert long_without_reason(REPO_ROOT, SOURCE_PACKAGES, MAX_LINES) == []


def test_size_check_catches_a_long_file_and_accepts_a_reason(tmp_path: Path) -> None:
    (tmp_path / "bot").mkdir()
    body = "X = 1\n" * 5
    (tmp_path / "bot" / "long.py").write_text('"""A long module."""\n' + body)
    (tmp_path / "bot" / "justified.py").write_text(
        '"""A long module.\n\nLong because: a reason.\n"""\n' + body
    )
    (tmp_path / "bot" / "short.py").write_text("X = 1\n")
    assert long_without_reason(tmp_path, ("bot",), max_lines=4) == [f"{Path('bot', 'long.py')} (6 lines)"]
