"""`bench_generation.py --backend openai`: the same cases against an OpenAI-compatible server, beside the
local worker on the same model, and what the client itself adds per reply.

Each system answers one reply at a time (p50 latency), then bursts of N concurrent replies (tokens/s,
p50/p95 latency, event-loop lag). With `--fake-server DIR` the script starts the project's test server
(tests/helpers/openai_server.py, the model in DIR through HFGenerateEngine) in a child process and reads
its own time per completion, so "client overhead" = the client's latency − the server's time, per reply.

    python scripts/bench_generation.py --backend openai --fake-server model/starter --local model/starter
    python scripts/bench_generation.py --backend openai --base-url http://127.0.0.1:8011/v1 --model starter

The machine's CPU is shared: numbers are noisy, compare columns of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bot.remote.generator import RemoteConfig, RemoteGenerator
from model.api import Reply, ReplyRequest
from model.prompt import Turn
from model.sampling import SamplingParams
from model.serving.worker import ModelWorker

LAG_TICK_SECONDS = 0.005


def request(new_tokens: int, index: int) -> ReplyRequest:
    params = SamplingParams(max_new_tokens=new_tokens, no_repeat_ngram_size=0, seed=index)
    history = (Turn("alice", f"hello, tell me something about number {index}"),)
    return ReplyRequest("A friendly chat.", history, params=params, time_limit_seconds=600.0)


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def burst(
    generate: Callable[[ReplyRequest], Awaitable[Reply]], count: int, new_tokens: int
) -> dict[str, float]:
    """`count` replies at once: wall time, tokens/s, latency p50/p95, loop lag p99 (all ms but tokens/s)."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(LAG_TICK_SECONDS)
            lags.append(time.perf_counter() - before - LAG_TICK_SECONDS)

    async def timed(index: int) -> tuple[float, int]:
        begun = time.perf_counter()
        reply = await generate(request(new_tokens, index))
        return time.perf_counter() - begun, reply.completion_tokens

    watcher = asyncio.create_task(watch())
    begun = time.perf_counter()
    done = await asyncio.gather(*(timed(i) for i in range(count)))
    wall = time.perf_counter() - begun
    stop.set()
    await watcher
    latencies = [d[0] for d in done]
    return {
        "tokens_per_second": sum(d[1] for d in done) / wall,
        "p50_ms": 1000 * _q(latencies, 0.5),
        "p95_ms": 1000 * _q(latencies, 0.95),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "lag_p99_ms": 1000 * _q(lags, 0.99),
        "wall_ms_per_reply": 1000 * wall / count,
    }


def server_seconds(base_url: str) -> list[float] | None:
    """The fake server's own time per completion so far; None for a server without that endpoint."""
    root = base_url.removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/test/server_seconds", timeout=5) as response:
            return list(json.load(response)["server_seconds"])
    except OSError:
        return None


async def bench(
    generate: Callable[[ReplyRequest], Awaitable[Reply]],
    counts: list[int],
    args: argparse.Namespace,
    url: str | None,
) -> dict[str, dict[str, float]]:
    await burst(generate, max(counts), args.new_tokens)  # warm-up
    singles = [await burst(generate, 1, args.new_tokens) for _ in range(args.singles)]
    results = {"single": {"p50_ms": statistics.median(s["p50_ms"] for s in singles)}}
    for count in counts:
        before = len(server_seconds(url) or []) if url else 0
        results[str(count)] = run = await burst(generate, count, args.new_tokens)
        times = server_seconds(url) if url else None
        if times is not None:
            mine = times[before:]
            run["server_mean_ms"] = 1000 * statistics.fmean(mine)
            run["client_overhead_ms"] = run["mean_ms"] - run["server_mean_ms"]
    return results


def client_work_ms(tokenizer_dir: Path, new_tokens: int, count: int) -> float:
    """The client's own CPU work per reply, no network: prompt, request body, JSON both ways, cleanup."""
    from bot.remote.generator import completion_body
    from model.loading import load_tokenizer
    from model.prompt import build_prompt
    from model.replies import clean_reply, stop_token_ids

    tokenizer = load_tokenizer(str(tokenizer_dir))
    stops = sorted(stop_token_ids(tokenizer))
    answer = json.dumps(
        {"choices": [{"text": " well, I think that is a good one. How are you?", "finish_reason": "stop"}]}
    )
    begun = time.perf_counter()
    for index in range(count):
        r = request(new_tokens, index)
        prompt = build_prompt(tokenizer, r.persona, r.history, r.bot_name, new_tokens, 256)
        json.dumps(completion_body("starter", prompt.input_ids, r.params, stops))
        clean_reply(json.loads(answer)["choices"][0]["text"], ("Bot", "alice"), has_ended_turn=True)
    return 1000 * (time.perf_counter() - begun) / count


@contextlib.contextmanager
def fake_server(model_dir: Path, instant: bool) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [
        sys.executable,
        "-m",
        "tests.helpers.openai_server",
        str(model_dir),
        "--port",
        str(port),
        "--name",
        "bench",
        *(["--fault", "instant"] if instant else []),
    ]
    child = subprocess.Popen(
        args, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    try:
        assert child.stdout is not None and child.stdout.readline().startswith("serving")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        child.kill()
        child.wait()


def table(columns: dict[str, dict[str, dict[str, float]]], counts: list[int]) -> str:
    names = list(columns)
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines.append(
        "| one reply, p50 latency (ms) | "
        + " | ".join(f"{columns[n]['single']['p50_ms']:,.1f}" for n in names)
        + " |"
    )
    for count in counts:
        key = str(count)
        cells = [columns[n][key] for n in names]
        lines.append(
            f"| {count} concurrent: new tokens/s | "
            + " | ".join(f"{c['tokens_per_second']:,.0f}" for c in cells)
            + " |"
        )
        lines.append(
            f"| {count} concurrent: p50 / p95 latency (ms) | "
            + " | ".join(f"{c['p50_ms']:,.0f} / {c['p95_ms']:,.0f}" for c in cells)
            + " |"
        )
        lines.append(
            f"| {count} concurrent: loop lag p99 (ms) | "
            + " | ".join(f"{c['lag_p99_ms']:.1f}" for c in cells)
            + " |"
        )
        lines.append(
            f"| {count} concurrent: wall time / replies (ms) | "
            + " | ".join(f"{c['wall_ms_per_reply']:.2f}" for c in cells)
            + " |"
        )
        if any("client_overhead_ms" in c for c in cells):
            lines.append(
                f"| {count} concurrent: client latency − server's own time, mean (ms) | "
                + " | ".join(
                    f"{c['client_overhead_ms']:.2f} (server {c['server_mean_ms']:,.0f})"
                    if "client_overhead_ms" in c
                    else "–"
                    for c in cells
                )
                + " |"
            )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.counts.split(",")]
    columns: dict[str, dict[str, dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(fake_server(args.fake_server, args.instant))
            if args.fake_server
            else args.base_url
        )
        model = "bench" if args.fake_server else args.model
        config = RemoteConfig((url,), model, str(args.tokenizer), queue_size=max(counts) * 2)
        async with RemoteGenerator(config) as remote:
            label = f"server {url}"
            if args.fake_server:
                label = (
                    "fake server (instant, no model)" if args.instant else "fake server (HFGenerateEngine)"
                )
            columns[label] = await bench(remote.generate, counts, args, url)
    if args.local:
        async with ModelWorker(
            str(args.local), device="cpu", dtype="float32", queue_size=max(counts) * 2
        ) as worker:
            columns["local worker (in-process)"] = await bench(worker.generate, counts, args, None)
    header = (
        f"{datetime.date.today()} · {platform.processor() or 'CPU'} ({os.cpu_count()} cores, shared) · "
        f"max {args.new_tokens} new tokens, default sampling but no-repeat n-grams · noisy: shared CPU"
    )
    work = client_work_ms(args.tokenizer, args.new_tokens, max(counts))
    print(f"\n{header}\n\n{table(columns, counts)}\n", flush=True)
    print(f"client's own work per reply (prompt build, body, JSON, cleanup; no network): {work:.2f} ms\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", help="an OpenAI-compatible server, ending in /v1")
    parser.add_argument("--model", default="starter", help="the served model's name")
    parser.add_argument("--tokenizer", type=Path, default=Path("model/starter"))
    parser.add_argument("--fake-server", type=Path, help="start the test server on this model dir instead")
    parser.add_argument("--instant", action="store_true", help="the fake server answers at once, no model")
    parser.add_argument("--local", type=Path, help="also run the local worker on this model dir")
    parser.add_argument("--counts", default="8,32")
    parser.add_argument("--singles", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    if not args.base_url and not args.fake_server:
        parser.error("give --base-url or --fake-server")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
