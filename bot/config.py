"""Settings: one frozen dataclass built from the environment and `.env`. The only reader of os.environ."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from model.sampling import SamplingParams
from model.training.dataset import DEFAULT_PERSONA

T = TypeVar("T")

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


# Ranges of the sampling settings: the BOT_* variables here and the bot's /config command both use them.
SAMPLING_LIMITS: Mapping[str, tuple[float, float]] = {
    "temperature": (0.0, 5.0),
    "top_p": (0.01, 1.0),
    "top_k": (0, 50_000),
    "repetition_penalty": (1.0, 3.0),
    "max_new_tokens": (1, 1024),
    "no_repeat_ngram_size": (0, 20),
}


class ConfigError(ValueError):
    """One or more settings are invalid; the message names every bad variable and value."""


def _parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("must be one of true/false, yes/no, on/off, 1/0")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be an integer {low}–{high}") from None
        if not low <= value <= high:
            raise ValueError(f"must be an integer {low}–{high}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"must be a number {low}–{high}") from None
        if not low <= value <= high:  # also rejects nan
            raise ValueError(f"must be a number {low}–{high}")
        return value

    return parse


def _sampling_int(name: str) -> Callable[[str], int]:
    low, high = SAMPLING_LIMITS[name]
    return _int_in(int(low), int(high))


def _sampling_float(name: str) -> Callable[[str], float]:
    return _float_in(*SAMPLING_LIMITS[name])


def _id_set(raw: str) -> frozenset[int]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ValueError("must be a comma-separated list of numeric Discord ids")
    return frozenset(int(p) for p in parts)


def _text(max_chars: int) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if not value:
            raise ValueError("must not be empty")
        if len(value) > max_chars:
            raise ValueError(f"must be at most {max_chars} characters")
        return value

    return parse


def _speaker_name(raw: str) -> str:
    value = _text(32)(raw)
    if ":" in value or "\n" in value:
        raise ValueError("must not contain ':' or line breaks (it is a speaker tag in the prompt)")
    return value


def _optional_path(raw: str) -> Path | None:
    value = raw.strip()
    return Path(_text(4096)(value)) if value else None


def _choice(*allowed: str, allow_cuda_index: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        is_cuda_index = allow_cuda_index and value.startswith("cuda:") and value[5:].isdigit()
        if value not in allowed and not is_cuda_index:
            extra = ", cuda:N" if allow_cuda_index else ""
            raise ValueError("must be one of " + ", ".join(allowed) + extra)
        return value

    return parse


def _base_urls(raw: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in raw.split(",") if u.strip())
    if not all(u.startswith(("http://", "https://")) for u in urls):
        raise ValueError("must be a comma-separated list of http:// or https:// URLs (ending in /v1)")
    return urls


def _shards(raw: str) -> str | None:
    value = raw.strip().lower()
    if not value:
        return None
    if value != "auto" and not (value.isdigit() and 1 <= int(value) <= 10_000):
        raise ValueError("must be auto or a shard count 1–10000")
    return value


def _optional_text(raw: str) -> str:
    return raw.strip()


def _setting(env: str, default: str, parse: Callable[[str], Any], secret: bool = False) -> Any:
    """A dataclass field that knows its environment variable, its default (as text) and its parser."""
    # An empty default means "unset": None for the token, the empty value (e.g. no ids) otherwise.
    value = None if secret and not default else parse(default)
    return field(
        default=value,
        repr=not secret,
        metadata={"env": env, "default": default, "parse": parse},
    )


@dataclass(frozen=True)
class Settings:
    """Every knob of the bot. Build with `load_settings()`; each field's env variable is in `.env.example`."""

    discord_token: str | None = _setting("DISCORD_TOKEN", "", str.strip, secret=True)
    # Hidden like the token: child processes (retraining) get neither.
    discord_token_file: Path | None = _setting("DISCORD_TOKEN_FILE", "", _optional_path, secret=True)
    data_dir: Path = _setting("BOT_DATA_DIR", "./data", lambda raw: Path(_text(4096)(raw)))
    model: str = _setting("BOT_MODEL", "starter", _text(4096))
    device: str = _setting("BOT_DEVICE", "auto", _choice("auto", "cpu", "cuda", allow_cuda_index=True))
    dtype: str = _setting("BOT_DTYPE", "auto", _choice("auto", "float32", "float16", "bfloat16"))
    allow_pickle: bool = _setting("BOT_ALLOW_PICKLE", "false", _parse_bool)
    engine: str = _setting("BOT_ENGINE", "auto", _choice("auto", "fastgen", "ct2", "hf"))
    cpu_compute: str = _setting("BOT_CPU_COMPUTE", "int8", _choice("int8", "float32"))
    cpu_threads: int = _setting("BOT_CPU_THREADS", "0", _int_in(0, 256))
    seed: int = _setting("BOT_SEED", "42", _int_in(0, 2**32 - 1))
    bot_name: str = _setting("BOT_NAME", "Bot", _speaker_name)
    persona: str = _setting("BOT_PERSONA", DEFAULT_PERSONA, _text(1000))
    max_new_tokens: int = _setting("BOT_MAX_NEW_TOKENS", "60", _sampling_int("max_new_tokens"))
    temperature: float = _setting("BOT_TEMPERATURE", "0.8", _sampling_float("temperature"))
    top_p: float = _setting("BOT_TOP_P", "0.9", _sampling_float("top_p"))
    top_k: int = _setting("BOT_TOP_K", "50", _sampling_int("top_k"))
    repetition_penalty: float = _setting(
        "BOT_REPETITION_PENALTY", "1.15", _sampling_float("repetition_penalty")
    )
    no_repeat_ngram_size: int = _setting(
        "BOT_NO_REPEAT_NGRAM_SIZE", "3", _sampling_int("no_repeat_ngram_size")
    )
    generation_timeout_seconds: float = _setting("BOT_GENERATION_TIMEOUT_SECONDS", "20", _float_in(0.1, 600))
    queue_size: int = _setting("BOT_QUEUE_SIZE", "32", _int_in(1, 10_000))
    history_messages: int = _setting("BOT_HISTORY_MESSAGES", "40", _int_in(1, 1000))
    answer_dms: bool = _setting("BOT_ANSWER_DMS", "true", _parse_bool)
    followup_window_seconds: float = _setting("BOT_FOLLOWUP_WINDOW_SECONDS", "120", _float_in(0, 86_400))
    cooldown_seconds: float = _setting("BOT_COOLDOWN_SECONDS", "3", _float_in(0, 3600))
    allowed_users: frozenset[int] = _setting("BOT_ALLOWED_USERS", "", _id_set)
    blocked_users: frozenset[int] = _setting("BOT_BLOCKED_USERS", "", _id_set)
    allowed_roles: frozenset[int] = _setting("BOT_ALLOWED_ROLES", "", _id_set)
    blocked_roles: frozenset[int] = _setting("BOT_BLOCKED_ROLES", "", _id_set)
    allowed_channels: frozenset[int] = _setting("BOT_ALLOWED_CHANNELS", "", _id_set)
    blocked_channels: frozenset[int] = _setting("BOT_BLOCKED_CHANNELS", "", _id_set)
    owner_ids: frozenset[int] = _setting("BOT_OWNER_IDS", "", _id_set)
    log_level: str = _setting("BOT_LOG_LEVEL", "INFO", _choice("INFO", "DEBUG", "WARNING", "ERROR"))
    log_message_text: bool = _setting("BOT_LOG_MESSAGE_TEXT", "false", _parse_bool)
    shutdown_grace_seconds: float = _setting("BOT_SHUTDOWN_GRACE_SECONDS", "10", _float_in(0, 600))
    db_busy_timeout_seconds: float = _setting("BOT_DB_BUSY_TIMEOUT_SECONDS", "5", _float_in(0.1, 600))
    export_gap_minutes: float = _setting("BOT_EXPORT_GAP_MINUTES", "30", _float_in(1, 525_600))
    promote_margin: float = _setting("BOT_PROMOTE_MARGIN", "0.02", _float_in(0, 10))
    metrics_port: int = _setting("BOT_METRICS_PORT", "0", _int_in(0, 65_535))
    metrics_host: str = _setting("BOT_METRICS_HOST", "127.0.0.1", _text(255))
    shards: str | None = _setting("BOT_SHARDS", "", _shards)
    shard_ids: frozenset[int] = _setting("BOT_SHARD_IDS", "", _id_set)
    # Where replies come from: the in-process model, or OpenAI-compatible servers (bot/remote/).
    backend: str = _setting("BOT_BACKEND", "local", _choice("local", "openai"))
    openai_base_urls: tuple[str, ...] = _setting("BOT_OPENAI_BASE_URL", "", _base_urls)
    openai_model: str = _setting("BOT_OPENAI_MODEL", "", _optional_text)
    openai_tokenizer: str = _setting("BOT_OPENAI_TOKENIZER", "", _optional_text)
    openai_api_key: str | None = _setting("BOT_OPENAI_API_KEY", "", str.strip, secret=True)
    openai_api_key_file: str = _setting("BOT_OPENAI_API_KEY_FILE", "", _optional_text)
    openai_connect_timeout_seconds: float = _setting(
        "BOT_OPENAI_CONNECT_TIMEOUT_SECONDS", "3", _float_in(0.1, 120)
    )
    openai_retry_after_seconds: float = _setting("BOT_OPENAI_RETRY_AFTER_SECONDS", "5", _float_in(0.1, 3600))

    @property
    def db_path(self) -> Path:
        return self.data_dir / "chatbot.db"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def ct2_dir(self) -> Path:
        """The CTranslate2 conversions of the served models (a cache: safe to delete)."""
        return self.data_dir / "ct2"

    def openai_key(self) -> str | None:
        """The API key for the model servers: BOT_OPENAI_API_KEY, else the first line of the key file."""
        if self.openai_api_key:
            return self.openai_api_key
        if self.openai_api_key_file:
            lines = Path(self.openai_api_key_file).read_text(encoding="utf-8").splitlines()
            return lines[0].strip() if lines and lines[0].strip() else None
        return None

    def sampling(self) -> SamplingParams:
        """The default sampling settings (a guild's /config overrides are applied on top by the bot)."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Parse and validate; a ConfigError lists every bad variable with its value."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in fields(cls):
            env, parse = f.metadata["env"], f.metadata["parse"]
            raw = environ.get(env)
            if raw is None or (raw.strip() == "" and f.metadata["default"] == ""):
                continue  # keep the default
            try:
                values[f.name] = parse(raw)
            except ValueError as exc:
                shown = "<hidden>" if not f.repr else repr(raw)
                problems.append(f"{env} {exc}, got {shown}")
        data_dir_problem = _data_dir_problem(values.get("data_dir", cls.data_dir))
        if data_dir_problem:
            problems.append(f"BOT_DATA_DIR {data_dir_problem}")
        if values.get("discord_token_file") is not None:
            _read_token_file(values, problems)
        problems.extend(_backend_problems(values))
        problems.extend(_shard_problems(values))
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        return cls(**values)


def _backend_problems(values: Mapping[str, Any]) -> list[str]:
    """BOT_BACKEND=openai needs at least one server URL and the served model's name."""
    if values.get("backend", "local") != "openai":
        return []
    problems = []
    if not values.get("openai_base_urls"):
        problems.append(
            "BOT_OPENAI_BASE_URL must be set when BOT_BACKEND=openai (e.g. http://127.0.0.1:8011/v1)"
        )
    if not values.get("openai_model"):
        problems.append("BOT_OPENAI_MODEL must be set when BOT_BACKEND=openai (the served model's name)")
    key_file = values.get("openai_api_key_file")
    if key_file and not Path(key_file).is_file():
        problems.append(f"BOT_OPENAI_API_KEY_FILE names no file: {key_file!r}")
    return problems


def _shard_problems(values: Mapping[str, Any]) -> list[str]:
    """BOT_SHARD_IDS needs a shard count, and each id must be below it."""
    shards, ids = values.get("shards"), values.get("shard_ids", frozenset())
    if ids and shards is None:
        return ["BOT_SHARD_IDS needs BOT_SHARDS (the total shard count across every process)"]
    if ids and shards == "auto":
        return ["BOT_SHARD_IDS needs BOT_SHARDS set to a number: with auto, Discord picks the count"]
    if ids and shards is not None and max(ids) >= int(shards):
        return [f"BOT_SHARD_IDS must be below BOT_SHARDS={shards}, got {sorted(ids)}"]
    return []


def _data_dir_problem(path: Path) -> str | None:
    """Why the data folder cannot be used (a file, or a folder that cannot be created), else None.

    Checked without creating anything: the nearest existing ancestor must be a writable folder.
    """
    if path.exists():
        if not path.is_dir():
            return f"must be a folder, but {str(path)!r} is a file"
        return None if os.access(path, os.W_OK | os.X_OK) else f"folder {str(path)!r} is not writable"
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: {str(ancestor)!r} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {str(ancestor)!r} is not writable"
    return None


def _read_token_file(values: dict[str, Any], problems: list[str]) -> None:
    """DISCORD_TOKEN_FILE (a Docker or systemd secret) supplies the token: it is never in the environment."""
    path = values["discord_token_file"]
    if values.get("discord_token"):
        problems.append("DISCORD_TOKEN_FILE and DISCORD_TOKEN are both set: keep one")
        return
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"DISCORD_TOKEN_FILE cannot be read ({type(exc).__name__}), got {str(path)!r}")
        return
    if not token:
        problems.append(f"DISCORD_TOKEN_FILE is empty, got {str(path)!r}")
        return
    values["discord_token"] = token


def env_variables() -> dict[str, str]:
    """Each setting's environment variable and its default, in declaration order (for docs and tests)."""
    return {f.metadata["env"]: f.metadata["default"] for f in fields(Settings)}


def load_settings(env_file: str | Path | None = ".env") -> Settings:
    """Load `.env` (real environment variables win) and build validated Settings."""
    if env_file is not None and Path(env_file).is_file():
        from dotenv import dotenv_values

        file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        return Settings.from_env({**file_values, **os.environ})
    return Settings.from_env(os.environ)
