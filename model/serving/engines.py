"""Which decode engine serves a loaded model, and how many sequences its KV cache holds.

BatchedGPT2Engine (model/fastgen/) for GPT-2 architecture models whose tokenizer encodes a newline, else
HFGenerateEngine (model/hf_engine.py), which works for any causal LM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from model.encoding import encodes_newline
from model.engine import DecodeEngine
from model.hf_engine import HFGenerateEngine
from model.replies import resample_params
from model.sampling import SamplingParams

if TYPE_CHECKING:
    from model.loading import LoadedModel

CUDA_MAX_BATCH = 256  # sequences decoded together on a GPU (one CUDA graph per batch-size bucket)
CPU_MAX_BATCH = 8  # a CPU gains little from wide batches
KV_CACHE_MEMORY_FRACTION = 0.3  # of the GPU memory still free after loading the weights


def _batch_slots(loaded: LoadedModel) -> int:
    """How many sequences the preallocated KV cache holds: capped by what the GPU can spare."""
    if loaded.device.type != "cuda":
        return CPU_MAX_BATCH
    config = loaded.model.config
    element_bytes = torch.finfo(loaded.dtype).bits // 8
    slot_bytes = 2 * config.n_layer * loaded.n_positions * config.n_embd * element_bytes  # K and V
    free_bytes, _ = torch.cuda.mem_get_info(loaded.device)
    return max(1, min(CUDA_MAX_BATCH, int(free_bytes * KV_CACHE_MEMORY_FRACTION) // slot_bytes))


def default_engine_factory(
    loaded: LoadedModel,
    max_batch_size: int | None = None,
    sampling: SamplingParams | None = None,
) -> DecodeEngine:
    """BatchedGPT2Engine for GPT-2 architecture models, HFGenerateEngine for every other causal LM.

    The batched engine captures its CUDA graphs for `sampling` (the bot's settings; SamplingParams()
    when None) and for its repeat-guard retry before it serves, so no burst pays for a capture.
    """
    from model.fastgen.engine import BatchedGPT2Engine

    # The batched engine ends turns by token id only; a tokenizer with no newline token (many Japanese
    # sentencepiece models) ends turns at speaker tags, which HFGenerateEngine checks on decoded text.
    if not BatchedGPT2Engine.supports(loaded.model) or not encodes_newline(loaded.tokenizer):
        return HFGenerateEngine(loaded.model, loaded.tokenizer)
    if max_batch_size is None:
        max_batch_size = _batch_slots(loaded)
    sampling = sampling or SamplingParams()
    warm_up = (sampling, resample_params(sampling))
    return BatchedGPT2Engine(loaded.model, loaded.tokenizer, max_batch_size=max_batch_size, warm_up=warm_up)
