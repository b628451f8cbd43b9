"""BatchedGPT2Engine against Hugging Face `generate` on the same weights, and its GPU-side logits processors.

CPU tests run the eager path on the tiny GPT-2 (fp32); `gpu` tests run the CUDA-graph path.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import model.fastgen.engine as fastgen
import model.fastgen.graphs as fastgen_graphs
import model.fastgen.inputs as fastgen_inputs
from model.engine import EngineResult
from model.fastgen.engine import BatchedGPT2Engine
from model.fastgen.sampling import (
    TOP_K_CAP,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    sample_top_k_top_p,
)
from model.sampling import SamplingParams
from tests.helpers.fastgen import (
    EOS_ID,
    GREEDY,
    drain,
    job,
    make_engine,
    random_prompt,
    sampled,
)
from tests.helpers.models import perturbed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=[False, True], ids=["plain", "fused"])
def fused(request: pytest.FixtureRequest) -> bool:
    """Run a CPU test on the plain step and on the fused step (its Triton kernels interpreted)."""
    if request.param:
        pytest.importorskip("triton")
        from model.fastgen.triton import fused_step as fastgen_triton

        if not fastgen_triton.can_run_on(torch.device("cpu")):
            pytest.skip("the fused step runs on the CPU only in Triton's interpreter (TRITON_INTERPRET=1)")
    return bool(request.param)


# ----------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> GPT2LMHeadModel:
    return perturbed(GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval())


def greedy(max_new_tokens: int = 16, penalty: float = 1.0, ngram: int = 0) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=penalty, no_repeat_ngram_size=ngram
    )


@torch.inference_mode()
def hf_generate(
    model: Any, prompt: tuple[int, ...], params: SamplingParams, stop: frozenset[int] = frozenset()
):
    """Hugging Face greedy `generate` with the same logits processors; the new ids (stop token kept)."""
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=False,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        eos_token_id=sorted(stop) or None,
        pad_token_id=EOS_ID,
    )
    ids = torch.tensor([prompt], device=model.device)
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return output[0, len(prompt) :].tolist()


# ----------------------------------------------------------------------------------------------------
# greedy equivalence with `generate` (eager path, fp32 CPU)


def test_supports_only_plain_gpt2(tiny_model: GPT2LMHeadModel) -> None:
    assert BatchedGPT2Engine.supports(tiny_model)
    assert not BatchedGPT2Engine.supports(SimpleNamespace(config=SimpleNamespace(model_type="llama")))
    scaled = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, scale_attn_by_inverse_layer_idx=True))
    assert not BatchedGPT2Engine.supports(scaled)
    with pytest.raises(ValueError, match="GPT-2"):
        make_engine(scaled)


MIXED_SETTINGS = [greedy(16), greedy(16, penalty=1.3, ngram=3), greedy(16, penalty=1.15, ngram=2), greedy(16)]


def test_rows_of_different_lengths_and_settings_in_one_batch_match_generate(tiny_model, fused) -> None:
    prompts = [random_prompt(n, seed=n) for n in (1, 7, 33, 100)]
    engine = make_engine(tiny_model, fused=fused, max_batch_size=8)
    for i, (prompt, params) in enumerate(zip(prompts, MIXED_SETTINGS, strict=True)):
        engine.admit(job(i, prompt, params))
    results = drain(engine)
    for i, (prompt, params) in enumerate(zip(prompts, MIXED_SETTINGS, strict=True)):
        assert list(results[i].token_ids) == hf_generate(tiny_model, prompt, params), f"row {i}"
        assert results[i].stop_reason == "max_tokens"


def test_jobs_joining_and_leaving_mid_batch_match_generate(tiny_model, fused) -> None:
    prompts = {i: random_prompt(5 + 9 * i, seed=100 + i) for i in range(5)}
    lengths = {0: 30, 1: 6, 2: 20, 3: 12, 4: 9}  # job 1 leaves first: the last slot moves into its hole
    params = {i: greedy(n, penalty=1.2, ngram=3) for i, n in lengths.items()}
    engine = make_engine(tiny_model, fused=fused, max_batch_size=4)
    engine.admit(job(0, prompts[0], params[0]))
    results: dict[int, EngineResult] = {}
    for _ in range(4):
        results.update((r.job_id, r) for r in engine.step())
    for i in (1, 2, 3):  # join a running batch
        engine.admit(job(i, prompts[i], params[i]))
    assert not engine.can_admit()
    while 1 not in results:
        results.update((r.job_id, r) for r in engine.step())
    engine.admit(job(4, prompts[4], params[4]))  # takes the freed slot while the others keep going
    drain(engine, results)
    for i, prompt in prompts.items():
        assert list(results[i].token_ids) == hf_generate(tiny_model, prompt, params[i]), f"job {i}"


def test_each_row_stops_at_its_own_stop_token(tiny_model, fused) -> None:
    prompt, params = random_prompt(12, seed=3), greedy(20, penalty=1.5)  # the penalty varies the tokens
    reference = hf_generate(tiny_model, prompt, params)
    first_at = sorted({reference.index(token) for token in reference})
    early, late = first_at[1], first_at[-1]
    engine = make_engine(tiny_model, fused=fused)
    engine.admit(job(0, prompt, params, stop=frozenset({reference[early]})))
    engine.admit(job(1, prompt, params, stop=frozenset({reference[late]})))
    engine.admit(job(2, prompt, params))
    results = drain(engine)
    assert results[0] == EngineResult(0, tuple(reference[:early]), "turn_end")
    assert results[1] == EngineResult(1, tuple(reference[:late]), "turn_end")
    assert results[2] == EngineResult(2, tuple(reference), "max_tokens")


def test_end_of_text_reports_eos(tiny_model, fused) -> None:
    prompt = random_prompt(12, seed=4)
    reference = hf_generate(tiny_model, prompt, greedy(8, penalty=1.5))
    engine = BatchedGPT2Engine(tiny_model, SimpleNamespace(eos_token_id=reference[2]), fused=fused)
    engine.admit(job(0, prompt, greedy(8, penalty=1.5), stop=frozenset({reference[2], EOS_ID})))
    result = drain(engine)[0]
    assert result.stop_reason == "eos"
    assert list(result.token_ids) == reference[: reference.index(reference[2])]


def test_max_new_tokens_and_context_window_are_honoured_per_row(tiny_model, fused) -> None:
    engine = make_engine(tiny_model, fused=fused, max_seq_len=40)
    prompt = random_prompt(30, seed=5)
    for i, n in enumerate((1, 5, 9)):
        engine.admit(job(i, prompt, greedy(n)))
    engine.admit(job(3, prompt, greedy(25)))  # only 10 positions are left in a 40-token window
    results = drain(engine)
    reference = hf_generate(tiny_model, prompt, greedy(10))
    for i, n in enumerate((1, 5, 9, 10)):
        assert results[i] == EngineResult(i, tuple(reference[:n]), "max_tokens")


def test_deadline_stops_one_row_and_the_others_finish(tiny_model, monkeypatch, fused) -> None:
    clock = SimpleNamespace(now=0.0)
    fake_time = SimpleNamespace(monotonic=lambda: clock.now, perf_counter=time.perf_counter)
    monkeypatch.setattr(fastgen, "time", fake_time)
    prompt = random_prompt(10, seed=6)
    engine = make_engine(tiny_model, fused=fused)
    engine.admit(job(0, prompt, greedy(30), deadline=10.0))
    engine.admit(job(1, prompt, greedy(30), deadline=1000.0))
    partial: dict[int, EngineResult] = {}
    for _ in range(5):
        partial.update((r.job_id, r) for r in engine.step())
    clock.now = 11.0
    results = drain(engine, partial)
    reference = hf_generate(tiny_model, prompt, greedy(30))
    assert results[0].stop_reason == "time_limit"
    assert 0 < len(results[0].token_ids) < 30
    assert list(results[0].token_ids) == reference[: len(results[0].token_ids)]
    assert results[1] == EngineResult(1, tuple(reference), "max_tokens")


# ----------------------------------------------------------------------------------------------------
# sampling


def test_a_seeded_job_samples_the_same_tokens_whatever_shares_its_batch(tiny_model, fused) -> None:
    prompt = random_prompt(9, seed=7)
    alone = make_engine(tiny_model, fused=fused)
    alone.admit(job(0, prompt, sampled(seed=7)))
    crowded = make_engine(tiny_model, fused=fused)
    crowded.admit(job(1, random_prompt(40, seed=8), greedy(5, penalty=1.3, ngram=2)))
    crowded.admit(job(2, random_prompt(3, seed=9), sampled(seed=None, top_k=0, top_p=0.5)))
    crowded.admit(job(0, prompt, sampled(seed=7)))
    crowded.admit(job(3, prompt, sampled(seed=8)))
    first, second = drain(alone)[0], drain(crowded)
    assert second[0].token_ids == first.token_ids
    assert second[3].token_ids != first.token_ids  # another seed, another draw
    assert all(len(r.token_ids) == {1: 5}.get(i, 12) for i, r in second.items())


@pytest.mark.parametrize("overrides", [{"top_k": 1}, {"top_k": 0, "top_p": 1e-6}, {"temperature": 1e-4}])
def test_sampling_that_leaves_one_candidate_gives_the_greedy_tokens(tiny_model, overrides, fused) -> None:
    prompt = random_prompt(15, seed=10)
    params = sampled(seed=None, repetition_penalty=1.2, no_repeat_ngram_size=3, **overrides)
    engine = make_engine(tiny_model, fused=fused)
    engine.admit(job(0, prompt, params))
    assert list(drain(engine)[0].token_ids) == hf_generate(tiny_model, prompt, greedy(12, 1.2, 3))


@pytest.mark.parametrize("cap", [TOP_K_CAP, 1000])
def test_sampler_draws_from_hf_warpers_distribution(cap: int) -> None:
    """Inverse-CDF sampling: the middle of each token's probability interval must pick that token."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=generator) * 3
    settings = [(1.0, 50, 0.9), (0.7, 5, 1.0), (1.3, 0 if cap == 1000 else cap, 0.8), (0.5, 20, 0.3)]
    for row, (temperature, top_k, top_p) in enumerate(settings):
        scores = TemperatureLogitsWarper(temperature)(None, logits[row : row + 1].clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        probs = TopPLogitsWarper(top_p)(None, scores).softmax(-1)[0].double()
        kept = probs.nonzero().squeeze(1)
        kept = kept[probs[kept].argsort(descending=True)]
        cumulative = probs[kept].cumsum(0)
        middles = (cumulative - probs[kept] / 2).float()  # one uniform draw per kept token
        n = len(kept)
        chosen = sample_top_k_top_p(
            logits[row].expand(n, -1),
            torch.full((n,), temperature),
            torch.full((n,), top_k),
            torch.full((n,), top_p),
            middles,
            cap,
        )
        assert chosen.tolist() == kept.tolist(), f"row {row}"


def test_repetition_penalty_matches_hf_processor() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 100, generator=generator)
    history = torch.randint(0, 100, (3, 30), generator=generator)
    penalties, lengths = torch.tensor([1.0, 1.15, 2.0]), [30, 1, 17]  # the rest of a row is stale ids
    ours = apply_repetition_penalty(logits.clone(), history, torch.tensor(lengths) - 1, penalties, window=30)
    for row, (penalty, length) in enumerate(zip(penalties.tolist(), lengths, strict=True)):
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        expected = processor(history[row : row + 1, :length], logits[row : row + 1].clone())
        assert torch.equal(ours[row], expected[0]), f"row {row}"


def test_ngram_ban_matches_hf_processor_for_every_n() -> None:
    generator = torch.Generator().manual_seed(2)
    lengths = [1, 2, 5, 17, 40, 40]
    sizes = [3, 2, 1, 3, 4, 0]
    tokens = torch.randint(0, 6, (6, 48), generator=generator)  # a small alphabet makes repeats common
    logits = torch.zeros(6, 10)
    pos = torch.tensor(lengths) - 1
    ours = ban_repeated_ngrams(logits.clone(), tokens, pos, torch.tensor(sizes), window=48, span=4)
    for row, (length, n) in enumerate(zip(lengths, sizes, strict=True)):
        expected = torch.zeros(1, 10)
        if n:
            expected = NoRepeatNGramLogitsProcessor(n)(tokens[row : row + 1, :length], expected)
        assert torch.equal(ours[row], expected[0]), f"row {row}"


# ----------------------------------------------------------------------------------------------------
# admission limits and failures


def test_admission_checks_slots_and_prompts(tiny_model) -> None:
    engine = make_engine(tiny_model, max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError):
        engine.admit(job(0, ()))
    with pytest.raises(ValueError):
        engine.admit(job(0, random_prompt(64, seed=0)))  # no position left for a new token
    with pytest.raises(ValueError):
        engine.admit(job(0, (1, 2, 50257)))
    engine.admit(job(0, random_prompt(63, seed=0)))
    engine.admit(job(1, (1,)))
    assert not engine.can_admit()
    with pytest.raises(RuntimeError):
        engine.admit(job(2, (1,)))
    results = drain(engine)
    assert len(results[0].token_ids) == 1 and results[0].stop_reason == "max_tokens"


def test_out_of_memory_propagates_and_abort_all_recovers(tiny_model, monkeypatch) -> None:
    engine = make_engine(tiny_model)
    engine.admit(job(0, random_prompt(8, seed=1)))
    engine.step()
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def failing_prefill(*args: Any) -> None:
        raise oom

    monkeypatch.setattr(engine, "_prefill", failing_prefill)
    engine.admit(job(1, random_prompt(8, seed=2)))
    with pytest.raises(torch.cuda.OutOfMemoryError) as raised:
        engine.step()
    assert raised.value is oom
    assert sorted(engine.abort_all()) == [0, 1]
    assert not engine.has_work()
    monkeypatch.undo()
    prompt = random_prompt(8, seed=3)
    engine.admit(job(2, prompt))
    assert list(drain(engine)[2].token_ids) == hf_generate(tiny_model, prompt, GREEDY)


# ----------------------------------------------------------------------------------------------------
# the CUDA-graph path


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("use_cuda_graphs", "fused"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_gpu_greedy_matches_generate_with_joins_and_leaves(tiny_model_dir, use_cuda_graphs, fused) -> None:
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).to("cuda").eval()
    engine = make_engine(model, max_batch_size=8, use_cuda_graphs=use_cuda_graphs, fused=fused)
    prompts = {i: random_prompt(3 + 37 * i, seed=200 + i) for i in range(6)}
    params = {i: greedy(8 + 5 * i, penalty=(1.0, 1.2)[i % 2], ngram=(0, 3, 2)[i % 3]) for i in range(6)}
    results: dict[int, EngineResult] = {}
    for i in range(3):
        engine.admit(job(i, prompts[i], params[i]))
    for _ in range(6):
        results.update((r.job_id, r) for r in engine.step())
    for i in range(3, 6):  # one at a time: one prefill graph serves every slot
        engine.admit(job(i, prompts[i], params[i]))
        results.update((r.job_id, r) for r in engine.step())
    drain(engine, results)
    for i, prompt in prompts.items():
        assert list(results[i].token_ids) == hf_generate(model, prompt, params[i]), f"job {i}"


@pytest.mark.gpu
@needs_cuda
def test_gpu_seeded_sampling_is_independent_of_the_batch(tiny_model_dir) -> None:
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).to("cuda", torch.float16).eval()
    prompt = random_prompt(20, seed=11)
    alone = make_engine(model)
    alone.admit(job(0, prompt, sampled(seed=5)))
    crowded = make_engine(model)
    for i in range(1, 6):
        crowded.admit(job(i, random_prompt(10 * i, seed=i), sampled(seed=None, top_k=0)))
    crowded.admit(job(0, prompt, sampled(seed=5)))
    assert drain(crowded)[0].token_ids == drain(alone)[0].token_ids


@pytest.mark.gpu
@needs_cuda
def test_gpu_warm_up_captures_every_batch_size_before_serving(tiny_model_dir) -> None:
    """No burst pays for a capture: the graphs of every batch size exist before the first job."""
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).to("cuda", torch.float16).eval()
    params = sampled(seed=3)
    engine = make_engine(model, max_batch_size=8, fused=True, warm_up=(params,))
    graphs = engine._graphs  # a test may peek
    assert graphs is not None
    captured = set(graphs.decode_graphs)
    assert sorted(plan.batch for plan in captured) == [1, 2, 4, 8]
    prefills = set(graphs.prefill_graphs)  # one graph per power-of-two count of prompts × 64-token bucket
    lengths = range(64, model.config.n_positions + 1, 64)
    assert prefills == {(count, length) for count in (1, 2, 4, 8) for length in lengths}
    for count in (3, 8, 1, 5, 1):
        for i in range(count):
            engine.admit(job(100 * count + i, random_prompt(5 + 70 * i + count, seed=i), params))
        assert len(drain(engine)) == count
    assert set(graphs.decode_graphs) == captured
    assert set(graphs.prefill_graphs) == prefills


def test_a_prefill_replays_in_parts_of_a_power_of_two() -> None:
    assert fastgen_graphs._powers_of_two(63) == [32, 16, 8, 4, 2, 1]
    assert fastgen_graphs._powers_of_two(64) == [64]
    assert fastgen_graphs._powers_of_two(11) == [8, 2, 1]
    assert fastgen_graphs._powers_of_two(1) == [1]


@pytest.mark.parametrize("max_batch", [1, 6, 8, 100, 256])
def test_every_part_of_a_prefill_within_the_cap_is_captured(max_batch: int) -> None:
    """The engine replays P prompts of a length when P × length is within the cap: each power-of-two part of
    P must be among the shapes the warm-up captures, or serving would capture it mid-burst."""
    lengths, cap = range(64, 1025, 64), fastgen.PREFILL_GRAPH_TOKENS
    shapes = fastgen_graphs.prefill_shapes(max_batch, lengths, cap)
    assert all(n * length <= cap for n, length in shapes)
    assert [n * length for n, length in shapes] == sorted((n * length for n, length in shapes), reverse=True)
    for prompts in range(1, max_batch + 1):
        for length in lengths:
            if prompts * length <= cap:
                assert {(part, length) for part in fastgen_graphs._powers_of_two(prompts)} <= set(shapes)


def test_right_padded_pads_each_row_with_its_own_last_id() -> None:
    padded = fastgen_inputs.right_padded([(1, 2, 3), (7,), ()], width=4)
    assert padded.tolist() == [[1, 2, 3, 3], [7, 7, 7, 7], [0, 0, 0, 0]]
    assert fastgen_inputs.right_padded([(), ()], width=2).tolist() == [[0, 0], [0, 0]]
    assert fastgen_inputs.right_padded([(5, 6)], width=2).tolist() == [[5, 6]]


def test_uniforms_repeat_for_seeded_jobs_and_are_unused_for_greedy_ones() -> None:
    seeded, other = sampled(seed=7), sampled(seed=None)
    jobs = [job(0, (1,), seeded), job(1, (1,), GREEDY), job(2, (1,), other), job(3, (1,), seeded)]
    uniforms = fastgen_inputs.uniforms(jobs, 5)
    expected = torch.rand(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(uniforms[0], expected) and torch.equal(uniforms[3], expected)
    assert not uniforms[1].any()  # greedy
    assert uniforms[2].all() and (uniforms[2] < 1).all() and not torch.equal(uniforms[2], expected)
    assert not fastgen_inputs.uniforms([job(0, (1,), GREEDY)], 3).any()
