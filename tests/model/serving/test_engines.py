"""model.serving.engines: which engine BOT_ENGINE picks for a model, and the one line when it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

import model.serving.engines as engines
from model.fastgen.engine import BatchedGPT2Engine
from model.hf_engine import HFGenerateEngine
from model.loading import LoadedModel, ModelLoadError, load_model
from model.serving.engines import EngineOptions, default_engine_factory, describe_engine, pick_kind


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


def test_auto_on_the_cpu_is_ct2_when_installed_and_torch_otherwise(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ctranslate2")
    assert pick_kind(loaded, EngineOptions("auto")) == "ct2"
    monkeypatch.setattr(engines, "ct2_installed", lambda: False)
    assert pick_kind(loaded, EngineOptions("auto")) == "fastgen"


def test_forcing_ct2_without_the_package_is_one_clear_line(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "ct2_installed", lambda: False)
    with pytest.raises(ModelLoadError, match=r"BOT_ENGINE=ct2 needs the ctranslate2 package: pip install"):
        default_engine_factory(loaded, options=EngineOptions("ct2"))


def test_each_forced_engine_is_built_and_described(loaded: LoadedModel, tmp_path: Path) -> None:
    hf = default_engine_factory(loaded, options=EngineOptions("hf"))
    fastgen = default_engine_factory(loaded, options=EngineOptions("fastgen"))
    assert isinstance(hf, HFGenerateEngine) and describe_engine(hf, loaded.device) == "hf generate"
    assert isinstance(fastgen, BatchedGPT2Engine)
    assert describe_engine(fastgen, loaded.device) == "fastgen (eager torch)"
    assert isinstance(default_engine_factory(loaded), BatchedGPT2Engine)  # no options: as before
    pytest.importorskip("ctranslate2")
    ct2 = default_engine_factory(loaded, options=EngineOptions("ct2", "float32", 1, tmp_path))
    assert describe_engine(ct2, loaded.device) == "ctranslate2 float32 (1 CPU thread)"
