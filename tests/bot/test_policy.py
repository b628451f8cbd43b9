"""The reply policy: triggers, self/bots, access lists, follow-up window, threads, per-user cooldown."""

from __future__ import annotations

import dataclasses

import pytest

from bot.config import Settings
from bot.policy import (
    Action,
    ChannelState,
    Cooldowns,
    Decision,
    MessageFacts,
    ReplyPolicy,
    apply_cooldown,
    decide,
    should_record,
)

BOT = 1
USER = 100
CHANNEL = 500
GUILD = 900
POLICY = ReplyPolicy(bot_user_id=BOT, followup_window_seconds=60, cooldown_seconds=3)
QUIET = ChannelState()


def facts(**changes: object) -> MessageFacts:
    base = MessageFacts(
        author_id=USER, author_is_bot=False, channel_id=CHANNEL, guild_id=GUILD, created_at=1000
    )
    return dataclasses.replace(base, **changes)


def action(message: MessageFacts, channel: ChannelState = QUIET, policy: ReplyPolicy = POLICY) -> Action:
    return decide(message, channel, policy).action


def test_plain_message_in_a_quiet_channel_is_ignored() -> None:
    assert action(facts()) is Action.IGNORE


@pytest.mark.parametrize(
    "changes",
    [{"mentions_bot": True}, {"replies_to_bot": True}, {"guild_id": None}],
    ids=["mention", "reply-to-bot", "dm"],
)
def test_explicit_triggers_reply(changes: dict[str, object]) -> None:
    decision = decide(facts(**changes), QUIET, POLICY)
    assert decision.action is Action.REPLY
    assert decision.trigger is not None and decision.trigger.is_explicit


def test_dms_off_ignores_dms() -> None:
    policy = dataclasses.replace(POLICY, answer_dms=False)
    assert action(facts(guild_id=None), policy=policy) is Action.IGNORE
    assert not should_record(facts(guild_id=None), policy)


def test_never_itself_or_other_bots_even_when_mentioned() -> None:
    assert action(facts(author_id=BOT, mentions_bot=True)) is Action.IGNORE
    assert action(facts(author_is_bot=True, mentions_bot=True)) is Action.IGNORE
    assert action(facts(author_is_bot=True, guild_id=None)) is Action.IGNORE


def test_enabled_channel_answers_every_message_implicitly() -> None:
    decision = decide(facts(), ChannelState(answer_all=True), POLICY)
    assert decision.action is Action.REPLY
    assert decision.trigger is not None and not decision.trigger.is_explicit


def test_followup_window_applies_to_every_user_of_the_channel() -> None:
    spoke = ChannelState(last_bot_message_at=990)
    assert action(facts(author_id=USER), spoke) is Action.REPLY
    assert action(facts(author_id=USER + 1), spoke) is Action.REPLY
    assert action(facts(created_at=990 + 60), spoke) is Action.REPLY
    assert action(facts(created_at=990 + 61), spoke) is Action.IGNORE


def test_zero_followup_window_turns_followups_off() -> None:
    policy = dataclasses.replace(POLICY, followup_window_seconds=0)
    assert action(facts(created_at=990), ChannelState(last_bot_message_at=990), policy) is Action.IGNORE


def test_followup_window_skips_messages_addressed_to_someone_else() -> None:
    spoke = ChannelState(last_bot_message_at=990)
    assert action(facts(addressed_to_other=True), spoke) is Action.IGNORE


def test_threads_are_their_own_conversations() -> None:
    spoke_in_parent = ChannelState(last_bot_message_at=990)  # state is looked up by the thread's own id
    thread_message = facts(channel_id=777, parent_channel_id=CHANNEL)
    assert action(thread_message, QUIET) is Action.IGNORE
    assert action(thread_message, spoke_in_parent) is Action.REPLY


def test_block_lists_win_over_allow_lists_and_triggers() -> None:
    policy = dataclasses.replace(
        POLICY,
        allowed_users=frozenset({USER}),
        blocked_roles=frozenset({42}),
        blocked_users=frozenset({USER}),
    )
    assert action(facts(mentions_bot=True), policy=policy) is Action.IGNORE
    policy = dataclasses.replace(POLICY, allowed_users=frozenset({USER}), blocked_roles=frozenset({42}))
    assert action(facts(mentions_bot=True, author_role_ids=frozenset({42})), policy=policy) is Action.IGNORE
    assert action(facts(mentions_bot=True), policy=policy) is Action.REPLY


def test_blocking_a_channel_blocks_its_threads() -> None:
    policy = dataclasses.replace(POLICY, blocked_channels=frozenset({CHANNEL}))
    thread_message = facts(channel_id=777, parent_channel_id=CHANNEL, mentions_bot=True)
    assert action(thread_message, policy=policy) is Action.IGNORE
    assert not should_record(thread_message, policy)


def test_allow_lists_are_exclusive_when_set() -> None:
    policy = dataclasses.replace(POLICY, allowed_users=frozenset({7}), allowed_roles=frozenset({42}))
    assert action(facts(mentions_bot=True), policy=policy) is Action.IGNORE
    assert action(facts(mentions_bot=True, author_id=7), policy=policy) is Action.REPLY
    assert action(facts(mentions_bot=True, author_role_ids=frozenset({42})), policy=policy) is Action.REPLY
    channels = dataclasses.replace(POLICY, allowed_channels=frozenset({CHANNEL}))
    assert action(facts(mentions_bot=True, channel_id=501), policy=channels) is Action.IGNORE
    assert action(facts(mentions_bot=True), policy=channels) is Action.REPLY
    assert action(facts(guild_id=None, channel_id=501), policy=channels) is Action.REPLY  # DMs: answer_dms


def test_should_record_skips_own_messages_but_keeps_other_bots() -> None:
    assert not should_record(facts(author_id=BOT), POLICY)
    assert should_record(facts(author_is_bot=True), POLICY)
    assert should_record(facts(), POLICY)


def test_from_settings_copies_every_rule() -> None:
    settings = Settings(blocked_users=frozenset({5}), followup_window_seconds=7.0, answer_dms=False)
    policy = ReplyPolicy.from_settings(settings, bot_user_id=BOT)
    assert policy.blocked_users == {5}
    assert policy.followup_window_seconds == 7.0
    assert not policy.answer_dms
    assert policy.bot_user_id == BOT


def reply(explicit: bool = True) -> Decision:
    return decide(facts(mentions_bot=explicit), ChannelState(answer_all=True), POLICY)


def test_cooldown_one_notice_per_period_then_silence() -> None:
    cooldowns = Cooldowns(cooldown_seconds=3)
    outcomes = [cooldowns.check(USER, reply(), now).action for now in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert outcomes == [Action.REPLY, Action.COOLDOWN_NOTICE, Action.IGNORE, Action.IGNORE, Action.IGNORE]
    assert cooldowns.check(USER, reply(), 3.0).action is Action.REPLY
    assert cooldowns.check(USER, reply(), 3.1).action is Action.COOLDOWN_NOTICE


def test_cooldown_is_per_user_and_silent_for_implicit_triggers() -> None:
    cooldowns = Cooldowns(cooldown_seconds=3)
    assert cooldowns.check(USER, reply(explicit=False), 0.0).action is Action.REPLY
    assert cooldowns.check(USER, reply(explicit=False), 1.0).action is Action.IGNORE
    assert cooldowns.check(USER + 1, reply(), 1.0).action is Action.REPLY


def test_cooldown_ignores_non_replies_and_zero_cooldown_never_blocks() -> None:
    ignored = Decision(Action.IGNORE, "x")
    assert apply_cooldown(ignored, None, 0.0, 3.0) == (ignored, None)
    cooldowns = Cooldowns(cooldown_seconds=0)
    assert [cooldowns.check(USER, reply(), 0.0).action for _ in range(3)] == [Action.REPLY] * 3


def test_cooldown_memory_is_bounded() -> None:
    cooldowns = Cooldowns(cooldown_seconds=3, limit=2)
    for user in (1, 2, 3):
        cooldowns.check(user, reply(), 0.0)
    assert cooldowns.check(1, reply(), 0.1).action is Action.REPLY  # forgotten: oldest dropped first
    assert cooldowns.check(3, reply(), 0.1).action is Action.COOLDOWN_NOTICE
