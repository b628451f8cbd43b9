"""Running the real `chatbot console` in a subprocess, fed through a pipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_console_process(env_file: Path, env: dict[str, str], text: str) -> subprocess.CompletedProcess[str]:
    """`python -m bot.cli --env-file ENV_FILE console` with `text` on its standard input."""
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", "--env-file", str(env_file), "console"],
        input=text,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
