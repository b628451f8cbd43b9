"""Top-k benchmark: the fused step's `_top_k` against `torch.topk`, on random logits and on a trained model's.

Sampling takes each row's TOP_K_CAP best logits. How long a top-k takes can depend on the values: a trained
GPT-2's best entries crowd into low ids (its frequent tokens), which random logits never do. So every figure
is taken on random logits (normal, ×3) and on the bundled starter model's logits, one row per position of a
few chat prompts, repeated to the row count; and once more with the first row's best 600 in one stretch of
ids, which sends that row to the exact search over the whole row (the slow way, for rows the bound cannot
narrow). Prints one table: µs per call, the median of 7 replays of a CUDA graph of CALLS_PER_GRAPH calls, and
whether `_top_k` gave torch.topk's values on every row. `_top_k` takes a bound from each segment's best keys,
so how many entries it keeps, and its time, depend on the values.

    python scripts/bench_top_k.py                  # rows 1, 8, 32, 64, 128, 256, on the GPU
    TRITON_INTERPRET=1 python scripts/bench_top_k.py --device cpu --rows 2   # a smoke run in the interpreter
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from model.fastgen.sampling import TOP_K_CAP
from model.fastgen.triton import fused_step as fastgen_triton
from model.loading import bundled_tokenizer_dir, load_tokenizer, starter_model_dir

CALLS_PER_GRAPH = 20
CROWDED = 600  # over fastgen_triton.SELECT_CAP
CHATS = (
    "Alice: hi! how are you?\nBot: I am good, thanks. What music do you like?\nAlice:",
    "Bob: I went to the park today and saw a dog.\nBot: That sounds nice! What kind of dog was it?\nBob:",
    "Carol: can you recommend a good book?\nBot: Sure, have you read",
    "Dave: lol that's so funny\nBot: haha yeah",
)


def starter_logits(device: torch.device) -> torch.Tensor:
    """float32 [positions, V]: the starter's logits at every position of CHATS."""
    model = GPT2LMHeadModel.from_pretrained(starter_model_dir()).to(device).eval()
    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    with torch.no_grad():
        rows = [model(torch.tensor([tokenizer(chat).input_ids], device=device)).logits[0] for chat in CHATS]
    return torch.cat(rows).float()


def rows_of(source: torch.Tensor, rows: int) -> torch.Tensor:
    """`rows` rows of `source`, repeated as needed, contiguous."""
    return source.repeat(-(-rows // source.shape[0]), 1)[:rows].contiguous()


def first_row_crowded(logits: torch.Tensor) -> torch.Tensor:
    """`logits` with its first row's best CROWDED entries in one stretch of ids: more of them reach the
    bound than select_kernel keeps, so that row takes the exact search over the whole row."""
    crowded = logits.clone()
    crowded[0, 1000 : 1000 + CROWDED] += 20.0
    return crowded


def time_us(call: Callable[[], object], device: torch.device) -> float:
    """Median µs per call: replays of a graph of CALLS_PER_GRAPH calls on the GPU, plain calls elsewhere."""
    if device.type != "cuda":
        samples = []
        for _ in range(3):
            started = time.perf_counter()
            call()
            samples.append(1e6 * (time.perf_counter() - started))
        return statistics.median(samples)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # Triton compiles, cuBLAS and allocator warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            call()
    samples = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(1000 * start.elapsed_time(end) / CALLS_PER_GRAPH)
    return statistics.median(samples)


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    args = parser.parse_args()
    device = torch.device(args.device)
    if not fastgen_triton.can_run_on(device):
        parser.error("the kernels need CUDA, or Triton's interpreter (TRITON_INTERPRET=1) on the CPU")
    torch.manual_seed(0)
    random, starter = torch.randn(64, 50257, device=device) * 3, starter_logits(device)
    cases = {
        "random": functools.partial(rows_of, random),
        "starter": functools.partial(rows_of, starter),
        "starter, first row crowded": lambda rows: first_row_crowded(rows_of(starter, rows)),
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton's interpreter)"
    print(f"{name} · torch {torch.__version__} · top {TOP_K_CAP} of 50,257 · µs per call")
    print("| rows | logits | `torch.topk` | `_top_k` | same values |")
    print("|---:|---|---:|---:|---|")
    for rows in args.rows:
        for label, make in cases.items():
            logits = make(rows)
            same = torch.equal(fastgen_triton._top_k(logits)[0], logits.topk(TOP_K_CAP, -1).values)
            plain = time_us(functools.partial(torch.topk, logits, TOP_K_CAP, -1), device)
            fused = time_us(functools.partial(fastgen_triton._top_k, logits), device)
            print(f"| {rows} | {label} | {plain:.1f} | {fused:.1f} | {'yes' if same else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
