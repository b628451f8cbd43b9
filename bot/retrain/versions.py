"""The `chatbot models`, `chatbot promote` and `chatbot rollback` commands: the registry from a shell.

Each prints its result and returns an exit code; a running bot notices a promotion or rollback made here
through its registry watcher (bot/retrain/watcher.py) and hot-reloads within seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bot.config import Settings
from bot.retrain.evaluation import ModelRef, compare
from bot.runtime import model_source
from model.training.registry import PromotionRefused, Registry, RegistryError


def newest_export(exports_dir: Path) -> Path | None:
    """The most recently finished export (any kind) under exports_dir, or None."""
    manifests = sorted(exports_dir.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return manifests[-1].parent if manifests else None


def list_models(settings: Settings) -> int:
    """Print every version, marking current (*) and previous (-), with its held-out perplexity."""
    versions = Registry(settings.models_dir).versions()
    if not versions:
        print(f"no model versions in {settings.models_dir} yet: run /retrain or `python -m bot.retrain`")
    for v in versions:
        mark = "*" if v.is_current else "-" if v.is_previous else " "
        ppl = v.card.get("metrics", {}).get("val_perplexity_after", "?")
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.added_at))
        print(f"{mark} {v.name:<16} added {added}  val ppl {ppl}  base {v.card.get('base', '?')}")
    return 0


def promote_version(settings: Settings, version: str, *, force: bool = False, val_ppl: float | None = None,
                    current_ppl: float | None = None) -> int:  # fmt: skip
    """Make a version current; both perplexities come from the newest export unless given. Exit code."""
    registry = Registry(settings.models_dir)
    try:
        target = registry.get(version)
        if target.is_current:
            raise RegistryError(f"{version} is already the current version")
        if val_ppl is None or current_ppl is None:
            val_ppl, current_ppl = _measure_for_promotion(settings, target.path, version)
        if val_ppl is None and not force:
            raise PromotionRefused(
                f"could not measure {version}'s held-out perplexity; --force promotes anyway"
            )
        registry.promote(version, val_ppl=val_ppl, current_ppl=current_ppl, margin=settings.promote_margin,
                         force=force)  # fmt: skip
    except RegistryError as exc:
        print(f"chatbot promote: {exc}", file=sys.stderr)
        return 1
    print(f"promoted {version}: a running bot switches to it within seconds")
    return 0


def _measure_for_promotion(settings: Settings, path: Path, version: str) -> tuple[float | None, float | None]:
    export_dir = newest_export(settings.exports_dir)
    if export_dir is None:
        print("no export found to measure perplexity on: run `chatbot export` first", file=sys.stderr)
        return None, None
    served = model_source(settings)
    new, old = ModelRef(str(path), f"new: {version}"), ModelRef(served, "serving")
    ppl, table = compare(settings, [new, old], export_dir)
    print(f"held-out perplexity on {export_dir / 'val.jsonl'}:\n{table}")
    return ppl.get(new.label), ppl.get(old.label)


def rollback(settings: Settings) -> int:
    """Serve the previous version again; exit code 1 when there is none."""
    try:
        record = Registry(settings.models_dir).rollback()
    except RegistryError as exc:
        print(f"chatbot rollback: {exc}", file=sys.stderr)
        return 1
    print(f"rolled back from {record.replaced} to {record.version}")
    return 0
