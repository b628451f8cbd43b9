"""T29: `chatbot export` SIGKILLed at random moments, into a fresh path and over an existing export.

Every time, the final path is absent, the old complete export, or the new complete one (its manifest's
checksums match); the next complete run leaves no temporary directory behind.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bot.storage import Storage, StoredMessage
from model.training.dataset import manifest_sha256, verify_export
from tests.helpers.exports import make_synthetic_export

GUILD, ALICE, BOT = 1, 11, 900
CONVERSATIONS = 800
TRIALS_PER_TARGET = 21  # 42 kills in all
CHATBOT = [sys.executable, "-c", "import sys; from bot.cli import main; sys.exit(main())"]


async def seed(db_path: Path) -> None:
    """One consenting user's conversations (an hour apart), long enough that writing takes a while."""
    async with Storage.open(db_path) as storage:
        await storage.set_guild_training_export(GUILD, True)
        await storage.set_training_opt_in(ALICE, True, at=1.0)
        for n in range(CONVERSATIONS):
            at = 1_000_000.0 + n * 3600
            text = f"question {n} " + "about the weather and the sea " * 8
            await storage.add_message(StoredMessage(2 * n + 1, 100, GUILD, ALICE, "Alice", False, text, at))
            await storage.add_message(StoredMessage(2 * n + 2, 100, GUILD, BOT, "Bot", True, f"answer {n}",
                                                    at + 5, reply_to_id=2 * n + 1))  # fmt: skip


def start_export(data_dir: Path, out_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BOT_DATA_DIR": str(data_dir), "BOT_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([*CHATBOT, "export", "--out", str(out_dir)], cwd=data_dir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.parent.glob(f".{out_dir.name}.export-*"))


def check_final_path(out_dir: Path, old_sha: str | None, new_counts: dict[str, int]) -> str:
    """Which state the final path is in; fails on anything but absent / old complete / new complete."""
    if not out_dir.exists():
        return "absent"
    manifest = verify_export(out_dir)  # ExportError on a missing manifest or a checksum mismatch
    if old_sha is not None and manifest_sha256(out_dir) == old_sha:
        return "old"
    assert manifest.source == "discord" and dict(manifest.counts) == new_counts, manifest
    return "new"


def kill_at_random(data_dir: Path, out_dir: Path, rng: random.Random, run_seconds: float) -> bool:
    """Start an export, SIGKILL it at a random moment; return whether it was still running then."""
    child = start_export(data_dir, out_dir)
    time.sleep(rng.uniform(0.0, 1.1 * run_seconds))  # a few land after the end: the "new" state
    was_running = child.poll() is None
    child.send_signal(signal.SIGKILL)
    child.wait()
    return was_running


async def test_sigkilled_exports_leave_the_final_path_absent_old_or_new(tmp_path: Path) -> None:
    data_dir, old_ref = tmp_path / "data", tmp_path / "old-reference"
    data_dir.mkdir()
    await seed(data_dir / "chatbot.db")
    old_sha = manifest_sha256(make_synthetic_export(old_ref, count=50))
    reference = tmp_path / "new-reference"
    started = time.perf_counter()
    finished = start_export(data_dir, reference)
    _, stderr = finished.communicate(timeout=60)
    run_seconds = time.perf_counter() - started
    assert finished.returncode == 0, stderr.decode()
    new_counts = dict(verify_export(reference).counts)

    rng = random.Random(29)
    fresh, over = tmp_path / "fresh", tmp_path / "over"
    states: dict[str, int] = {}
    mid_run_kills = 0
    for trial in range(2 * TRIALS_PER_TARGET):
        target = fresh if trial % 2 == 0 else over
        if target is fresh:
            shutil.rmtree(fresh, ignore_errors=True)  # a fresh path every time (leftovers stay)
        elif not over.exists() or manifest_sha256(over) != old_sha:
            shutil.rmtree(over, ignore_errors=True)
            shutil.copytree(old_ref, over)  # over an existing complete export every time
        mid_run_kills += kill_at_random(data_dir, target, rng, run_seconds)
        state = check_final_path(target, old_sha if target is over else None, new_counts)
        states[f"{target.name}:{state}"] = states.get(f"{target.name}:{state}", 0) + 1

    for target in (fresh, over):
        child = start_export(data_dir, target)
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr.decode()
        assert check_final_path(target, None, new_counts) == "new"
        assert leftovers(target) == [], "the next complete run did not clean up"
    print(f"T29: {2 * TRIALS_PER_TARGET} kills ({mid_run_kills} while running), run {run_seconds:.2f} s,"
          f" final path: {states}")  # fmt: skip
    # The test means something only when kills land while the export is being built and swapped in.
    assert mid_run_kills >= TRIALS_PER_TARGET
    assert states.get("over:old", 0) > 0 and states.get("fresh:absent", 0) > 0
