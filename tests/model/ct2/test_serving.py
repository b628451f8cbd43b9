"""CT2Engine in the worker: a reload converts in the worker thread; a failed conversion keeps the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

import model.ct2.convert as convert
from model.api import ReloadFailed
from model.sampling import SamplingParams
from model.serving.engines import EngineOptions
from model.serving.worker import ModelWorker
from tests.helpers.models import build_tiny_gpt2
from tests.helpers.workers import request

pytest.importorskip("ctranslate2")


async def test_a_failed_conversion_keeps_the_old_model_serving(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    retrained = build_tiny_gpt2(tmp_path / "retrained", seed=1)
    cache = tmp_path / "ct2"
    options = EngineOptions("ct2", "int8", 1, cache)
    params = SamplingParams(max_new_tokens=4)
    async with ModelWorker(str(tiny_model_dir), device="cpu", engine_options=options) as worker:
        old = worker.info()
        assert old.engine.startswith("ctranslate2 int8") and len(list(cache.iterdir())) == 1

        def disk_full(model: object, tokenizer: object, out_dir: Path, compute_type: str) -> None:
            out_dir.mkdir()
            (out_dir / "model.bin").write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(convert, "_write_conversion", disk_full)
            with pytest.raises(ReloadFailed, match="converting the model for CTranslate2 failed") as caught:
                await worker.reload(str(retrained))
        assert caught.value.step == "smoke"
        assert worker.info() == old
        assert (await worker.generate(request(params=params))).model_version == old.version
        assert len(list(cache.iterdir())) == 1  # nothing half-written beside the old conversion

        new = await worker.reload(str(retrained))
        assert new.version != old.version and new.engine == old.engine
        assert (await worker.generate(request(params=params))).model_version == new.version
        assert len(list(cache.iterdir())) == 2
        assert (await worker.reload(str(tiny_model_dir))).version == old.version  # a rollback: from the cache
        assert len(list(cache.iterdir())) == 2
