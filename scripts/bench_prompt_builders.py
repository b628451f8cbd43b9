"""Prompt-building throughput: a burst of distinct 256-token prompts built on N threads, as the worker's
prompt builders do (each thread has its own tokenizer copy). CPU only; prints one table row per count.

    python scripts/bench_prompt_builders.py --threads 1 2 4 8 12
    TOKENIZERS_PARALLELISM=false python scripts/bench_prompt_builders.py   # no Rust thread pool per call
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from model.jobs import thread_copy
from model.loading import bundled_tokenizer_dir, load_tokenizer
from model.prompt import Turn, build_prompt

WORDS = ("hello", "world", "how", "are", "you", "today", "music", "movie", "great", "thanks")


def histories(count: int, seed: int) -> list[tuple[Turn, ...]]:
    """`count` distinct one-turn histories of ~250 words (about 256 tokens each)."""
    rng = random.Random(seed)
    return [(Turn("Alice", " ".join(rng.choice(WORDS) for _ in range(250))),) for _ in range(count)]


def burst_ms(tokenizer: object, threads: int, burst: list[tuple[Turn, ...]]) -> float:
    """Wall ms to build every prompt of `burst` on `threads` threads, each with its own tokenizer copy."""
    local = threading.local()

    def build(history: tuple[Turn, ...]) -> int:
        if not hasattr(local, "tokenizer"):
            local.tokenizer = thread_copy(tokenizer)
        return len(build_prompt(local.tokenizer, "A friendly chat.", history, "Bot", 48, 1024).input_ids)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(build, burst[:threads]))  # each thread makes its copy before the clock starts
        started = time.perf_counter()
        list(pool.map(build, burst))
        return 1000 * (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    parser.add_argument("--burst", type=int, default=256)
    args = parser.parse_args()
    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM", "unset")
    print(f"{os.cpu_count()} CPUs · TOKENIZERS_PARALLELISM={parallelism} · burst of {args.burst}")
    print("| threads | burst wall (ms, median of 5) | per prompt (µs) |")
    print("|---:|---:|---:|")
    for threads in args.threads:
        walls = [burst_ms(tokenizer, threads, histories(args.burst, seed)) for seed in range(5)]
        wall = statistics.median(walls)
        print(f"| {threads} | {wall:.1f} | {1000 * wall / args.burst:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
