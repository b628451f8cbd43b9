"""`chatbot promote` / `rollback` on a real registry: refusals, --force, and no export to measure on."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.retrain.versions import promote_version, rollback
from model.training.registry import Registry
from tests.helpers.models import build_tiny_gpt2
from tests.helpers.retrain import retrain_settings


async def test_promote_and_rollback_commands(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = retrain_settings(tmp_path, tiny_model_dir)
    registry = Registry(settings.models_dir)
    registry.add(tiny_model_dir)
    registry.add(build_tiny_gpt2(tmp_path / "other", seed=1))
    assert promote_version(settings, "v1", val_ppl=50.0, current_ppl=60.0) == 0
    assert promote_version(settings, "v2", val_ppl=70.0, current_ppl=50.0) == 1
    assert "worse than the current version v1" in capsys.readouterr().err
    assert promote_version(settings, "v2", val_ppl=70.0, current_ppl=50.0, force=True) == 0
    assert rollback(settings) == 0
    assert registry.current().name == "v1"  # type: ignore[union-attr]
    assert rollback(settings) == 1
    assert promote_version(settings, "v9") == 1
    assert promote_version(settings, "v2") == 1  # no export to measure it on
    assert "no export found" in capsys.readouterr().err
