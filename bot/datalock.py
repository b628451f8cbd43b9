"""One bot process per data directory: a lock file that the OS releases when the process dies.

Two `chatbot run` processes on one data dir would answer every message twice and race on the registry;
shards belong in one process (BOT_SHARDS) or in processes with their own data dirs (README: "Growing").
`flock` is released by the kernel on any exit, kill -9 included, so a stale lock never blocks a restart.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "bot.lock"
EXIT_DATA_DIR_LOCKED = 75  # EX_TEMPFAIL: stop the other process, or give this one its own BOT_DATA_DIR


class DataDirLocked(Exception):
    """Another live process holds this data directory."""


@contextlib.contextmanager
def hold_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's lock for the block; DataDirLocked (naming the holder's pid) when taken."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    with open(path, "a+", encoding="utf-8") as lock:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one process per data dir is then up to you
            yield
            return
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise DataDirLocked(
                f"another bot process (pid {holder}) is using the data directory {str(data_dir)!r}: stop it, "
                "or give this one its own BOT_DATA_DIR (exit 75)"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield
