"""Manners toward destinations: how many sessions one next hop gets at
once, and when one that keeps failing is left alone for a while.

A destination is a next hop (`mta.nexthop.NextHop`): a domain's MX hosts,
or the hosts of a route or a ``relay_to``.  The rules:

- A healthy destination has at most ``destination_concurrency``
  deliveries (so SMTP sessions) at once (Postfix's
  ``default_destination_concurrency_limit``).  A delivery that finds no free
  turn does not wait for one: the queue runner sets its message aside
  (`Destinations.when_free`) and takes it up again when a turn frees, so a
  slow destination never holds the places of mail for others.
- Each delivery ends in one of three ways for this table.  It *worked*
  when some host got as far as the recipients (a transaction happened,
  whatever it said).  It *failed* when the servers could not be found for
  now (DNS SERVFAIL, a time-out) or every host failed before the
  transaction at the connection level: connect, greeting, EHLO/HELO,
  without a permanent reply.  Anything else (a TLS policy refused every
  host, a host refused us for good, the domain does not exist) says
  nothing about whether the destination is up, and changes nothing.
- After one failure a destination is *failing*: one delivery at a time
  probes it, and the deliveries that come while a probe is under way wait
  for its end, set aside like any that finds no free turn (so a dead
  destination whose connections hang ties up one delivery place, not the
  queue runner).  A probe that works wakes them as turns allow; one that
  fails wakes them all, and the next probes or, once the destination is
  suspended, they are deferred at once.  Waiting is not an attempt: a
  message is not pushed along its retry schedule for a probe it had no
  part in (Postfix's queue manager, too, keeps such mail in memory).
- After ``destination_failure_limit`` failures in a row it is
  *suspended* for ``destination_backoff``; each further suspension (the
  probe after one has ended failed again) lasts twice as long as the one
  before, at most ``destination_max_backoff``.  While suspended, its
  recipients are deferred at once, with the last error, without a lookup
  or a connection.  Their next attempt follows the retry schedule, as for
  any deferral.  This is Postfix's "dead destination", much simplified.
- One delivery that worked clears it all.

The decisions (`after_failure`, `admit`...) are pure functions of the
state, the settings and the time; `Destinations` keeps the state of each
next hop in memory (it is lost on restart, as Postfix's is) and hands out
the turns.  It does no I/O: the clock is passed in.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Hashable

from mta.clientsession import SessionResult
from mta.config import Delivery
from mta.logs import log_event
from mta.nexthop import MX, NextHop
from mta.reply import Reply

# What a delivery said about its destination.
WORKED = "worked"
FAILED = "failed"
NEUTRAL = "neutral"

# What a delivery about to start may do.
GO = "go"
WAIT = "wait"
DEFER = "defer"

# Failing at these stages, without a 5xx, is "not responding".
CONNECTION_STAGES = ("connect", "greeting", "EHLO", "HELO")


@dataclass(frozen=True, slots=True)
class Manners:
    """The settings, from ``delivery``."""

    concurrency: int = 20
    failure_limit: int = 3
    backoff: float = 60.0
    max_backoff: float = 3600.0

    @classmethod
    def of(cls, delivery: Delivery) -> Manners:
        return cls(
            delivery.destination_concurrency,
            delivery.destination_failure_limit,
            delivery.destination_backoff,
            delivery.destination_max_backoff,
        )


@dataclass(frozen=True, slots=True)
class Health:
    """What the table knows of one destination."""

    failures: int = 0  # deliveries failed in a row
    suspensions: int = 0  # suspensions since the last delivery that worked
    suspended_until: float | None = None
    last_error: str = ""
    last_dsn: str = "4.4.1"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery went for its destination; for a failure, the
    reason and status code its recipients were deferred with."""

    kind: str
    error: str = ""
    dsn: str = "4.4.1"


@dataclass(frozen=True, slots=True)
class Admission:
    kind: str  # GO, WAIT or DEFER
    reason: str = ""  # for DEFER: why the recipients were not tried
    dsn: str = ""


# --- the pure decisions ---------------------------------------------------


def destination_name(next_hop: NextHop) -> str:
    """As the log and the reasons name it: the domain looked up by MX,
    else the configured hosts."""
    if next_hop.kind == MX:
        return next_hop.hosts[0].host
    return str(next_hop)


def session_outcome(results: list[SessionResult]) -> Outcome:
    """What the sessions of one delivery (every host tried, in order) say
    about the destination."""
    if any(not result.failed_before_recipients for result in results):
        return Outcome(WORKED)
    if results and all(_not_responding_at_all(r) for r in results):
        failure = results[-1].failure
        assert failure is not None
        return Outcome(FAILED, failure.reason, _dsn(failure.stage,
                                                    failure.reply))
    return Outcome(NEUTRAL)


def _not_responding_at_all(result: SessionResult) -> bool:
    failure = result.failure
    return (failure is not None and failure.stage in CONNECTION_STAGES
            and (failure.reply is None or not failure.reply.is_permanent))


def _dsn(stage: str, reply: Reply | None) -> str:
    # As `mta.delivery` words a deferral: the server's own code when it
    # gave one, else 4.4.1 for no connection, 4.4.2 for a lost one.
    if reply is not None and reply.is_temporary:
        return reply.dsn
    return "4.4.1" if stage == "connect" else "4.4.2"


def is_suspended(health: Health, now: float) -> bool:
    until = health.suspended_until
    return until is not None and now < until


def suspension_length(suspensions: int, manners: Manners) -> float:
    """The ``suspensions``-th suspension in a row lasts twice as long as
    the one before, from ``backoff``, at most ``max_backoff``."""
    doublings = min(max(suspensions - 1, 0), 40)  # 2**40: past any cap
    return min(manners.backoff * 2**doublings, manners.max_backoff)


def after_failure(
    health: Health, outcome: Outcome, now: float, manners: Manners
) -> Health:
    failures = health.failures + 1
    health = replace(health, failures=failures, last_error=outcome.error,
                     last_dsn=outcome.dsn)
    if is_suspended(health, now) or failures < manners.failure_limit:
        # A delivery that started before the suspension adds no time to it.
        return health

    suspensions = health.suspensions + 1
    until = now + suspension_length(suspensions, manners)
    return replace(health, suspensions=suspensions, suspended_until=until)


def after(
    health: Health, outcome: Outcome, now: float, manners: Manners
) -> Health:
    if outcome.kind == WORKED:
        return Health()
    if outcome.kind == FAILED:
        return after_failure(health, outcome, now, manners)
    return health


def admit(
    health: Health, name: str, in_flight: int, now: float, manners: Manners
) -> Admission:
    """Whether a delivery to destination ``name`` may start now, while
    ``in_flight`` others are under way."""
    if is_suspended(health, now):
        assert health.suspended_until is not None
        until = _utc(health.suspended_until)
        return Admission(DEFER, f"{_not_responding(name, health)}; not "
                         f"tried, destination suspended until {until}",
                         health.last_dsn)

    if health.failures:
        # One probe at a time; the others wait for its verdict.
        return Admission(WAIT if in_flight else GO)

    return Admission(GO if in_flight < manners.concurrency else WAIT)


def _not_responding(name: str, health: Health) -> str:
    times = "failure" if health.failures == 1 else "failures"
    return (f"destination {name} is not responding ({health.failures} "
            f"{times} in a row; last error: {health.last_error})")


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def change_line(
    name: str, before: Health, after: Health, now: float
) -> tuple[str, str] | None:
    """The log level and line for a change of health worth a line: a
    suspension, and the end of a run of failures."""
    if after.suspended_until is not None and (
            after.suspended_until != before.suspended_until):
        length = after.suspended_until - now
        return "warn", (
            f"destination {name} suspended for {length:g}s until "
            f"{_utc(after.suspended_until)} after {after.failures} failures "
            f"in a row: {after.last_error}")
    if before.failures and not after.failures:
        return "info", (f"destination {name} is responding again after "
                        f"{before.failures} failures in a row")
    return None


def log_change(name: str, before: Health, after: Health, now: float) -> None:
    line = change_line(name, before, after, now)
    if line is not None:
        log_event(line[0], line[1], "destination", destination=name)


# --- the table --------------------------------------------------------------


@dataclass(slots=True)
class _Destination:
    health: Health
    in_flight: int = 0
    entries: int = 0  # turns ever taken: did a woken waiter take one?
    # Told, first come first served, when a turn frees or the health
    # changes; each at most once.
    waiting: deque[Callable[[], None]] | None = None


Notify = Callable[[str, Health, Health, float], None]


class Destinations:
    """The health and the turns of every destination with something to
    remember: an entry that is healthy and idle is dropped.

    A delivery calls `try_enter` and, if admitted (GO), `leave` once it
    knows how it went; when told WAIT, it may ask to be told when a turn
    frees (`when_free`).  ``notify(name, before, after, now)`` is told of
    each change of health (`log_change` by default)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        notify: Notify | None = log_change,
    ) -> None:
        self.clock = clock
        self.notify = notify
        self._table: dict[Hashable, _Destination] = {}
        self._waking: set[Hashable] = set()

    def health(self, key: Hashable) -> Health:
        entry = self._table.get(key)
        return entry.health if entry is not None else Health()

    def in_flight(self, key: Hashable) -> int:
        entry = self._table.get(key)
        return entry.in_flight if entry is not None else 0

    def try_enter(self, key: Hashable, name: str, manners: Manners) -> Admission:
        """GO (the turn is taken: call `leave`), DEFER (not taken, and the
        reason why) or WAIT (no free turn now)."""
        entry = self._table.setdefault(key, _Destination(Health()))
        admission = self._try(entry, name, manners)
        self._forget_if_idle(key, entry)
        return admission

    def when_free(self, key: Hashable, wake: Callable[[], None]) -> None:
        """Call ``wake`` once, when a turn of ``key`` frees or its health
        changes (then a delivery may be admitted, or deferred at once)."""
        entry = self._table.setdefault(key, _Destination(Health()))
        if entry.waiting is None:
            entry.waiting = deque()
        entry.waiting.append(wake)
        if entry.in_flight == 0:
            # No `leave` is to come that would wake it.
            self._wake(key, entry, None)

    def leave(
        self, key: Hashable, name: str, outcome: Outcome, manners: Manners
    ) -> None:
        entry = self._table[key]
        entry.in_flight -= 1
        before, now = entry.health, self.clock()
        entry.health = after(before, outcome, now, manners)
        if entry.health != before and self.notify is not None:
            self.notify(name, before, entry.health, now)
        # One waiter per free turn, or all of them once it fails: their
        # mail is deferred at once then, not kept behind a failing probe.
        self._wake(key, entry, None if entry.health.failures else manners)
        self._forget_if_idle(key, entry)

    def _try(
        self, entry: _Destination, name: str, manners: Manners
    ) -> Admission:
        admission = admit(entry.health, name, entry.in_flight, self.clock(),
                          manners)
        if admission.kind == GO:
            entry.in_flight += 1
            entry.entries += 1
        return admission

    def _wake(
        self, key: Hashable, entry: _Destination, manners: Manners | None
    ) -> None:
        """Wake waiters while turns are free (every one, without
        ``manners``).  A waiter that takes its turn while being woken
        uses it up; one that will come later counts as though it had."""
        # A waiter woken here may also take its turn and leave at once
        # (deferred, say), calling back in: the outer call serves them, so
        # the stack does not grow with the number of waiters.
        if key in self._waking:
            return
        self._waking.add(key)
        promised = 0
        try:
            while entry.waiting:
                if manners is not None and (
                        entry.in_flight + promised >= manners.concurrency):
                    break
                taken = entry.entries
                entry.waiting.popleft()()
                if entry.entries == taken:
                    promised += 1
        finally:
            self._waking.discard(key)

    def _forget_if_idle(self, key: Hashable, entry: _Destination) -> None:
        if (entry.in_flight == 0 and not entry.waiting
                and entry.health == Health()):
            self._table.pop(key, None)
