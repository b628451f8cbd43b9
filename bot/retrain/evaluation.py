"""Two models measured side by side on one export: the numbers a promotion is decided on.

Used by the child pipeline (the new version against the served model) and by `chatbot promote`
(a stored version against the served model on the newest export).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bot.config import Settings

log = logging.getLogger(__name__)

EVAL_BLOCK_TOKENS = 1024


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate and the name it gets in the comparison table."""

    source: str
    label: str


def train_device(device: str) -> Literal["auto", "cpu", "cuda"]:
    """BOT_DEVICE for training: model.training.train picks no GPU index, so "cuda:N" becomes "cuda"."""
    if device.startswith("cuda"):
        return "cuda"
    return "cpu" if device == "cpu" else "auto"


def _context_tokens(source: str, models_dir: Path) -> int | None:
    """The context window of a local model ("starter", a version, a folder) per config.json, else None."""
    from model.loading import ModelLoadError, resolve_model_source

    try:
        folder = Path(resolve_model_source(source, models_dir))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ModelLoadError, OSError, ValueError):  # a hub id, or no starter installed: evaluate() says so
        return None
    return config.get("n_positions") or config.get("max_position_embeddings")


def compare(
    settings: Settings, models: list[ModelRef], export_dir: Path, sample_prompts: int = 8
) -> tuple[dict[str, float], str]:
    """Evaluate models on the same val blocks: ({label: perplexity}, Markdown side by side)."""
    from model.loading import ModelLoadError
    from model.training.evaluate import DEFAULT_PROMPTS, evaluate, markdown_report

    # One block size for all, or the numbers would not be comparable.
    contexts = [_context_tokens(m.source, settings.models_dir) for m in models]
    block = min([EVAL_BLOCK_TOKENS, *(c for c in contexts if c)])
    reports = []
    for model in models:
        try:
            report = evaluate(model.source, export_dir, persona=settings.persona, bot_name=settings.bot_name,
                              block_size=block, device=train_device(settings.device),
                              prompts=DEFAULT_PROMPTS[:sample_prompts])  # fmt: skip
        except (ValueError, OSError, ModelLoadError) as exc:  # no validation data, a model that won't load
            log.warning("cannot evaluate %s: %s", model.label, exc)
            continue
        reports.append(dataclasses.replace(report, model=model.label))
    return {r.model: r.perplexity for r in reports}, markdown_report(reports) if reports else ""
