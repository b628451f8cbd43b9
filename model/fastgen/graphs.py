"""CUDA graphs for BatchedGPT2Engine: one per decode-step plan, one per (prompts, length) of a prefill.

A replay costs one launch where the eager code costs ~100-200 (a decode step, or a prefill: ~170 launches: 4.3
ms of host time on an H100 host for the ~0.3 ms of GPU work of one prompt, 5.1 ms on an H200 host for the ~5.7
ms of 64 prompts of 256 tokens). Every graph is captured into one memory pool, after an eager warm-up on a
side stream (kernel choice, cuBLAS workspace, Triton compiles), and reads and writes only the engine's
preallocated buffers, so a replay serves any rows those buffers hold. Graphs in one pool share its memory:
they run one at a time, and none leaves anything there that a later one reads.

A prefill's prompts are replayed in parts of a power of two (63 = 32 + 16 + 8 + 4 + 2 + 1), so one graph
per power of two and length serves every count, and no graph computes padding rows. The engine replays
prefills only up to a number of tokens (engine.PREFILL_GRAPH_TOKENS), and captures only those shapes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import torch

from model.fastgen.ops import DecodeState, StepPlan
from model.fastgen.weights import GPT2Weights

log = logging.getLogger(__name__)


class StepGraphs:
    """The engine's captured graphs: `decode(plan)` and `prefill(ids, first_slot)`, captured on first use,
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
        # (prompts: a power of two, length bucket) → the prefill of that many prompts
        self.prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        with torch.inference_mode():
            # A prefill reads its prompts' ids and slots from rows [0, prompts): the graphs' fixed inputs.
            shape = (state.done.shape[0], state.max_seq)  # max_batch × S
            self._prefill_input = torch.zeros(shape, dtype=torch.long, device=self._device)
            self._prefill_slots = torch.zeros(shape[0], dtype=torch.long, device=self._device)

    def decode(self, plan: StepPlan) -> torch.cuda.CUDAGraph:
        """The decode step for `plan` (captured now if it is new)."""
        graph = self.decode_graphs.get(plan)
        if graph is None:
            graph = self.decode_graphs[plan] = self._capture_decode(plan)
        return graph

    def prefill(self, ids: torch.Tensor, first_slot: int) -> None:
        """Replay the prefill of P prompts' ids [P, L] (L a length bucket) into cache slots first_slot + i,
        in parts of a power of two."""
        done = 0
        for part in _powers_of_two(ids.shape[0]):
            self._replay_prefill(ids[done : done + part], first_slot + done)
            done += part

    def capture_prefills(self, shapes: list[tuple[int, int]]) -> None:
        """Capture now, before serving, the prefill of each (prompts: a power of two, length bucket)."""
        with torch.inference_mode():
            for shape in shapes:
                if shape not in self.prefill_graphs:
                    self.prefill_graphs[shape] = self._capture_prefill(*shape)

    def _replay_prefill(self, ids: torch.Tensor, first_slot: int) -> None:
        prompts, length = ids.shape
        shape = (prompts, length)
        self._prefill_input[:prompts, :length].copy_(ids.to(self._device, non_blocking=True))
        self._prefill_slots[:prompts].copy_(self._state.arange[first_slot : first_slot + prompts])
        graph = self.prefill_graphs.get(shape)
        if graph is None:
            graph = self.prefill_graphs[shape] = self._capture_prefill(prompts, length)
        graph.replay()

    def _capture_decode(self, plan: StepPlan) -> torch.cuda.CUDAGraph:
        started = time.perf_counter()
        step = functools.partial(self._decode_step, self._weights, self._state, plan)
        graph = self._captured(warm_up=functools.partial(step, commit=False), body=step)
        log.info("captured a decode graph for %s in %.0f ms", plan, 1000 * (time.perf_counter() - started))
        return graph

    def _capture_prefill(self, prompts: int, length: int) -> torch.cuda.CUDAGraph:
        ids, slots = self._prefill_input[:prompts, :length], self._prefill_slots[:prompts]
        run = functools.partial(self._prefill, self._weights, self._state, ids, slots)
        graph = self._captured(warm_up=run, body=run)  # the warm-up writes what the replay writes
        log.info("captured a prefill graph for %d prompts of %d positions", prompts, length)
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


def _powers_of_two(count: int) -> list[int]:
    """The powers of two that sum to `count`, largest first: 11 → [8, 2, 1]."""
    return [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]


def prefill_shapes(max_prompts: int, lengths: Collection[int], max_tokens: int) -> list[tuple[int, int]]:
    """Every (power-of-two count up to max_prompts, length) of at most max_tokens, largest first (the smaller
    captures then reuse the pool's memory): the parts `prefill` replays for any count of prompts up to
    max_prompts at those lengths, within max_tokens."""
    counts = [1 << bit for bit in range(max_prompts.bit_length())]
    shapes = [(n, length) for n in counts for length in lengths if n * length <= max_tokens]
    return sorted(shapes, key=lambda shape: shape[0] * shape[1], reverse=True)
