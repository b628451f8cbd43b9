"""Replacing an export directory atomically: build it in a hidden sibling, then rename it into place.

The new export is built in `.<name>.export-<pid>.tmp`; the previous one waits in `.<name>.export-<pid>.old`
while the new one is renamed in, and is removed only after. So at every moment the final path is absent, the
previous complete export or the new complete one, and a later run can tell from the pid which leftovers are
a dead run's: it removes them, or puts the set-aside previous export back if the kill came between renames.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SIBLING_INFIX = ".export-"


def fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling(out_dir: Path, kind: str, pid: int | None = None) -> Path:
    """`.<name>.export-<pid>.<kind>` next to out_dir: "tmp" is being built, "old" is the export set aside."""
    return out_dir.parent / f".{out_dir.name}{SIBLING_INFIX}{os.getpid() if pid is None else pid}.{kind}"


def _is_alive(pid: int) -> bool:
    """Whether a process with this id runs (another export may be building next to ours)."""
    if pid == os.getpid():
        return False  # our own leftovers come from an earlier call that failed: nothing builds them now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_siblings(out_dir: Path) -> list[tuple[Path, str]]:
    """(path, kind) of the temporary directories that killed exports into out_dir left behind."""
    stale = []
    for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}{SIBLING_INFIX}*"):
        pid, _, kind = path.name[len(out_dir.name) + 1 + len(SIBLING_INFIX) :].partition(".")
        if pid.isdigit() and kind in ("tmp", "old") and not _is_alive(int(pid)):
            stale.append((path, kind))
    return stale


def recover_interrupted_export(out_dir: Path, complete_marker: str) -> int:
    """Clean up after an export killed mid-run; return how many leftovers were removed or restored.

    A kill between "old export set aside" and "new export renamed in" leaves out_dir absent and the old,
    complete export in its `.old` sibling: it goes back into place. Everything else is half-built or already
    replaced, and is removed.
    """
    stale = _stale_siblings(out_dir)
    for path, kind in stale:
        if kind == "old" and not out_dir.exists() and (path / complete_marker).is_file():
            os.rename(path, out_dir)
            fsync_dir(out_dir.parent)
            log.info("restored the previous export %s from %s", out_dir, path.name)
        else:
            shutil.rmtree(path, ignore_errors=True)
    if stale:
        log.info("cleaned %d leftover(s) of an interrupted export next to %s", len(stale), out_dir)
    return len(stale)


def swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the complete new export to out_dir: the old one is set aside first and removed only after."""
    aside = sibling(out_dir, "old")
    had_old = out_dir.exists()
    if had_old:
        os.rename(out_dir, aside)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        if had_old and not out_dir.exists():
            os.rename(aside, out_dir)  # the new one could not go in: the old one stays the export
        raise
    fsync_dir(out_dir.parent)
    if had_old:
        shutil.rmtree(aside)
