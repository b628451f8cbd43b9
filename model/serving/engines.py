"""Which decode engine serves a loaded model, and how many sequences its KV cache holds.

`EngineOptions.kind` picks it (BOT_ENGINE): "auto" serves GPT-2 on the CPU with CT2Engine (model/ct2/) when
the ctranslate2 package is installed, and otherwise as "fastgen" does: BatchedGPT2Engine (model/fastgen/)
for GPT-2 architecture models whose tokenizer encodes a newline, else HFGenerateEngine (model/hf_engine.py),
which works for any causal LM ("hf" forces it). Callers that pass no options (tests, scripts) get "fastgen".
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.encoding import encodes_newline
from model.engine import DecodeEngine
from model.hf_engine import HFGenerateEngine
from model.loading import ModelLoadError
from model.replies import resample_params
from model.sampling import SamplingParams

if TYPE_CHECKING:
    from model.loading import LoadedModel

log = logging.getLogger(__name__)

CUDA_MAX_BATCH = 256  # sequences decoded together on a GPU (one CUDA graph per batch-size bucket)
CPU_MAX_BATCH = 8  # a CPU gains little from wide batches
KV_CACHE_MEMORY_FRACTION = 0.3  # of the GPU memory still free after loading the weights
ENGINE_KINDS = ("auto", "fastgen", "ct2", "hf")
MAX_DEFAULT_CPU_THREADS = 4  # a small model gains nothing from more, and the event loop needs a core too


@dataclass(frozen=True)
class EngineOptions:
    """How to pick and set up the engine (BOT_ENGINE, BOT_CPU_COMPUTE, BOT_CPU_THREADS, the data dir)."""

    kind: str = "fastgen"  # auto | fastgen | ct2 | hf
    cpu_compute: str = "int8"  # CT2Engine's compute type: int8 | float32
    cpu_threads: int = 0  # CT2Engine's threads; 0: every core, at most MAX_DEFAULT_CPU_THREADS
    cache_dir: Path | None = None  # where CTranslate2 conversions are kept; None: the system's temp dir

    def threads(self) -> int:
        return self.cpu_threads or min(MAX_DEFAULT_CPU_THREADS, os.cpu_count() or 1)

    def conversions_dir(self) -> Path:
        return self.cache_dir or Path(tempfile.gettempdir()) / "chatbot-ct2"


def ct2_installed() -> bool:
    """Whether the optional ctranslate2 package (the `cpu` extra) can be imported."""
    return importlib.util.find_spec("ctranslate2") is not None


def describe_engine(engine: DecodeEngine, device: torch.device) -> str:
    """Which engine serves, for the start-up log and /stats ("ctranslate2 int8 (2 CPU threads)", ...)."""
    from model.fastgen.engine import BatchedGPT2Engine

    if isinstance(engine, BatchedGPT2Engine):
        return "fastgen (CUDA graphs)" if device.type == "cuda" else "fastgen (eager torch)"
    if isinstance(engine, HFGenerateEngine):
        return "hf generate"
    return str(getattr(engine, "description", type(engine).__name__))


def _batch_slots(loaded: LoadedModel) -> int:
    """How many sequences the preallocated KV cache holds: capped by what the GPU can spare."""
    if loaded.device.type != "cuda":
        return CPU_MAX_BATCH
    config = loaded.model.config
    element_bytes = torch.finfo(loaded.dtype).bits // 8
    slot_bytes = 2 * config.n_layer * loaded.n_positions * config.n_embd * element_bytes  # K and V
    free_bytes, _ = torch.cuda.mem_get_info(loaded.device)
    return max(1, min(CUDA_MAX_BATCH, int(free_bytes * KV_CACHE_MEMORY_FRACTION) // slot_bytes))


def pick_kind(loaded: LoadedModel, options: EngineOptions) -> str:
    """ "ct2", "fastgen" or "hf" for this model; refuses a forced ct2 that cannot run (one clear line)."""
    if options.kind == "ct2":
        if not ct2_installed():
            raise ModelLoadError(
                "BOT_ENGINE=ct2 needs the ctranslate2 package: pip install -e '.[cpu]' (or BOT_ENGINE=auto)",
                step="engine",
            )
        if loaded.device.type != "cpu":
            raise ModelLoadError(
                "BOT_ENGINE=ct2 runs on the CPU: set BOT_DEVICE=cpu (or BOT_ENGINE=auto)", "engine"
            )
        return "ct2"
    if options.kind != "auto":
        return options.kind
    if loaded.device.type != "cpu":
        return "fastgen"
    if not ct2_installed():
        log.info("ctranslate2 is not installed (pip install -e '.[cpu]'): the CPU is served by torch")
        return "fastgen"
    if loaded.model.config.model_type != "gpt2":
        log.info(
            "the CTranslate2 engine serves GPT-2 models; this %s model gets hf",
            loaded.model.config.model_type,
        )
        return "hf"
    return "ct2"


def default_engine_factory(
    loaded: LoadedModel,
    max_batch_size: int | None = None,
    sampling: SamplingParams | None = None,
    options: EngineOptions | None = None,
) -> DecodeEngine:
    """The engine `options` pick for `loaded` (see the module docstring), logged with what it runs.

    The batched engine captures its CUDA graphs for `sampling` (the bot's settings; SamplingParams()
    when None) and for its repeat-guard retry before it serves, so no burst pays for a capture. CT2Engine
    converts the model first (or takes its cached conversion): a failed conversion fails the load.
    """
    options = options or EngineOptions()
    kind = pick_kind(loaded, options)
    engine = _build(kind, loaded, max_batch_size, sampling, options)
    log.info("decode engine: %s", describe_engine(engine, loaded.device))
    return engine


def _build(
    kind: str,
    loaded: LoadedModel,
    max_batch_size: int | None,
    sampling: SamplingParams | None,
    options: EngineOptions,
) -> DecodeEngine:
    from model.fastgen.engine import BatchedGPT2Engine

    if kind == "hf":
        return HFGenerateEngine(loaded.model, loaded.tokenizer)
    if kind == "ct2":
        from model.ct2.engine import CT2_MAX_BATCH, build_ct2_engine

        batch = max_batch_size or CT2_MAX_BATCH
        return build_ct2_engine(
            loaded, options.conversions_dir(), options.cpu_compute, options.threads(), batch
        )
    # The batched engine ends turns by token id only; a tokenizer with no newline token (many Japanese
    # sentencepiece models) ends turns at speaker tags, which HFGenerateEngine checks on decoded text.
    if not BatchedGPT2Engine.supports(loaded.model) or not encodes_newline(loaded.tokenizer):
        return HFGenerateEngine(loaded.model, loaded.tokenizer)
    if max_batch_size is None:
        max_batch_size = _batch_slots(loaded)
    sampling = sampling or SamplingParams()
    warm_up = (sampling, resample_params(sampling))
    return BatchedGPT2Engine(loaded.model, loaded.tokenizer, max_batch_size=max_batch_size, warm_up=warm_up)
