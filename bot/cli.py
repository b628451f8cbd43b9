"""The `chatbot` command: thin argparse front end over importable functions. Each returns an exit code."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bot.config import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_STORAGE = 4
PASSTHROUGH_COMMANDS = frozenset({"train", "eval"})
CONNECT_HINT = (
    "No DISCORD_TOKEN set: opening the terminal chat. Put DISCORD_TOKEN in .env to connect Discord."
)


def cmd_start(settings: Settings, args: argparse.Namespace) -> int:
    """Run the Discord bot when a token is configured, otherwise the terminal chat."""
    if settings.discord_token:
        return cmd_run(settings, args)
    print(CONNECT_HINT, file=sys.stderr)
    args.channel = "console"
    return cmd_console(settings, args)


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Run the Discord bot until SIGTERM/SIGINT."""
    from bot.discord_app import run_bot

    return asyncio.run(run_bot(settings))


def cmd_console(settings: Settings, args: argparse.Namespace) -> int:
    """Chat with the model in the terminal (one `bot:` line per input line when piped)."""
    from bot.console import run_console
    from bot.runtime import create_worker

    async def main() -> int:
        async with create_worker(settings) as worker:
            return await run_console(settings, worker, channel=args.channel)

    return asyncio.run(main())


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    """Database helpers: migrate, check, backup."""
    from bot import storage

    if args.db_command == "migrate":
        print(f"schema version {storage.migrate(settings.db_path)}: {settings.db_path}")
        return 0

    async def main() -> int:
        async with await storage.Storage.open(settings.db_path, settings.db_busy_timeout_seconds) as db:
            if args.db_command == "backup":
                await db.backup(args.path)
                print(f"backed up {settings.db_path} to {args.path}")
                return 0
            result = await db.integrity_check()
            print(f"integrity_check: {result}")
            return 0 if result == "ok" else 1

    return asyncio.run(main())


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    """Export consented conversations (or an open corpus) as train/val JSONL for fine-tuning."""
    if args.corpus:
        from model.training.corpus import export_corpus

        manifest = export_corpus(args.corpus, args.out, bot_name=settings.bot_name)
    else:
        from bot.export import ExportArgumentError, export_from_database

        try:
            manifest = asyncio.run(
                export_from_database(settings, args.out, guild_id=args.guild, since=args.since)
            )
        except ExportArgumentError as exc:
            print(f"chatbot export: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    counts = ", ".join(f"{split}: {n}" for split, n in manifest.counts.items())
    dropped = manifest.duplicates_removed
    print(f"exported {manifest.source} to {args.out}: {counts}; duplicates removed: {dropped}")
    return 0


def cmd_passthrough(module: str, prog: str) -> Callable[[Settings, argparse.Namespace], int]:
    """A subcommand whose arguments belong to a model/ entry point (train, eval), named `prog` in its help."""

    def run(settings: Settings, args: argparse.Namespace) -> int:
        import importlib

        entry: Callable[..., int] = importlib.import_module(module).main
        return entry([arg for arg in args.rest if arg != "--"], prog=prog)

    return run


def cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    """List the model versions in the registry, marking current and previous."""
    from bot.retrain.versions import list_models

    return list_models(settings)


def cmd_promote(settings: Settings, args: argparse.Namespace) -> int:
    """Make a version current (refused when its held-out perplexity is worse, unless --force)."""
    from bot.retrain.versions import promote_version

    return promote_version(settings, args.version, force=args.force)


def cmd_rollback(settings: Settings, args: argparse.Namespace) -> int:
    """Serve the previous version again."""
    from bot.retrain.versions import rollback

    return rollback(settings)


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when the bot on this data dir is connected, its worker alive and its loop on time."""
    from bot.operations.health import run_health_check

    return run_health_check(settings.data_dir)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; every command and argument says what it is (`chatbot CMD --help`)."""
    parser = argparse.ArgumentParser(prog="chatbot", description="GPT-2 Discord chatbot")
    parser.add_argument("--env-file", default=".env", help="settings file read before the environment")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of these:")
    _command(sub, "start", cmd_start, "run the Discord bot if DISCORD_TOKEN is set, else the terminal chat")
    _command(sub, "run", cmd_run, "run the Discord bot until SIGTERM/SIGINT (exit codes: README, Deploying)")
    console = _command(sub, "console", cmd_console, "chat in the terminal (pipe lines in to script it)")
    console.add_argument("--channel", default="console", help="conversation name; each keeps its own history")
    _command(
        sub, "health", cmd_health,
        "exit 0 if the bot on this data dir is connected, its model worker alive and its loop on time",
    )  # fmt: skip
    _add_db(sub)
    _add_export(sub)
    for name, module, text in (
        ("train", "model.training.train", "fine-tune"),
        ("eval", "model.training.evaluate", "evaluate"),
    ):
        cmd = sub.add_parser(name, help=f"{text} a model (see `chatbot {name} --help`)", add_help=False)
        cmd.set_defaults(func=cmd_passthrough(module, f"chatbot {name}"), rest=[])
    _command(
        sub, "models", cmd_models, "list the model versions in the registry (current and previous marked)"
    )
    promote = _command(sub, "promote", cmd_promote, "make a model version current (refused if worse)")
    promote.add_argument("version", metavar="VERSION", help="a version name from `chatbot models` (e.g. v3)")
    promote.add_argument("--force", action="store_true", help="promote even if perplexity is worse")
    _command(sub, "rollback", cmd_rollback, "serve the previous model version again")
    return parser


def _command(
    sub: argparse._SubParsersAction, name: str, func: Callable[[Settings, argparse.Namespace], int], text: str
) -> argparse.ArgumentParser:
    """A subcommand whose one-line text is both its entry in `chatbot --help` and its own description."""
    command: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text[0].upper() + text[1:])
    command.set_defaults(func=func)
    return command


def _add_db(sub: argparse._SubParsersAction) -> None:
    db = _command(sub, "db", cmd_db, "database helpers: migrate, check, backup")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND", help="one of these:")
    _db_command(db_sub, "migrate", "create or upgrade the database schema")
    _db_command(db_sub, "check", "run SQLite's PRAGMA integrity_check on the database")
    backup = _db_command(db_sub, "backup", "online backup of the database to PATH (safe while the bot runs)")
    backup.add_argument("path", type=Path, metavar="PATH", help="the backup file to write (e.g. backup.db)")


def _db_command(db_sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = db_sub.add_parser(
        name, help=text, description=text[0].upper() + text[1:]
    )
    return parser


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = _command(
        sub, "export", cmd_export, "export training data (consented Discord logs or an open corpus)"
    )
    export.add_argument("--out", type=Path, required=True, help="output directory")
    export.add_argument("--guild", type=int, help="only this guild id")
    export.add_argument("--since", help="only messages on or after this date (YYYY-MM-DD)")
    export.add_argument("--corpus", help="chitchat | chatterbot[:LANGUAGE] instead of the database")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `chatbot` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in PASSTHROUGH_COMMANDS:
        parser.error("unrecognized arguments: " + " ".join(extra))
    args.rest = extra  # train and eval hand their flags (--help too) to model.training
    try:
        settings = load_settings(args.env_file)
    except ConfigError as exc:
        print(f"chatbot: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from bot.runtime import setup_logging

    setup_logging(settings.log_level, settings.log_message_text)
    return run_command(args.func, settings, args)


def run_command(
    func: Callable[[Settings, argparse.Namespace], int], settings: Settings, args: argparse.Namespace
) -> int:
    """Run a subcommand, turning the known failures into one clear line and an exit code."""
    try:
        return func(settings, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        known = known_failure(exc)
        if known is None:
            raise
        line, code = known
        print(f"chatbot: {line}", file=sys.stderr)
        return code


def known_failure(exc: Exception) -> tuple[str, int] | None:
    """(line, exit code) for a model or storage failure. The imports wait for a failure: model.loading
    loads torch, seconds that `chatbot health` (run every 30 s by a supervisor) must not pay."""
    from bot.datalock import EXIT_DATA_DIR_LOCKED, DataDirLocked
    from bot.storage import StorageError
    from model.loading import ModelLoadError

    if isinstance(exc, DataDirLocked):
        return str(exc), EXIT_DATA_DIR_LOCKED
    if isinstance(exc, ModelLoadError):
        return f"cannot load the model: {exc}", EXIT_MODEL
    if isinstance(exc, StorageError):
        return f"database problem: {exc}", EXIT_STORAGE
    return None


if __name__ == "__main__":
    sys.exit(main())
