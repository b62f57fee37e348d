"""Manners toward destinations, in memory: when a destination counts as
failing, how long it is suspended, who may start a delivery, the turns the
table hands out, and the deliverer deferring without connecting.  The same
rules against the running relay and real peers are in
test_destination_manners.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed

from mta.clientsession import SessionFailure, SessionResult, Target
from mta.config import load_config
from mta.delivery import Deliverer, group_recipients
from mta.destinations import (
    DEFER,
    FAILED,
    GO,
    NEUTRAL,
    WAIT,
    WORKED,
    Admission,
    Destinations,
    Health,
    Manners,
    Outcome,
    admit,
    after,
    change_line,
    session_outcome,
    suspension_length,
)
from mta.envelope import Client, Envelope, Recipient
from mta.reply import Reply

NOW = 1_000_000.0
MANNERS = Manners(concurrency=2, failure_limit=3, backoff=60.0,
                  max_backoff=300.0)
REFUSED = Outcome(FAILED, "connect to mx.dest.test[127.0.0.1]:25: "
                  "Connection refused", "4.4.1")
TARGET = Target("mx.dest.test", "127.0.0.1", 25)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def failed_times(n: int, now: float = NOW, health: Health = Health()) -> Health:
    for _ in range(n):
        health = after(health, REFUSED, now, MANNERS)
    return health


# --- suspension ---------------------------------------------------------------


@pytest.mark.parametrize(("suspensions", "length"), [
    (1, 60.0), (2, 120.0), (3, 240.0), (4, 300.0), (50, 300.0), (10**6, 300.0),
])
def test_each_suspension_doubles_up_to_the_cap(
    suspensions: int, length: float
) -> None:
    assert suspension_length(suspensions, MANNERS) == length


def test_failures_below_the_limit_do_not_suspend() -> None:
    health = failed_times(2)
    assert health.failures == 2 and health.suspended_until is None
    assert health.last_error == REFUSED.error and health.last_dsn == "4.4.1"


def test_the_limit_th_failure_suspends() -> None:
    health = failed_times(3)
    assert (health.failures, health.suspensions) == (3, 1)
    assert health.suspended_until == NOW + 60


def test_failures_while_suspended_add_no_time() -> None:
    # Deliveries that started before the suspension report afterwards.
    health = failed_times(10)
    assert health.suspensions == 1 and health.suspended_until == NOW + 60


def test_a_failed_probe_after_a_suspension_suspends_again_for_longer() -> None:
    health = failed_times(3)
    health = failed_times(1, NOW + 61, health)
    assert health.suspensions == 2 and health.suspended_until == NOW + 61 + 120


def test_a_delivery_that_worked_clears_everything() -> None:
    assert after(failed_times(5), Outcome(WORKED), NOW, MANNERS) == Health()


def test_a_neutral_delivery_changes_nothing() -> None:
    health = failed_times(2)
    assert after(health, Outcome(NEUTRAL), NOW, MANNERS) == health


# --- who may start ------------------------------------------------------------


@pytest.mark.parametrize(("health", "in_flight", "now", "kind"), [
    (Health(), 0, NOW, GO),
    (Health(), 1, NOW, GO),
    (Health(), 2, NOW, WAIT),  # concurrency 2
    (failed_times(1), 0, NOW, GO),  # the probe
    (failed_times(1), 1, NOW, WAIT),  # a probe is under way: its end
    (failed_times(3), 0, NOW, DEFER),  # suspended
    (failed_times(3), 0, NOW + 59.9, DEFER),
    (failed_times(3), 0, NOW + 60, GO),  # suspension over: one probe
    (failed_times(3), 1, NOW + 60, WAIT),
])
def test_admission(health: Health, in_flight: int, now: float, kind: str) -> None:
    assert admit(health, "dest.test", in_flight, now, MANNERS).kind == kind


def test_a_suspended_destination_says_why_and_until_when() -> None:
    admission = admit(failed_times(3), "dest.test", 0, NOW, MANNERS)
    assert admission == Admission(
        DEFER,
        "destination dest.test is not responding (3 failures in a row; last "
        "error: connect to mx.dest.test[127.0.0.1]:25: Connection refused); "
        "not tried, destination suspended until 1970-01-12T13:47:40Z",
        "4.4.1",
    )


def test_log_lines_for_a_suspension_and_a_recovery() -> None:
    suspended = failed_times(3)
    assert change_line("dest.test", failed_times(2), suspended, NOW) == (
        "warn", "destination dest.test suspended for 60s until "
        "1970-01-12T13:47:40Z after 3 failures in a row: connect to "
        "mx.dest.test[127.0.0.1]:25: Connection refused")
    assert change_line("dest.test", suspended, Health(), NOW) == (
        "info", "destination dest.test is responding again after 3 failures "
        "in a row")
    assert change_line("dest.test", Health(), failed_times(1), NOW) is None


# --- what a delivery's sessions say ---------------------------------------


def session(stage: str | None, code: int | None = None,
            rcpt: bool = False) -> SessionResult:
    reply = Reply(code, f"{code // 100}.0.0", "x") if code else None
    failure = SessionFailure(stage, reply, f"{stage} went wrong") if stage else None
    replies = {"bob@dest.test": Reply(250, "2.1.5", "ok")} if rcpt else {}
    return SessionResult(TARGET, failure=failure, rcpt_replies=replies)


@pytest.mark.parametrize(("sessions", "kind", "dsn"), [
    ([session(None, rcpt=True)], WORKED, None),
    ([session("connect"), session(None, rcpt=True)], WORKED, None),
    # a 421 in the transaction: the server answered; not its fault
    ([session("RCPT", 421, rcpt=True)], WORKED, None),
    ([session("connect")], FAILED, "4.4.1"),
    ([session("connect"), session("greeting")], FAILED, "4.4.2"),
    ([session("connect"), session("greeting", 421)], FAILED, "4.0.0"),
    ([session("EHLO", 451)], FAILED, "4.0.0"),
    ([session("greeting", 554)], NEUTRAL, None),  # refused for good
    ([session("connect"), session("TLS handshake")], NEUTRAL, None),
    ([session("STARTTLS")], NEUTRAL, None),
    ([session("MAIL", 451)], NEUTRAL, None),
])
def test_session_outcome(
    sessions: list[SessionResult], kind: str, dsn: str | None
) -> None:
    outcome = session_outcome(sessions)
    assert outcome.kind == kind
    if dsn is not None:
        assert outcome.dsn == dsn
        assert outcome.error == sessions[-1].failure.reason  # type: ignore[union-attr]


# --- the table: turns in order --------------------------------------------


def table(clock: Clock) -> tuple[Destinations, list[tuple[str, Health]]]:
    changes: list[tuple[str, Health]] = []
    return (Destinations(clock, lambda name, b, a, now: changes.append((name, a))),
            changes)


def test_turns_beyond_the_concurrency_are_refused_with_wait() -> None:
    destinations, _ = table(Clock())
    kinds = [destinations.try_enter("hop", "dest.test", MANNERS).kind
             for _ in range(3)]
    assert kinds == [GO, GO, WAIT]
    assert destinations.in_flight("hop") == 2

    destinations.leave("hop", "dest.test", Outcome(WORKED), MANNERS)
    assert destinations.try_enter("hop", "dest.test", MANNERS) == Admission(GO)
    assert destinations.in_flight("hop") == 2


def test_waiters_are_woken_in_order_one_per_free_turn() -> None:
    destinations, _ = table(Clock())
    for _ in range(2):
        destinations.try_enter("hop", "dest.test", MANNERS)
    woken: list[int] = []
    for n in range(3):
        destinations.when_free("hop", lambda n=n: woken.append(n))
    assert woken == []

    destinations.leave("hop", "dest.test", Outcome(WORKED), MANNERS)
    assert woken == [0]
    destinations.leave("hop", "dest.test", Outcome(NEUTRAL), MANNERS)
    assert woken == [0, 1, 2]  # nothing in flight: the last is told too


def test_a_waiter_on_an_idle_destination_is_woken_at_once() -> None:
    # Nothing in flight, so no `leave` would ever come to wake it.
    destinations, _ = table(Clock())
    woken: list[str] = []
    destinations.when_free("hop", lambda: woken.append("now"))
    assert woken == ["now"]


def test_other_destinations_have_turns_of_their_own() -> None:
    destinations, _ = table(Clock())
    for _ in range(2):
        destinations.try_enter("hop", "dest.test", MANNERS)
    assert destinations.try_enter("other", "other.test", MANNERS) == Admission(GO)


def test_waiters_are_woken_when_their_destination_starts_failing() -> None:
    clock = Clock()
    destinations, changes = table(clock)
    destinations.try_enter("hop", "dest.test", MANNERS)
    destinations.try_enter("hop", "dest.test", MANNERS)
    woken: list[int] = []
    for n in range(3):
        destinations.when_free("hop", lambda n=n: woken.append(n))

    destinations.leave("hop", "dest.test", REFUSED, MANNERS)

    # One in flight still (a probe, as far as the table knows): the
    # waiters are all told, and wait again for that probe's end; no
    # attempt is counted against their mail meanwhile.
    assert woken == [0, 1, 2]
    assert destinations.try_enter("hop", "dest.test", MANNERS).kind == WAIT
    assert changes == [("dest.test", failed_times(1))]

    destinations.when_free("hop", lambda: woken.append(3))
    destinations.leave("hop", "dest.test", REFUSED, MANNERS)
    assert woken == [0, 1, 2, 3]
    # Nothing in flight now: the next delivery is the probe.
    assert destinations.try_enter("hop", "dest.test", MANNERS).kind == GO


def test_suspension_then_probe_then_recovery() -> None:
    clock = Clock()
    destinations, changes = table(clock)
    for _ in range(3):
        assert destinations.try_enter("hop", "dest.test", MANNERS) == Admission(GO)
        destinations.leave("hop", "dest.test", REFUSED, MANNERS)

    refusal = destinations.try_enter("hop", "dest.test", MANNERS)
    assert refusal.kind == DEFER
    assert "suspended until" in refusal.reason

    clock.now += 60
    assert destinations.try_enter("hop", "dest.test", MANNERS) == Admission(GO)
    destinations.leave("hop", "dest.test", Outcome(WORKED), MANNERS)
    assert destinations.health("hop") == Health()
    assert changes[-1] == ("dest.test", Health())


def test_a_healthy_idle_destination_is_forgotten() -> None:
    destinations, _ = table(Clock())
    destinations.try_enter("hop", "dest.test", MANNERS)
    destinations.leave("hop", "dest.test", Outcome(WORKED), MANNERS)
    assert destinations._table == {}


def test_many_waiters_that_come_straight_back_do_not_grow_the_stack() -> None:
    # Each waiter, woken, takes the turn and is done at once (deferred,
    # say), leaving from inside the call that woke it.
    destinations, _ = table(Clock())
    manners = Manners(concurrency=1, failure_limit=3, backoff=60.0,
                      max_backoff=60.0)
    destinations.try_enter("hop", "dest.test", manners)
    served: list[str] = []

    def finish() -> None:
        admission = destinations.try_enter("hop", "dest.test", manners)
        served.append(admission.kind)
        destinations.leave("hop", "dest.test", Outcome(WORKED), manners)

    for _ in range(5000):
        destinations.when_free("hop", finish)

    destinations.leave("hop", "dest.test", Outcome(WORKED), manners)

    assert served == [GO] * 5000
    assert destinations.in_flight("hop") == 0


# --- the deliverer: no lookup, no connection while suspended -------------------


class Dead:
    """A next hop whose one host refuses every connection."""

    def __init__(self) -> None:
        self.lookups = 0
        self.sessions = 0

    def resolve(self, next_hop: Any) -> Deferred[list[Target]]:
        self.lookups += 1
        return succeed([TARGET])

    def session(self, target: Target, transaction: Any,
                settings: Any) -> Deferred[SessionResult]:
        self.sessions += 1
        failure = SessionFailure("connect", None, REFUSED.error)
        return succeed(SessionResult(target, failure=failure))


def test_the_deliverer_stops_connecting_after_the_limit(tmp_path: Path) -> None:
    (tmp_path / "mta.yaml").write_text("""
spool: spool
tls: {certificate: relay.crt, private_key: relay.key}
listeners: [{name: mx, address: 127.0.0.1, port: 2525, role: inbound}]
delivery: {destination_failure_limit: 2, destination_backoff: 1m}
""")
    config = load_config(tmp_path / "mta.yaml", check_tls=False)
    dead, clock = Dead(), Clock()
    deliverer = Deliverer(config, SSL.Context(SSL.TLS_METHOD), dead.resolve,
                          dead.session, clock=clock,
                          destinations=Destinations(clock, None))
    body = tmp_path / "body.msg"
    body.write_bytes(b"Subject: x\r\n\r\nhi\r\n")
    envelope = Envelope("0123456789ABCDEF0", "alice@org.test", NOW, 20,
                        Client("client.test", "client.test", "127.0.0.1",
                               "submission"),
                        (Recipient("bob@dest.test"),))
    group = group_recipients(config, ["bob@dest.test"])[0]

    def attempt() -> Any:
        results: list[Any] = []
        Deferred.fromCoroutine(deliverer.deliver(envelope, group, body,
                                             deliverer.admit(group))
                               ).addCallback(results.append)
        return results[0].attempts["bob@dest.test"]

    tried = [attempt(), attempt()]
    not_tried = attempt()

    assert (dead.lookups, dead.sessions) == (2, 2)
    assert [a.reply for a in tried] == [REFUSED.error] * 2
    assert not_tried.status == "deferred" and not_tried.dsn == "4.4.1"
    assert not_tried.relay is None and not not_tried.connected
    assert not_tried.reply.startswith(
        "destination dest.test is not responding (2 failures in a row; last "
        f"error: {REFUSED.error}); not tried, destination suspended until ")

    clock.now += 60
    attempt()
    assert (dead.lookups, dead.sessions) == (3, 3)


# --- the settings -------------------------------------------------------------


def config_with(tmp_path: Path, delivery: str) -> Any:
    (tmp_path / "mta.yaml").write_text(f"""
spool: spool
tls: {{certificate: relay.crt, private_key: relay.key}}
listeners: [{{name: mx, address: 127.0.0.1, port: 2525, role: inbound}}]
delivery: {delivery}
""")
    return load_config(tmp_path / "mta.yaml", check_tls=False)


def test_manners_by_default_follow_the_retry_schedule(tmp_path: Path) -> None:
    # [1m, 5m, 15m, 1h, 4h]: from its first step to its last, at most 1h.
    config = config_with(tmp_path, "{}")
    assert Manners.of(config.delivery) == Manners(20, 3, 60.0, 3600.0)
    assert config.delivery.concurrency == 20

    config = config_with(tmp_path, "{retry_schedule: [1s, 10s, 30s]}")
    assert Manners.of(config.delivery) == Manners(20, 3, 1.0, 30.0)


def test_manners_from_the_configuration(tmp_path: Path) -> None:
    config = config_with(tmp_path, (
        "{destination_concurrency: 5, destination_failure_limit: 1, "
        "destination_backoff: 2m, destination_max_backoff: 2h}"))
    assert Manners.of(config.delivery) == Manners(5, 1, 120.0, 7200.0)


def test_a_long_first_suspension_raises_the_default_cap(tmp_path: Path) -> None:
    config = config_with(tmp_path, "{destination_backoff: 2h}")
    assert Manners.of(config.delivery).max_backoff == 7200.0
    config = config_with(tmp_path, "{retry_schedule: [1s]}")
    assert Manners.of(config.delivery) == Manners(20, 3, 1.0, 1.0)
