"""Settings: defaults, validation messages that name the variable, and .env.example completeness."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.config import ConfigError, Settings, env_variables, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_token_is_unset() -> None:
    settings = Settings.from_env({})
    assert settings.discord_token is None
    assert settings.model == "starter"
    assert settings.db_path == Path("data") / "chatbot.db"
    assert settings.sampling().max_new_tokens == 60


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BOT_MAX_NEW_TOKENS", "abc", "BOT_MAX_NEW_TOKENS must be an integer 1–1024, got 'abc'"),
        ("BOT_MAX_NEW_TOKENS", "0", "BOT_MAX_NEW_TOKENS must be an integer 1–1024, got '0'"),
        ("BOT_ANSWER_DMS", "maybe", "BOT_ANSWER_DMS must be one of true/false"),
        ("BOT_TEMPERATURE", "nan", "BOT_TEMPERATURE must be a number"),
        ("BOT_TOP_P", "1.5", "BOT_TOP_P must be a number"),
        ("BOT_DEVICE", "tpu", "BOT_DEVICE must be one of auto, cpu, cuda, cuda:N"),
        ("BOT_DEVICE", "cuda:x", "BOT_DEVICE must be one of auto, cpu, cuda, cuda:N"),
        ("BOT_ENGINE", "vllm", "BOT_ENGINE must be one of auto, fastgen, ct2, hf"),
        ("BOT_CPU_COMPUTE", "int4", "BOT_CPU_COMPUTE must be one of int8, float32"),
        ("BOT_CPU_THREADS", "-1", "BOT_CPU_THREADS must be an integer 0–256"),
        ("BOT_DTYPE", "cuda:0", "BOT_DTYPE must be one of auto, float32, float16, bfloat16, got"),
        ("BOT_BLOCKED_USERS", "12,abc", "BOT_BLOCKED_USERS must be a comma-separated list"),
        ("BOT_NAME", "Bot: evil", "BOT_NAME must not contain ':'"),
        ("BOT_PERSONA", "   ", "BOT_PERSONA must not be empty"),
    ],
)
def test_bad_values_name_the_variable_and_value(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert expected in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BOT_QUEUE_SIZE": "-1", "BOT_SEED": "x"})
    assert "BOT_QUEUE_SIZE" in str(info.value) and "BOT_SEED" in str(info.value)


def test_a_cuda_index_is_a_device() -> None:
    assert Settings.from_env({"BOT_DEVICE": "cuda:1"}).device == "cuda:1"


@pytest.mark.parametrize(
    ("raw", "expected"), [("yes", True), ("OFF", False), ("1", True), (" false ", False)]
)
def test_booleans_accept_only_clear_spellings(raw: str, expected: bool) -> None:
    assert Settings.from_env({"BOT_ANSWER_DMS": raw}).answer_dms is expected


def test_token_never_appears_in_repr_or_errors() -> None:
    token = "MTA" + "x" * 60
    settings = Settings.from_env({"DISCORD_TOKEN": token, "BOT_OWNER_IDS": "5, 6"})
    assert settings.discord_token == token
    assert token not in repr(settings)
    assert settings.owner_ids == frozenset({5, 6})


def test_env_file_is_read_and_real_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("BOT_NAME=Robo\nBOT_QUEUE_SIZE=7\n")
    monkeypatch.setenv("BOT_QUEUE_SIZE", "9")
    settings = load_settings(env_file)
    assert (settings.bot_name, settings.queue_size) == ("Robo", 9)


def test_env_example_documents_every_variable_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = dict(re.findall(r"^([A-Z_]+)=(.*)$", text, flags=re.MULTILINE))
    assert documented == env_variables()
    assert Settings.from_env(documented) == Settings.from_env({})


def test_data_dir_pointing_at_a_file_is_refused_with_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "data"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"BOT_DATA_DIR must be a folder, but '.*data' is a file"):
        Settings.from_env({"BOT_DATA_DIR": str(a_file)})
    assert a_file.read_text() == "not a folder"  # left alone


def test_data_dir_that_cannot_be_created_is_refused_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ConfigError, match=r"BOT_DATA_DIR cannot be created: '.*file' is a file, not a folder"
    ):
        Settings.from_env({"BOT_DATA_DIR": str(tmp_path / "file" / "deeper" / "data")})
    assert (
        Settings.from_env({"BOT_DATA_DIR": str(tmp_path / "new" / "data")}).data_dir
        == tmp_path / "new" / "data"
    )
    assert not (tmp_path / "new").exists()  # validation creates nothing


def test_the_token_can_come_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "discord_token"
    secret.write_text("abc.def.ghi\n")
    settings = Settings.from_env({"DISCORD_TOKEN_FILE": str(secret)})
    assert settings.discord_token == "abc.def.ghi" and "abc.def" not in repr(settings)


@pytest.mark.parametrize(
    ("content", "extra", "words"),
    [
        (None, {}, "DISCORD_TOKEN_FILE cannot be read (FileNotFoundError)"),
        ("  \n", {}, "DISCORD_TOKEN_FILE is empty"),
        ("abc", {"DISCORD_TOKEN": "xyz"}, "DISCORD_TOKEN_FILE and DISCORD_TOKEN are both set"),
    ],
)
def test_a_bad_token_file_is_named(tmp_path: Path, content: str | None, extra: dict, words: str) -> None:
    secret = tmp_path / "discord_token"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(words)) as failed:
        Settings.from_env({"DISCORD_TOKEN_FILE": str(secret), **extra})
    assert "xyz" not in str(failed.value)
