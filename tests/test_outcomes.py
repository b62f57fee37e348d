"""The defer-or-bounce rules of SPEC.md section 2, as tables."""

from __future__ import annotations

import itertools

import pytest

from mta import envelope
from mta.config import Delivery, Timeouts
from mta.envelope import Attempt, Recipient, TLSFacts
from mta.outcomes import (
    BOUNCED,
    DEFERRED,
    FALLBACK_LATER,
    FALLBACK_NOW,
    NO_FALLBACK,
    SENT,
    FallbackPlan,
    deferral_due,
    expired_reply,
    next_attempt,
    plan_fallback,
    settle,
    status_of,
)
from mta.reply import Reply

MINUTE = 60.0
DAY = 86400.0
ARRIVAL = 1_000_000.0


@pytest.mark.parametrize(
    "code, status",
    [
        (250, SENT),
        (251, SENT),
        (421, DEFERRED),
        (450, DEFERRED),
        (452, DEFERRED),
        (454, DEFERRED),
        (500, BOUNCED),
        (550, BOUNCED),
        (554, BOUNCED),
    ],
)
def test_status_of_a_reply(code: int, status: str) -> None:
    assert status_of(Reply(code, f"{str(code)[0]}.0.0", "text")) == status


# --- plaintext fallback ----------------------------------------------------

FALLBACK_CASES = [
    # (level, mode, delay, age, passed_over, plan)
    # opportunistic, plaintext fallback, a host passed over for its TLS
    ("opportunistic", "plaintext", 600, 0, True,
     FallbackPlan(FALLBACK_LATER, ARRIVAL + 600)),
    ("opportunistic", "plaintext", 600, 599, True,
     FallbackPlan(FALLBACK_LATER, ARRIVAL + 600)),
    ("opportunistic", "plaintext", 600, 600, True, FallbackPlan(FALLBACK_NOW)),
    ("opportunistic", "plaintext", 600, 3 * DAY, True,
     FallbackPlan(FALLBACK_NOW)),
    ("opportunistic", "plaintext", 0, 0, True, FallbackPlan(FALLBACK_NOW)),
    # nothing was passed over: nothing to fall back to
    ("opportunistic", "plaintext", 600, 0, False, FallbackPlan(NO_FALLBACK)),
    ("opportunistic", "plaintext", 0, 3 * DAY, False,
     FallbackPlan(NO_FALLBACK)),
    # the fallback turned off
    ("opportunistic", "defer", 600, 3 * DAY, True, FallbackPlan(NO_FALLBACK)),
    ("opportunistic", "defer", 0, 0, True, FallbackPlan(NO_FALLBACK)),
]
# Other levels never fall back, whatever the rest says.
FALLBACK_CASES += [
    (level, mode, delay, age, passed_over, FallbackPlan(NO_FALLBACK))
    for level, mode, delay, age, passed_over in itertools.product(
        ("none", "enforce-tls", "enforce-secure"),
        ("plaintext", "defer"),
        (0, 600),
        (0, 600, 3 * DAY),
        (True, False),
    )
]


@pytest.mark.parametrize(
    "level, mode, delay, age, passed_over, plan", FALLBACK_CASES
)
def test_plan_fallback(
    level: str,
    mode: str,
    delay: float,
    age: float,
    passed_over: bool,
    plan: FallbackPlan,
) -> None:
    assert plan_fallback(
        level, mode, delay, ARRIVAL, ARRIVAL + age, passed_over
    ) == plan


# --- the retry schedule ----------------------------------------------------


@pytest.mark.parametrize(
    "deferrals, step",
    [(0, 60), (1, 300), (2, 900), (3, 900), (10, 900)],
)
def test_next_attempt_repeats_the_last_step(deferrals: int, step: float) -> None:
    assert next_attempt(deferrals, (60.0, 300.0, 900.0), 5000.0) == 5000.0 + step


@pytest.mark.parametrize(
    "deferrals, fallback_due, due",
    [
        (0, None, 1060.0),  # the schedule alone
        (2, None, 1900.0),
        (2, 1300.0, 1300.0),  # the fallback comes before the schedule
        (0, 5000.0, 1060.0),  # the schedule comes first
        (0, 900.0, 1000.0),  # a fallback already allowed: now, not the past
    ],
)
def test_deferral_due_is_capped_by_the_fallback_time(
    deferrals: int, fallback_due: float | None, due: float
) -> None:
    schedule = (60.0, 300.0, 900.0)
    assert deferral_due(deferrals, schedule, 1000.0, fallback_due) == due


# --- settling a recipient after an attempt ---------------------------------

DELIVERY = Delivery(
    retry_schedule=(60.0, 300.0, 900.0),
    max_lifetime=5 * DAY,
    opportunistic_fallback="plaintext",
    plaintext_fallback_delay=600.0,
    timeouts=Timeouts(connect=30.0, command=300.0, data=600.0),
    port=25,
    concurrency=20,
)

TLS = TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128)


def attempt(status: str, dsn: str, reply: str, when: float) -> Attempt:
    return Attempt(
        time=when, status=status, dsn=dsn, reply=reply,
        policy="opportunistic", relay="mx.example.net[192.0.2.1]:25", tls=TLS,
    )


def deferred_before(count: int) -> Recipient:
    earlier = tuple(
        attempt(DEFERRED, "4.4.1", "connection refused", ARRIVAL + index)
        for index in range(count)
    )
    return Recipient("a@example.net", state=envelope.DEFERRED, history=earlier)


SETTLE_CASES = [
    # (earlier deferrals, this attempt's status, dsn, reply, age, not_after,
    #  state, next attempt, recorded status, recorded dsn)
    (0, SENT, "2.0.0", "250 2.0.0 Ok", 10, None,
     envelope.DELIVERED, None, SENT, "2.0.0"),
    (2, SENT, "2.0.0", "250 2.0.0 Ok", 4 * DAY, None,
     envelope.DELIVERED, None, SENT, "2.0.0"),
    (0, BOUNCED, "5.1.1", "550 5.1.1 no such user", 10, None,
     envelope.FAILED, None, BOUNCED, "5.1.1"),
    (0, DEFERRED, "4.2.0", "450 4.2.0 busy", 10, None,
     envelope.DEFERRED, ARRIVAL + 10 + 60, DEFERRED, "4.2.0"),
    (1, DEFERRED, "4.2.0", "450 4.2.0 busy", 10, None,
     envelope.DEFERRED, ARRIVAL + 10 + 300, DEFERRED, "4.2.0"),
    (7, DEFERRED, "4.2.0", "450 4.2.0 busy", 10, None,
     envelope.DEFERRED, ARRIVAL + 10 + 900, DEFERRED, "4.2.0"),
    # a TLS deferral due again when the plaintext fallback is allowed
    (1, DEFERRED, "4.7.0", "STARTTLS failed", 10, ARRIVAL + 200,
     envelope.DEFERRED, ARRIVAL + 200, DEFERRED, "4.7.0"),
    # just short of max_lifetime: still a deferral
    (3, DEFERRED, "4.4.1", "connection refused", 5 * DAY - 1, None,
     envelope.DEFERRED, ARRIVAL + 5 * DAY - 1 + 900, DEFERRED, "4.4.1"),
    # max_lifetime ran out: an ordinary deferral becomes 5.4.7 ...
    (3, DEFERRED, "4.4.1", "connection refused", 5 * DAY, None,
     envelope.FAILED, None, BOUNCED, "5.4.7"),
    (3, DEFERRED, "4.2.2", "452 4.2.2 mailbox full", 6 * DAY, None,
     envelope.FAILED, None, BOUNCED, "5.4.7"),
    # ... and a TLS one keeps its detail, as 5.7.x
    (3, DEFERRED, "4.7.5", "certificate not trusted", 5 * DAY, None,
     envelope.FAILED, None, BOUNCED, "5.7.5"),
    (3, DEFERRED, "4.7.0", "STARTTLS not offered", 6 * DAY, ARRIVAL,
     envelope.FAILED, None, BOUNCED, "5.7.0"),
]


@pytest.mark.parametrize(
    "earlier, status, dsn, reply, age, not_after, state, due, recorded, "
    "recorded_dsn",
    SETTLE_CASES,
)
def test_settle(
    earlier: int,
    status: str,
    dsn: str,
    reply: str,
    age: float,
    not_after: float | None,
    state: str,
    due: float | None,
    recorded: str,
    recorded_dsn: str,
) -> None:
    recipient = deferred_before(earlier)
    now = ARRIVAL + age
    tried = attempt(status, dsn, reply, now)

    settled, kept = settle(recipient, tried, ARRIVAL, now, DELIVERY, not_after)

    assert (settled.state, settled.next_attempt) == (state, due)
    assert (kept.status, kept.dsn) == (recorded, recorded_dsn)
    assert settled.dsn == kept.dsn and settled.reason == kept.reply
    assert settled.history == (*recipient.history, kept)
    assert settled.address == recipient.address
    # What the attempt was is kept: relay, TLS facts, policy, time.
    assert (kept.relay, kept.tls, kept.policy, kept.time) == (
        tried.relay, TLS, "opportunistic", now)


def test_an_expired_deferral_says_why_and_what_went_wrong_last() -> None:
    recipient = deferred_before(3)
    tried = attempt(DEFERRED, "4.4.1", "connection refused", ARRIVAL + 5 * DAY)

    settled, kept = settle(recipient, tried, ARRIVAL, ARRIVAL + 5 * DAY,
                           DELIVERY)

    assert kept.reply == (
        "message expired after 5 days in the queue; last problem: "
        "connection refused"
    )
    assert settled.reason == kept.reply


@pytest.mark.parametrize(
    "last, lifetime, expected",
    [
        (Reply(451, "4.4.1", "no route"), 5 * DAY,
         Reply(554, "5.4.7",
               "message expired after 5 days in the queue; last problem: "
               "no route")),
        (Reply(451, "4.7.1", "TLS required"), 1.5 * DAY,
         Reply(550, "5.7.1",
               "message expired after 1.5 days in the queue; last problem: "
               "TLS required")),
        (Reply(421, "4.3.2", "shutting down"), 3600,
         Reply(554, "5.4.7",
               "message expired after 3600 seconds in the queue; last "
               "problem: shutting down")),
    ],
)
def test_expired_reply(last: Reply, lifetime: float, expected: Reply) -> None:
    assert expired_reply(last, lifetime) == expected
