"""model.loading: resolving names, refusing broken model directories, device/dtype/seed helpers."""

from __future__ import annotations

import logging
import pathlib
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import loading
from model.loading import (
    ModelLoadError,
    bundled_tokenizer_dir,
    check_finite,
    count_parameters,
    describe_device,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model_source,
    set_seed,
)
from tests.helpers.models import build_tiny_gpt2


def copy_model(source: Path, target: Path, with_tokenizer: bool = True) -> Path:
    """A copy of a model directory; without tokenizer files when asked."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if with_tokenizer or path.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(path, target / path.name)
    return target


# --- the bundled tokenizer -------------------------------------------------------------------------


def test_bundled_tokenizer_is_the_real_gpt2_one() -> None:
    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256
    # GPT-2 has no pad token: the loader reuses end-of-text instead of growing the vocabulary.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    notice = (bundled_tokenizer_dir() / "NOTICE").read_text()
    assert "MIT" in notice and "vocab.json" in notice


def test_model_dir_without_tokenizer_falls_back_to_bundled(tiny_model_dir: Path, tmp_path: Path) -> None:
    bare = copy_model(tiny_model_dir, tmp_path / "bare", with_tokenizer=False)
    assert not (bare / "tokenizer.json").exists()
    loaded = load_model(str(bare), device="cpu")
    assert len(loaded.tokenizer) == 50257
    assert loaded.tokenizer("Hello world")["input_ids"] == [15496, 995]


# --- a good model --------------------------------------------------------------------------------


def test_load_model_reports_and_checks(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="model.loading"):
        loaded = load_model(str(tiny_model_dir), device="cpu")
    assert not loaded.model.training
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert loaded.n_positions == 1024
    assert loaded.source == str(tiny_model_dir.resolve()) and loaded.name == str(tiny_model_dir)
    assert loaded.total_params == sum(p.numel() for p in loaded.model.parameters()) > 0
    assert loaded.trainable_params == loaded.total_params
    assert len(loaded.version) == 12 and int(loaded.version, 16) >= 0
    assert loaded.tokenizer.pad_token_id == 50256
    assert loaded.model.generation_config.pad_token_id == 50256
    report = caplog.text
    assert "device CPU," in report and "float32" in report and f"{loaded.total_params:,} parameters" in report
    assert any(r.levelno == logging.WARNING and "CPU" in r.getMessage() for r in caplog.records)


def test_version_is_stable_and_tracks_content(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = load_model(str(tiny_model_dir), device="cpu").version
    assert load_model(str(tiny_model_dir), device="cpu").version == first
    other = build_tiny_gpt2(tmp_path / "other", seed=1)
    assert load_model(str(other), device="cpu").version != first


def test_starter_model_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(loading, "starter_model_dir", lambda: tmp_path / "starter")
    with pytest.raises(ModelLoadError, match="starter model is not installed") as caught:
        load_model("starter", device="cpu")
    assert caught.value.step == "resolve"


def test_starter_model_loads_when_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path
) -> None:
    starter = copy_model(tiny_model_dir, tmp_path / "starter")
    monkeypatch.setattr(loading, "starter_model_dir", lambda: starter)
    loaded = load_model("starter", device="cpu")
    assert loaded.name == "starter" and loaded.source == str(starter)


def test_registry_version_name_resolves_to_its_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    version_dir = copy_model(tiny_model_dir, tmp_path / "models" / "versions" / "v20261127-1")
    assert resolve_model_source("v20261127-1", tmp_path / "models") == str(version_dir.resolve())
    # Not a registry folder (and no escaping it): treated as a hub id.
    assert resolve_model_source("gpt2-medium", tmp_path / "models") == "gpt2-medium"


# --- refusals ------------------------------------------------------------------------------------


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "model"), device="cpu")


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path), device="cpu")


def test_unreadable_config_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = copy_model(tiny_model_dir, tmp_path / "m")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json cannot be read"):
        load_model(str(broken), device="cpu")


def test_non_causal_lm_config_is_refused(tmp_path: Path) -> None:
    from transformers import T5Config

    T5Config(d_model=8, d_ff=16, num_layers=1, num_heads=1, vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal language model") as caught:
        load_model(str(tmp_path), device="cpu")
    assert caught.value.step == "config"


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_truncated_safetensors_is_refused(tmp_path: Path, tiny_model_dir: Path, keep_fraction: float) -> None:
    broken = copy_model(tiny_model_dir, tmp_path / "m")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as caught:
        load_model(str(broken), device="cpu")
    assert caught.value.step == "weights"


def test_garbage_safetensors_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = copy_model(tiny_model_dir, tmp_path / "m")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(str(broken), device="cpu")


def test_weights_missing_layers_are_refused_not_random_initialised(tmp_path: Path) -> None:
    three_layers = build_tiny_gpt2(tmp_path / "three", n_layer=3)
    two_layers = build_tiny_gpt2(tmp_path / "two", n_layer=2)
    shutil.copy(two_layers / "model.safetensors", three_layers / "model.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"do not match its config\.json.*missing transformer\.h\.2\."
    ) as caught:
        load_model(str(three_layers), device="cpu")
    assert caught.value.step == "weights"


def test_weights_with_mismatched_shapes_are_refused(tmp_path: Path) -> None:
    wide = build_tiny_gpt2(tmp_path / "wide", n_embd=64)
    narrow = build_tiny_gpt2(tmp_path / "narrow", n_embd=32)
    shutil.copy(narrow / "model.safetensors", wide / "model.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"do not match.*c_attn\.bias is \(96,\) in the file but \(192,\)"
    ):
        load_model(str(wide), device="cpu")


def test_nan_weights_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = copy_model(tiny_model_dir, tmp_path / "m")
    tensors = load_file(broken / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*NaN") as caught:
        load_model(str(broken), device="cpu")
    assert caught.value.step == "check"


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=1000)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="does not belong"):
        load_model(str(tmp_path), device="cpu")  # falls back to the 50,257-token GPT-2 tokenizer


class _SideEffect:
    """Unpickling this creates a file: proof that code ran during loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[pathlib.Path]]:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_pickle_checkpoint_never_runs_code(tmp_path: Path, tiny_model_dir: Path, allow_pickle: bool) -> None:
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model_dir / "config.json")
    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": _SideEffect(marker)}, model_dir / "pytorch_model.bin")
    # Even when pickles are allowed, transformers unpickles with weights_only=True, which refuses this.
    expected = "weights .* cannot be loaded" if allow_pickle else "pickle checkpoint.*BOT_ALLOW_PICKLE"
    with pytest.raises(ModelLoadError, match=expected):
        load_model(str(model_dir), device="cpu", allow_pickle=allow_pickle)
    assert not marker.exists()


def test_hub_id_offline_fails_fast_with_advice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # even if gpt2 is cached
    for name in ("gpt2", "no-such-org/no-such-model"):
        started = time.monotonic()
        with pytest.raises(ModelLoadError) as caught:
            load_model(name, device="cpu")
        assert time.monotonic() - started < 5.0
        message = str(caught.value)
        assert name in message and "HF_HUB_OFFLINE" in message
        assert "local model directory" in message and "cache" in message


def test_hub_id_in_the_offline_cache_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "hub" / "models--example--tiny-gpt2"
    copy_model(tiny_model_dir, repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("example/tiny-gpt2", device="cpu")
    assert (loaded.name, loaded.source, loaded.version) == (
        "example/tiny-gpt2",
        "example/tiny-gpt2",
        commit[:12],
    )
    assert len(loaded.tokenizer) == 50257


def test_unreachable_hub_fails_within_seconds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    with socket.socket() as probe:  # a local port that nothing listens on: refused at once, no network
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setattr(loading, "_hub_offline", lambda: False)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="cannot be reached") as caught:
        load_model("gpt2", device="cpu")
    assert time.monotonic() - started < 5.0
    assert caught.value.step == "download"


def test_non_hub_looking_missing_path_is_not_sent_to_the_hub() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source("../models/../nowhere")


# --- helpers -------------------------------------------------------------------------------------


def test_check_finite_names_an_infinite_parameter() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_finite(layer)
    with torch.no_grad():
        layer[1].bias[0] = float("inf")
    with pytest.raises(ModelLoadError, match=r"'1\.bias'"):
        check_finite(layer)


def test_count_parameters_separates_frozen_weights() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))  # 16 + 5 parameters
    layer[0].requires_grad_(False)
    assert count_parameters(layer) == (21, 5)


def test_set_seed_makes_every_generator_repeat() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    set_seed(1234)
    first = draw()
    set_seed(1234)
    assert draw() == first
    set_seed(4321)
    assert draw() != first


def test_device_and_dtype_choices() -> None:
    cpu = torch.device("cpu")
    assert pick_device("cpu") == cpu
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert describe_device(cpu).startswith("CPU (slow")
    with pytest.raises(ModelLoadError, match="unknown device"):
        pick_device("tpu")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        pick_dtype("float8", cpu)
    if not torch.cuda.is_available():
        assert pick_device("auto") == cpu
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            pick_device("cuda")


def test_load_on_cpu_warns_about_speed_once(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="model.loading"):
        load_model(str(tiny_model_dir), device="cpu")
    about_speed = [r for r in caplog.records if "slow" in r.getMessage()]
    assert len(about_speed) == 1 and about_speed[0].levelno == logging.WARNING
    assert "device CPU," in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_gpu_reports_the_card(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="model.loading"):
        loaded = load_model(str(tiny_model_dir), device="auto")
    assert loaded.device.type == "cuda" and loaded.dtype in (torch.bfloat16, torch.float16)
    assert next(loaded.model.parameters()).device.type == "cuda"
    assert "GiB" in describe_device(loaded.device) and describe_device(loaded.device) in caplog.text
