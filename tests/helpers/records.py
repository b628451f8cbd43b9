"""Storage records for tests: a message in one default guild, channel and author."""

from __future__ import annotations

from bot.storage import StoredMessage

GUILD, CHANNEL, USER = 1, 10, 100


def msg(message_id: int, content: str = "hello", **overrides: object) -> StoredMessage:
    """A message in the default guild/channel from the default user, created at `message_id` seconds."""
    fields: dict = dict(
        message_id=message_id,
        channel_id=CHANNEL,
        guild_id=GUILD,
        author_id=USER,
        author_name="ann",
        is_bot=False,
        content=content,
        created_at=float(message_id),
    )
    fields.update(overrides)
    return StoredMessage(**fields)
