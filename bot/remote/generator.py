"""RemoteGenerator: model.api.ReplyGenerator on OpenAI-compatible servers, through `/v1/completions`.

The prompt is the project's own (model.prompt.build_prompt with the served model's tokenizer) and goes out
as token ids, so `len(prompt) + max_new_tokens <= n_positions` holds exactly as in-process; the turn-ending
ids go as `stop_token_ids`, every sampling field is sent (top_k and repetition_penalty as vLLM's extra
fields), and the answer is cleaned by model.replies.clean_reply, so replies read like local ones.
`no_repeat_ngram_size` is not sent: stock vLLM has no such option (README, /stats).

Semantics match the local worker: at most `queue_size` requests in (the next gets WorkerBusy at once),
GenerationFailed for one failed request, WorkerClosed after close(). A request that certainly did no
work on a server (connection refused, 429/503) is retried on another replica with a short back-off; one
that may have (a timeout, a dropped connection, a 500) is not, so a reply is never generated twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bot.config import Settings
from bot.remote import checks
from bot.remote.client import ServerError, post_json, sleep_backoff, timeout
from bot.remote.replicas import Replica, ReplicaPool
from model.api import (
    FALLBACK_REPLY,
    GenerationFailed,
    ModelInfo,
    ModelUnavailable,
    ReloadFailed,
    ReloadInProgress,
    Reply,
    ReplyRequest,
    WorkerBusy,
    WorkerClosed,
    too_long_error,
)
from model.prompt import Prompt, PromptTooLong, build_prompt
from model.replies import clean_continuation, clean_reply, is_repeat, resample_params, stop_token_ids
from model.sampling import SamplingParams

log = logging.getLogger(__name__)

UNSUPPORTED_REMOTELY = "no_repeat_ngram_size is not applied (stock vLLM has no such option)"
CHECK_SECONDS = 10.0  # each server's start-up / reload check


@dataclass(frozen=True)
class RemoteConfig:
    """What the remote backend needs from the settings (bot/runtime.py builds it)."""

    base_urls: tuple[str, ...]
    model: str
    tokenizer_source: str
    api_key: str | None = None
    queue_size: int = 32
    connect_timeout_seconds: float = 3.0
    retry_after_seconds: float = 5.0
    local_source: str = ""  # what /reload without a model name passes (BOT_MODEL or the promoted one)


def completion_body(
    model: str, prompt_ids: Sequence[int], params: SamplingParams, stops: Sequence[int]
) -> dict[str, Any]:
    """The `/v1/completions` request: token-id prompt, every sampling field explicit, the turn-ending ids."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt_ids),
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,  # vLLM: -1 = no top-k
        "repetition_penalty": params.repetition_penalty,
        "stop_token_ids": list(stops),
        "n": 1,
        "stream": False,
        "skip_special_tokens": True,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    return body


def stop_reason(choice: dict[str, Any], eos_id: int | None) -> str:
    """The project's stop reason for an OpenAI choice ("stop" by the end-of-text id or a newline id)."""
    if choice.get("finish_reason") == "length":
        return "max_tokens"
    return "eos" if choice.get("stop_reason") in (None, eos_id) else "turn_end"


class RemoteGenerator:
    """Implements model.api.ReplyGenerator over one or more OpenAI-compatible servers."""

    def __init__(self, config: RemoteConfig) -> None:
        self._config = config
        self._model = config.model
        self._pool = ReplicaPool(config.base_urls, config.retry_after_seconds)
        self._local_n_positions = local_context_window(config.tokenizer_source)
        self._n_positions = 0
        # The tokenizer is not thread-safe and prompt building is CPU work: one thread builds them all.
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="remote-prompt")
        self._session: aiohttp.ClientSession | None = None
        self._tokenizer: Any = None
        self._stops: tuple[int, ...] = ()
        self._in_flight = 0
        self._is_reloading = False
        self._is_closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        # How generate awaits the servers; simcord tests route it through env.external_wait (as the
        # retrain cog does), since real sockets are input from outside its virtual world.
        self.external_wait: Callable[[Awaitable[Reply]], Awaitable[Reply]] = _plain

    # ---- start-up and reload ----

    async def start(self) -> ModelInfo:
        """Load the tokenizer and check every server; ModelLoadError says what is wrong."""
        from model.loading import ModelLoadError, load_tokenizer

        loop = asyncio.get_running_loop()
        self._tokenizer = await loop.run_in_executor(
            self._builder, load_tokenizer, self._config.tokenizer_source
        )
        self._stops = tuple(sorted(stop_token_ids(self._tokenizer)))
        headers = {"Authorization": f"Bearer {self._config.api_key}"} if self._config.api_key else None
        self._session = aiohttp.ClientSession(headers=headers)
        try:
            self._n_positions = await self._check(self._model)
        except ValueError as exc:
            await self._session.close()
            raise ModelLoadError(str(exc), step="servers") from None
        return self.info()

    async def _check(self, model: str) -> int:
        """Check every server for `model`; the context window, or ValueError listing the problems."""
        assert self._session is not None
        vocab = len(self._tokenizer)
        found = await asyncio.gather(
            *(
                checks.check_server(self._session, r.url, model, vocab, CHECK_SECONDS)
                for r in self._pool.replicas
            )
        )
        wrong = checks.problems(found)
        if wrong:
            raise ValueError("; ".join(wrong))
        for replica, check in zip(self._pool.replicas, found, strict=True):
            if check.problem:
                log.warning("%s; it gets requests again when it answers", check.problem)
                self._pool.failed(replica, "unreachable at the check")
            else:
                self._pool.mark_up(replica)
        window = checks.context_window(found, self._local_n_positions)
        if window is None:
            raise ValueError(f"neither the servers nor {self._config.tokenizer_source} name a context window")
        return window

    async def reload(self, source: str) -> ModelInfo:
        """Re-check the servers; `source` other than the model served now switches to that served model
        name (blue/green between two models on the servers). ReloadFailed keeps the current one."""
        if self._session is None or self._is_closing:
            raise WorkerClosed("the remote generator is not running")
        if self._is_reloading:
            raise ReloadInProgress("a reload is already running")
        same = ("", self._config.tokenizer_source, self._config.local_source)
        model = self._model if source in same else source
        self._is_reloading = True
        try:
            self._n_positions = await self._check(model)
        except ValueError as exc:
            raise ReloadFailed("servers", str(exc)) from None
        finally:
            self._is_reloading = False
        if model != self._model:
            log.info("now generating with the served model %r (was %r)", model, self._model)
        self._model = model
        return self.info()

    # ---- generation ----

    async def generate(self, request: ReplyRequest) -> Reply:
        """One reply; WorkerBusy when queue_size requests are in, GenerationFailed when no server can."""
        if self._session is None or self._is_closing:
            raise WorkerClosed("the remote generator is not running")
        if self._in_flight >= self._config.queue_size:
            raise WorkerBusy(f"{self._in_flight} requests are already in flight")
        if self._pool.is_open():
            raise ModelUnavailable(
                f"model unavailable: every server is down (next try in {self._pool.retry_in():.0f} s)"
            )
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self.external_wait(self._generate(request, time.monotonic()))
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _generate(self, request: ReplyRequest, submitted_at: float) -> Reply:
        from model.serving.jobs import speaker_names
        from model.serving.worker import fit_to_context

        request = fit_to_context(request, self._n_positions)
        prompt = await self._prompt(request)
        deadline = submitted_at + request.time_limit_seconds
        started_at = time.monotonic()
        names = speaker_names(request)
        params, completion_tokens = request.params, 0
        for attempt in (1, 2):  # the second only when the first repeats a recent reply
            choice, used = await self._complete(prompt.input_ids, params, deadline)
            completion_tokens += used
            reason = stop_reason(choice, self._tokenizer.eos_token_id)
            # A continued reply keeps its leading space: the server detokenizes with the prompt's context.
            clean = clean_continuation if request.continue_text else clean_reply
            text = clean(str(choice.get("text", "")), names, has_ended_turn=reason in ("eos", "turn_end"))
            is_again = attempt == 1 and is_repeat(text, request.recent_bot_replies)
            if not is_again or time.monotonic() >= deadline:
                break
            params = resample_params(params)
        return Reply(
            text=text or ("" if request.continue_text else FALLBACK_REPLY),
            prompt_tokens=len(prompt.input_ids),
            completion_tokens=completion_tokens,
            queue_seconds=started_at - submitted_at,
            generation_seconds=time.monotonic() - started_at,
            stop_reason=reason,
            model_name=self._model,
            model_version="remote",
            history_turns_used=prompt.turns_used,
        )

    async def _prompt(self, request: ReplyRequest) -> Prompt:
        loop = asyncio.get_running_loop()
        build = functools.partial(
            build_prompt,
            self._tokenizer,
            request.persona,
            request.history,
            request.bot_name,
            request.params.max_new_tokens,
            self._n_positions,
            facts=request.facts,
            continue_text=request.continue_text,
        )
        try:
            return await loop.run_in_executor(self._builder, build)
        except PromptTooLong as exc:
            raise too_long_error(request, exc) from None

    async def _complete(
        self, prompt_ids: Sequence[int], params: SamplingParams, deadline: float
    ) -> tuple[dict[str, Any], int]:
        """The first choice and its completion token count from the least-busy replica; retried on another
        (after a short back-off) only when the failure certainly did no work."""
        assert self._session is not None
        body = completion_body(self._model, prompt_ids, params, self._stops)
        tried: list[Replica] = []
        is_busy = False
        for attempt in range(len(self._pool.replicas) + 2):
            replica = self._pool.pick(exclude=tried) or self._pool.pick()
            if replica is None:
                raise ModelUnavailable("model unavailable: every server is down")
            left = deadline - time.monotonic()
            if left <= 0:
                raise GenerationFailed("generation timed out")
            try:
                payload, seconds = await self._post(replica, body, left)
            except ServerError as exc:
                if exc.replica_fault:
                    self._pool.failed(replica, exc.reason)
                    log.warning("model server %s: %s", replica.url, exc.reason)
                if not exc.retryable:
                    raise GenerationFailed(f"model server failed: {exc.reason}") from None
                tried.append(replica)
                is_busy = exc.reason == "HTTP 429"
                await sleep_backoff(attempt, deadline - time.monotonic())
                continue
            self._pool.succeeded(replica, seconds)
            return _first_choice(payload)
        if is_busy:
            raise WorkerBusy("every model server is busy (HTTP 429)")
        raise ModelUnavailable("model unavailable: every server refused the request")

    async def _post(
        self, replica: Replica, body: dict[str, Any], seconds_left: float
    ) -> tuple[dict[str, Any], float]:
        assert self._session is not None
        replica.in_flight += 1
        started = time.monotonic()
        try:
            limits = timeout(seconds_left, self._config.connect_timeout_seconds)
            payload = await post_json(self._session, f"{replica.url}/completions", body, limits)
        finally:
            replica.in_flight -= 1
        return payload, time.monotonic() - started

    # ---- the rest of the protocol ----

    def info(self) -> ModelInfo:
        """The served model's name, the servers' health and timings for /stats (never the API key)."""
        return ModelInfo(
            name=self._model,
            version="remote",
            device=f"{len(self._pool.replicas)} OpenAI-compatible server(s)",
            dtype="server's",
            total_params=0,
            trainable_params=0,
            n_positions=self._n_positions,
            backend="openai",
            details=(*self._pool.summaries(), UNSUPPORTED_REMOTELY),
        )

    def queue_depth(self) -> int:
        return self._in_flight

    def is_alive(self) -> bool:
        """Running (for health checks): servers being down is not a reason to restart the bot, which
        recovers by itself when they answer again; /stats shows their state."""
        return self._session is not None and not self._is_closing

    async def close(self, grace_seconds: float = 10.0) -> None:
        """Refuse new work, give in-flight requests the grace period, then close the connections."""
        if self._is_closing:
            return
        self._is_closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
        except TimeoutError:
            log.warning("%d remote requests outlived the %.1f s grace period", self._in_flight, grace_seconds)
        if self._session is not None:
            await self._session.close()
        self._builder.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> RemoteGenerator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _plain(awaitable: Awaitable[Reply]) -> Reply:
    return await awaitable


def _first_choice(payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise GenerationFailed("model server answered no choices")
    usage = payload.get("usage")
    used = usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
    return choices[0], int(used or 0)


def local_context_window(source: str) -> int | None:
    """The context window in the tokenizer source's config.json, when it is a folder that has one."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    import json

    data = json.loads(config.read_text(encoding="utf-8"))
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(data.get(key), int) and data[key] > 0:
            return int(data[key])
    return None


def remote_config(settings: Settings, tokenizer_source: str, local_source: str = "") -> RemoteConfig:
    """The remote backend's configuration from the settings; `tokenizer_source` is a name BOT_MODEL
    accepts ("starter", a registry version, a folder or a hub id)."""
    from model.loading import resolve_model_source

    return RemoteConfig(
        base_urls=settings.openai_base_urls,
        model=settings.openai_model,
        tokenizer_source=resolve_model_source(tokenizer_source, settings.models_dir),
        api_key=settings.openai_key(),
        queue_size=settings.queue_size,
        connect_timeout_seconds=settings.openai_connect_timeout_seconds,
        retry_after_seconds=settings.openai_retry_after_seconds,
        local_source=local_source,
    )
