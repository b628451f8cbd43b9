"""Imports flow one way: `model/` never imports discord, aiosqlite, dotenv or bot (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
