"""What `mta queue` does to the spool: select messages, and flush, hold,
release or delete them, safely beside a running queue runner.

Rules (the spool's locking contract, mta/spool.py):

- Every change is made holding the message's lock, the one the queue
  runner holds while it delivers.  The envelope is read again once the
  lock is ours, changed, and written back whole (`Spool.save`: temporary
  file, fsync, rename), so neither side ever overwrites the other's news.
- The lock is waited for a bounded time, then the message is reported as
  being delivered: an operator's command never hangs on a slow server.
- The running relay acts on what changed at its next spool scan
  (`mta.queue.SCAN_INTERVAL`): a flushed or released message goes out
  then, a held one is left alone from then on, a deleted one is gone.

The decisions (which messages a filter selects, what each operation does
to an envelope) are pure functions; `apply` adds the lock and the files.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from mta.envelope import (
    DEFERRED,
    DELIVERED,
    FAILED,
    PENDING,
    Envelope,
    is_queue_id,
)
from mta.spool import Locked, MessageLock, Spool, SpoolError

# A pseudo-state for `--state`: the message is on hold.
HOLD = "hold"
STATES = (PENDING, DEFERRED, DELIVERED, FAILED, HOLD)

# Every message, as postsuper's "ALL"; no queue id can be spelled so.
ALL = "ALL"

LOCK_POLL = 0.05
DEFAULT_WAIT = 10.0

# Outcome statuses.
DONE = "done"  # the envelope was changed (or the message deleted)
UNCHANGED = "unchanged"  # nothing to do: already so
REFUSED = "refused"  # the operation does not apply (flush of a held message)
BUSY = "busy"  # still locked by another process after the wait
UNKNOWN = "unknown"  # no such message
INVALID = "invalid"  # not a queue id
UNREADABLE = "unreadable"  # the envelope cannot be read
FAILED_IO = "error"  # the spool refused (permissions, a full disk)
OK_STATUSES = (DONE, UNCHANGED)


# --- selecting messages ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """`--state` and `--domain` filters: a message is selected when one of
    its recipients passes every filter given (``hold`` is the message's)."""

    states: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()

    @classmethod
    def of(cls, states: list[str] | None, domains: list[str] | None) -> Selection:
        return cls(
            frozenset(states or ()),
            frozenset(domain.lower().lstrip("@") for domain in domains or ()),
        )

    @property
    def is_everything(self) -> bool:
        return not self.states and not self.domains


def selects(selection: Selection, envelope: Envelope) -> bool:
    return _selects(selection, envelope.hold,
                    [(recipient.state, recipient.address)
                     for recipient in envelope.recipients])


def selects_checked(selection: Selection, raw: dict[str, Any]) -> bool:
    """`selects` for an envelope's checked JSON form
    (`mta.spool.Spool.scan_checked`), with no `Envelope` made."""
    return _selects(selection, raw["hold"],
                    [(recipient["state"], recipient["address"])
                     for recipient in raw["recipients"]])


def _selects(selection: Selection, hold: bool,
             recipients: list[tuple[str, str]]) -> bool:
    # recipients: (state, address) of each.
    held = HOLD in selection.states and hold
    return any(
        (held or not selection.states or state in selection.states)
        and (not selection.domains or _domain(address) in selection.domains)
        for state, address in recipients
    )


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def normal_queue_id(text: str) -> str | None:
    """The queue id as the spool names it (ids are upper-case hex; a
    lower-case paste is accepted), or None: anything else, a path above
    all, must never reach a file name."""
    candidate = text.strip().upper()
    return candidate if is_queue_id(candidate) else None


# --- what each operation does to an envelope ----------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """What an operation makes of an envelope: a new one to save (or None:
    nothing to save), the outcome status and the words for the operator."""

    envelope: Envelope | None
    status: str
    detail: str


def flush(envelope: Envelope, now: float) -> Change:
    # As postqueue -f: held messages stay held; releasing is its own step.
    if envelope.hold:
        return Change(None, REFUSED, "on hold, not flushed "
                      "(mta queue release it first)")
    due = [recipient for recipient in envelope.recipients
           if not recipient.is_final]
    if not due:
        return Change(None, UNCHANGED, "no recipient left to retry")
    recipients = tuple(
        recipient if recipient.is_final
        else replace(recipient, next_attempt=now)
        for recipient in envelope.recipients
    )
    return Change(replace(envelope, recipients=recipients), DONE,
                  f"flushed: {len(due)} recipient(s) due now")


def hold(envelope: Envelope, now: float) -> Change:
    if envelope.hold:
        return Change(None, UNCHANGED, "already on hold")
    return Change(replace(envelope, hold=True), DONE, "on hold")


def release(envelope: Envelope, now: float) -> Change:
    # The schedule is left as it is: a message whose next attempt has
    # passed (the usual case after a hold) goes at once; `flush` for the
    # others, as postsuper -H then postqueue -i.
    if not envelope.hold:
        return Change(None, UNCHANGED, "not on hold")
    return Change(replace(envelope, hold=False), DONE, "released")


OPERATIONS: dict[str, Callable[[Envelope, float], Change]] = {
    "flush": flush, "hold": hold, "release": release,
}


def wanted_by_all(operation: str, envelope: Envelope) -> bool:
    """Whether ``ALL`` (or a bare ``flush``) includes this message: only
    those the operation would change, so "ALL" reports no noise."""
    if operation == "delete":
        return True
    return OPERATIONS[operation](envelope, 0.0).status == DONE


# --- acting on the spool -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    queue_id: str
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


@dataclass(slots=True)
class Operations:
    """Applies operations to a spool; ``wait`` is how long a locked
    message is waited for, in seconds."""

    spool: Spool
    wait: float = DEFAULT_WAIT
    clock: Callable[[], float] = time.time
    timer: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    selection: Selection = field(default_factory=Selection)

    def apply(self, operation: str, text: str) -> Outcome:
        queue_id = normal_queue_id(text)
        if queue_id is None:
            return Outcome(text, INVALID, "not a queue id")
        try:
            return self._apply(operation, queue_id)
        except OSError as error:
            # A failed save leaves the old envelope whole (Spool.save).
            return Outcome(queue_id, FAILED_IO, f"unchanged: {error}")

    def _apply(self, operation: str, queue_id: str) -> Outcome:
        try:
            lock = self._lock(queue_id)
        except Locked:
            return Outcome(queue_id, BUSY, "being delivered; try again")
        except FileNotFoundError:
            return self._without_message_file(operation, queue_id)
        with lock:
            # Delete needs no envelope (an unreadable one goes too), unless
            # a filter must be checked against it.
            if operation == "delete" and self.selection.is_everything:
                return self._delete(queue_id)
            return self._change(operation, queue_id)

    def _lock(self, queue_id: str) -> MessageLock:
        deadline = self.timer() + self.wait
        while True:
            try:
                return self.spool.lock(queue_id)
            except Locked:
                if self.timer() >= deadline:
                    raise
                self.sleep(LOCK_POLL)

    def _change(self, operation: str, queue_id: str) -> Outcome:
        try:
            envelope = self.spool.load(queue_id)
        except FileNotFoundError:
            return self._unknown(queue_id)
        except SpoolError as error:
            return Outcome(queue_id, UNREADABLE, str(error))
        # ALL was chosen from a scan without locks: check again now.
        if not selects(self.selection, envelope):
            return Outcome(queue_id, UNCHANGED, "no longer selected")
        if operation == "delete":
            return self._delete(queue_id)

        change = OPERATIONS[operation](envelope, self.clock())
        if change.envelope is not None:
            self.spool.save(change.envelope)
        return Outcome(queue_id, change.status, change.detail)

    def _delete(self, queue_id: str) -> Outcome:
        self.spool.remove(queue_id)
        return Outcome(queue_id, DONE, "deleted")

    def _without_message_file(self, operation: str, queue_id: str) -> Outcome:
        # An envelope whose message file is gone can be neither locked nor
        # delivered (the queue runner quarantines it); delete may remove it.
        if not self.spool.envelope_path(queue_id).exists():
            return self._unknown(queue_id)
        if operation == "delete":
            return self._delete(queue_id)
        return Outcome(queue_id, UNREADABLE, "message file is missing")

    def _unknown(self, queue_id: str) -> Outcome:
        return Outcome(queue_id, UNKNOWN, f"no such message in {self.spool.queue}")

    def apply_to_all(self, operation: str) -> tuple[list[Outcome], int]:
        """The operation on every message it would change and the
        selection takes; also how many selected messages it leaves alone
        (held ones for flush, say)."""
        envelopes, _ = self.spool.scan()
        chosen = [envelope for envelope in envelopes
                  if selects(self.selection, envelope)]
        wanted = [envelope.queue_id for envelope in chosen
                  if wanted_by_all(operation, envelope)]
        outcomes = [self.apply(operation, queue_id) for queue_id in wanted]
        return outcomes, len(chosen) - len(wanted)


# --- the spool's owner -----------------------------------------------------------


def act_as_spool_owner(spool: Spool) -> None:
    """When run as root on a spool that belongs to another user (the relay
    drops to it with twistd -u/-g), become that user: an envelope rewritten
    by root would be owned by root, 0600, and unreadable to the relay."""
    if os.geteuid() != 0:
        return
    try:
        owner = spool.queue.stat()
    except FileNotFoundError:
        return  # no spool yet: nothing to change either
    if owner.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)
