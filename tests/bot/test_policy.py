"""The reply policy: triggers, self/bots, access lists, follow-up window, threads, per-user cooldown, wake
words, the bot's own threads, thread mode and the reply chance (with a seeded random source)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

from bot.config import Settings
from bot.policy import (
    Action,
    ChannelState,
    Cooldowns,
    Decision,
    MessageFacts,
    ReplyPolicy,
    Trigger,
    apply_cooldown,
    decide,
    matched_wake_word,
    opens_thread,
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


@pytest.mark.parametrize(
    ("text", "words", "expected"),
    [
        ("hey Bot, what's up?", ("bot",), "bot"),  # case-insensitive, punctuation is a word boundary
        ("BOT", ("Bot",), "Bot"),
        ("a robot walks in", ("bot",), None),  # Latin words match whole words only
        ("bots everywhere", ("bot",), None),
        ("ok computer, play", ("ok computer",), "ok computer"),  # a phrase
        ("ねえボットさん、元気？", ("ボット",), "ボット"),  # CJK: a substring (no spaces between words)
        ("今日は天気がいい", ("天気",), "天気"),
        ("今日は晴れ", ("天気",), None),
        ("c++ rocks", ("c++",), "c++"),  # regex characters are literal
        ("anything", ("",), None),  # an empty word never matches
        ("", ("bot",), None),
    ],
)
def test_wake_word_matching(text: str, words: tuple[str, ...], expected: str | None) -> None:
    assert matched_wake_word(text, words) == expected


@pytest.mark.parametrize(
    ("changes", "channel", "expected_reason", "is_explicit"),
    [
        ({"text": "hello bot"}, ChannelState(wake_words=("bot",)), "wake word 'bot'", True),
        ({"text": "hello robot"}, ChannelState(wake_words=("bot",)), None, None),
        ({"text": "hi"}, ChannelState(is_bot_thread=True), "the bot's own thread", False),
        # The bot's own thread answers every message, even one addressed to someone else.
        ({"addressed_to_other": True}, ChannelState(is_bot_thread=True), "the bot's own thread", False),
        ({"in_archived_thread": True, "mentions_bot": True}, ChannelState(is_bot_thread=True), None, None),
        ({"mentions_bot": True}, ChannelState(wake_words=("hi",)), "mention", True),  # mention comes first
        ({"text": "hello bot", "author_is_bot": True}, ChannelState(wake_words=("bot",)), None, None),
    ],
)
def test_wake_words_own_threads_and_archived_threads(
    changes: dict[str, object], channel: ChannelState, expected_reason: str | None, is_explicit: bool | None
) -> None:
    decision = decide(facts(**changes), channel, POLICY)
    if expected_reason is None:
        assert decision.action is Action.IGNORE
        return
    assert decision.action is Action.REPLY and decision.trigger is not None
    assert (decision.trigger.reason, decision.trigger.is_explicit) == (expected_reason, is_explicit)


def test_wake_word_is_explicit_so_the_cooldown_notices_it_once() -> None:
    cooldowns = Cooldowns(cooldown_seconds=10)
    channel = ChannelState(wake_words=("bot",), reply_chance=1.0, chance_cooldown_seconds=0)
    first = cooldowns.check(USER, decide(facts(text="bot?"), channel, POLICY), 1000)
    woken = cooldowns.check(USER, decide(facts(text="bot?"), channel, POLICY), 1001)
    chance = cooldowns.check(USER, decide(facts(text="hmm"), channel, POLICY, roll=0.0), 1002)
    assert [first.action, woken.action, chance.action] == [
        Action.REPLY,
        Action.COOLDOWN_NOTICE,
        Action.IGNORE,
    ]


CHANCE = ChannelState(reply_chance=0.25, chance_cooldown_seconds=60, last_chance_reply_at=None)


@pytest.mark.parametrize(
    ("changes", "channel", "roll", "expected"),
    [
        ({}, CHANCE, 0.1, Action.REPLY),  # the roll came up
        ({}, CHANCE, 0.25, Action.IGNORE),  # a roll equal to the chance does not (uniform in [0, 1))
        ({}, CHANCE, 0.9, Action.IGNORE),
        ({}, dataclasses.replace(CHANCE, last_chance_reply_at=950), 0.0, Action.IGNORE),  # 50 s < 60 s
        ({}, dataclasses.replace(CHANCE, last_chance_reply_at=940), 0.0, Action.REPLY),  # exactly 60 s
        ({"addressed_to_other": True}, CHANCE, 0.0, Action.IGNORE),  # never barge into others' exchange
        ({}, ChannelState(), 0.0, Action.IGNORE),  # off by default
        ({"author_is_bot": True}, CHANCE, 0.0, Action.IGNORE),
    ],
)
def test_reply_chance_table(
    changes: dict[str, object], channel: ChannelState, roll: float, expected: Action
) -> None:
    decision = decide(facts(**changes), channel, POLICY, roll=roll)
    assert decision.action is expected
    if expected is Action.REPLY:
        assert decision.trigger is not None and not decision.trigger.is_explicit


def binomial_bounds(trials: int, p: float, sigmas: float = 4.0) -> tuple[float, float]:
    """trials·p ± sigmas·σ: a seeded run outside this range means the rule, not luck, is off."""
    spread = sigmas * math.sqrt(trials * p * (1 - p))
    return trials * p - spread, trials * p + spread


def simulate_chance(
    p: float, cooldown_seconds: float, seconds_between: float, seed: int
) -> tuple[int, list[float]]:
    """1,000 plain messages through decide() as the chat cog drives it: (eligible messages, reply times)."""
    rng = random.Random(seed)
    last: float | None = None
    eligible, replies = 0, []
    for index in range(1000):
        at = 1000 + index * seconds_between
        channel = ChannelState(
            reply_chance=p, chance_cooldown_seconds=cooldown_seconds, last_chance_reply_at=last
        )
        eligible += last is None or at - last >= cooldown_seconds
        if decide(facts(created_at=at), channel, POLICY, roll=rng.random()).action is Action.REPLY:
            replies.append(at)
            last = at
    return eligible, replies


@pytest.mark.parametrize("seed", [1, 25, 2026])
def test_reply_chance_rate_is_within_binomial_bounds_without_a_cooldown(seed: int) -> None:
    eligible, replies = simulate_chance(0.2, 0, 5, seed)
    low, high = binomial_bounds(1000, 0.2)
    assert eligible == 1000 and low <= len(replies) <= high


@pytest.mark.parametrize("seed", [1, 25, 2026])
def test_reply_chance_never_exceeds_one_per_cooldown_and_is_p_of_the_eligible_messages(seed: int) -> None:
    eligible, replies = simulate_chance(0.3, 60, 10, seed)
    gaps = [later - earlier for earlier, later in itertools.pairwise(replies)]
    assert gaps and min(gaps) >= 60
    assert len(replies) <= 1 + (999 * 10) // 60  # at most one per window over the whole run
    low, high = binomial_bounds(eligible, 0.3)  # each message outside a cooldown is a fresh draw
    assert low <= len(replies) <= high


@pytest.mark.parametrize(
    ("decision", "changes", "thread_mode", "expected"),
    [
        (Decision(Action.REPLY, "mention", Trigger("mention", True)), {}, True, True),
        (Decision(Action.REPLY, "mention", Trigger("mention", True)), {}, False, False),
        (Decision(Action.REPLY, "follow-up", Trigger("follow-up window", False)), {}, True, False),
        (Decision(Action.REPLY, "mention", Trigger("mention", True)), {"parent_channel_id": 7}, True, False),
        (Decision(Action.REPLY, "dm", Trigger("dm", True)), {"guild_id": None}, True, False),
        (Decision(Action.COOLDOWN_NOTICE, "cooldown", Trigger("mention", True)), {}, True, False),
    ],
    ids=["mention", "mode-off", "implicit", "already-in-a-thread", "dm", "cooldown-notice"],
)
def test_opens_thread_only_for_an_explicit_reply_in_a_thread_mode_channel(
    decision: Decision, changes: dict[str, object], thread_mode: bool, expected: bool
) -> None:
    assert opens_thread(decision, facts(**changes), ChannelState(thread_mode=thread_mode)) is expected
