"""The retraining child process: export → train → eval → promote (`python -m bot.retrain`).

The bot never trains in its own process: `/retrain` starts this pipeline as a child (bot/retrain/runner.py),
so the event loop, the worker and the GPU owner thread are untouched. The child speaks one JSON object per
stdout line (events: stage, export, train, registered, eval, done, error); everything else it or its
libraries print goes to stderr (a log file the parent chooses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bot.config import Settings, load_settings
from bot.retrain.evaluation import ModelRef, compare, train_device
from bot.retrain.options import RetrainOptions, build_parser, options_from_args
from bot.runtime import model_source, setup_logging
from model.training.registry import PromotionRefused, Registry

log = logging.getLogger(__name__)

Emit = Callable[[Mapping[str, Any]], None]
EXPORT_PREFIX = "retrain-"  # the pipeline's own exports; only the newest is kept (see prune_old_exports)
STAGING_DIR = "staging"
LOCK_FILE = "retrain.lock"
TRAIN_EVENT_INTERVAL_SECONDS = 1.0


class PipelineError(Exception):
    """A stage failed in a known way; the message is shown to the admin as is."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class PipelineResult:
    """How a run ended."""

    version: str
    promoted: bool
    val_ppl: float | None
    current_ppl: float | None
    reason: str  # why it was not promoted; "" when it was
    table: str  # Markdown: the new model and the served one side by side


# --- stages ----------------------------------------------------------------------------------------------


def prune_old_exports(exports_dir: Path, keep: Path) -> None:
    """Delete the pipeline's older exports: files already exported are beyond /forget-me's reach."""
    for old in exports_dir.glob(EXPORT_PREFIX + "*"):
        if old.is_dir() and old != keep:
            shutil.rmtree(old, ignore_errors=True)


def export_step(settings: Settings, options: RetrainOptions, run_id: str, emit: Emit) -> Path:
    """Export consented conversations to exports/retrain-<run>; PipelineError when there is nothing."""
    import asyncio

    from bot.export import export_from_database

    emit({"event": "stage", "stage": "export"})
    out_dir = settings.exports_dir / f"{EXPORT_PREFIX}{run_id}"
    manifest = asyncio.run(export_from_database(settings, out_dir, guild_id=options.guild_id,
                                                bot_user_id=options.bot_user_id, progress=False))  # fmt: skip
    prune_old_exports(settings.exports_dir, keep=out_dir)
    emit({"event": "export", "train": manifest.counts["train"], "val": manifest.counts["val"]})
    if manifest.counts["train"] == 0:
        raise PipelineError("export", "no consented conversations to train on: turn training export on with "
                            "/privacy and ask users to /optin")  # fmt: skip
    return out_dir


def progress_callback(emit: Emit, interval_seconds: float = TRAIN_EVENT_INTERVAL_SECONDS) -> Any:
    """A Trainer callback that emits {"event": "train", step, max_steps, loss, eta_seconds} now and then."""
    from transformers import TrainerCallback

    class JsonProgress(TrainerCallback):
        def __init__(self) -> None:
            self.started = self.last_sent = time.monotonic()
            self.loss: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.monotonic()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.monotonic()
            if now - self.last_sent < interval_seconds and state.global_step < state.max_steps:
                return
            self.last_sent = now
            per_step = (now - self.started) / max(state.global_step, 1)
            eta_seconds = round(per_step * (state.max_steps - state.global_step), 1)
            emit({"event": "train", "step": state.global_step, "max_steps": state.max_steps,
                  "loss": self.loss, "eta_seconds": eta_seconds})  # fmt: skip

    return JsonProgress()


def train_step(
    settings: Settings, options: RetrainOptions, export_dir: Path, out_dir: Path, emit: Emit
) -> Path:
    """Fine-tune the base on the export into out_dir (model.training.train does the work)."""
    from model.loading import ModelLoadError
    from model.training import train as training

    emit({"event": "stage", "stage": "train"})
    args = training.TrainArguments(
        data=str(export_dir), out=str(out_dir), base=options.base or model_source(settings),
        persona=settings.persona, bot_name=settings.bot_name, block_size=options.block_size,
        epochs=options.epochs, max_steps=options.max_steps, batch_size=options.batch_size,
        learning_rate=options.learning_rate, seed=settings.seed, device=train_device(settings.device),
        eval_before=False, eval_each_epoch=False, progress=False, logging_steps=1,
    )  # fmt: skip
    callback = progress_callback(emit)
    try:
        train: Callable[..., Path] = training.train
        if "callbacks" in inspect.signature(train).parameters:
            return train(args, callbacks=[callback])
        log.warning("model.training.train.train takes no callbacks: no step progress for this run")
        return training.train(args)
    except training.TrainError as exc:
        raise PipelineError("train", str(exc)) from exc
    except ModelLoadError as exc:
        raise PipelineError("train", f"cannot load the base model: {exc}") from exc


def promote_step(settings: Settings, version: str, numbers: tuple[float | None, float | None],
                 force: bool) -> tuple[bool, str]:  # fmt: skip
    """Promote unless refused; (promoted, reason when not). An unmeasured model is never promoted unforced."""
    val_ppl, current_ppl = numbers
    if val_ppl is None and not force:
        return False, "its held-out perplexity could not be measured (no validation conversations yet?)"
    try:
        Registry(settings.models_dir).promote(version, val_ppl=val_ppl, current_ppl=current_ppl,
                                              margin=settings.promote_margin, force=force)  # fmt: skip
    except PromotionRefused as exc:
        return False, str(exc)
    return True, ""


def run_pipeline(
    settings: Settings, options: RetrainOptions, emit: Emit, run_id: str | None = None
) -> PipelineResult:
    """The whole run under the retrain lock: export, train, register, evaluate, promote."""
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    served = model_source(settings)
    with _retrain_lock(settings.models_dir):
        export_dir = export_step(settings, options, run_id, emit)
        with _staging(settings.models_dir, run_id) as work_dir:
            model_dir = train_step(settings, options, export_dir, work_dir, emit)
            version = Registry(settings.models_dir).add(model_dir, move=True)
        emit({"event": "registered", "version": version.name})
        emit({"event": "stage", "stage": "eval"})
        new = ModelRef(str(version.path), f"new: {version.name}")
        old = ModelRef(served, f"serving: {Path(served).name if os.sep in served else served}")
        ppl, table = compare(settings, [new, old], export_dir, options.sample_prompts)
        val_ppl, current_ppl = ppl.get(new.label), ppl.get(old.label)
        emit({"event": "eval", "val_ppl": val_ppl, "current_ppl": current_ppl, "table": table})
        promoted, reason = False, "not asked to promote"
        if options.promote:
            emit({"event": "stage", "stage": "promote"})
            promoted, reason = promote_step(settings, version.name, (val_ppl, current_ppl), options.force)
    return PipelineResult(version.name, promoted, val_ppl, current_ppl, reason, table)


@contextlib.contextmanager
def _retrain_lock(models_dir: Path) -> Iterator[None]:
    """One retraining at a time per data directory, across processes (the bot and a shell)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / LOCK_FILE, "a+") as lock:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: the bot's own one-at-a-time rule still holds
            pass
        except BlockingIOError:
            raise PipelineError(
                "start", "another retraining is already running on this data directory"
            ) from None
        yield


@contextlib.contextmanager
def _staging(models_dir: Path, run_id: str) -> Iterator[Path]:
    """A scratch directory for training output, removed afterwards (also on failure or cancel)."""
    staging = models_dir / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed run; we hold the retrain lock
    work_dir = staging / run_id
    work_dir.mkdir(parents=True)
    try:
        yield work_dir
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- entry point -----------------------------------------------------------------------------------------


class EventWriter:
    """Writes one JSON object per line to the event stream and remembers the current stage."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.stage = "start"

    def __call__(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == "stage":
            self.stage = str(event["stage"])
        self._stream.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._stream.flush()


def claim_stdout() -> IO[str]:
    """Keep the real stdout for events only; anything else printed (Trainer logs, tqdm) goes to stderr."""
    sys.stdout.flush()
    events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds the stack, so `finally` blocks remove the staging directory on /retrain cancel.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline, reporting JSON events on stdout; exit code 0 when it finished (promoted or not)."""
    from bot.config import ConfigError

    args = build_parser().parse_args(argv)
    emit = EventWriter(claim_stdout())
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        settings = load_settings(args.env_file)
    except ConfigError as exc:
        emit({"event": "error", "stage": "start", "message": str(exc)})
        return 2
    setup_logging(settings.log_level, settings.log_message_text)
    options = options_from_args(args)
    try:
        result = run_pipeline(settings, options, emit)
    except PipelineError as exc:
        emit({"event": "error", "stage": exc.stage, "message": str(exc)})
        return 1
    except Exception as exc:  # the boundary of the child: log the traceback, tell the parent in one line
        log.exception("retraining failed in stage %s", emit.stage)
        emit({"event": "error", "stage": emit.stage, "message": f"{type(exc).__name__}: {exc}"})
        return 1
    emit({"event": "done", **dataclasses.asdict(result)})
    return 0
