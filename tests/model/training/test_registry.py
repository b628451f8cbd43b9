"""The model registry: versions, atomic registry.json, promote/refuse/rollback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from model.training.registry import (
    NoPreviousVersion,
    PromotionRefused,
    Registry,
    RegistryError,
    UnknownVersion,
    current_source,
    is_worse,
)
from tests.helpers.models import fake_model_dir


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def test_empty_registry(registry: Registry) -> None:
    assert registry.versions() == []
    assert registry.current() is None
    assert current_source(registry.models_dir) is None
    with pytest.raises(NoPreviousVersion):
        registry.rollback()


def test_add_copies_and_names_versions_in_order(registry: Registry, tmp_path: Path) -> None:
    first = registry.add(fake_model_dir(tmp_path / "run1", "a"), at=100.0)
    second = registry.add(fake_model_dir(tmp_path / "run2", "b"), at=200.0)
    named = registry.add(fake_model_dir(tmp_path / "run3", "c"), name="june-finetune", at=300.0)
    assert [v.name for v in registry.versions()] == ["v1", "v2", "june-finetune"]
    assert first.path == registry.models_dir / "versions" / "v1"
    assert (second.path / "model.safetensors").read_bytes() == b"weights-b"
    assert named.card["marker"] == "c"
    assert (tmp_path / "run1").is_dir()  # copied, not moved


def test_add_move_removes_the_source(registry: Registry, tmp_path: Path) -> None:
    version = registry.add(fake_model_dir(tmp_path / "run", "m"), move=True)
    assert not (tmp_path / "run").exists()
    assert (version.path / "config.json").is_file()


@pytest.mark.parametrize("name", ["current", "starter", "../escape", "a/b", "", ".hidden", "x" * 65])
def test_add_refuses_bad_names(registry: Registry, tmp_path: Path, name: str) -> None:
    with pytest.raises(RegistryError, match="bad version name"):
        registry.add(fake_model_dir(tmp_path / "run"), name=name)
    assert registry.versions() == []


def test_add_refuses_non_model_dir_and_duplicates(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match=r"no config\.json"):
        registry.add(tmp_path / "empty")
    registry.add(fake_model_dir(tmp_path / "run"), name="v7")
    with pytest.raises(RegistryError, match="already exists"):
        registry.add(tmp_path / "run", name="v7")
    assert registry.add(tmp_path / "run").name == "v8"


def test_first_promotion_needs_no_comparison(registry: Registry, tmp_path: Path) -> None:
    registry.add(fake_model_dir(tmp_path / "run"))
    record = registry.promote("v1", val_ppl=None, current_ppl=None, margin=0.02, at=5.0)
    assert record.replaced is None
    assert registry.current().name == "v1"  # type: ignore[union-attr]
    assert current_source(registry.models_dir) == str(registry.models_dir / "versions" / "v1")


def test_promote_refuses_worse_model_unless_forced(registry: Registry, tmp_path: Path) -> None:
    for i in (1, 2):
        registry.add(fake_model_dir(tmp_path / f"run{i}"))
    registry.promote("v1", val_ppl=40.0, current_ppl=None, margin=0.02)
    with pytest.raises(PromotionRefused, match=r"41\.00 is worse .* 40\.00 by more than 2%"):
        registry.promote("v2", val_ppl=41.0, current_ppl=40.0, margin=0.02)
    assert registry.current().name == "v1"  # type: ignore[union-attr]
    record = registry.promote("v2", val_ppl=41.0, current_ppl=40.0, margin=0.02, force=True)
    assert record.forced and registry.current().name == "v2"  # type: ignore[union-attr]


def test_promote_accepts_within_margin_and_refuses_missing_numbers(
    registry: Registry, tmp_path: Path
) -> None:
    for i in (1, 2, 3):
        registry.add(fake_model_dir(tmp_path / f"run{i}"))
    registry.promote("v1", val_ppl=40.0, current_ppl=None, margin=0.02)
    registry.promote("v2", val_ppl=40.7, current_ppl=40.0, margin=0.02)  # 1.75 % worse: within the margin
    with pytest.raises(PromotionRefused, match="no held-out perplexity"):
        registry.promote("v3", val_ppl=None, current_ppl=40.0, margin=0.02)
    with pytest.raises(PromotionRefused):
        registry.promote("v3", val_ppl=float("nan"), current_ppl=40.0, margin=0.02)
    with pytest.raises(UnknownVersion, match="known: v1, v2, v3"):
        registry.promote("v9", val_ppl=1.0, current_ppl=40.0, margin=0.02)
    with pytest.raises(RegistryError, match="already the current"):
        registry.promote("v2", val_ppl=1.0, current_ppl=40.0, margin=0.02)


def test_first_promotion_compares_with_the_served_base_when_given(registry: Registry, tmp_path: Path) -> None:
    registry.add(fake_model_dir(tmp_path / "run"))
    with pytest.raises(PromotionRefused, match="worse than the model being served"):
        registry.promote("v1", val_ppl=80.0, current_ppl=50.0, margin=0.02)
    assert registry.current() is None


def test_is_worse() -> None:
    assert not is_worse(40.0, 40.0, 0.0)
    assert is_worse(40.01, 40.0, 0.0)
    assert not is_worse(44.0, 40.0, 0.10)
    assert is_worse(44.1, 40.0, 0.10)
    assert not is_worse(10.0, float("inf"), 0.02)
    assert is_worse(float("inf"), 40.0, 0.02)


def test_rollback_restores_previous_and_walks_back(registry: Registry, tmp_path: Path) -> None:
    for i in (1, 2, 3):
        registry.add(fake_model_dir(tmp_path / f"run{i}"))
    for name, ppl in (("v1", 50.0), ("v2", 45.0), ("v3", 40.0)):
        registry.promote(name, val_ppl=ppl, current_ppl=ppl + 5, margin=0.02)
    assert registry.previous().name == "v2"  # type: ignore[union-attr]
    record = registry.rollback()
    assert (record.version, record.replaced) == ("v2", "v3")
    assert registry.current().name == "v2"  # type: ignore[union-attr]
    registry.rollback()
    assert registry.current().name == "v1"  # type: ignore[union-attr]
    with pytest.raises(NoPreviousVersion):
        registry.rollback()
    actions = [(h.action, h.version) for h in registry.history()]
    assert actions == [("promote", "v1"), ("promote", "v2"), ("promote", "v3"), ("rollback", "v2"),
                       ("rollback", "v1")]  # fmt: skip


def test_registry_json_is_replaced_atomically(registry: Registry, tmp_path: Path) -> None:
    registry.add(fake_model_dir(tmp_path / "run"))
    registry.promote("v1", val_ppl=30.0, current_ppl=None, margin=0.02)
    state = json.loads(registry.path.read_text())
    assert state["current"] == "v1" and state["history"][0]["val_ppl"] == 30.0
    leftovers = [p.name for p in registry.models_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_corrupt_registry_json_is_a_clear_error(registry: Registry, tmp_path: Path) -> None:
    registry.add(fake_model_dir(tmp_path / "run"))
    registry.path.write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        registry.current()


def test_interrupted_write_leaves_old_registry(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add(fake_model_dir(tmp_path / "run1"))
    registry.add(fake_model_dir(tmp_path / "run2"))
    registry.promote("v1", val_ppl=30.0, current_ppl=None, margin=0.02)

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        registry.promote("v2", val_ppl=29.0, current_ppl=30.0, margin=0.02)
    monkeypatch.undo()
    assert registry.current().name == "v1"  # type: ignore[union-attr]


KILLED_PROMOTE = """
import os, signal, sys
from pathlib import Path
from model.training import registry

def killed_before_rename(source, target):
    os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written and fsynced: die before the rename

registry.os.replace = killed_before_rename
registry.Registry(Path(sys.argv[1])).promote("v2", val_ppl=29.0, current_ppl=30.0, margin=0.02)
"""


def test_a_killed_promote_leaves_a_temp_file_that_the_next_write_removes(
    registry: Registry, tmp_path: Path
) -> None:
    registry.add(fake_model_dir(tmp_path / "run1"))
    registry.add(fake_model_dir(tmp_path / "run2"))
    registry.promote("v1", val_ppl=30.0, current_ppl=None, margin=0.02)
    command = [sys.executable, "-c", KILLED_PROMOTE, str(registry.models_dir)]
    child = subprocess.run(command, cwd=Path(__file__).resolve().parents[3], timeout=60)
    assert child.returncode == -signal.SIGKILL
    leftovers = list(registry.models_dir.glob(".registry.json.*.tmp"))
    assert len(leftovers) == 1 and json.loads(leftovers[0].read_text())["current"] == "v2"
    assert registry.current().name == "v1"  # type: ignore[union-attr]
    stale_copy = registry.versions_dir / ".v3.4242.tmp"  # what a killed `add` leaves mid-copy
    stale_copy.mkdir()
    registry.promote("v2", val_ppl=29.0, current_ppl=30.0, margin=0.02)
    assert list(registry.models_dir.glob(".registry.json.*.tmp")) == []
    assert not stale_copy.exists()
    assert registry.current().name == "v2"  # type: ignore[union-attr]
