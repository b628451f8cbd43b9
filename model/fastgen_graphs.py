"""CUDA graphs for BatchedGPT2Engine: one per decode-step plan, one per prompt length for a lone prefill.

A replay costs one launch where the eager code costs ~100-200 (a decode step, or the prefill of one
prompt: ~170 launches, 4.3 ms of host time on an H100 host for ~0.3 ms of GPU work). Every graph is
captured into one memory pool, after an eager warm-up on a side stream (kernel choice, cuBLAS workspace,
Triton compiles), and reads and writes only the engine's preallocated buffers, so a replay serves any
rows those buffers hold.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from model.fastgen_ops import DecodeState, StepPlan
from model.fastgen_weights import GPT2Weights

log = logging.getLogger(__name__)


class StepGraphs:
    """The engine's captured graphs: `decode(plan)` and `prefill_one(ids, slot)`, captured on first use,
    or ahead of it (BatchedGPT2Engine.capture_graphs calls `decode`; `capture_prefills`)."""

    def __init__(
        self,
        weights: GPT2Weights,
        state: DecodeState,
        decode_step: Callable[..., None],
        prefill: Callable[..., None],
    ) -> None:
        self._weights, self._state = weights, state
        self._decode_step, self._prefill = decode_step, prefill
        self._device = state.tokens.device
        self._pool: Any = torch.cuda.graph_pool_handle()
        self.decode_graphs: dict[StepPlan, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # length bucket → one-job prefill
        with torch.inference_mode():
            # A lone prompt's prefill reads its ids and slot from here: the graphs' fixed inputs.
            self._prefill_input = torch.zeros((1, state.max_seq), dtype=torch.long, device=self._device)
            self._prefill_slot = torch.zeros(1, dtype=torch.long, device=self._device)

    def decode(self, plan: StepPlan) -> torch.cuda.CUDAGraph:
        """The decode step for `plan` (captured now if it is new)."""
        graph = self.decode_graphs.get(plan)
        if graph is None:
            graph = self.decode_graphs[plan] = self._capture_decode(plan)
        return graph

    def prefill_one(self, ids: torch.Tensor, slot: int) -> None:
        """Replay the prefill of one prompt's ids [1, L] (L a length bucket) into cache slot `slot`."""
        length = ids.shape[1]
        self._prefill_input[:, :length].copy_(ids.to(self._device, non_blocking=True))
        self._prefill_slot.fill_(slot)
        graph = self.prefill_graphs.get(length)
        if graph is None:
            graph = self.prefill_graphs[length] = self._capture_prefill(length)
        graph.replay()

    def capture_prefills(self, lengths: list[int]) -> None:
        """Capture a lone prompt's prefill for each length bucket now, before serving."""
        with torch.inference_mode():
            for length in lengths:
                if length not in self.prefill_graphs:
                    self.prefill_graphs[length] = self._capture_prefill(length)

    def _capture_decode(self, plan: StepPlan) -> torch.cuda.CUDAGraph:
        started = time.perf_counter()
        step = functools.partial(self._decode_step, self._weights, self._state, plan)
        graph = self._captured(warm_up=functools.partial(step, commit=False), body=step)
        log.info("captured a decode graph for %s in %.0f ms", plan, 1000 * (time.perf_counter() - started))
        return graph

    def _capture_prefill(self, length: int) -> torch.cuda.CUDAGraph:
        ids, slot = self._prefill_input[:, :length], self._prefill_slot
        run = functools.partial(self._prefill, self._weights, self._state, ids, slot)
        graph = self._captured(warm_up=run, body=run)  # the warm-up writes what the replay writes
        log.info("captured a prefill graph for %d positions", length)
        return graph

    def _captured(self, warm_up: Callable[[], None], body: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """`body` as a CUDA graph in the pool, after `warm_up` ran eagerly on a side stream."""
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            warm_up()
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            body()
        return graph
