"""Which Trainer checkpoint `chatbot train --resume` continues from: the newest complete one.

The HF Trainer writes `checkpoint-N` in place (weights, optimizer, scheduler, RNG state, then
`trainer_state.json`, last) and deletes old ones with `save_total_limit`; a kill during either leaves a folder
that `resume_from_checkpoint=True` would pick and then fail on. Renaming a staged folder into place would mean
overriding the Trainer's private `_save_checkpoint`, which refers to the final path throughout (rotation, the
best checkpoint); instead a checkpoint counts only when every file it needs is there and its state parses —
complete by construction, since the state is written after everything it describes. Incomplete ones are
removed before resuming, so the step they stood for is saved again cleanly.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# Besides the weights, what the Trainer needs to continue exactly where it was (save_only_model is never set).
RESUME_FILES = ("optimizer.pt", "scheduler.pt")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _has_weights(folder: Path) -> bool:
    """A single weights file, or a shard index whose every shard is present."""
    if (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file():
        return True
    index = folder / SAFETENSORS_INDEX
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((folder / shard).is_file() for shard in shards)


def is_complete(folder: Path) -> bool:
    """Whether a checkpoint folder holds a parseable trainer state, the weights and the optimizer state."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(state, dict)
        and "global_step" in state
        and _has_weights(folder)
        and all((folder / name).is_file() for name in RESUME_FILES)
        and any(folder.glob("rng_state*.pth"))
    )


def checkpoint_folders(checkpoints: Path) -> list[Path]:
    """The `checkpoint-N` folders, oldest step first."""
    found = [
        (int(m.group(1)), p) for p in checkpoints.glob("checkpoint-*") if (m := CHECKPOINT_NAME.match(p.name))
    ]
    return [path for _, path in sorted(found)]


def newest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a killed save or rotation) are removed, and logged."""
    newest = None
    for folder in checkpoint_folders(checkpoints):
        if is_complete(folder):
            newest = folder
        else:
            log.warning("removing %s: incomplete (a run was killed while saving or rotating it)", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return newest
