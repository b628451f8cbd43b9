"""RetrainStatus folded from the child's events, and the progress and result text the admin reads."""

from __future__ import annotations

from bot.retrain.progress import RetrainStatus, format_final, format_progress, reload_note
from bot.text import MESSAGE_LIMIT_CHARS


def test_status_and_messages() -> None:
    status = RetrainStatus(admin_id=1, started_at=100.0)
    for event in (
        {"event": "stage", "stage": "export"},
        {"event": "export", "train": 40, "val": 4},
        {"event": "stage", "stage": "train"},
        {"event": "train", "step": 12, "max_steps": 60, "loss": 3.25, "eta_seconds": 80.0},
    ):
        status.apply(event)
    text = format_progress(status, now=130.0)
    assert "train (30s elapsed)" in text
    assert "40 training and 4 validation" in text
    assert "step 12/60, loss 3.250, about 1m 20s left" in text
    assert not status.is_finished
    table = "| metric | new: v1 | serving |\n|---|---|---|\n| held-out perplexity | 41.0 | 44.0 |\n\n" + (
        "| prompt | a | b |\n" + "| x | y | z |\n" * 400
    )
    status.apply({"event": "done", "version": "v1", "promoted": True, "val_ppl": 41.0, "current_ppl": 44.0,
                  "reason": "", "table": table})  # fmt: skip
    final = format_final(status, now=200.0)
    assert final.startswith("Retraining finished: v1 promoted (held-out perplexity 41.00 vs 44.00 now)")
    assert "| held-out perplexity | 41.0 | 44.0 |" in final and "| x | y | z |" not in final
    assert len(final) <= MESSAGE_LIMIT_CHARS
    failed = RetrainStatus(admin_id=1, started_at=0.0)
    failed.apply({"event": "error", "stage": "export", "message": "no consented conversations"})
    assert format_final(failed, 1.0).startswith("Retraining failed (export: no consented conversations)")


def test_reload_note() -> None:
    assert reload_note(True, None) == " Now serving it."
    assert reload_note(False, "hot reload of v1 failed: x") == " But the hot reload of v1 failed: x."
    assert reload_note(None, None) == ""
