"""The export format: hash split, atomic writer (SIGKILL at random points), manifest checks, packing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model.prompt import render_dialogue
from model.training import dataset
from model.training.dataset import (
    DEFAULT_PERSONA,
    Conversation,
    ExportError,
    pack_blocks,
    read_conversations,
    split_of,
    verify_export,
)
from tests.helpers.exports import export, make_conversations

REPO_ROOT = Path(__file__).resolve().parents[3]
FINAL_NAMES = ("train.jsonl", "val.jsonl", "manifest.json")


def test_split_is_the_documented_hash() -> None:
    for conversation_id in ("a", "chitchat:123", "discord:9:8"):
        bucket = int(hashlib.sha256(conversation_id.encode()).hexdigest()[:8], 16) % 100
        assert split_of(conversation_id) == ("val" if bucket < 10 else "train")
    assert split_of("x", val_percent=0) == "train"
    assert split_of("x", val_percent=100) == "val"
    share = sum(split_of(f"id-{n}") == "val" for n in range(5000)) / 5000
    assert 0.08 < share < 0.12


def test_export_round_trip_and_manifest(tmp_path: Path) -> None:
    conversations = make_conversations(200)
    manifest = export(tmp_path, conversations)
    read_back = {
        c.id: c for split in ("train", "val") for c in read_conversations(tmp_path / f"{split}.jsonl")
    }
    assert read_back == {c.id: c for c in conversations}
    assert manifest.counts["train"] + manifest.counts["val"] == 200
    assert all(split_of(c.id) == "val" for c in read_conversations(tmp_path / "val.jsonl"))
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["counts"] == manifest.counts and on_disk["filters"] == {"min_turns": 2}
    assert (
        on_disk["files"]["train.jsonl"] == hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest()
    )
    assert verify_export(tmp_path) == manifest
    assert "こんにちは" in (tmp_path / "train.jsonl").read_text(
        encoding="utf-8"
    )  # stored as UTF-8, not \\u escapes


def test_exact_duplicates_are_removed_and_counted(tmp_path: Path) -> None:
    conversations = make_conversations(5)
    copy = Conversation(id="other-id", source="test", turns=conversations[0].turns)
    manifest = export(tmp_path, [*conversations, copy])
    assert manifest.duplicates_removed == 1
    assert sum(manifest.counts.values()) == 5


def test_verify_export_detects_tampering_and_missing_manifest(tmp_path: Path) -> None:
    export(tmp_path, make_conversations(50))
    with open(tmp_path / "train.jsonl", "ab") as data:
        data.write(b"\n")
    with pytest.raises(ExportError, match="does not match"):
        verify_export(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ExportError, match="did not finish"):
        verify_export(tmp_path)


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": "a", "source": "s", "turns": []}\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(ExportError, match=r"train\.jsonl:2"):
        list(read_conversations(path))


def test_splits_are_stable_across_exports_with_new_data(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    export(first, make_conversations(300))
    grown = make_conversations(200, start=300) + make_conversations(300)
    random.Random(0).shuffle(grown)
    export(second, grown)

    def ids(folder: Path, split: str) -> set[str]:
        return {c.id for c in read_conversations(folder / f"{split}.jsonl")}

    for folder in (first, second):
        assert not ids(folder, "train") & ids(folder, "val")
    assert ids(first, "train") <= ids(second, "train")
    assert ids(first, "val") <= ids(second, "val")
    assert not ids(first, "train") & ids(second, "val")


def test_a_failed_rename_leaves_no_partial_final_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export(tmp_path, make_conversations(40))
    old_train = (tmp_path / "train.jsonl").read_bytes()
    real_replace = os.replace
    calls: list[str] = []

    def failing_replace(source: str | Path, target: str | Path) -> None:
        calls.append(str(target))
        if len(calls) == 2:  # train.jsonl replaced, then the disk "fails" before val.jsonl
            raise OSError("disk full")
        real_replace(source, target)

    monkeypatch.setattr(dataset.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path, make_conversations(80))
    monkeypatch.undo()
    assert not (tmp_path / "manifest.json").exists()  # no manifest pairs new data with old checksums
    assert (tmp_path / "train.jsonl").read_bytes() != old_train  # complete new file, renamed atomically
    assert not list(tmp_path.glob(".export-*"))  # the writer cleaned up after itself
    with pytest.raises(ExportError):
        verify_export(tmp_path)


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from tests.helpers.exports import export, make_conversations
    print("ready", flush=True)
    export(Path(sys.argv[1]), make_conversations(int(sys.argv[2]), words=60))
    """
)


def _run_child(script: Path, out_dir: Path, count: int) -> subprocess.Popen[str]:
    command = [sys.executable, str(script), str(out_dir), str(count), str(REPO_ROOT)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


def _assert_consistent(out_dir: Path, complete: dict[str, set[bytes]]) -> None:
    """Every final file is absent or byte-identical to a complete export; a manifest always matches."""
    for name in FINAL_NAMES[:2]:
        path = out_dir / name
        assert not path.exists() or path.read_bytes() in complete[name], f"partial {name}"
    if (out_dir / "manifest.json").exists():
        verify_export(out_dir)


def test_sigkill_at_random_points_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """T29: 24 exports killed with SIGKILL at random moments; then one complete run cleans up."""
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    old_dir, new_dir, out_dir = tmp_path / "old", tmp_path / "new", tmp_path / "out"
    export(old_dir, make_conversations(1500, words=60))
    started = time.perf_counter()
    _run_child(script, new_dir, 3000).wait()
    run_seconds = time.perf_counter() - started
    complete = {name: {(d / name).read_bytes() for d in (old_dir, new_dir)} for name in FINAL_NAMES[:2]}
    export(out_dir, make_conversations(1500, words=60))  # a previous export that the runs overwrite
    rng = random.Random(29)
    for _ in range(24):
        child = _run_child(script, out_dir, 3000)
        time.sleep(rng.uniform(0.0, run_seconds))
        child.send_signal(signal.SIGKILL)
        child.wait()
        _assert_consistent(out_dir, complete)
    _run_child(script, out_dir, 3000).wait()
    assert not list(out_dir.glob(".export-*")), "stale temp files were not removed"
    assert verify_export(out_dir).counts == json.loads((new_dir / "manifest.json").read_text())["counts"]


def test_pack_blocks_renders_with_end_of_text(gpt2_tokenizer) -> None:
    conversations = make_conversations(6)
    blocks = pack_blocks(gpt2_tokenizer, conversations, DEFAULT_PERSONA, "Bot", 16, keep_remainder=True)
    stream = [token for block in blocks for token in block]
    expected: list[int] = []
    for conversation in conversations:
        text = render_dialogue(DEFAULT_PERSONA, conversation.turns, "Bot", open_bot_turn=False)
        expected += gpt2_tokenizer(text)["input_ids"] + [gpt2_tokenizer.eos_token_id]
    assert stream == expected
    assert all(len(block) == 16 for block in blocks[:-1])
    dropped = pack_blocks(gpt2_tokenizer, conversations, DEFAULT_PERSONA, "Bot", 16)
    assert dropped == blocks[: len(expected) // 16]
    assert pack_blocks(gpt2_tokenizer, [], DEFAULT_PERSONA, "Bot", 16) == []
