"""Generation benchmark: the notebook's serialized `model.generate` vs the ModelWorker + BatchedGPT2Engine.

Both sides use the same randomly initialised GPT-2 weights (124M shape on the GPU, the shipped
starter's 8×256 on the CPU), the same 256-token prompt and the bot's default sampling settings, and
generate exactly 48 new tokens per reply (stop tokens are ignored on both sides, so both do equal work).
A third column drives BatchedGPT2Engine directly with the same prompt ids, to separate the engine from
the worker's own costs (prompt building, queueing, reply cleanup). Prints one markdown table.

    python scripts/bench_generation.py --device cuda               # GPT-2 124M, fp16
    python scripts/bench_generation.py --device cpu                # starter-sized model, fp32
    python scripts/bench_generation.py --device cpu --engine ct2   # + the worker on CT2Engine (int8)
    python scripts/bench_generation.py --device cpu --engine ct2 --shape gpt2 --counts 1,8
    python scripts/bench_generation.py --backend openai --base-url URL  # a server (scripts/bench_remote.py)

With `--engine ct2` the table has a fourth system, the worker on CT2Engine (model/ct2/, BOT_CPU_COMPUTE's
int8 by default), beside generate and the current CPU engine (the worker on BatchedGPT2Engine's eager
path), with its speed-up over each; the engine-alone column is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from model.api import ReplyRequest
from model.engine import DecodeEngine, EngineJob, EngineResult
from model.fastgen.engine import BatchedGPT2Engine
from model.hf_engine import generation_config
from model.loading import LoadedModel, bundled_tokenizer_dir, count_parameters, load_tokenizer
from model.prompt import Turn, build_prompt
from model.sampling import SamplingParams
from model.serving.worker import ModelWorker

log = logging.getLogger("bench_generation")

SHAPES = {"gpt2": (12, 768, 12), "starter": (8, 256, 4)}  # n_layer, n_embd, n_head (the shipped starter)
LAG_TICK_SECONDS = 0.005


@dataclasses.dataclass(frozen=True)
class Options:
    device: str
    dtype: torch.dtype
    shape: str
    counts: tuple[int, ...]
    baseline_max_count: int  # larger counts are projected from the measured serial rate
    singles: int
    prompt_tokens: int
    new_tokens: int
    engine: str = "fastgen"  # "ct2": also the worker on CT2Engine
    cpu_compute: str = "int8"
    cpu_threads: int = 0  # 0: as the bot (every core, at most 4)


@dataclasses.dataclass(frozen=True)
class Run:
    """One measured batch of concurrent replies."""

    count: int
    wall_seconds: float
    latencies_seconds: tuple[float, ...]
    tokens: int
    lag_seconds: tuple[float, ...]
    is_projected: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_seconds

    def latency_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_seconds)
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def lag_ms(self, q: float) -> float:
        ordered = sorted(self.lag_seconds) or [0.0]
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ----------------------------------------------------------------------------------------------------
# set-up


def build_loaded(options: Options) -> LoadedModel:
    """Random GPT-2 weights of the chosen shape with the real tokenizer, as the worker's loader returns."""
    torch.manual_seed(0)
    n_layer, n_embd, n_head = SHAPES[options.shape]
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024, vocab_size=50257)
    device = torch.device(options.device)
    model = GPT2LMHeadModel(config).to(device, options.dtype).eval()
    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    name = f"random-{options.shape}"
    counts = count_parameters(model)
    return LoadedModel(model, tokenizer, name, "bench", name, device, options.dtype, 1024, *counts)


def make_request(loaded: LoadedModel, options: Options) -> ReplyRequest:
    """A request whose prompt is exactly `prompt_tokens` long (checked with the worker's own builder)."""
    params = SamplingParams(max_new_tokens=options.new_tokens)  # the bot's defaults otherwise
    for words in range(1, 2 * options.prompt_tokens):
        history = (Turn("Alice", " ".join(["hello"] * words)),)
        request = ReplyRequest("A friendly chat.", history, params=params, time_limit_seconds=600.0)
        if len(prompt_ids(loaded, request)) >= options.prompt_tokens:
            break
    assert len(prompt_ids(loaded, request)) == options.prompt_tokens, "adjust the filler word"
    return request


def prompt_ids(loaded: LoadedModel, request: ReplyRequest) -> tuple[int, ...]:
    """The request's prompt ids, built as the worker builds them."""
    return build_prompt(
        loaded.tokenizer, request.persona, request.history, request.bot_name,
        request.params.max_new_tokens, loaded.n_positions,
    ).input_ids  # fmt: skip


class ExactLengthEngine:
    """A DecodeEngine wrapper that drops stop tokens, so every reply is exactly max_new_tokens long."""

    def __init__(self, inner: DecodeEngine) -> None:
        self._inner = inner

    def can_admit(self) -> bool:
        return self._inner.can_admit()

    def admit(self, job: EngineJob) -> None:
        self._inner.admit(dataclasses.replace(job, stop_token_ids=frozenset()))

    def has_work(self) -> bool:
        return self._inner.has_work()

    def step(self) -> list[EngineResult]:
        return self._inner.step()

    def abort_all(self) -> list[int]:
        return self._inner.abort_all()


class SerialGenerate:
    """The original notebook's way: one `model.generate` per message, one at a time behind a lock."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self._lock = asyncio.Lock()

    async def reply(self, request: ReplyRequest) -> int:
        async with self._lock:
            return await asyncio.to_thread(self._generate, request)  # the loop stays free (kind to it)

    @torch.inference_mode()
    def _generate(self, request: ReplyRequest) -> int:
        loaded = self._loaded
        ids = torch.tensor([prompt_ids(loaded, request)], device=loaded.device)
        config = generation_config(request.params, frozenset(), loaded.tokenizer.pad_token_id)
        mask = torch.ones_like(ids)
        output = loaded.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        new_ids = output[0, ids.shape[1] :].tolist()
        loaded.tokenizer.decode(new_ids, skip_special_tokens=True)
        return len(new_ids)


# ----------------------------------------------------------------------------------------------------
# measuring


async def _watch_lag(stop: asyncio.Event, lags: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        await asyncio.sleep(LAG_TICK_SECONDS)
        lags.append(loop.time() - started - LAG_TICK_SECONDS)


async def _timed(reply: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = await reply()
    return time.perf_counter() - started, tokens


async def measure(reply: Callable[[], Awaitable[int]], count: int) -> Run:
    """Submit `count` replies at once; wall time, per-reply latency and event-loop lag meanwhile."""
    stop, lags = asyncio.Event(), []
    watcher = asyncio.create_task(_watch_lag(stop, lags))
    started = time.perf_counter()
    done = await asyncio.gather(*(_timed(reply) for _ in range(count)))
    wall = time.perf_counter() - started
    stop.set()
    await watcher
    return Run(count, wall, tuple(d[0] for d in done), sum(d[1] for d in done), tuple(lags))


async def measure_singles(reply: Callable[[], Awaitable[int]], repeats: int) -> Run:
    """One reply at a time, `repeats` times: the latency of a reply on an idle system."""
    runs = [await measure(reply, 1) for _ in range(repeats)]
    wall = sum(r.wall_seconds for r in runs)
    latencies = tuple(r.latencies_seconds[0] for r in runs)
    return Run(1, wall, latencies, sum(r.tokens for r in runs), tuple(x for r in runs for x in r.lag_seconds))


def project_serial(single: Run, count: int) -> Run:
    """What `count` concurrent replies take when each waits for the ones before it (lock-serialized)."""
    per_reply = statistics.median(single.latencies_seconds)
    latencies = tuple(per_reply * (i + 1) for i in range(count))
    tokens = count * single.tokens // len(single.latencies_seconds)
    return Run(count, per_reply * count, latencies, tokens, (), is_projected=True)


async def bench_system(
    reply: Callable[[], Awaitable[int]], options: Options, max_count: int
) -> dict[str, Run]:
    """Warm up, then the single-reply latency and each concurrency level (projected above max_count)."""
    for count in (1, *options.counts):
        if count <= max_count:
            await measure(reply, count)  # warm-up: CUDA graphs, cuBLAS plans, allocator
    results = {"single": await measure_singles(reply, options.singles)}
    for count in options.counts:
        if count <= max_count:
            results[str(count)] = await measure(reply, count)
        else:
            results[str(count)] = project_serial(results["single"], count)
        log.info("count %d: %.0f tokens/s", count, results[str(count)].tokens_per_second)
    return results


async def bench_worker(loaded: LoadedModel, request: ReplyRequest, options: Options) -> dict[str, Run]:
    largest = max(options.counts)
    warm_up = (request.params,)
    made: list[BatchedGPT2Engine] = []

    def engine_factory(loaded: LoadedModel) -> DecodeEngine:
        # Graphs captured up front for the request's settings, as the worker's default factory does.
        engine = BatchedGPT2Engine(loaded.model, loaded.tokenizer, max_batch_size=largest, warm_up=warm_up)
        made.append(engine)
        return ExactLengthEngine(engine)

    # queue_size must cover the largest burst, or the worker would answer WorkerBusy.
    worker = ModelWorker("bench", queue_size=largest, loader=lambda _: loaded, engine_factory=engine_factory)
    async with worker:

        async def reply() -> int:
            return (await worker.generate(request)).completion_tokens

        runs = await bench_system(reply, options, largest)
    log_graphs("worker", made[-1])
    return runs


async def bench_ct2_worker(loaded: LoadedModel, request: ReplyRequest, options: Options) -> dict[str, Run]:
    """The worker on CT2Engine, converted once into a temporary cache (as the bot does into its data dir)."""
    from model.ct2.engine import build_ct2_engine
    from model.serving.engines import EngineOptions

    largest = max(options.counts)
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-ct2-"))
    threads = EngineOptions(cpu_threads=options.cpu_threads).threads()

    def engine_factory(loaded: LoadedModel) -> DecodeEngine:
        engine = build_ct2_engine(loaded, cache_dir, options.cpu_compute, threads, max_batch_size=largest)
        return ExactLengthEngine(engine)

    worker = ModelWorker("bench", queue_size=largest, loader=lambda _: loaded, engine_factory=engine_factory)
    async with worker:
        log.info("ct2 worker: %s", worker.info().engine)

        async def reply() -> int:
            return (await worker.generate(request)).completion_tokens

        return await bench_system(reply, options, largest)


def log_graphs(system: str, engine: BatchedGPT2Engine) -> None:
    """How many decode graphs the engine captured: jobs joining at scattered steps need more shapes."""
    graphs = engine._graphs  # a benchmark may peek
    log.info("%s: %d decode graphs captured", system, len(graphs.decode_graphs) if graphs else 0)


def _engine_run(engine: BatchedGPT2Engine, ids: tuple[int, ...], params: SamplingParams, count: int) -> Run:
    """`count` jobs admitted at once straight into the engine; latency = admission to result."""
    started = time.perf_counter()
    for job_id in range(count):
        engine.admit(EngineJob(job_id, ids, params, float("inf"), frozenset()))
    latencies, tokens = [], 0
    while engine.has_work():
        for result in engine.step():
            latencies.append(time.perf_counter() - started)
            tokens += len(result.token_ids)
    return Run(count, time.perf_counter() - started, tuple(latencies), tokens, ())


def bench_engine(loaded: LoadedModel, request: ReplyRequest, options: Options) -> dict[str, Run]:
    """The same cases with BatchedGPT2Engine driven directly on this thread (no worker, no event loop)."""
    engine = BatchedGPT2Engine(
        loaded.model, loaded.tokenizer, max_batch_size=max(options.counts), warm_up=(request.params,)
    )
    run = functools.partial(_engine_run, engine, prompt_ids(loaded, request), request.params)
    for count in (1, *options.counts):
        run(count)  # warm-up
    singles = [run(1) for _ in range(options.singles)]
    single = Run(
        1, sum(r.wall_seconds for r in singles), tuple(r.latencies_seconds[0] for r in singles),
        sum(r.tokens for r in singles), (),
    )  # fmt: skip
    results = {"single": single} | {str(count): run(count) for count in options.counts}
    log_graphs("engine alone", engine)
    return results


# ----------------------------------------------------------------------------------------------------
# the table


def _ratio(baseline: float, worker: float) -> str:
    return f"{baseline / worker:,.1f}×" if worker > 0 else "–"


def _latencies(run: Run, digits: int) -> str:
    return f"{run.latency_ms(0.5):,.{digits}f} / {run.latency_ms(0.95):,.{digits}f}"


def table(runs: dict[str, dict[str, Run]], options: Options) -> str:
    """One markdown table: each case for the baseline, the worker (with its gain) and the bare engine."""
    baseline, worker, engine = runs["baseline"], runs["worker"], runs["engine"]
    b1, w1, e1 = baseline["single"], worker["single"], engine["single"]
    lines = [
        "| case | baseline: generate behind a lock | worker + BatchedGPT2Engine | gain | engine alone |",
        "|---|---:|---:|---:|---:|",
        f"| one reply, p50 latency (ms) | {b1.latency_ms(0.5):,.1f} | {w1.latency_ms(0.5):,.1f} "
        f"| {_ratio(b1.latency_ms(0.5), w1.latency_ms(0.5))} | {e1.latency_ms(0.5):,.1f} |",
    ]
    for key in map(str, options.counts):
        b, w, e = baseline[key], worker[key], engine[key]
        mark = " (projected)" if b.is_projected else ""
        lines += [
            f"| {key} concurrent: new tokens/s | {b.tokens_per_second:,.0f}{mark} "
            f"| {w.tokens_per_second:,.0f} | {_ratio(w.tokens_per_second, b.tokens_per_second)} "
            f"| {e.tokens_per_second:,.0f} |",
            f"| {key} concurrent: p50 / p95 latency (ms) | {_latencies(b, 0)}{mark} | {_latencies(w, 1)} "
            f"| {_ratio(b.latency_ms(0.95), w.latency_ms(0.95))} (p95) | {_latencies(e, 1)} |",
        ]
    measured = [c for c in options.counts if not baseline[str(c)].is_projected]
    bl, wl = baseline[str(max(measured))], worker[str(max(options.counts))]
    lines.append(
        f"| event-loop lag while saturated, p99 / max (ms) | {bl.lag_ms(0.99):.1f} / {bl.lag_ms(1.0):.1f} "
        f"(at {bl.count}) | {wl.lag_ms(0.99):.1f} / {wl.lag_ms(1.0):.1f} (at {wl.count}) | | – |"
    )
    return "\n".join(lines)


def ct2_table(runs: dict[str, dict[str, Run]], options: Options) -> str:
    """generate, the current CPU engine and CT2Engine, each through its own path, with CT2's speed-ups."""
    baseline, current, ct2 = runs["baseline"], runs["worker"], runs["ct2"]
    b1, w1, c1 = (system["single"].latency_ms(0.5) for system in (baseline, current, ct2))
    lines = [
        "| case | generate behind a lock | current: worker + BatchedGPT2Engine (eager) "
        f"| worker + CT2Engine ({options.cpu_compute}) | ct2 vs current | ct2 vs generate |",
        "|---|---:|---:|---:|---:|---:|",
        f"| one reply, p50 latency (ms) | {b1:,.1f} | {w1:,.1f} | {c1:,.1f} "
        f"| {_ratio(w1, c1)} | {_ratio(b1, c1)} |",
    ]
    for key in map(str, options.counts):
        b, w, c = baseline[key], current[key], ct2[key]
        mark = " (projected)" if b.is_projected else ""
        lines += [
            f"| {key} concurrent: new tokens/s | {b.tokens_per_second:,.0f}{mark} "
            f"| {w.tokens_per_second:,.0f} | {c.tokens_per_second:,.0f} "
            f"| {_ratio(c.tokens_per_second, w.tokens_per_second)} "
            f"| {_ratio(c.tokens_per_second, b.tokens_per_second)} |",
            f"| {key} concurrent: p50 / p95 latency (ms) | {_latencies(b, 0)}{mark} | {_latencies(w, 1)} "
            f"| {_latencies(c, 1)} | {_ratio(w.latency_ms(0.95), c.latency_ms(0.95))} (p95) "
            f"| {_ratio(b.latency_ms(0.95), c.latency_ms(0.95))} (p95) |",
        ]
    top = str(max(options.counts))
    lags = " | ".join(f"{r[top].lag_ms(0.99):.1f} / {r[top].lag_ms(1.0):.1f}" for r in (current, ct2))
    lines.append(f"| event-loop lag while saturated ({top}), p99 / max (ms) | – | {lags} | | |")
    return "\n".join(lines)


def describe(options: Options, loaded: LoadedModel) -> str:
    card = torch.cuda.get_device_name() if options.device == "cuda" else platform.processor() or "CPU"
    n_layer, n_embd, _ = SHAPES[options.shape]
    return (
        f"{datetime.date.today()} · {card} · torch {torch.__version__} · transformers "
        f"{transformers.__version__} · {n_layer}×{n_embd} GPT-2 ({loaded.total_params / 1e6:.0f}M params, "
        f"random init) · {str(options.dtype).removeprefix('torch.')} · "
        f"prompt {options.prompt_tokens} tokens, "
        f"exactly {options.new_tokens} new tokens, default sampling (T 0.8, top-k 50, top-p 0.9, "
        f"repetition penalty 1.15, no-repeat 3-grams)"
    )


async def run(options: Options, out: Path | None) -> None:
    loaded = build_loaded(options)
    request = make_request(loaded, options)
    serial = SerialGenerate(loaded)
    runs = {
        "baseline": await bench_system(lambda: serial.reply(request), options, options.baseline_max_count),
        "worker": await bench_worker(loaded, request, options),
    }
    if options.engine == "ct2":
        runs["ct2"] = await bench_ct2_worker(loaded, request, options)
    else:
        runs["engine"] = bench_engine(loaded, request, options)
    header, body = describe(options, loaded), (ct2_table if options.engine == "ct2" else table)(runs, options)
    print(f"\n{header}\n\n{body}\n", flush=True)
    if out is not None:
        record = {"header": header, "table": body, **runs}
        out.write_text(json.dumps(record, default=dataclasses.asdict, indent=1))


def parse_options(argv: list[str] | None) -> tuple[Options, Path | None]:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--counts", help="concurrency levels (default: 1,8,64,256 on cuda; 1,4,16,32 on cpu)")
    parser.add_argument("--baseline-max-count", type=int, help="project the baseline above this (8 / 4)")
    parser.add_argument("--singles", type=int, help="sequential single replies to time (20 / 5)")
    parser.add_argument("--out", type=Path, help="also write the runs as JSON here")
    parser.add_argument("--engine", choices=("fastgen", "ct2"), default="fastgen", help="ct2: add CT2Engine")
    parser.add_argument(
        "--shape", choices=tuple(SHAPES), help="model shape (default: gpt2 on cuda, starter on cpu)"
    )
    parser.add_argument("--cpu-compute", choices=("int8", "float32"), default="int8", help="CT2Engine's")
    parser.add_argument("--cpu-threads", type=int, default=0, help="CT2Engine's threads (0: as the bot)")
    args = parser.parse_args(argv)
    is_cuda = args.device == "cuda"
    if is_cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.engine == "ct2" and is_cuda:
        parser.error("--engine ct2 is the CPU engine: use --device cpu")
    default_counts = "1,8,32" if args.engine == "ct2" else "1,4,16,32"
    counts = args.counts or ("1,8,64,256" if is_cuda else default_counts)
    options = Options(
        device=args.device,
        dtype=torch.float16 if is_cuda else torch.float32,
        shape=args.shape or ("gpt2" if is_cuda else "starter"),
        counts=tuple(int(c) for c in counts.split(",")),
        baseline_max_count=args.baseline_max_count or (8 if is_cuda else 4),
        singles=args.singles or (20 if is_cuda else 5),
        prompt_tokens=256,
        new_tokens=48,
        engine=args.engine,
        cpu_compute=args.cpu_compute,
        cpu_threads=args.cpu_threads,
    )
    return options, args.out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (--backend openai: scripts/bench_remote.py's)."""
    args = sys.argv[1:] if argv is None else argv
    if "--backend" in args and args[args.index("--backend") + 1 :][:1] == ["openai"]:
        import bench_remote  # scripts/ is on sys.path when this file runs as a script

        at = args.index("--backend")
        return int(bench_remote.main(args[:at] + args[at + 2 :]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per captured graph is noise.
    logging.getLogger("model.fastgen.engine").setLevel(logging.WARNING)
    options, out = parse_options(argv)
    asyncio.run(run(options, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
