"""The remote-backend settings (BOT_BACKEND=openai …): validated, the API key hidden, the key file read."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import ConfigError, Settings
from bot.remote.generator import remote_config

REMOTE = {
    "BOT_BACKEND": "openai",
    "BOT_OPENAI_BASE_URL": "http://10.0.0.2:8000/v1/",
    "BOT_OPENAI_MODEL": "starter",
}


def test_openai_backend_needs_urls_and_a_model_name() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"BOT_BACKEND": "openai"})
    assert "BOT_OPENAI_BASE_URL must be set" in str(caught.value)
    assert "BOT_OPENAI_MODEL must be set" in str(caught.value)
    with pytest.raises(ConfigError, match="BOT_OPENAI_BASE_URL must be a comma-separated list of http"):
        Settings.from_env({**REMOTE, "BOT_OPENAI_BASE_URL": "gpu-box:8000"})
    with pytest.raises(ConfigError, match="BOT_BACKEND must be one of local, openai"):
        Settings.from_env({"BOT_BACKEND": "vllm"})


def test_replicas_are_a_list_and_the_key_is_never_shown(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {**REMOTE, "BOT_OPENAI_BASE_URL": "http://a:1/v1, http://b:2/v1", "BOT_OPENAI_API_KEY": "sk-top"}
    )
    assert settings.openai_base_urls == ("http://a:1/v1", "http://b:2/v1")
    assert "sk-top" not in repr(settings) and settings.openai_key() == "sk-top"
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    from_file = Settings.from_env({**REMOTE, "BOT_OPENAI_API_KEY_FILE": str(key_file)})
    assert from_file.openai_key() == "sk-from-file"
    with pytest.raises(ConfigError, match="BOT_OPENAI_API_KEY_FILE names no file"):
        Settings.from_env({**REMOTE, "BOT_OPENAI_API_KEY_FILE": str(tmp_path / "missing")})


def test_remote_config_resolves_the_tokenizer_like_bot_model() -> None:
    config = remote_config(Settings.from_env(REMOTE), tokenizer_source="starter")
    assert config.base_urls == ("http://10.0.0.2:8000/v1",) and config.model == "starter"
    assert Path(config.tokenizer_source, "vocab.json").is_file()
