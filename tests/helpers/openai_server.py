"""A small OpenAI-compatible server for tests: `/v1/models` and `/v1/completions` (token-id prompts) on
loopback, generating with the project's own engine (HFGenerateEngine on the tiny GPT-2), with faults.

In-process: `async with OpenAIServer(model_dir) as server:` (its `url` ends in /v1; set `server.fault`);
generation runs on one thread, so the event loop (the bot's, in tests) is never blocked by the model.
As a process (for kill tests and the benchmark): `python -m tests.helpers.openai_server DIR --port N`.
It checks what vLLM checks (model name, ids in the vocabulary, prompt + max_tokens within the window) and
keeps every request body and its own time per completion (`server_seconds`) for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from model.engine import EngineJob
from model.hf_engine import HFGenerateEngine
from model.loading import load_model
from model.sampling import SamplingParams

FAULTS = ("500", "429", "503", "slow", "drop", "hang", "instant")  # instant: a canned reply, no model


@dataclass
class OpenAIServer:
    """The test server; `fault` (one of FAULTS or None) applies to every completion until changed."""

    model_dir: Path
    name: str = "tiny"
    port: int = 0
    also_named: tuple[str, ...] = ()  # more served names for the same model (blue/green reloads)
    vocab_size: int | None = None  # pretend a smaller vocabulary than the tokenizer's
    fault: str | None = None
    slow_seconds: float = 0.5
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    server_seconds: list[float] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _engine: HFGenerateEngine | None = None
    _executor: ThreadPoolExecutor | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> OpenAIServer:
        loaded = await asyncio.to_thread(load_model, str(self.model_dir), "cpu", "float32")
        self._engine = HFGenerateEngine(loaded.model, loaded.tokenizer)
        self._vocab, self._window = self.vocab_size or len(loaded.tokenizer), loaded.n_positions
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fake-openai")
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/test/fault", self._set_fault)  # for a server in another process
        app.router.add_get("/test/server_seconds", self._server_times)  # for the benchmark
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        """Close the port and every open connection (a request in flight sees its connection drop)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """Listen again on the same port (after stop())."""
        await self.start()

    async def __aenter__(self) -> OpenAIServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _models(self, request: web.Request) -> web.Response:
        entries = [
            {"id": name, "object": "model", "owned_by": "tests", "max_model_len": self._window}
            for name in (self.name, *self.also_named)
        ]
        return web.json_response({"object": "list", "data": entries})

    async def _set_fault(self, request: web.Request) -> web.Response:
        self.fault = (await request.json()).get("fault")
        return web.json_response({"fault": self.fault})

    async def _server_times(self, request: web.Request) -> web.Response:
        return web.json_response({"server_seconds": self.server_seconds})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()  # the server's own time: request read → answer built
        body = await request.json()
        self.bodies.append(body)
        self.auth_headers.append(request.headers.get("Authorization"))
        fault = await self._fault(request)
        if fault is not None:
            return fault
        problem = self._problem(body)
        if problem is not None:
            return web.json_response({"error": {"message": problem}}, status=problem_status(problem))
        loop = asyncio.get_running_loop()
        if self.fault == "instant":  # what the client and HTTP cost, with no generation behind them
            ids, reason = (1049, 373, 257, 922, 530, 13), "eos"
        else:
            ids, reason = await loop.run_in_executor(self._executor, self._generate, body)
        answer = web.json_response(self._answer(body, ids, reason))
        self.server_seconds.append(time.perf_counter() - started)
        return answer

    async def _fault(self, request: web.Request) -> web.StreamResponse | None:
        if self.fault in ("500", "429", "503"):
            return web.json_response({"error": {"message": "injected"}}, status=int(self.fault))
        if self.fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        if self.fault == "hang":
            await asyncio.sleep(3600)
        if self.fault == "drop":
            assert request.transport is not None
            request.transport.close()  # the client sees its connection end with no answer
            return web.Response()
        return None

    def _problem(self, body: dict[str, Any]) -> str | None:
        prompt = body.get("prompt")
        if body.get("model") not in (self.name, *self.also_named):
            return f"model not found: {body.get('model')}"
        if not isinstance(prompt, list) or not prompt or not all(isinstance(i, int) for i in prompt):
            return "prompt must be a non-empty list of token ids"
        if not all(0 <= i < self._vocab for i in prompt):
            return "token id out of vocabulary"
        if len(prompt) + int(body.get("max_tokens", 16)) > self._window:
            return f"prompt + max_tokens exceed the context window of {self._window}"
        return None

    def _generate(self, body: dict[str, Any]) -> tuple[tuple[int, ...], str]:
        assert self._engine is not None
        params = SamplingParams(
            # vLLM's defaults for what a request leaves out
            max_new_tokens=int(body.get("max_tokens", 16)),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            top_k=max(0, int(body.get("top_k", -1))),
            repetition_penalty=float(body.get("repetition_penalty", 1.0)),
            no_repeat_ngram_size=0,  # what stock vLLM does: it has no such option
            seed=body.get("seed"),
        )
        job = EngineJob(
            0, tuple(body["prompt"]), params, time.monotonic() + 60, frozenset(body.get("stop_token_ids", ()))
        )
        self._engine.admit(job)
        (result,) = self._engine.step()
        return result.token_ids, result.stop_reason

    def _answer(self, body: dict[str, Any], ids: tuple[int, ...], reason: str) -> dict[str, Any]:
        assert self._engine is not None
        text = self._engine.tokenizer.decode(list(ids), skip_special_tokens=True)
        finish = "length" if reason == "max_tokens" else "stop"
        stop = None if reason in ("eos", "max_tokens") else "turn_end"
        choice = {"index": 0, "text": text, "finish_reason": finish, "stop_reason": stop}
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(ids)}
        return {
            "id": "cmpl-test",
            "object": "text_completion",
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }


def problem_status(problem: str) -> int:
    return 404 if problem.startswith("model not found") else 400


async def _serve_forever(model_dir: Path, port: int, name: str, fault: str | None) -> None:
    async with OpenAIServer(model_dir, name=name, port=port, fault=fault, slow_seconds=3600) as server:
        print(f"serving {server.url}", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="tiny")
    parser.add_argument("--fault", choices=FAULTS, default=None)
    args = parser.parse_args()
    asyncio.run(_serve_forever(args.model_dir, args.port, args.name, args.fault))


if __name__ == "__main__":
    main()
