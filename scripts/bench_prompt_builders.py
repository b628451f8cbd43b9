"""Prompt-building throughput: a burst of distinct 256-token prompts, wall time until all are built. CPU only.

Two tables. `build_prompt` per job on N threads, each with its own tokenizer copy (the builders before
batching); then the worker's real PromptBuilders (N threads, up to B jobs built together with
build_prompts), the burst submitted at once as the worker's thread does, timed until every BuiltPrompt
is delivered. B = 1 builds one job at a time, as the per-job builders did.

    python scripts/bench_prompt_builders.py --threads 1 2 4 --max-batch 1 16 64 256
    TOKENIZERS_PARALLELISM=true python scripts/bench_prompt_builders.py   # the worker on ≥ 8 cores
    TOKENIZERS_PARALLELISM=false python scripts/bench_prompt_builders.py  # the worker on fewer
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from model.api import ReplyRequest
from model.encoding import thread_copy
from model.loading import bundled_tokenizer_dir, load_tokenizer
from model.prompt import Turn, build_prompt
from model.sampling import SamplingParams
from model.serving.jobs import BuiltPrompt, GenerateJob, Serving
from model.serving.prompt_builders import PromptBuilders

WORDS = ("hello", "world", "how", "are", "you", "today", "music", "movie", "great", "thanks")
PERSONA, BOT_NAME, MAX_NEW_TOKENS, N_POSITIONS = "A friendly chat.", "Bot", 48, 1024
REPEATS = 5


def histories(count: int, seed: int) -> list[tuple[Turn, ...]]:
    """`count` distinct one-turn histories of ~250 words (about 256 tokens each)."""
    rng = random.Random(seed)
    return [(Turn("Alice", " ".join(rng.choice(WORDS) for _ in range(250))),) for _ in range(count)]


def per_job_ms(tokenizer: Any, threads: int, burst: list[tuple[Turn, ...]]) -> float:
    """Wall ms to build every prompt of `burst` on `threads` threads, each with its own tokenizer copy."""
    local = threading.local()

    def build(history: tuple[Turn, ...]) -> int:
        if not hasattr(local, "tokenizer"):
            local.tokenizer = thread_copy(tokenizer)
        return len(
            build_prompt(local.tokenizer, PERSONA, history, BOT_NAME, MAX_NEW_TOKENS, N_POSITIONS).input_ids
        )

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(build, burst[:threads]))  # each thread makes its copy before the clock starts
        started = time.perf_counter()
        list(pool.map(build, burst))
        return 1000 * (time.perf_counter() - started)


class Delivered:
    """PromptBuilders' deliver callback: counts BuiltPrompts and says when `expected` have come."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._left = 0

    def expect(self, count: int) -> None:
        self._left = count
        self._done.clear()

    def __call__(self, built: list[BuiltPrompt]) -> None:
        assert all(one.prompt is not None for one in built), [one.error for one in built]
        with self._lock:
            self._left -= len(built)
            if self._left == 0:
                self._done.set()

    def wait(self) -> None:
        self._done.wait()


def builders_ms(
    tokenizer: Any, threads: int, max_batch: int, bursts: list[list[tuple[Turn, ...]]]
) -> list[float]:
    """Wall ms per burst for PromptBuilders: every job submitted at once, until the last is delivered."""
    loop = asyncio.new_event_loop()
    loaded = SimpleNamespace(tokenizer=tokenizer, n_positions=N_POSITIONS)
    serving = Serving(loaded, engine=None, stop_ids=frozenset())  # type: ignore[arg-type]
    for _ in range(threads):
        serving.tokenizer_copies.put(thread_copy(tokenizer))
    delivered = Delivered()
    builders = PromptBuilders(threads, delivered, max_batch=max_batch)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    walls = []
    try:
        for burst in [bursts[0][: 4 * threads], *bursts]:  # the first, small, starts every thread
            jobs = [
                GenerateJob(ReplyRequest(PERSONA, h, BOT_NAME, params), loop.create_future(), 0.0)
                for h in burst
            ]
            delivered.expect(len(jobs))
            started = time.perf_counter()
            builders.submit(jobs, serving, generation=1)
            delivered.wait()
            walls.append(1000 * (time.perf_counter() - started))
    finally:
        builders.shutdown()
        loop.close()
    return walls[1:]


def table(title: str, rows: list[tuple[str, list[float]]], burst: int) -> None:
    print(f"\n{title}\n| setting | burst wall (ms, median of {REPEATS}) | per prompt (µs) |\n|---|---:|---:|")
    for setting, walls in rows:
        wall = statistics.median(walls)
        print(f"| {setting} | {wall:.1f} | {1000 * wall / burst:.0f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--burst", type=int, default=256)
    args = parser.parse_args()
    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    bursts = [histories(args.burst, seed) for seed in range(REPEATS)]
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM", "unset")
    print(f"{os.cpu_count()} CPUs · TOKENIZERS_PARALLELISM={parallelism} · burst of {args.burst}")

    def per_job(threads: int) -> list[float]:
        return [per_job_ms(tokenizer, threads, burst) for burst in bursts]

    table("build_prompt per job", [(f"{t} threads", per_job(t)) for t in args.threads], args.burst)
    rows = [
        (f"{t} threads, batches ≤ {b}", builders_ms(tokenizer, t, b, bursts))
        for t in args.threads
        for b in args.max_batch
    ]
    table("PromptBuilders (build_prompts)", rows, args.burst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
