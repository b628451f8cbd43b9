"""`python -m bot`: the same as `chatbot run` (options such as --env-file may come first)."""

from __future__ import annotations

import sys

from bot.cli import main

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:], "run"]))
