"""The export format (jsonl + manifest), the hash split, the atomic writer and packing into blocks.

One format for Discord logs and open corpora alike (docs/ARCHITECTURE.md): `train.jsonl` and `val.jsonl`
hold one conversation per line, `manifest.json` (written last) holds counts, filters and sha256s.
A conversation's split is a hash of its id, so it never moves between train and val across exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from model.prompt import Turn, render_dialogue
from model.training.export_dir import fsync_dir, recover_interrupted_export, sibling, swap_into_place

log = logging.getLogger(__name__)

# The serving default; bot/config.py should import it from here so training and serving share one persona.
DEFAULT_PERSONA = "A friendly chat between a helpful bot and the people of a Discord server."
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
LEGACY_TEMP_PREFIX = ".export-"  # what temp files of older writers, left inside an export, start with
EXPORT_FILES = frozenset({*(f"{split}.jsonl" for split in SPLITS), MANIFEST_NAME})
HASH_CHUNK_BYTES = 1 << 20


class ExportError(Exception):
    """An export directory is incomplete, tampered with, or holds a malformed line."""


@dataclass(frozen=True)
class Conversation:
    """One conversation of the export: turns oldest → newest."""

    id: str
    source: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Manifest:
    """What an export holds; written last, so its presence means the export is complete."""

    source: str
    created_at: str
    val_percent: int
    counts: Mapping[str, int]
    files: Mapping[str, str]  # file name → sha256 hex
    filters: Mapping[str, Any]
    duplicates_removed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """A plain dict for json.dump."""
        return {
            "format_version": self.format_version,
            "source": self.source,
            "created_at": self.created_at,
            "val_percent": self.val_percent,
            "counts": dict(self.counts),
            "files": dict(self.files),
            "filters": dict(self.filters),
            "duplicates_removed": self.duplicates_removed,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """Inverse of to_json; raises ExportError when a key is missing."""
        try:
            return cls(
                source=data["source"],
                created_at=data["created_at"],
                val_percent=int(data["val_percent"]),
                counts=dict(data["counts"]),
                files=dict(data["files"]),
                filters=dict(data["filters"]),
                duplicates_removed=int(data.get("duplicates_removed", 0)),
                extra=dict(data.get("extra", {})),
                format_version=int(data.get("format_version", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"malformed manifest: {exc!r}") from exc


def split_of(conversation_id: str, val_percent: int = 10) -> str:
    """'val' when int(sha256(id)[:8], 16) % 100 < val_percent, else 'train' (stable across exports)."""
    bucket = int(hashlib.sha256(conversation_id.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "val" if bucket < val_percent else "train"


def conversation_to_json(conversation: Conversation) -> dict[str, Any]:
    """The jsonl record of one conversation."""
    turns = [{"speaker": t.speaker, "text": t.text, "is_bot": t.is_bot} for t in conversation.turns]
    return {"id": conversation.id, "source": conversation.source, "turns": turns}


def conversation_from_json(record: Mapping[str, Any]) -> Conversation:
    """Parse one jsonl record; raises KeyError/TypeError on a malformed one."""
    turns = tuple(
        Turn(speaker=str(t["speaker"]), text=str(t["text"]), is_bot=bool(t["is_bot"]))
        for t in record["turns"]
    )
    return Conversation(id=str(record["id"]), source=str(record["source"]), turns=turns)


def _content_key(conversation: Conversation) -> str:
    """Identity of a conversation's content (ids ignored), for exact-duplicate removal."""
    turns = [[t.speaker, t.text, t.is_bot] for t in conversation.turns]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode("utf-8")).hexdigest()


def _is_export_file(name: str) -> bool:
    """An export's own file, or a temp file that an earlier version of the writer left inside it."""
    return name in EXPORT_FILES or (name.startswith(LEGACY_TEMP_PREFIX) and name.endswith(".tmp"))


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything that is not an export: the writer swaps out_dir as a whole."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not an export directory")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if not _is_export_file(p.name))
        if foreign:
            raise ExportError(
                f"{out_dir} holds files that are not part of an export ({', '.join(foreign[:3])}):"
                " choose a new or empty directory"
            )


class _HashingWriter:
    """A file of the export being built that hashes what is written; fsynced on commit."""

    def __init__(self, directory: Path, name: str) -> None:
        self._file: IO[bytes] = open(directory / name, "wb")  # noqa: SIM115 - closed in commit()/close()
        self._sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha256.update(data)

    def commit(self) -> str:
        """fsync and close; return the sha256 hex."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._sha256.hexdigest()

    def close(self) -> None:
        self._file.close()


def _write_splits(
    out_dir: Path, conversations: Iterable[Conversation], val_percent: int, progress: bool
) -> tuple[dict[str, str], dict[str, int], int]:
    """Stream conversations into the two split files; return (sha256s, counts, duplicates removed)."""
    from tqdm.auto import tqdm

    writers = {split: _HashingWriter(out_dir, f"{split}.jsonl") for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    seen: set[str] = set()
    duplicates = 0
    try:
        for conversation in tqdm(conversations, disable=not progress, desc="export", unit="conv"):
            key = _content_key(conversation)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            split = split_of(conversation.id, val_percent)
            line = json.dumps(conversation_to_json(conversation), ensure_ascii=False) + "\n"
            writers[split].write(line.encode("utf-8"))
            counts[split] += 1
        hashes = {f"{split}.jsonl": writers[split].commit() for split in SPLITS}
    finally:
        for writer in writers.values():
            writer.close()
    return hashes, counts, duplicates


def _build_export(
    staging: Path,
    conversations: Iterable[Conversation],
    *,
    source: str,
    filters: Mapping[str, object],
    extra: Mapping[str, object] | None,
    val_percent: int,
    progress: bool,
) -> Manifest:
    """Write the split files, then the manifest, into the staging directory (all fsynced)."""
    hashes, counts, duplicates = _write_splits(staging, conversations, val_percent, progress)
    manifest = Manifest(
        source=source,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        val_percent=val_percent,
        counts=counts,
        files=hashes,
        filters=dict(filters),
        duplicates_removed=duplicates,
        extra=dict(extra or {}),
    )
    writer = _HashingWriter(staging, MANIFEST_NAME)
    try:
        writer.write((json.dumps(manifest.to_json(), ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
        writer.commit()
    finally:
        writer.close()
    fsync_dir(staging)
    return manifest


def write_export(
    out_dir: Path,
    conversations: Iterable[Conversation],
    *,
    source: str,
    filters: Mapping[str, object],
    extra: Mapping[str, object] | None = None,
    val_percent: int = 10,
    progress: bool = False,
) -> Manifest:
    """Build the export in a sibling temporary directory, then rename it over out_dir (T29).

    At every moment out_dir is absent, the previous complete export, or the new complete one: a killed run
    never leaves a half-written export under the final name, and the next run cleans up what it left.
    """
    if not 0 <= val_percent <= 100:
        raise ValueError(f"val_percent must be 0–100, got {val_percent}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_export(out_dir, MANIFEST_NAME)
    _check_replaceable(out_dir)
    staging = sibling(out_dir, "tmp")
    staging.mkdir()
    try:
        manifest = _build_export(staging, conversations, source=source, filters=filters, extra=extra,
                                 val_percent=val_percent, progress=progress)  # fmt: skip
        swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("export %s: %s (%d duplicates removed)", out_dir, manifest.counts, manifest.duplicates_removed)
    return manifest


def read_conversations(path: Path) -> Iterator[Conversation]:
    """Yield the conversations of one jsonl file; a malformed line raises ExportError naming file:line."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield conversation_from_json(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise ExportError(f"{path}:{number}: malformed conversation: {exc!r}") from exc


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(out_dir: Path) -> Manifest:
    """The manifest of an export; ExportError when absent (an export still running or killed)."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(
            f"{out_dir} has no {MANIFEST_NAME}: not an export, or an export that did not finish"
        )
    try:
        return Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON: {exc}") from exc


def verify_export(out_dir: Path) -> Manifest:
    """Check every file's sha256 against the manifest; raise ExportError on any mismatch."""
    manifest = read_manifest(out_dir)
    for name, expected in manifest.files.items():
        path = out_dir / name
        if not path.is_file():
            raise ExportError(f"{path} is listed in the manifest but missing")
        actual = file_sha256(path)
        if actual != expected:
            raise ExportError(f"{path}: sha256 {actual} does not match the manifest's {expected}")
    return manifest


def manifest_sha256(out_dir: Path) -> str:
    """sha256 of manifest.json: one hash that pins the whole export (it holds every file's hash)."""
    return file_sha256(out_dir / MANIFEST_NAME)


def render_conversation(conversation: Conversation, persona: str, bot_name: str) -> str:
    """The training text of one whole conversation (no open bot turn), in the serving format."""
    return render_dialogue(persona, conversation.turns, bot_name, open_bot_turn=False)


def pack_blocks(
    tokenizer: Any,
    conversations: Iterable[Conversation],
    persona: str,
    bot_name: str,
    block_size: int,
    *,
    keep_remainder: bool = False,
) -> list[list[int]]:
    """Render each conversation + end-of-text, concatenate, cut into block_size blocks (run_clm packing).

    The tail shorter than a block is dropped (as run_clm does), unless keep_remainder: evaluation keeps it
    so that every held-out token is scored.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    texts = [render_conversation(c, persona, bot_name) for c in conversations]
    if not texts:
        return []
    # One batched call: the fast tokenizer encodes in parallel; verbose=False silences the
    # "longer than the model's maximum" warning, which does not apply before packing.
    encoded: Sequence[list[int]] = tokenizer(texts, verbose=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    usable = len(stream) if keep_remainder else len(stream) - len(stream) % block_size
    return [stream[start : start + block_size] for start in range(0, usable, block_size)]
