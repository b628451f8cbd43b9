"""Decode-step benchmark: one CUDA-graph replay of the plain step against the fused (Triton) step.

GPT-2 124M's shape with random fp16 weights; every row holds a 256-token prompt and the timed replays
generate tokens 257..304, as a 48-token reply does. Each figure is the median over repeats of
(48 replays timed with CUDA events) / 48, after restoring the rows between repeats. Prints a table of step
times, then eager prefill times, plain and fused (and, with --profile, the fused step's kernels).

    python scripts/bench_decode_step.py                 # rows 1, 8, 64, 256
    python scripts/bench_decode_step.py --profile 1     # also the fused step's kernels at 1 row
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from model.fastgen import ops as fastgen_ops
from model.fastgen import weights as fastgen_weights
from model.fastgen.ops import DecodeState, StepPlan
from model.fastgen.triton import fused_step as fastgen_triton
from model.fastgen.weights import GPT2Weights
from model.sampling import SamplingParams

PROMPT_TOKENS = 256
NEW_TOKENS = 48
MAX_SEQ = 1024


def build(rows: int) -> tuple[GPT2Weights, DecodeState]:
    """Random GPT-2 124M weights and a state whose `rows` slots hold prefilled 256-token prompts."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=MAX_SEQ, vocab_size=50257)
    model = GPT2LMHeadModel(config).to("cuda", torch.float16).eval()
    weights = fastgen_weights.weights_from_hf(model, fast_activation=True, out_in_copies=True)
    state = fastgen_ops.allocate_state(weights, rows, MAX_SEQ)
    prompts = torch.randint(0, 50256, (rows, PROMPT_TOKENS))
    params = SamplingParams()  # the bot's defaults: sampling, penalty, 3-gram ban
    settings = [PROMPT_TOKENS - 1, 0, 10**6, params.top_k, params.no_repeat_ngram_size]
    fastgen_ops.install_rows(
        state, 0, prompts,
        rows=torch.tensor([settings] * rows),
        floats=torch.tensor([[params.temperature, params.top_p, params.repetition_penalty]] * rows),
        stop_index=torch.full((rows, 1), 50257),
        uniforms=torch.rand(rows, MAX_SEQ + 1),
    )  # fmt: skip
    fastgen_ops.prefill(weights, state, prompts[:, :-1].cuda(), torch.arange(rows, device="cuda"))
    return weights, state


def plan_for(rows: int, greedy: bool) -> StepPlan:
    """The plan the engine makes for `rows` rows of greedy jobs or of the bot's default sampling
    (top-k 50 within the cap, repetition penalty, 3-gram ban: span 4)."""
    window = -(-(PROMPT_TOKENS + NEW_TOKENS) // 32) * 32
    if greedy:
        return StepPlan(rows, window, "greedy", use_penalty=False, ngram_span=0)
    return StepPlan(rows, window, "top_k", use_penalty=True, ngram_span=4)


def time_step(step: Callable[..., None], weights: GPT2Weights, state: DecodeState, plan: StepPlan) -> float:
    """Median ms per replay of a captured graph of `step`."""
    saved = [t.clone() for t in (state.tokens, state.rows, state.done)]

    def restore() -> None:
        for buffer, copy in zip((state.tokens, state.rows, state.done), saved, strict=True):
            buffer.copy_(copy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(weights, state, plan)
    torch.cuda.current_stream().wait_stream(side)
    restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(weights, state, plan)
    samples = []
    for _ in range(7):
        restore()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(NEW_TOKENS):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / NEW_TOKENS)
    restore()
    return statistics.median(samples)


def profile(rows: int) -> None:
    """The fused step's kernels at `rows` rows, by total GPU time (20 eager steps)."""
    weights, state = build(rows)
    plan = plan_for(rows, greedy=False)
    with torch.inference_mode():
        fastgen_triton.decode_step(weights, state, plan, commit=False)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fastgen_triton.decode_step(weights, state, plan)
            torch.cuda.synchronize()
    print(f"fused step at {rows} rows, 20 steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))


def time_prefill(rows: int, prefill: Callable[..., None]) -> float:
    """Wall ms of one eager prefill of `rows` 255-token prompt prefixes (GPU synchronised)."""
    weights, state = build(rows)
    ids = torch.randint(0, 50256, (rows, PROMPT_TOKENS)).cuda()  # 255 prompt tokens, padded to the bucket
    samples = []
    for _ in range(7):
        torch.cuda.synchronize()
        started = time.perf_counter()
        prefill(weights, state, ids, torch.arange(rows, device="cuda"))
        torch.cuda.synchronize()
        samples.append(1000 * (time.perf_counter() - started))
    return statistics.median(samples[2:])


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--profile", type=int, nargs="*", default=[], help="profile the fused step (rows)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · fp16 · GPT-2 124M shape")
    print("| rows | greedy: plain (ms) | greedy: fused (ms) | sampling: plain (ms) | sampling: fused (ms) |")
    print("|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in args.rows:
            weights, state = build(rows)
            cells = []
            for greedy in (True, False):
                plan = plan_for(rows, greedy)
                for step in (fastgen_ops.decode_step, fastgen_triton.decode_step):
                    cells.append(time_step(step, weights, state, plan))
            print(f"| {rows} | " + " | ".join(f"{ms:.3f}" for ms in cells) + " |", flush=True)
            del weights, state
            torch.cuda.empty_cache()
    with torch.inference_mode():
        for rows in (1, 64, 256):
            plain, fused = (time_prefill(rows, p) for p in (fastgen_ops.prefill, fastgen_triton.prefill))
            print(f"eager prefill of {rows} × 256 tokens: plain {plain:.2f} ms, fused {fused:.2f} ms")
    for rows in args.profile:
        profile(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
