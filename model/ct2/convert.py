"""Converting the served model for CTranslate2, cached by its weights' hash; a killed conversion leaves none.

Layout: `<cache_dir>/<key>/` holds a finished conversion (model.bin, config.json, vocabulary.json), where
the key hashes the weights as loaded (so a starter, a hub model and a registry version are all keyed the
same way, whatever their path), the config, the vocabulary and the ctranslate2 version, and names the
compute type. A conversion writes into a temporary sibling `<cache_dir>/.tmp-<key>-<pid>-<random>/`,
fsyncs its files and itself, then renames it into place: a reader sees no directory or a complete one.
Temporary directories of processes that died mid-conversion (SIGKILL, power loss) are removed before the
next conversion, and only the KEEP_CONVERSIONS most recently used conversions are kept.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from model.loading import ModelLoadError

log = logging.getLogger(__name__)

COMPUTE_TYPES = ("int8", "float32")
KEEP_CONVERSIONS = 4  # the registry's rollback wants the previous versions at hand
TEMPORARY_PREFIX = ".tmp-"
MODEL_FILE = "model.bin"


def conversion_key(model: Any, tokenizer: Any, compute_type: str) -> str:
    """`<16 hex digits>-<compute type>`: sha256 over the weights' bytes, the config, the vocabulary and
    the ctranslate2 version. Hashing the tensors in memory costs ~1 s for GPT-2 124M; sizes and mtimes
    (model.loading's version id) would miss a file rewritten in place."""
    import ctranslate2

    digest = hashlib.sha256(f"ctranslate2 {ctranslate2.__version__}\n".encode())
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for name, tensor in model.state_dict().items():
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy())
    return f"{digest.hexdigest()[:16]}-{compute_type}"


def converted_model(model: Any, tokenizer: Any, cache_dir: Path, compute_type: str) -> Path:
    """The conversion of `model` for `compute_type`: from the cache, else converted now (atomically).

    Raises ModelLoadError(step="convert") when the conversion fails; nothing is left behind then.
    """
    if compute_type not in COMPUTE_TYPES:
        raise ModelLoadError(f"unknown CPU compute type '{compute_type}': use int8 or float32", "convert")
    key = conversion_key(model, tokenizer, compute_type)
    target = cache_dir / key
    if (target / MODEL_FILE).is_file():
        os.utime(target)  # most recently used: pruned last
        log.info("using the cached CTranslate2 conversion %s", target)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(cache_dir)
    started = time.monotonic()
    _convert_atomically(model, tokenizer, cache_dir, key, compute_type)
    log.info(
        "converted the model for CTranslate2 (%s) in %.1f s: %s",
        compute_type,
        time.monotonic() - started,
        target,
    )
    prune(cache_dir, keep=target)
    return target


def _convert_atomically(model: Any, tokenizer: Any, cache_dir: Path, key: str, compute_type: str) -> None:
    target = cache_dir / key
    temporary = cache_dir / f"{TEMPORARY_PREFIX}{key}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_conversion(model, tokenizer, temporary, compute_type)
        _fsync_tree(temporary)
        os.rename(temporary, target)
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        if (target / MODEL_FILE).is_file():  # another process finished the same conversion first
            return
        raise ModelLoadError(_failure(exc), step="convert") from exc
    except Exception as exc:  # the converter raises ValueError, RuntimeError, KeyError, ...
        shutil.rmtree(temporary, ignore_errors=True)
        raise ModelLoadError(_failure(exc), step="convert") from exc
    _fsync_directory(cache_dir)


def _failure(exc: BaseException) -> str:
    return (
        f"converting the model for CTranslate2 failed ({type(exc).__name__}: {exc}); "
        "set BOT_ENGINE=hf to serve it with Hugging Face generate instead"
    )


def _write_conversion(model: Any, tokenizer: Any, out_dir: Path, compute_type: str) -> None:
    """Convert the in-memory model and tokenizer (the converter's loading hooks return them)."""
    from ctranslate2.converters import TransformersConverter

    check_vocabulary(tokenizer)

    class _LoadedConverter(TransformersConverter):
        def load_model(self, model_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            return model

        def load_tokenizer(self, tokenizer_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            return _WithStartToken(tokenizer)

    # The converter changes tied weights in place (the served embedding, measured with 4.8.5): give it a copy.
    model = copy.deepcopy(model)
    # The converter reads the config from a directory; the loaded model's own config serves for any source.
    with tempfile.TemporaryDirectory(prefix="ct2-config-") as config_dir:
        model.config.save_pretrained(config_dir)
        _LoadedConverter(config_dir).convert(str(out_dir), quantization=compute_type, force=True)


class _WithStartToken:
    """The tokenizer as the converter reads it, with end-of-text standing in for a missing start token:
    a null bos_token in the converted config.json (T5Tokenizer-based Japanese GPT-2s have none) makes the
    Generator fail to load. The engine never feeds a start token, so which one is named does not matter."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @property
    def bos_token(self) -> Any:
        return self._tokenizer.bos_token or self._tokenizer.eos_token

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def check_vocabulary(tokenizer: Any) -> None:
    """CTranslate2 takes prompts as token strings, its vocabulary being the tokenizer's sorted by id: refuse
    a tokenizer whose ids have gaps, where a position in that list would not be the id."""
    ids = sorted(tokenizer.get_vocab().values())
    if ids != list(range(len(ids))):
        raise ValueError(f"the tokenizer's {len(ids)} ids are not 0..{len(ids) - 1} without gaps")


def remove_leftovers(cache_dir: Path) -> list[Path]:
    """Remove the temporary directories of conversions whose process is gone; return them."""
    removed = []
    for path in cache_dir.glob(f"{TEMPORARY_PREFIX}*"):
        if not _owner_is_alive(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d unfinished CTranslate2 conversion(s) in %s", len(removed), cache_dir)
    return removed


def _owner_is_alive(name: str) -> bool:
    """Whether the process named in `.tmp-<key>-<pid>-<random>` still runs."""
    parts = name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def prune(cache_dir: Path, keep: Path) -> None:
    """Keep the KEEP_CONVERSIONS most recently used conversions (and `keep`); remove the rest."""
    finished = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(TEMPORARY_PREFIX)]
    finished.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for path in finished[KEEP_CONVERSIONS:]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(folder)


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
