"""`chatbot train --resume` after a SIGKILL at a random moment: it resumes in every trial.

A real training process (the tiny GPT-2 on the synthetic export, a checkpoint every step so that most of its
time is spent saving) is killed at a random moment after its first checkpoint; `--resume` then has to finish
the run from the newest complete checkpoint, whatever state the kill left the newest one in.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.training.checkpoints import checkpoint_folders, newest_complete_checkpoint
from model.training.train import TrainArguments, main, train
from tests.helpers.exports import make_synthetic_export

MAX_STEPS = 6
TRIALS = 5


def train_flags(data: Path, base: Path, out: Path) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--base", str(base), "--max_steps", str(MAX_STEPS),
            "--save_steps", "1", "--block_size", "64", "--batch_size", "4", "--keep_checkpoints",
            "--eval_before", "false", "--progress", "false"]  # fmt: skip


def train_command(data: Path, base: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "model.training.train", *train_flags(data, base, out)]


def has_a_saved_state(out: Path) -> bool:
    """Whether the Trainer finished at least one checkpoint (its state is the last file it writes)."""
    return any((out / "checkpoints").glob("checkpoint-*/trainer_state.json"))


def half_written(out: Path) -> list[str]:
    """Checkpoint folders without their state: what a kill during a save leaves (and used to break resume)."""
    folders = (out / "checkpoints").glob("checkpoint-*")
    return [p.name for p in folders if not (p / "trainer_state.json").is_file()]


def run_until_killed(command: list[str], out: Path, rng: random.Random, window: float) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not has_a_saved_state(out) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, window))
    child.send_signal(signal.SIGKILL)
    child.wait()


@pytest.mark.slow
def test_resume_after_a_kill_at_a_random_moment_succeeds_every_time(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_synthetic_export(tmp_path / "export", count=120)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A reference run: how long the steps after the first checkpoint take, to spread the kills over them.
    reference = tmp_path / "reference"
    command = train_command(data, tiny_model_dir, reference)
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not has_a_saved_state(reference) and child.poll() is None:
        time.sleep(0.01)
    first_checkpoint = time.monotonic()
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-2000:]
    window = time.monotonic() - first_checkpoint

    rng = random.Random(17)
    broken = 0
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        run_until_killed(train_command(data, tiny_model_dir, out), out, rng, window)
        broken += bool(half_written(out))
        capsys.readouterr()
        # The resume runs in this process (torch is imported already), through `chatbot train`'s entry point.
        assert main([*train_flags(data, tiny_model_dir, out), "--resume"]) == 0, capsys.readouterr().err
        card = json.loads((out / "training_card.json").read_text(encoding="utf-8"))
        # A kill after the last checkpoint resumes from it; the Trainer then counts one more step.
        assert card["metrics"]["train_steps"] in (MAX_STEPS, MAX_STEPS + 1)
        assert half_written(out) == []
    print(f"resume after kill: {TRIALS} trials, {broken} left a half-written newest checkpoint")


def test_resume_skips_a_half_written_newest_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Deterministic: the newest checkpoint lost its state (killed mid-save) → resume from the one before."""
    data = make_synthetic_export(tmp_path / "export", count=60)
    out = tmp_path / "out"
    settings = dict(data=str(data), out=str(out), base=str(tiny_model_dir), block_size=64, batch_size=4,
                    max_steps=4, save_steps=2, keep_checkpoints=True, eval_before=False,
                    progress=False)  # fmt: skip
    train(TrainArguments(**settings))  # type: ignore[arg-type]
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    rotated = (
        out / "checkpoints" / "checkpoint-6"
    )  # a kill during rotation's rmtree: state left, weights gone
    shutil.copytree(out / "checkpoints" / "checkpoint-2", rotated)
    (rotated / "model.safetensors").unlink()
    train(TrainArguments(**{**settings, "resume": True}))  # type: ignore[arg-type]
    card = json.loads((out / "training_card.json").read_text(encoding="utf-8"))
    assert card["metrics"]["train_steps"] == 4
    # Resumed from checkpoint-2: the broken two were removed, and step 4 was saved again, whole.
    assert [p.name for p in checkpoint_folders(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert newest_complete_checkpoint(out / "checkpoints") == out / "checkpoints" / "checkpoint-4"
