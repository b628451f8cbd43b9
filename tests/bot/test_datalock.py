"""One bot process per data directory: a second `chatbot run` on a held data dir exits 75 with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.datalock import EXIT_DATA_DIR_LOCKED, DataDirLocked, hold_data_dir


def test_a_second_holder_is_refused_and_a_released_lock_is_free_again(tmp_path: Path) -> None:
    with hold_data_dir(tmp_path):
        code = (
            "import pathlib, sys\nfrom bot.datalock import hold_data_dir\n"
            "with hold_data_dir(pathlib.Path(sys.argv[1])): pass"
        )
        other = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False
        )
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
        second = hold_data_dir(tmp_path)
        with pytest.raises(DataDirLocked, match="give this one its own BOT_DATA_DIR"):  # same process, too
            second.__enter__()
    with hold_data_dir(tmp_path):  # released on exit
        pass


def test_chatbot_run_on_a_held_data_dir_exits_75_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {
        **os.environ,
        "BOT_DATA_DIR": str(data),
        "DISCORD_TOKEN": "not-a-real-token",
        "HF_HUB_OFFLINE": "1",
    }
    with hold_data_dir(data):
        result = subprocess.run(
            [sys.executable, "-m", "bot.cli", "--env-file", str(tmp_path / "none"), "run"],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == EXIT_DATA_DIR_LOCKED
    assert "another bot process" in result.stderr and "Traceback" not in result.stderr
