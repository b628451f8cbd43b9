"""model.ct2.convert: the conversion cache (reuse, invalidation, pruning) and its atomicity under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import model.ct2.convert as convert
from model.ct2.convert import KEEP_CONVERSIONS, TEMPORARY_PREFIX, converted_model
from model.loading import LoadedModel, ModelLoadError, load_model

ctranslate2 = pytest.importorskip("ctranslate2")
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def fresh(tiny_model_dir: Path) -> LoadedModel:
    """A tiny GPT-2 of this test's own (tests may change its weights)."""
    return load_model(str(tiny_model_dir), device="cpu")


def finished(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith(TEMPORARY_PREFIX))


def test_a_conversion_is_reused_and_a_weight_change_converts_again(
    fresh: LoadedModel, tmp_path: Path
) -> None:
    first = converted_model(fresh.model, fresh.tokenizer, tmp_path, "int8")
    written = (first / "model.bin").stat().st_mtime_ns
    assert converted_model(fresh.model, fresh.tokenizer, tmp_path, "int8") == first
    assert (first / "model.bin").stat().st_mtime_ns == written  # taken from the cache, not written again
    with torch.no_grad():
        fresh.model.transformer.h[0].mlp.c_fc.bias[0] += 1.0  # one number of 3.4M
    second = converted_model(fresh.model, fresh.tokenizer, tmp_path, "int8")
    float32 = converted_model(fresh.model, fresh.tokenizer, tmp_path, "float32")
    assert len({first, second, float32}) == 3 and finished(tmp_path) == sorted([first, second, float32])
    assert (float32 / "model.bin").stat().st_size > 2 * (
        second / "model.bin"
    ).stat().st_size  # int8 is smaller
    ctranslate2.Generator(str(second), device="cpu", compute_type="int8")  # loads


def test_only_the_most_recently_used_conversions_are_kept(fresh: LoadedModel, tmp_path: Path) -> None:
    made = []
    for step in range(KEEP_CONVERSIONS + 1):
        with torch.no_grad():
            fresh.model.lm_head.weight[0, 0] = float(step)
        made.append(converted_model(fresh.model, fresh.tokenizer, tmp_path, "int8"))
        os.utime(made[-1], (step, step))  # distinct ages, oldest first
    assert finished(tmp_path) == sorted(made[1:])


def test_a_failed_conversion_leaves_nothing(
    fresh: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(model: object, tokenizer: object, out_dir: Path, compute_type: str) -> None:
        out_dir.mkdir()
        (out_dir / "model.bin").write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "_write_conversion", half_written)
    with pytest.raises(ModelLoadError, match=r"No space left on device.*BOT_ENGINE=hf") as caught:
        converted_model(fresh.model, fresh.tokenizer, tmp_path, "int8")
    assert caught.value.step == "convert" and list(tmp_path.iterdir()) == []


# The child converts the tiny model, but stops for good once the conversion is written and fsynced, just
# before the rename that publishes it: the parent SIGKILLs it there.
CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
import model.ct2.convert as convert
from model.loading import load_model

real_fsync_tree = convert._fsync_tree

def fsync_then_hang(folder):
    real_fsync_tree(folder)
    print("WRITTEN", flush=True)
    time.sleep(600)

convert._fsync_tree = fsync_then_hang
loaded = load_model({model!r}, device="cpu")
convert.converted_model(loaded.model, loaded.tokenizer, Path({cache!r}), "int8")
"""


def test_a_conversion_killed_midway_leaves_no_model_and_the_next_one_succeeds(
    tiny_model_dir: Path, fresh: LoadedModel, tmp_path: Path
) -> None:
    cache = tmp_path / "ct2"
    script = textwrap.dedent(CHILD).format(repo=str(REPO), model=str(tiny_model_dir), cache=str(cache))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "WRITTEN"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    (leftover,) = cache.iterdir()  # the whole conversion, but only under its temporary name
    assert leftover.name.startswith(TEMPORARY_PREFIX) and (leftover / "model.bin").is_file()
    assert finished(cache) == []

    path = converted_model(fresh.model, fresh.tokenizer, cache, "int8")  # the same weights: the same key
    assert list(cache.iterdir()) == [path]  # the leftover was removed
    assert path.name in leftover.name
    generator = ctranslate2.Generator(str(path), device="cpu", compute_type="int8")
    assert generator.generate_batch([["Hello"]], max_length=2, include_prompt_in_result=False)


def test_a_live_conversions_temporary_directory_is_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / f"{TEMPORARY_PREFIX}abc-int8-{os.getpid()}-0000"
    gone = tmp_path / f"{TEMPORARY_PREFIX}abc-int8-{2**22 + 12345}-0000"  # past Linux's largest pid
    mine.mkdir()
    gone.mkdir()
    assert convert.remove_leftovers(tmp_path) == [gone]
    assert mine.is_dir() and not gone.exists()
