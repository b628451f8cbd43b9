"""Counts what a real Storage is asked to do: each public method call and each write transaction.

`StorageCalls.watch(storage)` replaces the bound methods of one opened Storage (a real SQLite file) with
counting wrappers; the SQL still runs. Calls one public method makes to another are counted too.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from bot.storage import Storage

TRANSACTIONS = "write transactions"


class StorageCalls:
    """A Counter of method names (plus TRANSACTIONS) for one watched Storage."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @classmethod
    def watch(cls, storage: Storage) -> StorageCalls:
        """Count every public coroutine method of `storage` and every write transaction it opens."""
        calls = cls()
        for name, method in inspect.getmembers(storage, inspect.iscoroutinefunction):
            if not name.startswith("_"):
                setattr(storage, name, calls._counting(name, method))
        storage._transaction = calls._counting_transaction(storage._transaction)  # type: ignore[method-assign]
        return calls

    def snapshot(self) -> Counter[str]:
        """A copy of the counts so far."""
        return Counter(self.counts)

    def since(self, earlier: Counter[str]) -> Counter[str]:
        """What was counted after `earlier` (a snapshot)."""
        return self.counts - earlier

    def _counting(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            return await method(*args, **kwargs)

        return counted

    def _counting_transaction(
        self, transaction: Callable[[], AbstractAsyncContextManager[Any]]
    ) -> Callable[[], AbstractAsyncContextManager[Any]]:
        @asynccontextmanager
        async def counted() -> AsyncIterator[Any]:
            self.counts[TRANSACTIONS] += 1
            async with transaction() as db:
                yield db

        return counted
