"""Resolve and load a causal LM and its tokenizer: hub id, local directory or the bundled starter model.

Long because: every refusal of a bad model directory lives here, before it serves; they read as one list.

Everything that can be wrong with a model directory is refused here with a message that says what to do,
before the model ever serves: a missing or non-causal config, truncated safetensors, pickle checkpoints
(unless explicitly allowed), weights that do not match the config, non-finite weights, a tokenizer that
is empty or larger than the embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import torch

from model.encoding import encodes_newline

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

STARTER_MODEL_NAME = "starter"
HUB_PROBE_TIMEOUT_SECONDS = 3.0
# What a hub snapshot fetches: configs, tokenizer files and safetensors. Never code, never pickles
# (those only with allow_pickle).
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")
PICKLE_FILE_PATTERN = "pytorch_model*.bin"
# Any of these in a model directory means it brings its own tokenizer (BPE files, or sentencepiece ones).
BPE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")
TOKENIZER_FILES = (*BPE_TOKENIZER_FILES, "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(Exception):
    """A model could not be loaded; the message says what is wrong and what to do. `step` names the stage."""

    def __init__(self, message: str, step: str = "load") -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class LoadedModel:
    """A checked model and tokenizer, ready to serve (eval mode, on `device`)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase  # pad token set
    name: str  # what was asked for ("starter", "gpt2", "/path/to/dir")
    version: str  # short content id of the files, or the hub revision
    source: str  # resolved local path or hub id
    device: torch.device
    dtype: torch.dtype
    n_positions: int  # context window
    total_params: int
    trainable_params: int


def bundled_tokenizer_dir() -> Path:
    """The real GPT-2 tokenizer shipped in the package (vocab.json + merges.txt)."""
    return Path(__file__).resolve().parent / "assets" / "gpt2-tokenizer"


def starter_model_dir() -> Path:
    """Where the bundled starter model lives inside the package (it may not be installed)."""
    return Path(__file__).resolve().parent / "starter"


def resolve_model_source(name: str, models_dir: Path | None = None) -> str:
    """Turn a model name into a local directory or a hub id: starter, a directory, a version, a hub id."""
    if name == STARTER_MODEL_NAME:
        return str(_starter_dir_or_error())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    # Only a plain name can be a registry version: never let "../x" climb out of the versions folder.
    if models_dir is not None and "/" not in name and "\\" not in name and name not in (".", ".."):
        version_dir = models_dir / "versions" / name
        if version_dir.is_dir():
            return str(version_dir.resolve())
    if not HUB_ID_PATTERN.match(name) or ".." in name:
        raise ModelLoadError(
            f"model directory '{name}' does not exist (and it is not a Hugging Face hub id): "
            "check the path, or use a hub id such as gpt2, or 'starter'",
            step="resolve",
        )
    return name


def _starter_dir_or_error() -> Path:
    starter_dir = starter_model_dir()
    if not (starter_dir / "config.json").is_file():
        raise ModelLoadError(
            f"the bundled starter model is not installed (expected it in {starter_dir}); train it with the "
            "project's starter-model script, or set the model to a local model directory or a hub id "
            "such as gpt2",
            step="resolve",
        )
    return starter_dir


def _hub_offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline()) if callable(is_offline) else bool(constants.HF_HUB_OFFLINE)


def _hub_help(repo_id: str, reason: str) -> str:
    return (
        f"cannot load '{repo_id}': it is not a local model directory and {reason}. Use a local model "
        "directory (a path), the bundled starter model ('starter'), or run once with network access so the "
        "model is in the Hugging Face cache (~/.cache/huggingface, or HF_HOME), after which HF_HUB_OFFLINE=1 "
        "loads it offline"
    )


def _probe_hub(repo_id: str) -> None:
    """Fail within seconds when the hub cannot be reached, instead of retrying for minutes."""
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_SECONDS).close()
    except OSError as exc:
        reason = f"the hub ({endpoint.hostname}:{port}) cannot be reached: {exc}"
        raise ModelLoadError(_hub_help(repo_id, reason), step="download") from exc


def _hub_snapshot(repo_id: str, allow_pickle: bool) -> Path:
    """A local snapshot of a hub model: the cache first, then a download when online."""
    from huggingface_hub import snapshot_download

    patterns = [*HUB_FILE_PATTERNS, *([PICKLE_FILE_PATTERN] if allow_pickle else [])]
    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        if (cached / "config.json").is_file() and _weight_files(cached, allow_pickle):
            return cached
    except (OSError, ValueError):
        pass  # not cached (or cached without weights): fall through to a download
    if _hub_offline():
        raise ModelLoadError(_hub_help(repo_id, "HF_HUB_OFFLINE is set and it is not cached"), "download")
    _probe_hub(repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError) as exc:  # hub errors derive from OSError (HTTPError) or ValueError
        raise ModelLoadError(_hub_help(repo_id, f"downloading it failed: {exc}"), "download") from exc


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or (sorted(folder.glob(PICKLE_FILE_PATTERN)) if allow_pickle else [])


def _check_safetensors_file(path: Path) -> None:
    """Refuse a truncated or corrupt file: its header must parse and describe exactly the file's bytes."""
    size_bytes = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_bytes,) = struct.unpack("<Q", handle.read(8))
            if header_bytes > min(size_bytes - 8, MAX_SAFETENSORS_HEADER_BYTES):
                raise ValueError(f"header of {header_bytes} bytes does not fit")
            header = json.loads(handle.read(header_bytes))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ModelLoadError(f"{path} is corrupt or not safetensors ({exc})", "weights") from exc
    expected_bytes = 8 + header_bytes + max(ends, default=0)
    if expected_bytes != size_bytes:
        raise ModelLoadError(
            f"{path} is truncated or corrupt: it has {size_bytes} bytes but its header describes "
            f"{expected_bytes}; copy or download it again",
            step="weights",
        )


def check_weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a model directory (safetensors; pickles only if allowed), each checked intact."""
    weights = _weight_files(folder, allow_pickle)
    if not weights and list(folder.glob(PICKLE_FILE_PATTERN)):
        raise ModelLoadError(
            f"{folder} has only a pickle checkpoint (pytorch_model.bin), which can run code when loaded; "
            "convert it to safetensors, or allow pickle checkpoints (allow_pickle=True, "
            "BOT_ALLOW_PICKLE=true) if you trust its source",
            step="weights",
        )
    if not weights:
        raise ModelLoadError(f"{folder} has no weights (model.safetensors)", step="weights")
    for path in (path for path in weights if path.suffix == ".safetensors"):
        _check_safetensors_file(path)
    return weights


def _load_config(folder: Path) -> PretrainedConfig:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: it is not a Hugging Face model folder", "config")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:  # bad JSON is a ValueError; unknown model_type too
        raise ModelLoadError(f"{folder}/config.json cannot be read: {exc}", step="config") from exc
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"{folder} holds a '{config.model_type}' model, which is not a causal language model; "
            "use a decoder-only model such as GPT-2",
            step="config",
        )
    return config


def context_window(config: PretrainedConfig) -> int:
    """The number of positions the model can attend to (n_positions / max_position_embeddings / n_ctx)."""
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadError(f"the '{config.model_type}' config names no context window size", step="config")


def _has_own_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _set_pad_token(tokenizer: PreTrainedTokenizerBase, origin: Path) -> None:
    if tokenizer.pad_token is not None:
        return  # respect the model's own pad token (e.g. <pad> in Japanese sentencepiece models)
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"the tokenizer in {origin} has no pad and no end-of-text token", "tokenizer")
    # GPT-2 has no pad token. Padded positions are masked out by the attention mask, so any id works
    # there; reusing end-of-text avoids adding a token and growing the embedding matrix.
    tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory or hub id; the bundled GPT-2 one when the directory has none."""
    from transformers import AutoTokenizer

    folder = Path(source) if Path(source).is_dir() else _hub_snapshot(str(source), allow_pickle=False)
    origin = folder if _has_own_tokenizer(folder) else bundled_tokenizer_dir()
    if origin != folder:
        log.info("%s has no tokenizer files: using the bundled GPT-2 tokenizer", folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(origin, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"the tokenizer in {origin} cannot be loaded: {exc}", step="tokenizer") from exc
    # transformers 5 can return an empty tokenizer instead of raising (offline, for a hub id it cannot reach).
    if len(tokenizer) < 2:
        raise ModelLoadError(f"the tokenizer in {origin} is empty ({len(tokenizer)} tokens)", "tokenizer")
    _set_pad_token(tokenizer, origin)
    return tokenizer


def pick_device(device: str = "auto") -> torch.device:
    """'auto' → the CUDA GPU when there is one, else the CPU; 'cpu', 'cuda' and 'cuda:N' as asked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device '{device}' was asked for but CUDA is not available", "device")
        return torch.device(device)
    raise ModelLoadError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N", step="device")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' → bfloat16 (or float16 without bf16 support) on CUDA, float32 on the CPU; else as named."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}", step="device")
    if device.type == "cpu" and DTYPES[dtype] != torch.float32:
        log.warning("%s on the CPU is slow and some operations lack it; float32 is the CPU default", dtype)
    return DTYPES[dtype]


def _load_weights(folder: Path, config: PretrainedConfig, dtype: torch.dtype, weights: list[Path]) -> Any:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    uses_safetensors = weights[0].suffix == ".safetensors"
    try:
        # Even with pickles allowed, transformers unpickles with torch.load(weights_only=True).
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            use_safetensors=uses_safetensors,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # report mismatches in `info` (refused below) instead of raising
        )
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError, SafetensorError) as exc:
        raise ModelLoadError(
            f"the weights in {folder} cannot be loaded: {_first_line(exc)}", "weights"
        ) from exc
    model, info = loaded  # output_loading_info=True returns (model, info)
    _check_loading_info(folder, info)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """Refuse weights that do not match the config instead of letting transformers random-initialise them."""
    # mismatched_keys entries are (key, shape in the file, shape the config asks for).
    problems = [f"missing {key}" for key in sorted(info.get("missing_keys", ()))] + [
        f"{key} is {tuple(file_shape)} in the file but {tuple(config_shape)} in the config"
        for key, file_shape, config_shape in sorted(info.get("mismatched_keys", ()))
    ]
    if problems:
        raise ModelLoadError(
            f"the weights in {folder} do not match its config.json (wrong architecture?): {len(problems)} "
            f"problems, e.g. {'; '.join(problems[:3])}",
            step="weights",
        )
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        log.warning("%s: %d unused weights in the file, e.g. %s", folder, len(unexpected), unexpected[0])


def check_finite(model: torch.nn.Module) -> None:
    """Raise ModelLoadError naming the first parameter that holds NaN or infinity."""
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise ModelLoadError(
                f"weight '{name}' contains NaN or infinite values: the checkpoint is broken", "check"
            )


def _check_vocabulary(model: Any, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    # An id past the embedding would be a device-side assert on the GPU, which poisons every later call.
    embedding_rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedding_rows:
        raise ModelLoadError(
            f"the tokenizer has {len(tokenizer)} tokens but the model in {folder} only {embedding_rows} "
            "embeddings: the tokenizer does not belong to these weights",
            step="tokenizer",
        )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights count once."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)


def describe_device(device: torch.device) -> str:
    """A human description: the GPU's name and memory, or a CPU warning."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{properties.name} ({properties.total_memory / 2**30:.1f} GiB)"
    return "CPU (slow: no CUDA GPU in use, replies take seconds)"


def set_seed(seed: int) -> None:
    """Seed Python's random, NumPy and torch (CPU and every CUDA device) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)  # lazy: a no-op without CUDA


def _content_version(folder: Path, weights: list[Path]) -> str:
    """12 hex digits over config.json and the weight files' names, sizes and mtimes (cheap for 6 GB)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in weights:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def _report(loaded: LoadedModel) -> None:
    # On a CPU the line below names just "CPU": the warning after it is the one word on slowness.
    device = describe_device(loaded.device) if loaded.device.type == "cuda" else "CPU"
    log.info(
        "loaded model %s (version %s, from %s): device %s, dtype %s, %s parameters (%s trainable), "
        "context %d tokens",
        loaded.name, loaded.version, loaded.source, device,
        str(loaded.dtype).removeprefix("torch."), f"{loaded.total_params:,}", f"{loaded.trainable_params:,}",
        loaded.n_positions,
    )  # fmt: skip
    if loaded.device.type == "cpu":
        log.warning("running on the CPU: replies will be slow; a CUDA GPU makes them many times faster")
    if not encodes_newline(loaded.tokenizer):
        log.warning("this tokenizer cannot encode a newline, so dialogue turns run together in the prompt")


def _checked_model(
    folder: Path, config: PretrainedConfig, weights: list[Path], tokenizer: Any, dtype: torch.dtype
) -> Any:
    """Load the weights and refuse them unless they match the config and tokenizer and are finite."""
    model = _load_weights(folder, config, dtype, weights)
    _check_vocabulary(model, tokenizer, folder)
    check_finite(model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # silences a warning per generate()
    return model


def load_model(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    models_dir: Path | None = None,
) -> LoadedModel:
    """Resolve `name`, check and load the model and tokenizer, move them to the device, log a report."""
    source = resolve_model_source(name, models_dir)
    is_hub = not Path(source).is_dir()
    folder = _hub_snapshot(source, allow_pickle) if is_hub else Path(source)
    config = _load_config(folder)  # the cheapest and most basic refusals first
    weights = check_weight_files(folder, allow_pickle)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    tokenizer = load_tokenizer(str(folder))
    model = _checked_model(folder, config, weights, tokenizer, torch_dtype).to(torch_device).eval()
    version = folder.name[:12] if is_hub else _content_version(folder, weights)  # hub snapshot dir = commit
    loaded = LoadedModel(
        model, tokenizer, name, version, source, torch_device, torch_dtype, context_window(config),
        *count_parameters(model),
    )  # fmt: skip
    _report(loaded)
    return loaded
