"""Generation with Hugging Face `generate` (one request at a time), stop tokens and reply cleanup.

`HFGenerateEngine` is the reference DecodeEngine: it works for any causal LM on any device, runs one
whole `generate` per step, and stops at end-of-text, at a newline (the model starting the next speaker's
turn, see docs/ARCHITECTURE.md), at max_new_tokens, or at the job's deadline (checked every token).
`clean_reply` turns the raw continuation into something fit to post.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any, cast

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from model.engine import EngineJob, EngineResult
from model.prompt import SPEAKER_COLONS
from model.sampling import SamplingParams

log = logging.getLogger(__name__)


# "." ends a sentence only before whitespace or the end (so "3.5" and "v1.2" do not); "!" "?" "…" and
# the Japanese 。！？ end one wherever they stand (Japanese text, NFKC-normalised "?" "!" too, has no spaces).
# Closing quotes and brackets after the mark belong to the sentence.
_CLOSERS = "\"'”’」』）)】］\\]"
_ANYWHERE_MARKS = "!?…。！？"
_SENTENCE_END = re.compile(rf"(?:\.+[{_CLOSERS}]*(?=\s|$)|[{_ANYWHERE_MARKS}]+[{_CLOSERS}]*)")
_COLON = "[" + "".join(SPEAKER_COLONS) + "]"  # full-width colons end a speaker tag in Japanese text


# ----------------------------------------------------------------------------------------------------
# stop tokens


def stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """The end-of-text id plus every vocabulary id whose text contains a newline (which ends a turn)."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    newline_ids = tokenizer.encode("\n", add_special_tokens=False)
    if "\n" not in tokenizer.decode(newline_ids):
        # e.g. sentencepiece models whose normaliser folds "\n" into a space: the model never saw a
        # newline, so only end-of-text stops it and clean_reply cuts at leaked speaker tags.
        return frozenset(eos)
    marker = _byte_level_newline(tokenizer, newline_ids)
    if marker is not None:
        ids = {i for token, i in tokenizer.get_vocab().items() if marker in token}
    else:
        ids = {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
    return frozenset(ids | eos)


def _byte_level_newline(tokenizer: Any, newline_ids: list[int]) -> str | None:
    """The one-character stand-in a byte-level BPE vocabulary (GPT-2) uses for "\\n", else None."""
    # GPT-2 maps every byte to a printable character ("\n" → "Ċ"); in such a vocabulary that character
    # means byte 10 and nothing else, so scanning token strings finds every newline token without
    # decoding 50k ids one by one.
    tokens = tokenizer.convert_ids_to_tokens(newline_ids)
    if len(tokens) != 1 or len(tokens[0]) != 1 or tokens[0] == "\n":
        return None
    return tokens[0] if tokenizer.convert_tokens_to_string(tokens) == "\n" else None


# ----------------------------------------------------------------------------------------------------
# the engine


class _DeadlineCriteria(StoppingCriteria):
    """Stops generation at the first step that ends after `deadline` (a time.monotonic() value)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.has_fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.has_fired = self.has_fired or time.monotonic() > self.deadline
        is_done = torch.full((input_ids.shape[0],), self.has_fired, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, is_done)


class _SpeakerTagCriteria(StoppingCriteria):
    """Stops once the new text starts another speaker's turn ("… Name:"), for tokenizers with no newline."""

    def __init__(self, tokenizer: Any, prompt_length: int, speakers: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.speakers = speakers
        self.has_fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        # Decoding the whole continuation each step is quadratic, but replies are tens of tokens long.
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        self.has_fired = self.has_fired or _cut_at_speaker_tag(text, self.speakers) != text
        is_done = torch.full((input_ids.shape[0],), self.has_fired, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, is_done)


def generation_config(params: SamplingParams, stop_ids: frozenset[int], pad_id: int) -> GenerationConfig:
    """A GenerationConfig built only from SamplingParams (every knob explicit, no logits processors)."""
    # Greedy leaves top_k unset: HF warns about any explicit top_k when do_sample is off.
    sampling: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_p": 1.0}
    if not params.is_greedy:
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        sampling["top_k"] = params.top_k  # 0 disables top-k filtering
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        eos_token_id=sorted(stop_ids) or None,
        pad_token_id=pad_id,
        **sampling,
    )


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the RNGs for one job without disturbing the global random state of other jobs."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFGenerateEngine:
    """A DecodeEngine of batch size 1: each step runs one whole `model.generate` for the oldest job."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id: int | None = tokenizer.eos_token_id
        # GPT-2 has no pad token; generate wants one for rows that finish early. With batch size 1 no
        # row is ever padded, so end-of-text serves (the usual GPT-2 convention).
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.pad_id: int = pad if pad is not None else 0
        self._jobs: deque[EngineJob] = deque()

    def can_admit(self) -> bool:
        """One job at a time: the rest wait in the worker's queue, where they count as queued."""
        return not self._jobs

    def admit(self, job: EngineJob) -> None:
        """Add a job; it runs at the next step."""
        assert job.prompt_ids, "an empty prompt has nothing to condition on"
        self._jobs.append(job)

    def has_work(self) -> bool:
        """Whether a job is waiting to run."""
        return bool(self._jobs)

    def step(self) -> list[EngineResult]:
        """Generate the oldest job to its end; if this raises, the job stays admitted for abort_all()."""
        result = self._generate(self._jobs[0])
        self._jobs.popleft()
        return [result]

    def abort_all(self) -> list[int]:
        """Drop every admitted job and return their ids."""
        ids = [job.job_id for job in self._jobs]
        self._jobs.clear()
        return ids

    @torch.inference_mode()
    def _generate(self, job: EngineJob) -> EngineResult:
        device = self.model.device
        input_ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=device)  # (1, T)
        deadline = _DeadlineCriteria(job.deadline)
        speaker_tag = _SpeakerTagCriteria(self.tokenizer, input_ids.shape[1], job.stop_speakers)
        criteria = [deadline, speaker_tag] if job.stop_speakers else [deadline]
        with _seeded(job.params.seed, device):
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=generation_config(job.params, job.stop_token_ids, self.pad_id),
                stopping_criteria=StoppingCriteriaList(criteria),
            )
        new_ids = output[0, input_ids.shape[1] :].tolist()  # (T_new,)
        return self._result(job, new_ids, deadline.has_fired, speaker_tag.has_fired)

    def _result(
        self, job: EngineJob, new_ids: list[int], is_past_deadline: bool, has_tag: bool = False
    ) -> EngineResult:
        if new_ids and new_ids[-1] in job.stop_token_ids:
            reason = "eos" if new_ids[-1] == self.eos_id else "turn_end"
            return EngineResult(job.job_id, tuple(new_ids[:-1]), reason)
        if has_tag:  # the tag stays in the tokens; clean_reply cuts the text there
            return EngineResult(job.job_id, tuple(new_ids), "turn_end")
        if is_past_deadline and len(new_ids) < job.params.max_new_tokens:
            return EngineResult(job.job_id, tuple(new_ids), "time_limit")
        return EngineResult(job.job_id, tuple(new_ids), "max_tokens")


# ----------------------------------------------------------------------------------------------------
# reply cleanup


def clean_reply(text: str, speaker_names: Iterable[str] = (), *, has_ended_turn: bool = False) -> str:
    """Trim a raw continuation into a postable reply; "" when nothing usable remains.

    Cuts at a newline or a leaked "Name:" speaker tag, and drops a dangling half-sentence after the last
    complete one unless `has_ended_turn` (the model closed its turn itself, so the line is whole).
    """
    text = text.replace("\ufffd", "")  # half of a multi-byte character cut off by the token limit
    text = _cut_at_speaker_tag(text.split("\n", 1)[0], speaker_names).strip()
    if not has_ended_turn:
        text = _drop_dangling(text).strip()
    return text if _is_usable(text) else ""


def _cut_at_speaker_tag(text: str, speaker_names: Iterable[str]) -> str:
    """Cut where the model starts writing someone's turn inline ("… Alice: hi")."""
    if not any(colon in text for colon in SPEAKER_COLONS):  # a tag needs a colon: skip the regex (~8 µs)
        return text
    pattern = _speaker_tag_pattern(tuple(speaker_names))
    match = pattern.search(text) if pattern is not None else None
    return text[: match.start()] if match else text


@functools.lru_cache(maxsize=1024)
def _speaker_tag_pattern(speaker_names: tuple[str, ...]) -> re.Pattern[str] | None:
    """A "Name:" tag of any of these speakers (longest name first), compiled once per set of names:
    building it took ~10 µs a reply, a burst's replies mostly share their speakers."""
    names = sorted({n.strip() for n in speaker_names if n.strip()}, key=len, reverse=True)
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(r"(?:^|(?<=\s))(?:" + alternatives + r")\s*" + _COLON, re.IGNORECASE)


def _drop_dangling(text: str) -> str:
    """Keep text up to its last complete sentence when words follow it."""
    end = _last_sentence_end(text)
    if not end or not any(ch.isalnum() for ch in text[end:]):
        return text
    return text[:end]


def _last_sentence_end(text: str) -> int:
    """Where _SENTENCE_END's last match in `text` ends; 0 when none does. Every match starts at a mark, and
    one always starts at a "!?…。！？" mark: the last match starts at the rightmost of those or at a run of
    dots after it, and a run of dots matches from any of its dots or from none. So only those runs are
    tried, right to left (scanning every match took ~7 µs a reply, a burst's worth of them ~2 ms)."""
    anywhere = max(text.rfind(mark) for mark in _ANYWHERE_MARKS)
    limit = len(text)
    while (dot := text.rfind(".", anywhere + 1, limit)) >= 0:
        match = _SENTENCE_END.match(text, dot)
        if match:
            return match.end()
        limit = dot  # none of this run matches: go on left of its first dot
        while limit > anywhere + 1 and text[limit - 1] == ".":
            limit -= 1
    match = _SENTENCE_END.match(text, anywhere) if anywhere >= 0 else None
    return match.end() if match else 0


def _is_usable(text: str) -> bool:
    """Words, digits or symbols (emoji count); punctuation or whitespace alone is not a reply."""
    return any(ch.isalnum() or unicodedata.category(ch).startswith("S") for ch in text)


# ----------------------------------------------------------------------------------------------------
# the repeat guard


def is_repeat(reply: str, recent_replies: Iterable[str]) -> bool:
    """Whether `reply` says the same as one of the bot's recent replies (case and spacing ignored)."""
    key = _comparable(reply)
    return bool(key) and any(key == _comparable(old) for old in recent_replies)


def resample_params(params: SamplingParams) -> SamplingParams:
    """Settings for the one retry after a repeated reply: a fresh seed, and sampling even if greedy."""
    # Greedy decoding would only produce the same reply again, so the retry samples at the default
    # temperature; a fixed seed moves on by one so a seeded retry differs too.
    seed = None if params.seed is None else params.seed + 1
    temperature = params.temperature if not params.is_greedy else SamplingParams().temperature
    return replace(params, seed=seed, temperature=temperature)


def _comparable(text: str) -> str:
    return " ".join(text.casefold().split())
