"""The `chatbot` command tree: every command and positional says what it is; train/eval keep their name."""

from __future__ import annotations

import argparse

import pytest

from bot.cli import build_parser, main


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_and_positional_has_a_description() -> None:
    parser = build_parser()
    commands = _subcommands(parser)
    listed = {a.dest for a in parser._actions if isinstance(a, argparse._SubParsersAction)}
    assert listed == {"command"}
    help_by_name = {c.dest: c.help for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                    for c in a._choices_actions}  # fmt: skip
    assert set(help_by_name) == set(commands) and all(help_by_name.values())
    nested = {f"db {name}": cmd for name, cmd in _subcommands(commands["db"]).items()}
    for name, command in {**commands, **nested}.items():
        if name in ("train", "eval"):  # their help is model.training's own (next test)
            continue
        assert command.description, f"`chatbot {name} --help` shows no description"
        for action in command._actions:
            if not action.option_strings:  # positionals (and nested command lists) say what they are
                assert action.help, f"`chatbot {name}`: {action.dest} has no help"


def test_db_backup_help_says_what_path_is(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "db", "backup")
    assert text.startswith("usage: chatbot db backup [-h] PATH")
    assert "PATH        the backup file to write" in text and "Online backup" in text


def test_promote_help_says_what_version_is(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "promote")
    assert "VERSION     a version name from `chatbot models`" in text


@pytest.mark.parametrize("command", ["start", "run", "console", "health", "models", "rollback", "db"])
def test_commands_describe_themselves(capsys: pytest.CaptureFixture[str], command: str) -> None:
    lines = _help(capsys, command).splitlines()
    assert lines[0].startswith(f"usage: chatbot {command} ")
    assert len(lines) > 2 and lines[2].strip()  # the description under the usage line


@pytest.mark.parametrize("command", ["train", "eval"])
def test_passthrough_help_names_the_subcommand(capsys: pytest.CaptureFixture[str], command: str) -> None:
    assert _help(capsys, command).startswith(f"usage: chatbot {command} [-h]")
