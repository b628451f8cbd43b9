"""The hot reload: when the registry's `current` changes, the running worker loads it.

Whoever promoted (the /retrain child, `chatbot promote` or `chatbot rollback` in a shell), the bot notices
within WATCH_INTERVAL_SECONDS: the retrain cog calls `RegistryWatcher.poll` that often. A failed reload is
remembered and not retried until `current` changes again: the old model keeps serving, and retrying a
broken model every few seconds would only repeat the same error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from model.api import ReloadInProgress
from model.training.registry import RegistryError, current_source, registry_stamp

log = logging.getLogger(__name__)

WATCH_INTERVAL_SECONDS = 5.0


class RegistryWatcher:
    """Polls registry.json and hands a newly promoted `current` to `reload` (e.g. ModelWorker.reload)."""

    def __init__(self, models_dir: Path, reload: Callable[[str], Awaitable[object]]) -> None:
        self.models_dir = Path(models_dir)
        self._reload = reload
        self._lock = asyncio.Lock()
        self._stamp: tuple[int, int, int] | None = registry_stamp(self.models_dir)
        self.seen_source = current_source(self.models_dir)  # what is being served already at start-up
        self.failed_source: str | None = None  # the version whose reload failed, until one succeeds
        self.last_error: str | None = None  # that failure, as the admin reads it

    async def poll(self) -> str | None:
        """Reload when `current` changed since the last poll, never two polls at once; the source reloaded."""
        async with self._lock:
            try:
                reloaded = await self._poll()
            except (RegistryError, OSError) as exc:
                log.error("cannot read the model registry: %s", exc)
                return None
        if reloaded is not None:
            self.failed_source = self.last_error = None
        return reloaded

    async def catch_up(self) -> bool | None:
        """Poll now (a promotion just happened): whether `current` is served, False if its reload failed.

        None when there is no current version, or it is not known yet to be served.
        """
        await self.poll()
        current = current_source(self.models_dir)
        if current is not None and current == self.failed_source:
            return False
        return True if current is not None and current == self.seen_source else None

    async def _poll(self) -> str | None:
        stamp = registry_stamp(self.models_dir)
        if stamp == self._stamp:
            return None  # the common case: one stat() and nothing else
        self._stamp = stamp
        source = current_source(self.models_dir)
        if source is None or source == self.seen_source:
            return None
        previous, self.seen_source = self.seen_source, source
        try:
            await self._reload(source)
        except ReloadInProgress:
            # Someone's /reload is running: try again at the next poll rather than give up on this version.
            self._stamp, self.seen_source = None, previous
            log.info("a reload is already running; will load the promoted model %s next time", source)
            return None
        except Exception as exc:  # any other failure: the worker keeps the old model, we report and wait
            log.error("hot reload of the promoted model %s failed: %s", source, exc)
            self.failed_source = source
            self.last_error = f"hot reload of {Path(source).name} failed: {exc}; the old model keeps serving"
            return None
        log.info("now serving the promoted model %s", source)
        return source
