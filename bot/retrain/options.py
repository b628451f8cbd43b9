"""What one retraining run does: RetrainOptions, declared once, and the flags derived from it.

The child's argparse (`python -m bot.retrain --help`), the argv the bot passes to the child, and the
descriptions of /retrain's options all come from the fields below and their help text, so a new option is
one line here. Stdlib only: the bot builds a child's argv without importing transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

ENV_FILE_FLAG = "env_file"  # the child's one flag that is not an option of the run (see build_parser)


def _option(default: Any, help_text: str) -> Any:
    """A dataclass field with its help text (the --help line and the slash option description)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class RetrainOptions:
    """What one retraining run does (the flags of `python -m bot.retrain`)."""

    base: str = _option("", "model to fine-tune (default: the one being served)")
    guild_id: int | None = _option(None, "export only this guild")
    bot_user_id: int | None = _option(None, "the bot's Discord user id (marks its own messages)")
    max_steps: int = _option(-1, "optimizer steps (default: one pass over the data; overrides epochs)")
    epochs: float = _option(1.0, "passes over the exported conversations")
    batch_size: int = _option(8, "blocks per step")
    block_size: int = _option(0, "tokens per block (0: the model's, ≤ 1024)")
    learning_rate: float = _option(5e-5, "peak learning rate")
    # Fewer fixed prompts make the comparison faster on a CPU.
    sample_prompts: int = _option(8, "fixed prompts answered in the comparison")
    force: bool = _option(False, "promote even if the new model's held-out perplexity is worse")
    promote: bool = _option(True, "train and register only")  # the flag is --no-promote

    def to_argv(self) -> list[str]:
        """The flags of `python -m bot.retrain` that rebuild these options in the child."""
        argv = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                argv += [_flag(f)] if value != f.default else []
            elif value is not None and value != "":
                argv.append(f"{_flag(f)}={value}")
        return argv


def _flag(f: dataclasses.Field[Any]) -> str:
    """A field's command-line flag: `--max-steps`; `--no-promote` for a boolean that defaults to true."""
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _value_type(annotation: Any) -> Any:
    """int for `int | None`, else the annotation itself."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RetrainOptions field, with its default and help text."""
    hints = typing.get_type_hints(RetrainOptions)
    for f in dataclasses.fields(RetrainOptions):
        help_text = f.metadata["help"]
        if hints[f.name] is bool:
            action = "store_false" if f.default else "store_true"
            parser.add_argument(_flag(f), dest=f.name, action=action, help=help_text)
        else:
            parser.add_argument(_flag(f), type=_value_type(hints[f.name]), default=f.default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m bot.retrain` (the bot passes them; an admin may run it from a shell too)."""
    parser = argparse.ArgumentParser(
        prog="python -m bot.retrain", description="Retrain: export, train, evaluate, promote (JSON events)."
    )
    add_option_flags(parser)
    parser.add_argument(
        "--env-file", dest=ENV_FILE_FLAG, default=".env", help="settings file (the environment wins)"
    )
    return parser


def options_from_args(args: argparse.Namespace) -> RetrainOptions:
    """The RetrainOptions a parsed command line asks for."""
    return RetrainOptions(**{k: v for k, v in vars(args).items() if k != ENV_FILE_FLAG})


def describe(name: str) -> str:
    """A field's help text, as the description of the slash command option that sets it."""
    [f] = [f for f in dataclasses.fields(RetrainOptions) if f.name == name]
    return str(f.metadata["help"])
