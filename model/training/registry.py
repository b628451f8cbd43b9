"""Model versions in the data directory, the `current` / `previous` pointers, promote and rollback.

Layout under `models_dir` (model.loading.resolve_model_source finds `versions/<name>` by name):

    registry.json          {"current", "previous", "versions": {name: {...}}, "history": [...]}
    versions/<name>/       a model directory (config, safetensors, tokenizer) + its training card

registry.json is only ever replaced whole (temp file, fsync, rename, fsync of the directory), under an
exclusive file lock, so a reader sees the old or the new file and two writers (the CLI and the bot's
/retrain child) cannot lose each other's update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
LOCK_FILE = "registry.lock"
VERSIONS_DIR = "versions"
CARD_FILE = "training_card.json"
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Names that mean something else to BOT_MODEL / the CLI, so a version may not take them.
RESERVED_NAMES = frozenset({"current", "previous", "starter"})


class RegistryError(Exception):
    """A registry operation failed; the message says why and what to do."""


class UnknownVersion(RegistryError):
    """No version of that name is in versions/."""


class PromotionRefused(RegistryError):
    """The candidate's held-out perplexity is worse than current's by more than the margin."""


class NoPreviousVersion(RegistryError):
    """Rollback asked for, but nothing was served before the current version."""


@dataclass(frozen=True)
class ModelVersion:
    """One stored model version."""

    name: str
    path: Path
    added_at: float
    card: Mapping[str, Any] = field(default_factory=dict)  # the training card, {} when there is none
    is_current: bool = False
    is_previous: bool = False


@dataclass(frozen=True)
class Promotion:
    """The outcome of a promote or rollback, as recorded in the history."""

    action: str  # "promote" | "rollback"
    version: str
    replaced: str | None
    at: float
    val_ppl: float | None = None
    current_ppl: float | None = None
    forced: bool = False


def _empty_state() -> dict[str, Any]:
    return {"current": None, "previous": None, "versions": {}, "history": []}


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def check_version_name(name: str) -> str:
    """The name itself when it is a usable folder name, else RegistryError naming the rule."""
    if not VERSION_NAME.fullmatch(name) or name.lower() in RESERVED_NAMES:
        raise RegistryError(
            f"bad version name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            f"not one of {', '.join(sorted(RESERVED_NAMES))}"
        )
    return name


def is_worse(val_ppl: float, current_ppl: float, margin: float) -> bool:
    """Whether a candidate's perplexity is worse than current's by more than `margin` (relative)."""
    if not math.isfinite(val_ppl):
        return True
    return val_ppl > current_ppl * (1.0 + margin)


class Registry:
    """The model registry of one data directory; every method reads registry.json afresh."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self.versions_dir = self.models_dir / VERSIONS_DIR
        self.path = self.models_dir / REGISTRY_FILE

    # --- reading -------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _empty_state()
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.path} is not valid JSON ({exc}); restore it from a backup") from None
        return {**_empty_state(), **state}

    def _version(self, name: str, state: Mapping[str, Any]) -> ModelVersion:
        path = self.versions_dir / name
        meta = state["versions"].get(name, {})
        return ModelVersion(
            name=name,
            path=path,
            added_at=float(meta.get("added_at", path.stat().st_mtime)),
            card=_read_card(path),
            is_current=state["current"] == name,
            is_previous=state["previous"] == name,
        )

    def versions(self) -> list[ModelVersion]:
        """Every version folder, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        state = self._state()
        names = [p.name for p in self.versions_dir.iterdir() if p.is_dir() and VERSION_NAME.fullmatch(p.name)]
        return sorted((self._version(n, state) for n in names), key=lambda v: (v.added_at, v.name))

    def get(self, name: str) -> ModelVersion:
        """One version by name; UnknownVersion when its folder is missing."""
        if not (self.versions_dir / name / "config.json").is_file():
            known = ", ".join(v.name for v in self.versions()) or "none"
            raise UnknownVersion(f"no model version {name!r} in {self.versions_dir} (known: {known})")
        return self._version(name, self._state())

    def current(self) -> ModelVersion | None:
        """The version being served, or None before the first promotion."""
        name = self._state()["current"]
        return self.get(name) if name else None

    def previous(self) -> ModelVersion | None:
        """The version a rollback would return to."""
        name = self._state()["previous"]
        return self.get(name) if name else None

    def history(self) -> list[Promotion]:
        """Every promotion and rollback, oldest first."""
        return [Promotion(**entry) for entry in self._state()["history"]]

    # --- writing -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of registry.json under an exclusive lock; the yielded dict is written back."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with open(self.models_dir / LOCK_FILE, "a+") as lock:
            _lock_file(lock.fileno())
            self._remove_leftovers()
            state = self._state()
            yield state
            write_json_atomic(self.path, state)

    def _remove_leftovers(self) -> None:
        """Delete the temp files and folders a killed promote / rollback / add left behind.

        Every writer builds them while holding the lock, so whatever exists while we hold it is a dead run's.
        """
        stale = [*self.models_dir.glob(f".{REGISTRY_FILE}.*.tmp")]
        if self.versions_dir.is_dir():
            stale += self.versions_dir.glob(".*.tmp")
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if stale:
            log.info("removed %d leftover temp file(s) of an interrupted registry write", len(stale))

    def _next_name(self) -> str:
        taken = {p.name for p in self.versions_dir.iterdir()} if self.versions_dir.is_dir() else set()
        numbers = [int(n[1:]) for n in taken if re.fullmatch(r"v\d+", n)]
        return f"v{max(numbers, default=0) + 1}"

    def add(
        self, model_dir: Path, name: str | None = None, *, move: bool = False, at: float | None = None
    ) -> ModelVersion:
        """Copy (or move) a trained model directory into versions/<name> (default name: v1, v2, …)."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RegistryError(f"{model_dir} is not a model directory (no config.json)")
        with self._locked() as state:
            name = self._next_name() if name is None else check_version_name(name)
            final = self.versions_dir / name
            if final.exists():
                raise RegistryError(f"model version {name!r} already exists in {self.versions_dir}")
            _place(model_dir, final, move=move)
            state["versions"][name] = {"added_at": time.time() if at is None else at, "from": str(model_dir)}
        log.info("added model version %s from %s", name, model_dir)
        return self.get(name)

    def promote(
        self,
        version: str,
        *,
        val_ppl: float | None,
        current_ppl: float | None,
        margin: float,
        force: bool = False,
        at: float | None = None,
    ) -> Promotion:
        """Make `version` current; PromotionRefused when its perplexity is worse than current's by >margin."""
        self.get(version)
        with self._locked() as state:
            if state["current"] == version:
                raise RegistryError(f"{version} is already the current version")
            refusal = _refusal(state["current"], val_ppl, current_ppl, margin)
            if refusal and not force:
                raise PromotionRefused(refusal + " (use --force to promote anyway)")
            record = Promotion(
                "promote",
                version,
                state["current"],
                _now(at),
                val_ppl,
                current_ppl,
                forced=bool(refusal and force),
            )
            state["previous"], state["current"] = state["current"], version
            state["history"].append(dataclasses.asdict(record))
        log.info(
            "promoted %s (replacing %s; val ppl %s vs %s)", version, record.replaced, val_ppl, current_ppl
        )
        return record

    def rollback(self, at: float | None = None) -> Promotion:
        """current ← previous; the new previous is whatever `previous` itself had replaced."""
        with self._locked() as state:
            target = state["previous"]
            if not target:
                raise NoPreviousVersion("there is no previous version to roll back to")
            self.get(target)
            record = Promotion("rollback", target, state["current"], _now(at))
            state["current"], state["previous"] = target, _replaced_by(state["history"], target)
            state["history"].append(dataclasses.asdict(record))
        log.info("rolled back from %s to %s", record.replaced, target)
        return record


def _now(at: float | None) -> float:
    return time.time() if at is None else at


def _refusal(
    current: str | None, val_ppl: float | None, current_ppl: float | None, margin: float
) -> str | None:
    """Why a promotion must be refused, or None.

    Both numbers given: compare them, even before the first promotion (current_ppl is then the base model's
    that is being served). A registry with a current version and no numbers to compare: refuse.
    """
    if val_ppl is not None and current_ppl is not None:
        if not is_worse(val_ppl, current_ppl, margin):
            return None
        served = f"the current version {current}" if current else "the model being served"
        return (
            f"held-out perplexity {val_ppl:.2f} is worse than {served}'s {current_ppl:.2f} "
            f"by more than {margin:.0%}"
        )
    if current is None:
        return None
    return f"no held-out perplexity to compare with the current version {current}"


def _replaced_by(history: list[Mapping[str, Any]], version: str) -> str | None:
    """The version that `version` replaced when it was last made current."""
    for entry in reversed(history):
        if entry["version"] == version and entry["action"] == "promote":
            return entry["replaced"]
    return None


def _read_card(path: Path) -> Mapping[str, Any]:
    try:
        card = json.loads((path / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return card if isinstance(card, dict) else {}


def _place(source: Path, final: Path, *, move: bool) -> None:
    """Put a model directory at `final` atomically: build it under a temp name, then rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if move:
        with contextlib.suppress(OSError):  # a different filesystem: fall through to copy + delete
            os.replace(source, final)
            fsync_dir(final.parent)
            return
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if move:
        shutil.rmtree(source)


def _lock_file(fd: int) -> None:
    """An exclusive lock held until the file is closed (POSIX; elsewhere writers must not overlap)."""
    try:
        import fcntl
    except ImportError:  # Windows: no fcntl; the bot and the CLI are rarely run at the same moment there
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def current_source(models_dir: Path) -> str | None:
    """The folder of the current version (served ahead of BOT_MODEL), or None before any promotion."""
    try:
        version = Registry(models_dir).current()
    except UnknownVersion:
        log.warning("registry.json names a current version whose folder is missing; ignoring it")
        return None
    return str(version.path) if version else None


def registry_stamp(models_dir: Path) -> tuple[int, int, int] | None:
    """A cheap change marker for registry.json (inode, mtime in ns, size) for pollers; None while none."""
    try:
        st = (Path(models_dir) / REGISTRY_FILE).stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)  # every write is a new inode
