"""What the admin sees of a retraining: RetrainStatus, folded from the child's events, and its text.

Pure functions of the status and a time: the progress message while the run goes on, the final message
(at most one Discord message; the full comparison goes into an attached report).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.text import split_message


@dataclass
class RetrainStatus:
    """What is known about one run so far; `apply` folds in each event from the child."""

    admin_id: int
    started_at: float
    stage: str = "starting"
    train_conversations: int | None = None
    val_conversations: int | None = None
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    version: str | None = None
    result: Mapping[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False
    reload_note: str = ""

    def apply(self, event: Mapping[str, Any]) -> None:
        """Update from one child event (unknown events are ignored)."""
        kind = event["event"]
        if kind == "stage":
            self.stage = str(event.get("stage", self.stage))
        elif kind == "export":
            self.train_conversations, self.val_conversations = event.get("train"), event.get("val")
        elif kind == "train":
            self.step, self.max_steps = int(event.get("step", 0)), int(event.get("max_steps", 0))
            self.loss, self.eta_seconds = event.get("loss"), event.get("eta_seconds")
        elif kind == "registered":
            self.version = event.get("version")
        elif kind == "done":
            self.stage, self.result = "done", event
        elif kind == "error":
            self.error = f"{event.get('stage', '?')}: {event.get('message', 'unknown error')}"

    @property
    def is_finished(self) -> bool:
        """Whether the run ended (finished, failed or cancelled)."""
        return self.result is not None or self.error is not None or self.cancelled


def format_seconds(seconds: float) -> str:
    """`1h 02m`, `3m 05s` or `12s`."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _ppl(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float | int) else "n/a"


def _training_line(status: RetrainStatus) -> str | None:
    if not status.max_steps:
        return None
    loss = f", loss {status.loss:.3f}" if status.loss is not None else ""
    eta = f", about {format_seconds(status.eta_seconds)} left" if status.eta_seconds is not None else ""
    return f"Training: step {status.step}/{status.max_steps}{loss}{eta}"


def format_progress(status: RetrainStatus, now: float) -> str:
    """The admin's message while the run goes on (and the first lines of the final one)."""
    lines = [f"Retraining: {status.stage} ({format_seconds(now - status.started_at)} elapsed)"]
    if status.train_conversations is not None:
        lines.append(
            f"Exported {status.train_conversations} training and {status.val_conversations} validation "
            "conversations."
        )
    lines.append(_training_line(status) or "")
    return "\n".join(line for line in lines if line)


def first_message(text: str) -> str:
    """What fits in one Discord message (UTF-16 length, code fences closed), via the reply splitter."""
    return split_message(text)[0] if text else text


def _metrics_table(table: str) -> str:
    """The metrics part of the comparison (the replies table goes into the attached report)."""
    return table.split("\n\n", 1)[0]


def format_final(status: RetrainStatus, now: float) -> str:
    """The admin's last message: outcome, perplexities, the metrics table; at most 2000 characters."""
    if status.cancelled:
        head = "Retraining cancelled; nothing was promoted."
    elif status.error is not None or status.result is None:
        head = f"Retraining failed ({status.error or 'the child process exited without a result'})."
    else:
        head = _outcome(status.result) + status.reload_note
    body = format_progress(status, now)
    table = _metrics_table(str(status.result.get("table", ""))) if status.result else ""
    text = f"{head}\n{body}" + (f"\n```\n{table}\n```" if table else "")
    return first_message(text)


def _outcome(result: Mapping[str, Any]) -> str:
    numbers = f"held-out perplexity {_ppl(result.get('val_ppl'))} vs {_ppl(result.get('current_ppl'))} now"
    if result.get("promoted"):
        return f"Retraining finished: {result.get('version')} promoted ({numbers})."
    version, reason = result.get("version"), result.get("reason")
    return f"Retraining finished: {version} kept, not promoted: {reason} ({numbers})."


def reload_note(is_served: bool | None, reload_error: str | None) -> str:
    """What the final message says of the promoted version's hot reload (RegistryWatcher.catch_up)."""
    if is_served is False:
        return f" But the {reload_error}."
    return " Now serving it." if is_served else ""
