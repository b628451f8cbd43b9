"""`chatbot eval`: metric definitions, exact perplexity, replies to fixed prompts, side-by-side report."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model.training.evaluate import (
    DEFAULT_PROMPTS,
    EVAL_SAMPLING,
    distinct_n,
    evaluate,
    generate_reply,
    main,
    markdown_report,
    perplexity,
    repetition_rate,
)
from tests.helpers.exports import make_synthetic_export

FAST = replace(EVAL_SAMPLING, max_new_tokens=6)


class UniformModel(torch.nn.Module):
    """Equal logits for every token: its perplexity is exactly the vocabulary size."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


@pytest.fixture(scope="module")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_export(tmp_path_factory.mktemp("export"), count=120)


def test_distinct_and_repetition_definitions() -> None:
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_n([[], [7]], 2) == 0.0
    assert repetition_rate([[1, 2, 3, 1, 2, 3]]) == pytest.approx(1 / 4)
    assert repetition_rate([[1, 2, 3, 4, 5]]) == 0.0
    assert repetition_rate([[9] * 12]) == pytest.approx(9 / 10)


def test_perplexity_is_exact_and_skips_end_of_text(gpt2_tokenizer) -> None:
    eos = gpt2_tokenizer.eos_token_id
    blocks = [[5, 6, 7, eos, 8, 9], [10, 11, 12]]  # a shorter last block is padded (with eos) and masked
    ppl, tokens = perplexity(UniformModel(len(gpt2_tokenizer)), gpt2_tokenizer, blocks, batch_size=2)
    assert tokens == 4 + 2  # targets 6, 7, 8, 9 and 11, 12: the eos and the padding are not scored
    assert ppl == pytest.approx(len(gpt2_tokenizer), rel=1e-5)


def test_reply_respects_a_short_context_window(gpt2_tokenizer) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=32, n_layer=1, n_embd=16, n_head=2)).eval()
    long_prompt = "User: " + "word " * 200 + "\nBot:"
    text, count = generate_reply(
        model, gpt2_tokenizer, long_prompt, replace(EVAL_SAMPLING, max_new_tokens=40), frozenset()
    )
    assert count <= 16 and "\n" not in text


def test_evaluate_reports_every_metric(tiny_model_dir: Path, small_export: Path) -> None:
    report = evaluate(str(tiny_model_dir), small_export, block_size=64, settings=FAST)
    assert math.isfinite(report.perplexity) and report.perplexity > 1 and report.val_tokens > 0
    assert [r.prompt for r in report.replies] == list(DEFAULT_PROMPTS)
    assert all("\n" not in r.reply and 0 < r.reply_tokens <= 6 for r in report.replies)
    assert 0 <= report.distinct_1 <= 1 and 0 <= report.distinct_2 <= 1 and 0 <= report.repetition_rate <= 1
    assert report.mean_reply_seconds > 0 and report.block_size == 64 and report.device == "cpu"


def test_against_prints_side_by_side_and_writes_json(
    tiny_model_dir: Path, small_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    from tests.helpers.models import build_tiny_gpt2

    build_tiny_gpt2(other, seed=1)
    json_path = tmp_path / "report.json"
    argv = ["--model", str(tiny_model_dir), "--against", str(other), "--data", str(small_export),
            "--block-size", "64", "--max-new-tokens", "4", "--json", str(json_path)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"| metric | {tiny_model_dir} | {other} |" in printed
    assert "| held-out perplexity |" in printed and "| hi! how are you? |" in printed
    models = json.loads(json_path.read_text())["models"]
    assert [m["model"] for m in models] == [str(tiny_model_dir), str(other)]
    assert models[0]["perplexity"] != models[1]["perplexity"]


def test_markdown_escapes_pipes_and_empty_replies(tiny_model_dir: Path, small_export: Path) -> None:
    report = evaluate(str(tiny_model_dir), small_export, block_size=64, prompts=("a | b",), settings=FAST)
    table = markdown_report([report])
    assert "| a \\| b |" in table


def test_missing_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "x"]) == 2
    assert "--data" in capsys.readouterr().err
