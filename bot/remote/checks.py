"""What the remote backend checks before it serves: every server answers `/v1/models`, serves the model
by that name, and accepts the tokenizer's highest token id (the vocabularies match).

Each problem becomes one line naming the server and what to do; start-up raises ModelLoadError with
them (the CLI prints it and exits 3), /reload turns them into ReloadFailed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bot.remote.client import ServerError, get_json, post_json, timeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerCheck:
    """One server's answer: its context window for the model (None if it names none), or the problem."""

    url: str
    max_model_len: int | None = None
    problem: str | None = None
    reachable: bool = True


async def check_server(
    session: aiohttp.ClientSession, url: str, model: str, vocab_size: int, seconds: float
) -> ServerCheck:
    """Ask `url` for its models, then probe the vocabulary with a one-token completion."""
    limits = timeout(seconds, seconds)
    try:
        listing = await get_json(session, f"{url}/models", limits)
    except ServerError as exc:
        return ServerCheck(url, problem=f"{url} is unreachable or failing: {exc.reason}", reachable=False)
    entries = [e for e in listing.get("data", []) if isinstance(e, dict)]
    served = {str(e.get("id")): e for e in entries}
    if model not in served:
        names = ", ".join(sorted(served)) or "none"
        return ServerCheck(url, problem=f"{url} does not serve a model named {model!r} (it serves: {names})")
    probe = {"model": model, "prompt": [vocab_size - 1], "max_tokens": 1, "temperature": 0.0}
    try:
        await post_json(session, f"{url}/completions", probe, limits)
    except ServerError as exc:
        if exc.replica_fault:
            return ServerCheck(url, problem=f"{url} failed a test completion: {exc.reason}", reachable=False)
        return ServerCheck(
            url,
            problem=f"{url}'s model {model!r} rejects token id {vocab_size - 1}: its vocabulary is smaller "
            f"than the tokenizer's {vocab_size} tokens (set BOT_OPENAI_TOKENIZER to the served model's "
            f"folder) — {exc.reason}",
        )
    return ServerCheck(url, max_model_len=_max_model_len(served[model]))


def _max_model_len(entry: dict[str, Any]) -> int | None:
    value = entry.get("max_model_len")
    return value if isinstance(value, int) and value > 0 else None


def context_window(checks: Sequence[ServerCheck], local: int | None) -> int | None:
    """The positions every prompt must fit in: the smallest of the servers' and the local config's."""
    windows = [c.max_model_len for c in checks if c.max_model_len is not None]
    if local is not None:
        windows.append(local)
    return min(windows) if windows else None


def problems(checks: Sequence[ServerCheck]) -> list[str]:
    """The problems that must stop start-up or a reload: any but a server that is down right now, and
    that one too when no server answered at all."""
    wrong = [c.problem for c in checks if c.problem and c.reachable]
    if wrong:
        return wrong
    if all(not c.reachable for c in checks):
        return [c.problem for c in checks if c.problem]
    return []
