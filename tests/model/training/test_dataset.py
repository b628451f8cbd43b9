"""The export format: hash split, atomic writer (failed renames, kill leftovers), manifest checks, packing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from model.prompt import render_dialogue
from model.training import export_dir
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


def test_a_failed_rename_keeps_the_previous_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "out"
    old = export(out_dir, make_conversations(40))
    real_rename = os.rename
    calls: list[str] = []

    def failing_rename(source: str | Path, target: str | Path) -> None:
        calls.append(str(target))
        if len(calls) == 2:  # the old export set aside, then the disk "fails" renaming the new one in
            raise OSError("disk full")
        real_rename(source, target)

    monkeypatch.setattr(export_dir.os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        export(out_dir, make_conversations(80))
    monkeypatch.undo()
    assert verify_export(out_dir) == old  # the old export is back in place, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the writer cleaned up after itself


def test_a_kill_between_the_renames_restores_the_previous_export(tmp_path: Path) -> None:
    """Killed after setting the old export aside: out_dir is absent and the next run puts the old one back."""
    out_dir = tmp_path / "out"
    old = export(out_dir, make_conversations(40))
    dead_pid = _dead_pid()
    os.rename(out_dir, tmp_path / f".out.export-{dead_pid}.old")
    (tmp_path / f".out.export-{dead_pid}.tmp").mkdir()  # the half-built new one
    assert export_dir.recover_interrupted_export(out_dir, "manifest.json") == 2
    assert verify_export(out_dir) == old
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_a_running_export_are_not_touched(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        building = tmp_path / f".out.export-{sleeper.pid}.tmp"
        building.mkdir()
        export(tmp_path / "out", make_conversations(10))
        assert building.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ExportError, match="not part of an export"):
        export(tmp_path, make_conversations(10))
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")) == []


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


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
