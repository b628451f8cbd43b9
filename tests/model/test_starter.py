"""The bundled starter model: configuration, tokenizer, size budget, card, and a real reply on the CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from model.loading import starter_model_dir

STARTER = starter_model_dir()
pytestmark = pytest.mark.skipif(
    not (STARTER / "config.json").is_file(),
    reason=f"{STARTER} is absent: train it with `python scripts/train_starter.py` (needs chitchat-dataset)",
)
MAX_TOTAL_WEIGHT_BYTES = 40_000_000
MAX_SHARD_BYTES = 16_000_000


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((STARTER / "training_card.json").read_text(encoding="utf-8"))


def test_configuration_is_a_small_gpt2_with_the_real_vocabulary(card: dict) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(STARTER)
    assert config.model_type == "gpt2" and config.vocab_size == 50257
    assert config.eos_token_id == config.bos_token_id == 50256
    assert (config.n_layer, config.n_embd, config.n_head) == tuple(
        card["architecture"][key] for key in ("n_layer", "n_embd", "n_head")
    )
    # The context is the training block size: positions past it were never trained.
    assert config.n_positions == card["data"]["block_size"]


def test_tokenizer_is_the_real_gpt2_one_and_loads_plainly() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STARTER)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert (STARTER / "NOTICE").is_file()  # the vocabulary's origin and MIT licence travel with it


def test_weights_are_fp16_safetensors_within_the_size_budget() -> None:
    from safetensors import safe_open

    shards = sorted(STARTER.glob("*.safetensors"))
    assert shards and not list(STARTER.glob("*.bin"))
    assert sum(p.stat().st_size for p in shards) <= MAX_TOTAL_WEIGHT_BYTES
    for shard in shards:
        with safe_open(str(shard), framework="pt") as weights:
            names = list(weights.keys())
            assert {str(weights.get_tensor(name).dtype) for name in names} == {"torch.float16"}
        # One tensor cannot be split across files: only a shard holding the embedding alone may be larger.
        assert shard.stat().st_size < MAX_SHARD_BYTES or names == ["transformer.wte.weight"]


def test_model_card_states_the_measured_perplexity(card: dict) -> None:
    text = (STARTER / "MODEL_CARD.md").read_text(encoding="utf-8")
    perplexity = card["metrics"]["val_perplexity_after"]
    assert perplexity <= 50
    assert f"**{perplexity:.2f}**" in text
    assert "chitchat-dataset" in text and "MIT" in text
    assert re.search(re.escape("python scripts/train_starter.py"), text)


def test_generates_a_non_empty_reply_on_the_cpu() -> None:
    from dataclasses import replace

    from model.loading import load_model
    from model.training.dataset import DEFAULT_PERSONA
    from model.training.evaluate import EVAL_SAMPLING, answer_prompts

    loaded = load_model("starter", device="cpu", dtype="float32")
    greedy = replace(EVAL_SAMPLING, max_new_tokens=20, temperature=0.0)
    (reply,) = answer_prompts(
        loaded.model, loaded.tokenizer, ["hi! how are you?"], DEFAULT_PERSONA, "Bot", greedy
    )
    assert reply.reply.strip() and "\n" not in reply.reply
    assert 0 < reply.reply_tokens <= 20


def test_card_files_sit_beside_the_weights() -> None:
    names = {p.name for p in Path(STARTER).iterdir()}
    assert {"config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "MODEL_CARD.md"} <= names
