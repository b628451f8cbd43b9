"""model.ct2.scoring and `chatbot eval --engine ct2`: CTranslate2's perplexity against the torch one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.ct2.scoring import ct2_perplexity
from model.loading import load_model
from model.training.evaluate import main, pack_blocks, perplexity, read_conversations
from tests.helpers.exports import make_synthetic_export
from tests.helpers.models import perturbed

pytest.importorskip("ctranslate2")


@pytest.fixture(scope="module")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_export(tmp_path_factory.mktemp("export"), count=60)


def test_float32_scores_as_torch_does_and_int8_stays_close(
    tiny_model_dir: Path, small_export: Path, tmp_path: Path
) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    perturbed(loaded.model)
    conversations = read_conversations(small_export / "val.jsonl")
    blocks = pack_blocks(loaded.tokenizer, conversations, "A chat.", "Bot", 64, keep_remainder=True)
    torch_ppl, tokens = perplexity(loaded.model, loaded.tokenizer, blocks)
    float32_ppl, float32_tokens = ct2_perplexity(loaded.model, loaded.tokenizer, blocks, tmp_path, "float32")
    int8_ppl, _ = ct2_perplexity(loaded.model, loaded.tokenizer, blocks, tmp_path, "int8")
    assert float32_tokens == tokens  # the same tokens scored: end-of-text skipped
    assert float32_ppl == pytest.approx(torch_ppl, rel=1e-4)
    assert int8_ppl == pytest.approx(float32_ppl, rel=0.01) and int8_ppl != float32_ppl


def test_eval_engine_flag_reports_what_scored(
    tiny_model_dir: Path, small_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path = tmp_path / "report.json"
    argv = ["--model", str(tiny_model_dir), "--data", str(small_export), "--block-size", "64",
            "--max-new-tokens", "2", "--engine", "ct2", "--cpu-compute", "float32",
            "--json", str(json_path)]  # fmt: skip
    assert main(argv) == 0
    assert "| perplexity scored by | ct2 float32 |" in capsys.readouterr().out
    assert json.loads(json_path.read_text())["models"][0]["engine"] == "ct2 float32"
