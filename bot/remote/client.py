"""One HTTP request to an OpenAI-compatible server, with its failures sorted by what may be retried.

aiohttp, not the `openai` package: discord.py already brings aiohttp into every bot install, so the remote
backend adds no dependency, and its errors say exactly how far a request got (a connection refused before
anything was sent vs a connection dropped mid-reply), which decides whether a retry could double a reply.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

# Statuses that mean "not now" before any work was done: the request may go to another server.
RETRYABLE_STATUSES = frozenset({429, 503})


class ServerError(Exception):
    """A request to one server failed; `retryable` when it certainly did no work there."""

    def __init__(self, reason: str, *, retryable: bool, replica_fault: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.replica_fault = replica_fault  # False for a 4xx: the request was bad, not the server


async def get_json(
    session: aiohttp.ClientSession, url: str, timeout: aiohttp.ClientTimeout
) -> dict[str, Any]:
    """GET `url` and return its JSON object."""
    return await _request(session, "GET", url, None, timeout)


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout
) -> dict[str, Any]:
    """POST `body` as JSON to `url` and return the JSON object it answers."""
    return await _request(session, "POST", url, body, timeout)


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: dict[str, Any] | None,
    timeout: aiohttp.ClientTimeout,
) -> dict[str, Any]:
    try:
        async with session.request(method, url, json=body, timeout=timeout) as response:
            if response.status in RETRYABLE_STATUSES:
                # Released unread: the server refused before generating anything. 429 is "busy", not
                # "down": the replica stays in.
                raise ServerError(
                    f"HTTP {response.status}", retryable=True, replica_fault=response.status != 429
                )
            if response.status >= 400:
                detail = (await response.text())[:200].replace("\n", " ")
                raise ServerError(
                    f"HTTP {response.status}: {detail}", retryable=False, replica_fault=response.status >= 500
                )
            payload = await response.json(content_type=None)
    except aiohttp.ClientConnectorError as exc:  # no connection: nothing was sent
        raise ServerError(f"unreachable ({exc.os_error.strerror or exc})", retryable=True) from exc
    except TimeoutError as exc:
        raise ServerError("timed out", retryable=False) from exc
    except (aiohttp.ClientError, ValueError) as exc:  # dropped mid-request, or not JSON
        raise ServerError(f"{type(exc).__name__}: {str(exc)[:120]}", retryable=False) from exc
    if not isinstance(payload, dict):
        raise ServerError("answered JSON that is not an object", retryable=False)
    return payload


def timeout(total_seconds: float, connect_seconds: float) -> aiohttp.ClientTimeout:
    """A request's limits: the whole request, and the TCP connection within it."""
    return aiohttp.ClientTimeout(total=max(0.001, total_seconds), sock_connect=connect_seconds)


async def sleep_backoff(attempt: int, seconds_left: float) -> None:
    """Wait before retry number `attempt` (50 ms, doubling), never past the request's deadline."""
    await asyncio.sleep(max(0.0, min(0.05 * 2**attempt, seconds_left)))
