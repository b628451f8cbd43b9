"""A tiny Discord API on loopback for start-up tests: the three calls of bot.startup.check_discord.

`status` answers every HTTP call with that status (401: bad token, 503: an outage); `flags` are the
application's flags (0: the Message Content intent is off); the gateway's websocket sends HELLO.
`free_port()` gives a loopback port nothing listens on (connection refused).
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

MESSAGE_CONTENT_LIMITED = 1 << 19
JSON_HEADERS = {"Content-Type": "application/json"}


def free_port() -> int:
    """A loopback port that was free a moment ago (nothing listens on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def fake_discord_api(*, status: int = 200, flags: int = MESSAGE_CONTENT_LIMITED) -> AsyncIterator[str]:
    """Serve the fake API; yields its base URL for discord.http.Route.BASE."""
    app = web.Application()
    base = ""

    def answer(body: dict[str, object]) -> web.Response:
        if status != 200:
            body = {"message": "nope", "code": 0}
        # discord.py parses JSON only for exactly this content type (no "; charset=...").
        return web.Response(body=json.dumps(body).encode(), status=status, headers=JSON_HEADERS)

    async def me(request: web.Request) -> web.Response:
        return answer({"id": "1", "username": "bot", "discriminator": "0", "avatar": None})

    async def application(request: web.Request) -> web.Response:
        return answer({"id": "1", "name": "bot", "flags": flags})

    async def gateway_bot(request: web.Request) -> web.Response:
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return answer(
            {"url": base.replace("http", "ws") + "/gateway", "shards": 1, "session_start_limit": limit}
        )

    async def gateway(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}})
        await ws.receive()  # until the client closes
        return ws

    app.add_routes([
        web.get("/api/v10/users/@me", me),
        web.get("/api/v10/oauth2/applications/@me", application),
        web.get("/api/v10/gateway/bot", gateway_bot),
        web.get("/gateway", gateway),
    ])  # fmt: skip
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    try:
        yield f"{base}/api/v10"
    finally:
        await runner.cleanup()
