"""Retraining test data: a settings object on a tiny model, consented conversations to export, a tiny run."""

from __future__ import annotations

from pathlib import Path

from bot.config import Settings
from bot.retrain.options import RetrainOptions
from bot.storage import Storage, StoredMessage

GUILD, ALICE, BOT = 1, 11, 900

# A few steps on a 64-token block: enough to beat a random tiny model, seconds on a CPU.
TINY_RUN = RetrainOptions(
    bot_user_id=BOT, max_steps=4, batch_size=4, block_size=64, learning_rate=3e-3, sample_prompts=1
)


def retrain_settings(tmp_path: Path, model_dir: Path) -> Settings:
    """Settings whose data directory is under tmp_path and whose BOT_MODEL is model_dir, on the CPU."""
    return Settings(data_dir=tmp_path / "data", model=str(model_dir), device="cpu", bot_name="Bot")


async def seed_conversations(settings: Settings, count: int) -> None:
    """`count` consented question/answer pairs by ALICE and the bot in GUILD, a few hours apart."""
    async with Storage.open(settings.db_path) as storage:
        await storage.set_guild_training_export(GUILD, True)
        await storage.set_training_opt_in(ALICE, True, at=1.0)
        for i in range(count):
            at = 1_700_000_000.0 + i * 10_000
            asked, answered = 10 * i + 1, 10 * i + 2
            texts = (f"hi bot, how is day {i}?", f"day {i} is good, thanks for asking!")
            await storage.add_message(StoredMessage(asked, 100, GUILD, ALICE, "alice", False, texts[0], at))
            await storage.add_message(StoredMessage(answered, 100, GUILD, BOT, "Bot", True, texts[1], at + 5,
                                                    reply_to_id=asked))  # fmt: skip
