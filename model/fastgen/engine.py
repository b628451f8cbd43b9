"""BatchedGPT2Engine: continuous batching for GPT-2 with a preallocated KV cache and CUDA graphs.

Long because: one class owns the slots, the KV cache and the steps in flight; admit, step, retire share them.

A job's life (every call comes from the worker thread, so nothing here locks):
- `admit()` gives the job the next slot; slots [0, n) are always the occupied ones.
- `step()` prefills every newly admitted job together (prompt minus its last token, right-padded to a bucketed
  length; on the GPU a few CUDA-graph replays, graphs.py), reads the outputs of earlier steps
  that the GPU has finished, retires jobs that finished or passed their deadline (the last slots move into the
  holes), then launches one decode step over all rows: a CUDA-graph replay on the GPU, the same Python eagerly
  on the CPU. On CUDA with Triton installed the step is the fused one (triton/fused_step.py), whose graphs
  serve every window: one per batch bucket × sampling features, captured up front for the `warm_up` settings
  (capture_graphs); the plain step (ops.py) needs one per window bucket too, captured when first
  needed.
- The host never waits for the step it just launched. Each step's tokens and finish reasons are copied
  to pinned host memory behind an event and read when ready; the host waits only when it is
  MAX_STEPS_AHEAD steps ahead. A row that finishes freezes on the GPU until the host has seen it.

Sampling (temperature, top-k, top-p, repetition penalty, no_repeat_ngram_size) runs on the device with
per-row settings held in tensors, so rows with different settings share one graph. Every job's random
numbers are drawn up front, a seeded job's from its own generator, so a seeded job samples the same
tokens whatever else is in the batch. Tie-breaking inside top-k and rounding inside top-p can differ
from Hugging Face's warpers; greedy decoding (temperature 0) gives exactly the tokens `generate` gives
(tests/model/fastgen/test_engine.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.engine import EngineJob, EngineResult
from model.fastgen.graphs import StepGraphs, prefill_shapes
from model.fastgen.inputs import prefill_inputs
from model.fastgen.ops import (
    REASON_MAX_NEW,
    REASON_MAX_SEQ,
    REASON_RUNNING,
    REASON_STOP_TOKEN,
    DecodeState,
    StepPlan,
    allocate_state,
    decode_step,
    install_rows,
    move_rows,
    prefill,
)
from model.fastgen.sampling import TOP_K_CAP
from model.fastgen.weights import weights_from_hf
from model.sampling import SamplingParams

log = logging.getLogger(__name__)

MAX_STEPS_AHEAD = 3  # launched steps the host has not read yet before step() waits for the oldest
OUTPUT_RING_SIZE = 8  # pinned output buffers; more than MAX_STEPS_AHEAD + 1 so none is reused unread
WINDOW_BUCKET = 32  # CUDA-graph path: attended cache length rounded up to this (few graphs, little waste)
PREFILL_BUCKET = 64  # CUDA-graph path: prefill length rounded up to this
PREFILL_TOKENS = {"cuda": 65_536, "cpu": 4_096}  # rows × length in one prefill call (bounds activations)
# CUDA-graph path: prefills of up to this many rows × length are graph replays. Up to here the eager
# prefill's ~170 launches take longer on the host than its kernels on the GPU (64 × 256 tokens: 5.1 ms of
# launches for 5.7 ms of GPU work on an H200); above it they overlap, and the graphs' memory pool would
# grow with it (BENCHMARKS.md).
PREFILL_GRAPH_TOKENS = 16_384


@dataclass(eq=False)
class _Running:
    """The host's record of one admitted job."""

    job: EngineJob
    max_steps: int  # after this many decode steps the GPU has certainly finished it
    tokens: list[int] = field(default_factory=list)
    installed_at: int = -1  # the engine's launched-step count at its prefill; -1 = not prefilled yet
    is_finished: bool = False

    def length_bound(self, steps_launched: int) -> int:
        """Upper bound of prompt + generated length once `steps_launched` steps have been launched."""
        return len(self.job.prompt_ids) + steps_launched - self.installed_at


@dataclass(frozen=True)
class _Launched:
    """A launched decode step: the host copy of its outputs, the job in each row, its completion event."""

    host_out: torch.Tensor  # [2B]: tokens then reasons
    jobs: tuple[_Running, ...]
    event: torch.cuda.Event | None  # None: a CPU step, complete on return


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _batch_buckets(max_batch: int) -> tuple[int, ...]:
    powers = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return (*powers, max_batch)


def _step_features(params: Sequence[SamplingParams]) -> tuple[str, bool, int]:
    """(sampling mode, any repetition penalty, n-gram span) for a StepPlan covering these settings."""
    sampled = [p for p in params if not p.is_greedy]
    sampling = "greedy" if not sampled else "full"
    if sampled and all(0 < p.top_k <= TOP_K_CAP for p in sampled):
        sampling = "top_k"
    use_penalty = any(p.repetition_penalty != 1.0 for p in params)
    largest_n = max((p.no_repeat_ngram_size for p in params), default=0)
    span = 0 if largest_n <= 0 else max(4, 1 << (largest_n - 1).bit_length())  # few distinct graphs
    return sampling, use_penalty, span


def _step_functions(
    device: torch.device, want_fused: bool, is_required: bool
) -> tuple[Callable[..., None], Callable[..., None]]:
    """(decode step, prefill): the fused Triton pair when wanted and Triton can run here, else the plain
    pair. They go together: the prefill writes the cache rounded as its decode step rounds."""
    if not want_fused:
        return decode_step, prefill
    try:
        from model.fastgen.triton import fused_step
    except ImportError:
        if is_required:
            raise
        log.info("Triton is not installed: using the plain decode step")
        return decode_step, prefill
    if not fused_step.can_run_on(device):
        if is_required:
            raise ValueError("the fused decode step needs CUDA (or Triton's interpreter, TRITON_INTERPRET=1)")
        return decode_step, prefill
    return fused_step.decode_step, fused_step.prefill


class BatchedGPT2Engine:
    """A DecodeEngine for GPT-2 models: many jobs per decode step, joining and leaving between steps."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 64,
        max_seq_len: int | None = None,
        use_cuda_graphs: bool | None = None,
        fused: bool | None = None,
        warm_up: Sequence[SamplingParams] = (),
    ) -> None:
        if not self.supports(model):
            raise ValueError("BatchedGPT2Engine needs a GPT-2 model without cross-attention or layer scaling")
        n_positions = int(model.config.n_positions)
        max_seq = n_positions if max_seq_len is None else max_seq_len
        if not 2 <= max_seq <= n_positions:
            raise ValueError(f"max_seq_len must be 2..{n_positions}, got {max_seq_len}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        device = model.lm_head.weight.device
        self._use_graphs = device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        if self._use_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self._device = device
        self._eos_id: int | None = tokenizer.eos_token_id
        self._max_batch, self._max_seq = max_batch_size, max_seq
        want_fused = self._use_graphs if fused is None else fused
        self._decode_step, self._prefill = _step_functions(device, want_fused, is_required=fused is True)
        self._is_fused = self._decode_step is not decode_step
        self._weights = weights_from_hf(model, fast_activation=self._use_graphs, out_in_copies=self._is_fused)
        with torch.inference_mode():
            self._state: DecodeState = allocate_state(self._weights, max_batch_size, max_seq)
        # Graphs are captured per window bucket; the fused step reads each row's length on the device,
        # so its graphs serve every window. Eager shapes cost nothing to vary.
        self._bucket = WINDOW_BUCKET if self._use_graphs else 1
        self._fixed_window = max_seq if self._is_fused else None
        self._prefill_bucket = PREFILL_BUCKET if self._use_graphs else 1
        self._prefill_tokens = PREFILL_TOKENS["cuda" if device.type == "cuda" else "cpu"]
        self._batch_buckets = _batch_buckets(max_batch_size)
        self._running: list[_Running] = []  # index = slot
        self._launched: deque[_Launched] = deque()
        self._steps = 0  # decode steps launched so far
        self._features: tuple[str, bool, int] | None = None  # cached until the set of jobs changes
        self._graphs: StepGraphs | None = None  # eager on the CPU, or when graphs are turned off
        if self._use_graphs:
            self._graphs = StepGraphs(self._weights, self._state, self._decode_step, self._prefill)
        self._host_out: torch.Tensor | None = None
        self._events: list[torch.cuda.Event] = []
        if device.type == "cuda":
            ring_shape = (OUTPUT_RING_SIZE, 2 * max_batch_size)
            self._host_out = torch.zeros(ring_shape, dtype=torch.long, pin_memory=True)
            self._events = [torch.cuda.Event() for _ in range(OUTPUT_RING_SIZE)]
        for params in warm_up:
            self.capture_graphs(params)
        if warm_up and self._graphs is not None:
            self._capture_prefill_graphs()

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether `model` is a GPT-2 LM head model this engine reproduces exactly."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "gpt2":
            return False
        if not (hasattr(model, "transformer") and hasattr(model, "lm_head")):
            return False
        unsupported = ("add_cross_attention", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
        return not any(getattr(config, name, False) for name in unsupported)

    def capture_graphs(self, params: SamplingParams) -> None:
        """Capture now the decode graph of every batch size for jobs sampled with `params`.

        Otherwise a graph is captured the first time its batch size comes up, in the middle of serving,
        with the GIL mostly held: on the H100 a 256-burst that met a new batch size stalled the event loop
        72 ms and took 509 ms instead of 217 (BENCHMARKS.md, Generation). Only
        the fused step's graphs serve every window; the plain step's are left to capture on demand.
        """
        if self._graphs is None or not self._fixed_window:
            return
        features = _step_features([params])
        with torch.inference_mode():
            for batch in self._batch_buckets:
                self._graphs.decode(StepPlan(batch, self._fixed_window, *features))

    def _capture_prefill_graphs(self) -> None:
        """Capture now the prefill graph of every prompt length bucket and power-of-two count of prompts up
        to PREFILL_GRAPH_TOKENS; captured on first use instead, the first reply of each bucket waited ~0.9 s
        on an H100 (BENCHMARKS.md, Generation)."""
        assert self._graphs is not None
        lengths = dict.fromkeys(self._prefill_length(prefix) for prefix in range(1, self._max_seq))
        self._graphs.capture_prefills(prefill_shapes(self._max_batch, lengths, PREFILL_GRAPH_TOKENS))

    # ---- the DecodeEngine protocol ----

    def can_admit(self) -> bool:
        """Whether a slot is free."""
        return len(self._running) < self._max_batch

    def admit(self, job: EngineJob) -> None:
        """Give the job a slot; its prefill runs at the start of the next step()."""
        if not self.can_admit():
            raise RuntimeError("no free slot: check can_admit() first")
        prompt = job.prompt_ids
        if not prompt or len(prompt) >= self._max_seq:
            raise ValueError(f"prompt of {len(prompt)} tokens: need 1..{self._max_seq - 1}")
        if min(prompt) < 0 or max(prompt) >= self._weights.vocab_size:
            raise ValueError("prompt has a token id outside the model's vocabulary")
        max_steps = min(job.params.max_new_tokens, self._max_seq - len(prompt))
        self._running.append(_Running(job, max_steps))
        self._features = None

    def has_work(self) -> bool:
        """Whether any admitted job is unfinished."""
        return bool(self._running)

    @torch.inference_mode()
    def step(self) -> list[EngineResult]:
        """Prefill new jobs, retire finished ones, launch one decode step; return the jobs that finished."""
        self._install_waiting()
        results = self._read(wait_for_oldest=False)
        results += self._expire(time.monotonic())
        self._compact()
        if self._needs_step():
            self._launch()
            results += self._read(wait_for_oldest=len(self._launched) > MAX_STEPS_AHEAD)
        elif self._launched:
            results += self._read(wait_for_oldest=True)
        elif any(not r.is_finished for r in self._running):
            raise RuntimeError("internal error: jobs are unfinished but no decode step is pending")
        self._compact()
        return results

    def abort_all(self) -> list[int]:
        """Drop every admitted job (after an error) and return their ids."""
        ids = [r.job.job_id for r in self._running if not r.is_finished]
        self._running.clear()
        self._launched.clear()
        self._features = None
        with torch.inference_mode():
            self._state.done.fill_(True)
        return ids

    # ---- admission: prefill ----

    def _install_waiting(self) -> None:
        waiting_from = next((i for i, r in enumerate(self._running) if r.installed_at < 0), None)
        if waiting_from is None:
            return
        waiting = self._running[waiting_from:]  # admit() appends, so waiting jobs are a suffix
        for first_slot, chunk in self._prefill_chunks(waiting_from, waiting):
            self._install(first_slot, chunk)
        for running in waiting:
            running.installed_at = self._steps

    def _prefill_chunks(
        self, first_slot: int, waiting: list[_Running]
    ) -> Iterator[tuple[int, list[_Running]]]:
        chunk: list[_Running] = []
        longest = 0
        for running in waiting:
            length = _round_up(len(running.job.prompt_ids), self._prefill_bucket)
            if chunk and (len(chunk) + 1) * max(longest, length) > self._prefill_tokens:
                yield first_slot, chunk
                first_slot, chunk, longest = first_slot + len(chunk), [], 0
            chunk.append(running)
            longest = max(longest, length)
        yield first_slot, chunk

    def _install(self, first_slot: int, chunk: list[_Running]) -> None:
        jobs = [r.job for r in chunk]
        longest = max(len(job.prompt_ids) for job in jobs)
        # The last prompt token is fed by the first decode step, which also picks the first new token;
        # the prefill writes the cache for the rest, `prefix` positions rounded up to a bucket.
        prefix = longest - 1
        length = self._prefill_length(prefix) if prefix > 0 else 0
        draws = max(r.max_steps for r in chunk) + 1
        # One padded copy serves both: a prefill's input past a prompt's own prefix is padding, whose
        # keys/values the decode steps overwrite before any row attends to them.
        inputs = prefill_inputs(jobs, max(longest, length), draws, self._weights.vocab_size)
        install_rows(
            self._state,
            first_slot,
            tokens=inputs.ids[:, :longest],
            rows=inputs.rows,
            floats=inputs.floats,
            stop_index=inputs.stop_index,
            uniforms=inputs.uniforms,
        )
        if length > 0:
            ids = inputs.ids[:, :length]
            if self._graphs is not None and len(chunk) * length <= PREFILL_GRAPH_TOKENS:
                self._graphs.prefill(ids, first_slot)
            else:
                slots = torch.arange(first_slot, first_slot + len(chunk))
                self._prefill(self._weights, self._state, self._on_device(ids), self._on_device(slots))

    def _prefill_length(self, prefix: int) -> int:
        """The prefill's length for prompts whose longest prefix is `prefix` tokens: a bucket."""
        return min(self._max_seq, _round_up(prefix, self._prefill_bucket))

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._device, non_blocking=True)

    # ---- reading results, retiring jobs ----

    def _read(self, wait_for_oldest: bool) -> list[EngineResult]:
        """Apply the outputs of launched steps, oldest first, that the device has finished."""
        results: list[EngineResult] = []
        while self._launched:
            oldest = self._launched[0]
            if oldest.event is not None and not oldest.event.query():
                if not wait_for_oldest:
                    break
                oldest.event.synchronize()  # releases the GIL while it waits
            wait_for_oldest = False
            self._launched.popleft()
            results += self._apply(oldest)
        return results

    def _apply(self, launched: _Launched) -> list[EngineResult]:
        values = launched.host_out.tolist()
        batch = len(values) // 2
        results = []
        for running, token, reason in zip(launched.jobs, values[:batch], values[batch:], strict=False):
            if running.is_finished:
                continue  # finished earlier (its row was frozen) or retired by its deadline
            result = self._advance(running, token, reason)
            if result is not None:
                results.append(result)
        return results

    def _advance(self, running: _Running, token: int, reason: int) -> EngineResult | None:
        if reason == REASON_RUNNING:
            running.tokens.append(token)
            return None
        if reason == REASON_STOP_TOKEN:
            return self._finish(running, "eos" if token == self._eos_id else "turn_end")
        if reason not in (REASON_MAX_NEW, REASON_MAX_SEQ):
            raise RuntimeError(f"internal error: job {running.job.job_id} ran on an idle row")
        running.tokens.append(token)
        return self._finish(running, "max_tokens")

    def _finish(self, running: _Running, stop_reason: str) -> EngineResult:
        running.is_finished = True
        return EngineResult(running.job.job_id, tuple(running.tokens), stop_reason)

    def _expire(self, now: float) -> list[EngineResult]:
        late = [r for r in self._running if not r.is_finished and now >= r.job.deadline]
        return [self._finish(r, "time_limit") for r in late]

    def _compact(self) -> None:
        """Drop finished jobs; move the last running jobs into their slots so [0, n) stays occupied."""
        running = self._running
        n_keep = sum(not r.is_finished for r in running)
        if n_keep == len(running):
            return
        holes = [i for i in range(n_keep) if running[i].is_finished]
        movers = [i for i in range(n_keep, len(running)) if not running[i].is_finished]
        if holes:
            longest = max(running[i].length_bound(self._steps) for i in movers)
            move_rows(self._state, movers, holes, min(self._max_seq, _round_up(longest, self._bucket)))
            for hole, mover in zip(holes, movers, strict=True):
                running[hole] = running[mover]
        self._state.done[n_keep : len(running)] = True  # freeze the vacated rows
        del running[n_keep:]
        self._features = None

    # ---- the decode step ----

    def _needs_step(self) -> bool:
        return any(not r.is_finished and self._steps - r.installed_at < r.max_steps for r in self._running)

    def _plan(self) -> StepPlan:
        n_rows = len(self._running)
        batch = next(b for b in self._batch_buckets if b >= n_rows) if self._use_graphs else n_rows
        longest = max(r.length_bound(self._steps) for r in self._running)
        window = self._fixed_window or min(self._max_seq, _round_up(longest, self._bucket))
        if self._features is None:
            self._features = _step_features([r.job.params for r in self._running])
        sampling, use_penalty, ngram_span = self._features
        return StepPlan(batch, window, sampling, use_penalty, ngram_span)

    def _launch(self) -> None:
        plan = self._plan()
        if self._graphs is not None:
            self._graphs.decode(plan).replay()
        else:
            self._decode_step(self._weights, self._state, plan)
        self._launched.append(self._publish(plan.batch))
        self._steps += 1

    def _publish(self, batch: int) -> _Launched:
        """Start copying the step's outputs to the host; record an event to know when they are there."""
        out, jobs = self._state.out[: 2 * batch], tuple(self._running)
        if self._host_out is None:
            return _Launched(out.clone(), jobs, None)
        ring = self._steps % OUTPUT_RING_SIZE
        host_out = self._host_out[ring, : 2 * batch]
        host_out.copy_(out, non_blocking=True)
        self._events[ring].record()
        return _Launched(host_out, jobs, self._events[ring])
