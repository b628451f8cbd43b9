"""`chatbot train` on the CPU: a tiny GPT-2 on a small export learns, saves, writes a card and resumes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from model.training.train import TrainArguments, TrainError, main, train
from tests.helpers.exports import make_synthetic_export


@pytest.fixture(scope="module")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_export(tmp_path_factory.mktemp("export"))


def tiny_args(data: Path, out: Path, **overrides: object) -> TrainArguments:
    settings: dict[str, object] = dict(
        data=str(data), out=str(out), block_size=64, batch_size=4, learning_rate=5e-3, logging_steps=10,
        progress=False, eval_each_epoch=False,
    )  # fmt: skip
    settings.update(overrides)
    return TrainArguments(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def step_recorder() -> object:
    """A caller-supplied TrainerCallback that records every optimizer step."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_step_end(self, args: object, state: object, control: object, **kwargs: object) -> None:
            self.steps.append(state.global_step)  # type: ignore[attr-defined]

    return StepRecorder()


@pytest.fixture(scope="module")
def trained(
    small_export: Path, tiny_model_dir: Path, step_recorder: object, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny model after 24 steps on the small export."""
    out = tmp_path_factory.mktemp("trained")
    return train(
        tiny_args(small_export, out, base=str(tiny_model_dir), max_steps=24), callbacks=[step_recorder]
    )


def test_training_lowers_held_out_perplexity(trained: Path, step_recorder: object) -> None:
    metrics = json.loads((trained / "training_card.json").read_text())["metrics"]
    assert metrics["val_perplexity_after"] < metrics["val_perplexity_before"] / 10
    assert metrics["train_steps"] == 24 and metrics["train_tokens"] == 24 * 4 * 64
    assert metrics["val_tokens"] > 0
    assert step_recorder.steps == list(range(1, 25))  # type: ignore[attr-defined]  # reached the Trainer


def test_output_loads_with_plain_from_pretrained(trained: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert len(tokenizer) == 50257 and model.config.n_layer == 2
    assert list(trained.glob("*.safetensors")) and not list(trained.glob("*.bin"))
    assert not (trained / "checkpoints").exists()  # removed after a successful run


def test_training_card_pins_data_settings_and_hardware(trained: Path, small_export: Path) -> None:
    card = json.loads((trained / "training_card.json").read_text())
    manifest_hash = hashlib.sha256((small_export / "manifest.json").read_bytes()).hexdigest()
    assert card["data"]["manifest_sha256"] == manifest_hash
    assert card["data"]["block_size"] == 64 and card["data"]["source"] == "test"
    assert card["settings"]["learning_rate"] == 5e-3 and card["settings"]["max_steps"] == 24
    assert card["hardware"]["precision"] == "fp32" and card["hardware"]["device"].startswith("CPU")
    assert card["time"]["train_seconds"] > 0 and card["architecture"]["n_layer"] == 2
    readme = (trained / "README.md").read_text()
    assert "# Training card" in readme and manifest_hash in readme


def test_eval_reproduces_the_cards_perplexity(trained: Path, small_export: Path) -> None:
    from dataclasses import replace

    from model.training.evaluate import EVAL_SAMPLING, evaluate

    card = json.loads((trained / "training_card.json").read_text())
    report = evaluate(
        str(trained), small_export, prompts=("hi",), settings=replace(EVAL_SAMPLING, max_new_tokens=4)
    )
    assert report.block_size == 64  # read from the training card
    assert report.perplexity == pytest.approx(card["metrics"]["val_perplexity_after"], rel=1e-4)


def test_from_scratch_gpt2_with_real_vocabulary_and_fp16_shards(small_export: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    args = tiny_args(
        small_export, tmp_path, from_scratch=True, n_layer=1, n_embd=32, n_head=2, block_size=32,
        max_steps=2, save_dtype="float16", max_shard_size="1MB", eval_before=False,
    )  # fmt: skip
    out = train(args)
    config = AutoConfig.from_pretrained(out)
    assert (config.n_layer, config.n_embd, config.n_positions, config.vocab_size) == (1, 32, 32, 50257)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as weights:
            assert {str(weights.get_tensor(k).dtype) for k in weights.keys()} == {"torch.float16"}  # noqa: SIM118
    assert len(AutoTokenizer.from_pretrained(out)) == 50257


def test_resume_continues_from_the_newest_checkpoint(
    small_export: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Trainer

    first = tiny_args(small_export, tmp_path, base=str(tiny_model_dir), max_steps=4, save_steps=2,
                      keep_checkpoints=True, eval_before=False)  # fmt: skip
    train(first)
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"checkpoint-2", "checkpoint-4"}
    loaded_from: list[str] = []
    original = Trainer._load_from_checkpoint

    def spy(self: Trainer, resume_from_checkpoint: str, model: object = None) -> None:
        loaded_from.append(Path(resume_from_checkpoint).name)
        original(self, resume_from_checkpoint, model)

    monkeypatch.setattr(Trainer, "_load_from_checkpoint", spy)
    train(tiny_args(small_export, tmp_path, base=str(tiny_model_dir), max_steps=6, save_steps=2,
                    resume=True, eval_before=False))  # fmt: skip
    assert loaded_from == ["checkpoint-4"]
    assert json.loads((tmp_path / "training_card.json").read_text())["metrics"]["train_steps"] == 6


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        ([], "--data"),
        (["--data", "D", "--out", "O"], "--base"),
        (["--data", "D", "--out", "O", "--base", "gpt2", "--from-scratch"], "--base"),
        (["--data", "D", "--out", "O", "--from-scratch", "--n-embd", "64", "--n-head", "3"], "--n-head"),
        (["--data", "D", "--out", "O", "--from-scratch", "--dropout", "1.5"], "--dropout"),
        (["--data", "D", "--out", "O", "--from-scratch", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_invalid_flags_are_named(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert flag in capsys.readouterr().err


def test_data_and_resume_problems_are_named(tmp_path: Path, small_export: Path) -> None:
    base = [
        "--out",
        str(tmp_path / "o"),
        "--from-scratch",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
    ]
    with pytest.raises(TrainError, match=r"--data .*manifest"):
        train(tiny_args(tmp_path, tmp_path / "o", from_scratch=True, n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(TrainError, match="--resume"):
        train(tiny_args(small_export, tmp_path / "o", from_scratch=True, resume=True))
    with pytest.raises(TrainError, match="--block-size 64 exceeds"):
        small = {"n_layer": 1, "n_embd": 32, "n_head": 2}
        train(tiny_args(small_export, tmp_path / "o", from_scratch=True, n_positions=32, **small))
    assert main(["--data", str(tmp_path), *base]) == 2
