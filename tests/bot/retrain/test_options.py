"""RetrainOptions declared once: the child's flags, the argv the bot builds and the help all come from it."""

from __future__ import annotations

import dataclasses

import pytest

from bot.retrain.options import RetrainOptions, build_parser, describe, options_from_args


def test_options_round_trip_through_the_child_flags() -> None:
    options = RetrainOptions(base="gpt2", guild_id=5, bot_user_id=900, max_steps=7, epochs=2.0, batch_size=3,
                             block_size=64, learning_rate=1e-3, sample_prompts=2, force=True,
                             promote=False)  # fmt: skip
    args = vars(build_parser().parse_args(options.to_argv()))
    args.pop("env_file")
    assert RetrainOptions(**args) == options
    assert RetrainOptions(
        **{k: v for k, v in vars(build_parser().parse_args([])).items() if k != "env_file"}
    ) == (RetrainOptions())


def test_every_option_is_a_flag_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for flag in ("--base", "--guild-id", "--bot-user-id", "--max-steps", "--epochs", "--batch-size",
                 "--block-size", "--learning-rate", "--sample-prompts", "--force", "--no-promote",
                 "--env-file"):  # fmt: skip
        assert flag in usage
    for f in dataclasses.fields(RetrainOptions):
        assert describe(f.name) == f.metadata["help"] and describe(f.name) in usage


def test_options_from_the_command_line() -> None:
    args = build_parser().parse_args(["--max-steps=3", "--guild-id=7", "--no-promote", "--env-file=x.env"])
    assert options_from_args(args) == RetrainOptions(max_steps=3, guild_id=7, promote=False)
    assert args.env_file == "x.env"
