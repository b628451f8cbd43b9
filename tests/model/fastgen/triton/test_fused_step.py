"""The fused decode step's kernels against plain torch math.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there);
`gpu` tests run them compiled. Engine-level equivalence with `generate` is in
tests/model/fastgen/test_engine.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

pytest.importorskip("triton")

from model.fastgen import ops as fastgen_ops
from model.fastgen import weights as fastgen_weights
from model.fastgen.ops import POS
from model.fastgen.triton import fused_step as fastgen_triton
from model.fastgen.triton import products as fastgen_products
from model.loading import bundled_tokenizer_dir, load_tokenizer, starter_model_dir
from tests.helpers.models import perturbed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def device_under_test() -> torch.device:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not fastgen_triton.can_run_on(device):
        pytest.skip("on the CPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1)")
    return device


def reference_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: torch.Tensor,
    pos: list[int],
    scale: float,
) -> torch.Tensor:
    """Row b attends over its cached positions [0, pos[b]) plus its new key/value: [B, H, D]."""
    outputs = []
    for row, length in enumerate(pos):
        keys = torch.cat([cache[0, row, :, :length], k_new[row, :, None]], dim=1)  # [H, length + 1, D]
        values = torch.cat([cache[1, row, :, :length], v_new[row, :, None]], dim=1)
        weights = torch.softmax((keys @ q[row, :, :, None]).squeeze(-1) * scale, dim=-1)
        outputs.append((weights[:, None, :] @ values).squeeze(1))
    return torch.stack(outputs)


@pytest.mark.parametrize(
    ("programs", "max_seq"), [(1, 256), (256, 256), (256, 201)], ids=["one split", "split", "uneven split"]
)
def test_attention_matches_softmax_and_writes_the_new_key_value(
    tiny_model_dir: Path, programs: int, max_seq: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastgen_triton, "ATTENTION_PROGRAMS", programs)
    device = device_under_test()
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).to(device).eval()
    weights = fastgen_weights.weights_from_hf(model, fast_activation=False)
    state = fastgen_ops.allocate_state(weights, max_batch=5, max_seq=max_seq)
    generator = torch.Generator().manual_seed(0)
    state.kv.copy_(torch.randn(state.kv.shape, generator=generator))
    pos = [0, 1, 63, 64, 200]  # empty cache, block edges, several blocks
    state.rows[:, POS] = torch.tensor(pos)
    width, n_head = weights.width, weights.n_head
    qkv = torch.randn(5, 3 * width, generator=generator).to(device)
    y = fastgen_triton._attention(weights, state, 0, qkv)
    assert not state.tickets.any()  # the merging split left every ticket count at zero for the next layer
    q, k_new, v_new = qkv.view(5, 3, n_head, width // n_head).unbind(1)
    cache = state.kv[0]
    expected = reference_attention(q, k_new, v_new, cache, pos, weights.attn_scale)
    torch.testing.assert_close(y.view(5, n_head, -1), expected, rtol=1e-5, atol=1e-5)
    for row, length in enumerate(pos):
        assert torch.equal(cache[0, row, :, length], k_new[row]) and torch.equal(
            cache[1, row, :, length], v_new[row]
        )


def test_attention_splits_stop_from_the_unsplit_threshold() -> None:
    unsplit_from = fastgen_triton.ATTENTION_UNSPLIT_FROM
    assert fastgen_triton._attention_splits(unsplit_from, max_seq=1024) == 1
    assert fastgen_triton._attention_splits(unsplit_from - 12, max_seq=1024) > 1
    assert fastgen_triton._attention_splits(12, max_seq=1024) == 16  # one row of GPT-2: 16 blocks of 64


def test_attention_splits_are_powers_of_two_that_cover_the_cache() -> None:
    for max_seq in (1, 40, 63, 64, 65, 200, 256, 1000, 1024, 2048):
        for programs in (1, 2, 12, 24, 96, 256, 3072):
            splits = fastgen_triton._attention_splits(programs, max_seq)
            assert splits >= 1 and splits & (splits - 1) == 0, (max_seq, programs, splits)
            assert splits * fastgen_triton.ATTENTION_BLOCK <= max(max_seq, fastgen_triton.ATTENTION_BLOCK)


def test_layer_norm_kernel_adds_the_delta_and_the_next_bias(tiny_model_dir: Path) -> None:
    device = device_under_test()
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).to(device).eval()
    layer = fastgen_weights.weights_from_hf(model, fast_activation=False).layers[0]
    resid = torch.randn(3, model.config.n_embd, device=device)
    delta = torch.randn_like(resid)
    before, out = resid.clone(), torch.empty_like(resid)
    fastgen_triton._norm(resid, layer.ln_2, out, 1e-5, delta=delta, store=True, bias=layer.out_b)
    x = before + delta
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (x.shape[1],), *layer.ln_2, 1e-5))
    torch.testing.assert_close(resid, x + layer.out_b)


@pytest.mark.parametrize(
    ("rows", "epilogue"), [(1, "bias"), (3, "gelu"), (4, "accumulate"), (2, "norm"), (3, "norm")]
)
def test_small_linear_kernel_equals_addmm(rows: int, epilogue: str) -> None:
    device = device_under_test()
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(72, 216, generator=generator).to(device)  # [in, out], as Conv1D holds it
    bias = torch.randn(216, generator=generator).to(device)
    x = torch.randn(rows, 3 * 72, generator=generator).to(device)[:, 72:144]  # strided rows, as the QKV split
    ln = (
        torch.rand(72, generator=generator).to(device) + 0.5,
        torch.randn(72, generator=generator).to(device),
    )
    into, norm = None, None
    expected = torch.addmm(bias, x, weight)
    if epilogue == "accumulate":
        into = torch.randn(rows, 216, generator=generator).to(device)
        expected = into + expected  # before the call: it adds in place
    elif epilogue == "gelu":
        expected = torch.nn.functional.gelu(expected, approximate="tanh")
    elif epilogue == "norm":
        norm = ln
        expected = torch.addmm(bias, torch.nn.functional.layer_norm(x, (72,), *ln, 1e-5), weight)
    out = fastgen_products._small_linear(
        x, weight.t().contiguous(), bias, gelu=epilogue == "gelu", into=into, norm=norm, eps=1e-5
    )
    assert into is None or out is into
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def sixty_fourths(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Multiples of 1/64 in [-1, 1]: their float32 sums are exact in any order."""
    return torch.randint(-64, 65, shape, generator=generator) / 64


def test_small_linear_kernel_rounds_a_residual_add_as_hf_does() -> None:
    """In half precision the product is rounded, then added to the residual and rounded again."""
    device = device_under_test()
    generator = torch.Generator().manual_seed(6)
    weight, bias, x = (sixty_fourths(generator, *shape) for shape in ((72, 216), (216,), (3, 72)))
    into = 8 * torch.randn(3, 216, generator=generator)
    product = torch.addmm(bias, x, weight)
    expected = (into.half().float() + product.half().float()).half()
    rounded_once = (into.half().float() + product).half()
    half = [t.half().to(device) for t in (x, weight.t().contiguous(), bias, into)]
    out = fastgen_products._small_linear(*half[:3], gelu=False, into=half[3], norm=None, eps=0.0)
    assert torch.equal(out.cpu(), expected)
    assert not torch.equal(expected, rounded_once)  # the two orders differ on these values


@pytest.mark.parametrize(("rows", "epilogue"), [(5, "bias"), (16, "gelu"), (33, "bias"), (64, "no bias")])
def test_skinny_linear_kernel_equals_addmm(rows: int, epilogue: str) -> None:
    """On sixty-fourths, whose float32 sums are exact in any order (at most 21 significant bits here),
    so the tensor cores' sums (of half-precision inputs on the GPU) must round exactly as the reference
    does; GELU within an ulp."""
    device = device_under_test()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(7)
    # K = 3 × SKINNY_LINEAR_BLOCK_K: the loop over K runs three times
    weight, bias = sixty_fourths(generator, 384, 96), sixty_fourths(generator, 96)  # [in, out]
    x = sixty_fourths(generator, rows, 3 * 384)[:, 384:768]  # strided rows, as the QKV split
    expected = torch.addmm(bias, x, weight)
    if epilogue == "gelu":
        expected = torch.nn.functional.gelu(expected, approximate="tanh")
    elif epilogue == "no bias":
        bias, expected = None, x @ weight
    on_device = [None if t is None else t.to(dtype).to(device) for t in (x, weight.t().contiguous(), bias)]
    out = fastgen_products._skinny_linear(*on_device, gelu=epilogue == "gelu").cpu()
    if epilogue == "gelu":
        torch.testing.assert_close(out, expected.to(dtype))
    else:
        assert torch.equal(out, expected.to(dtype))


def test_skinny_linear_kernel_takes_what_fits_it(tiny_model_dir: Path) -> None:
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    layer = fastgen_weights.weights_from_hf(model, fast_activation=False, out_in_copies=True).layers[0]
    bare = fastgen_weights.weights_from_hf(model, fast_activation=False).layers[0]
    rows = [fastgen_products.SMALL_LINEAR_ROWS, fastgen_products.SKINNY_LINEAR_ROWS + 1]
    assert not any(fastgen_products._is_skinny(torch.zeros(n, 64), layer, fastgen_weights.QKV) for n in rows)
    x = torch.zeros(fastgen_products.SKINNY_LINEAR_ROWS, 64)
    assert fastgen_products._is_skinny(x, layer, fastgen_weights.QKV)
    assert not fastgen_products._is_skinny(x, bare, fastgen_weights.QKV)  # no [out, in] copies
    odd = fastgen_weights.weights_from_hf(odd_model(), fast_activation=False, out_in_copies=True).layers[0]
    # 72 is no whole tile
    assert not fastgen_products._is_skinny(torch.zeros(8, 72), odd, fastgen_weights.QKV)


def argmax_keys(logits: torch.Tensor) -> torch.Tensor:
    """Each row's largest (value, id) key [B] with torch ops: value order, then the smaller id."""
    bits = torch.where(logits == 0, 0.0, logits.float()).view(torch.int32)  # -0.0 ties with 0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats count down
    ids = torch.arange(logits.shape[1], device=logits.device)
    return ((ordered.long() << 32) | (logits.shape[1] - 1 - ids)).max(-1).values


def test_argmax_keys_break_ties_like_argmax() -> None:
    device = device_under_test()
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 50257, generator=generator)
    logits[1, 100:400] = 9.0  # a wide tie at the top: the smallest id wins
    logits[2] = 0.0
    logits[3, 5000], logits[3, 4000] = 0.0, -0.0  # -0.0 == 0.0: argmax takes the first
    logits[3] = torch.where(logits[3] > 0, -logits[3], logits[3])
    logits[4, 50256] = 50.0  # the last id, in the last, partial chunk
    logits = logits.to(device)
    keys = fastgen_triton._greedy_keys(logits)
    assert keys.shape == (5, 13)
    best = keys.max(-1).values
    assert torch.equal(best, argmax_keys(logits))
    assert (
        (50256 - (best & 0xFFFFFFFF)).tolist()
        == logits.argmax(-1).tolist()
        == [logits[0].argmax().item(), 100, 0, 4000, 50256]
    )


def ranking_logits(vocab: int) -> torch.Tensor:
    """[6, vocab] rows that test a top-k: ties, banned ids, signed zeros, the last id, all equal, and the
    best entries crowded into one stretch of ids (ids 1,000-1,599: past a vocabulary of 300)."""
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[0, : vocab // 2] = logits[0, : vocab // 2].round(decimals=1)  # many ties, across segments
    logits[1, 3:250] = float("-inf")  # banned ids; at 300 fewer than 128 are finite, and -inf ties fill up
    logits[2] = -logits[2].abs()
    logits[2, 0], logits[2, 1] = -0.0, 0.0  # the best two, equal
    logits[3, vocab - 1] = 40.0  # the last id, in the last, partial segment
    logits[4] = 0.5  # every entry ties
    logits[5, 1000 : 1000 + 600] += 20.0  # the best 600 in one stretch: few segments hold them
    return logits


@pytest.mark.parametrize("vocab", [50257, 4096, 4097, 300])
def test_top_k_gives_what_a_stable_sort_gives(vocab: int) -> None:
    """torch.topk's values; equal values (-0.0 == 0.0 too) rank the smaller id first, as a stable sort."""
    logits = ranking_logits(vocab).to(device_under_test())
    values, ids = fastgen_triton._top_k(logits)
    expected = logits.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(values, expected.values[:, : fastgen_triton.TOP_K_CAP])
    assert torch.equal(ids, expected.indices[:, : fastgen_triton.TOP_K_CAP])
    assert torch.equal(values, logits.topk(fastgen_triton.TOP_K_CAP, -1).values)
    assert ids[3, 0] == vocab - 1 and ids[2, :2].tolist() == [0, 1]
    assert ids[4].tolist() == list(range(fastgen_triton.TOP_K_CAP))


@pytest.mark.parametrize("vocab", [50257, 4096, 4097])
def test_the_bound_keeps_a_few_hundred_entries_or_takes_the_exact_search(vocab: int) -> None:
    """Both of the bound's ways are taken (the test above checks what each gives): a few hundred entries a
    row qualify, except where all tie or the best crowd into one stretch. With 8 whole segments (4,096 and
    4,097 ids) each must give 16 keys for the 128 that bound the row, or every entry would qualify."""
    device, k = device_under_test(), fastgen_triton.TOP_K_CAP
    logits = ranking_logits(vocab).to(device)
    values, ids = torch.empty((6, k), device=device), torch.empty((6, k), dtype=torch.long, device=device)
    counts = fastgen_triton._top_k_from_bound(logits, values, ids)
    assert torch.equal(values, logits.topk(k, -1).values)
    cap = fastgen_triton.SELECT_CAP
    assert all(fastgen_triton.TOP_K_CAP <= count <= cap for count in counts[:4].tolist()), counts
    assert counts[4] == vocab and counts[5] > cap


@pytest.mark.skipif(not (starter_model_dir() / "config.json").is_file(), reason="the starter model is absent")
def test_the_bound_keeps_under_the_cap_on_a_trained_models_logits() -> None:
    """A trained model's best entries crowd into few segments (GPT-2's frequent tokens have small ids); with
    3 keys per 1,024 entries most rows of the starter's went over the cap. Random logits cannot show it."""
    device, k = device_under_test(), fastgen_triton.TOP_K_CAP
    model = GPT2LMHeadModel.from_pretrained(starter_model_dir()).eval()
    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    chat = "Alice: hi! how are you?\nBot: I am good, thanks. What music do you like?\nAlice:"
    ids = tokenizer(chat).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().contiguous().to(device)  # every position
    values = torch.empty((len(ids), k), device=device)
    counts = fastgen_triton._top_k_from_bound(logits, values, torch.empty_like(values, dtype=torch.long))
    assert torch.equal(values, logits.topk(k, -1).values)
    assert int(counts.max()) <= fastgen_triton.SELECT_CAP, counts


def test_top_k_refuses_a_vocabulary_smaller_than_k() -> None:
    logits = torch.randn(2, fastgen_triton.TOP_K_CAP - 1, device=device_under_test())
    with pytest.raises(ValueError, match="vocabulary"):
        fastgen_triton._top_k(logits)


def test_fused_step_samples_what_the_plain_step_samples(tiny_model_dir: Path) -> None:
    from tests.helpers.fastgen import drain, job, make_engine, random_prompt, sampled

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).to(device_under_test()).eval()
    # top_k stays within the cap: full-vocabulary sampling is the plain step's own code in both, and on a
    # random model's near-flat distribution its order among ~25k candidates follows last-bit rounding.
    settings = [sampled(1), sampled(2, top_k=5, temperature=0.7), sampled(3, top_k=20, top_p=0.5)]
    runs = []
    for fused in (False, True):
        engine = make_engine(model, fused=fused)
        for i, params in enumerate(settings):
            engine.admit(job(i, random_prompt(5 + 20 * i, seed=i), params))
        runs.append({i: r.token_ids for i, r in drain(engine).items()})
    assert runs[0] == runs[1]


def odd_model(activation: str = "gelu_new") -> GPT2LMHeadModel:
    """Two blocks 72 wide with 3 heads of 24: widths and head sizes that are not powers of two."""
    torch.manual_seed(3)
    config = GPT2Config(n_layer=2, n_embd=72, n_head=3, n_positions=128, vocab_size=50257)
    return GPT2LMHeadModel(GPT2Config(**{**config.to_dict(), "activation_function": activation}))


def shaped_weights(
    tiny_model_dir: Path, shape: str, device: torch.device, out_in_copies: bool = True
) -> fastgen_weights.GPT2Weights:
    """The fp32 weights of the tiny test model ("tiny"), of odd_model() ("odd") or of it with ReLU
    ("odd-relu") on `device`, biases and norms perturbed; with the [out, in] copies, steps of up to
    SMALL_LINEAR_ROWS rows take small_linear_kernel."""
    if shape == "tiny":
        model = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    else:
        model = odd_model("relu" if shape == "odd-relu" else "gelu_new")
    return fastgen_weights.weights_from_hf(
        perturbed(model).to(device).eval(), fast_activation=False, out_in_copies=out_in_copies
    )


def prefilled_state(
    weights: fastgen_weights.GPT2Weights, device: torch.device, rows: int = 3
) -> tuple[fastgen_ops.DecodeState, torch.Tensor]:
    """Rows at 20, 10, 1, 15, 5 and 12 tokens (the first `rows` of them) of random prompts, prefilled."""
    state = fastgen_ops.allocate_state(weights, max_batch=rows, max_seq=64)
    prompts = torch.randint(0, 50257, (rows, 20), generator=torch.Generator().manual_seed(2))
    settings = torch.tensor(
        [[pos, 0, 10, 0, 0] for pos in (19, 9, 0, 14, 4, 11)[:rows]]
    )  # POS GEN MAX_NEW ..
    stop_index = torch.full((rows, 1), 50257)
    fastgen_ops.install_rows(
        state, 0, prompts, settings, torch.ones(rows, 3), stop_index, torch.rand(rows, 11)
    )
    with torch.inference_mode():
        fastgen_ops.prefill(weights, state, prompts[:, :19].to(device), torch.arange(rows, device=device))
    return state, prompts


@pytest.mark.parametrize(
    ("products", "rows"),
    [
        ("small_linear_kernel", 3),
        ("addmm", 3),
        ("skinny_linear_kernel", fastgen_products.SMALL_LINEAR_ROWS + 2),
        ("addmm beside the copies", fastgen_products.SMALL_LINEAR_ROWS + 2),
    ],
)
@pytest.mark.parametrize("shape", ["tiny", "odd", "odd-relu"])
def test_fused_logits_equal_the_plain_steps(
    tiny_model_dir: Path, shape: str, products: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """72, the odd models' width, is no whole tile of skinny_linear_kernel: at 6 rows they take addmm."""
    if products == "addmm beside the copies":
        monkeypatch.setattr(fastgen_products, "SKINNY_LINEAR_ROWS", fastgen_products.SMALL_LINEAR_ROWS)
    skinny_calls: list[int] = []
    skinny = fastgen_products._skinny_linear

    def counted(x: torch.Tensor, out_in: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        skinny_calls.append(out_in.shape[0])
        return skinny(x, out_in, *args, **kwargs)

    monkeypatch.setattr(fastgen_products, "_skinny_linear", counted)
    device = device_under_test()
    weights = shaped_weights(tiny_model_dir, shape, device, out_in_copies=products != "addmm")
    state, _ = prefilled_state(weights, device, rows)
    with torch.inference_mode():
        expected = fastgen_ops.decode_logits(weights, state, batch=rows, window=64)
        logits = fastgen_triton.decode_logits(weights, state, batch=rows)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # float32 on the GPU takes cuBLAS (tensor cores would round to TF32): the half-precision test below
    takes_skinny = products == "skinny_linear_kernel" and shape == "tiny" and device.type == "cpu"
    width = weights.width  # QKV, the attention projection and FC, in each layer; not the MLP projection
    assert skinny_calls == ([3 * width, width, 4 * width] * len(weights.layers) if takes_skinny else [])


@pytest.mark.parametrize("shape", ["tiny", "odd"])
def test_fused_prefill_caches_what_the_plain_prefill_caches(
    tiny_model_dir: Path, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into slots out of order (cache_prompt_kernel takes each prompt's slot from the device), and 19
    positions in blocks of 8: two whole blocks and a partial one."""
    monkeypatch.setattr(fastgen_triton, "CACHE_PROMPT_BLOCK", 8)
    device = device_under_test()
    weights = shaped_weights(tiny_model_dir, shape, device)
    expected, prompts = prefilled_state(weights, device)
    state = fastgen_ops.allocate_state(weights, max_batch=3, max_seq=64)
    slots = torch.tensor([2, 0, 1], device=device)
    with torch.inference_mode():
        fastgen_triton.prefill(weights, state, prompts[:, :19].to(device), slots)
    torch.testing.assert_close(state.kv[:, :, slots], expected.kv, rtol=1e-4, atol=1e-4)
    assert bool(state.kv[:, :, :, :, :19].abs().sum(-1).gt(0).all())  # every layer, row, head, position


@pytest.mark.parametrize("shape", ["tiny", "odd"])
def test_fused_prefill_of_a_few_tokens_caches_what_the_plain_prefill_caches(
    tiny_model_dir: Path, shape: str
) -> None:
    """Three tokens in all: the prefill's products take small_linear_kernel (without the norm prologue),
    which then adds the MLP's bias itself."""
    device = device_under_test()
    weights = shaped_weights(tiny_model_dir, shape, device)
    ids = torch.randint(0, 50257, (1, 3), generator=torch.Generator().manual_seed(3)).to(device)
    expected, state = (fastgen_ops.allocate_state(weights, max_batch=1, max_seq=64) for _ in range(2))
    with torch.inference_mode():
        fastgen_ops.prefill(weights, expected, ids, torch.arange(1, device=device))
        fastgen_triton.prefill(weights, state, ids, torch.arange(1, device=device))
    torch.testing.assert_close(state.kv, expected.kv, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 6], ids=["small products", "skinny products"])
def test_gpu_fused_logits_in_half_precision_track_float32(
    tiny_model_dir: Path, dtype: torch.dtype, rows: int
) -> None:
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).to("cuda").eval()
    results = {}
    for precision in (torch.float32, dtype):
        weights = fastgen_weights.weights_from_hf(
            model.to(precision), fast_activation=True, out_in_copies=True
        )
        state, _ = prefilled_state(weights, torch.device("cuda"), rows)
        with torch.inference_mode():
            plain = fastgen_ops.decode_logits(weights, state, batch=rows, window=64)
            results[precision] = (plain, fastgen_triton.decode_logits(weights, state, batch=rows))
    reference = results[torch.float32][0]
    plain_error = (results[dtype][0] - reference).abs().max()
    fused_error = (results[dtype][1] - reference).abs().max()
    assert fused_error <= 2 * plain_error + 1e-3, (fused_error, plain_error)


def test_warm_up_step_writes_only_this_positions_key_value(tiny_model_dir: Path) -> None:
    device = device_under_test()
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).to(device).eval()
    weights = fastgen_weights.weights_from_hf(model, fast_activation=False)
    state, _ = prefilled_state(weights, device)
    before = {name: getattr(state, name).clone() for name in ("tokens", "rows", "done", "out", "kv")}
    plan = fastgen_ops.StepPlan(batch=3, window=64, sampling="top_k", use_penalty=True, ngram_span=4)
    with torch.inference_mode():
        fastgen_triton.decode_step(weights, state, plan, commit=False)
    for name in ("tokens", "rows", "done", "out"):
        assert torch.equal(getattr(state, name), before[name]), name
    changed = (state.kv != before["kv"]).any(-1)  # [layers, 2, rows, heads, positions]
    positions = changed.nonzero()[:, 4].unique().tolist()
    assert set(positions) <= {19, 9, 0} and changed.any()
