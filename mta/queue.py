"""The queue runner: picks up new and due messages from the spool and
delivers them, a bounded number at a time.

In memory it keeps a bounded schedule (`mta.schedule`): the messages due
soonest, at most `ACTIVE_LIMIT`, found by a periodic scan of the spool that
reads only each envelope file's time (`Spool.earliest_due`, in a thread),
and by `wakeup` for new mail from this process's listeners.  The spool
stays the truth, and the runner's memory does not grow with the queue.

While a message is being delivered its spool lock is held, so another
process never acts on it at the same time.  Every recipient's new state is
written to the spool (fsync'd) after each transaction, before the next one
starts: a recipient whose 250 was recorded is never sent again.

At most ``delivery.concurrency`` messages are delivered at once.  A
message whose destination has no free turn (`destination_concurrency`)
takes none of those places and holds no lock: it is set aside (parked) and
taken up again when a turn of that destination frees, so mail for a slow
destination never keeps mail for others waiting.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from mta.config import Config
from mta.delivery import Deliverer, Group, GroupResult, group_recipients
from mta.destinations import WAIT
from mta.envelope import DELIVERED, HELD_DUE, Envelope, due_time, is_queue_id
from mta.envelopesave import save_envelope
from mta.logs import log, log_accepted, log_delivery, log_event
from mta.nexthop import NextHop
from mta.notices import (
    Notice,
    discarded_line,
    is_finished,
    mark_notified,
    notified_line,
    notices_due,
)
from mta.noticewriter import write_notice
from mta.outcomes import settle
from mta.schedule import Schedule
from mta.spool import Locked, MessageLock, Spool, SpoolError
from mta.spoolworker import SpoolWorker

SCAN_INTERVAL = 10.0
# Messages the runner keeps in mind at once (Postfix's qmgr keeps 20,000);
# a scan fills half, so that new mail always finds room.
ACTIVE_LIMIT = 10_000
SCAN_BATCH = ACTIVE_LIMIT // 2
# A parked message not woken in this time is taken up by the next scan.
PARKED_AT_MOST = 60.0
# A message whose files cannot be read now is tried again after this.
RETRY_UNREADABLE = 30.0


class QueueRunner:
    def __init__(
        self,
        reactor: IReactorTime,
        spool: Spool,
        get_config: Callable[[], Config],
        get_deliverer: Callable[[], Deliverer],
        clock: Callable[[], float] = time.time,
        spool_worker: SpoolWorker | None = None,
    ) -> None:
        self.reactor = reactor
        self.spool = spool
        self.spool_worker = spool_worker
        self.get_config = get_config
        self.get_deliverer = get_deliverer
        self.clock = clock
        self._schedule = Schedule(ACTIVE_LIMIT)
        self._active: dict[str, Deferred[list[NextHop]]] = {}
        # Removals on their way to disk (`_remove`): a stop waits for them.
        self._removing: set[Deferred[None]] = set()
        self._parked: dict[str, float] = {}  # queue id -> since when
        self._timer: IDelayedCall | None = None
        self._scanner = LoopingCall(self.scan)
        self._scanner.clock = reactor
        self._stopping = False
        # The last scan found a full batch: more may be due than it took,
        # so the next scan comes as soon as these are under way, not at
        # the next interval (a backlog after an outage drains at once).
        self._backlog = False
        self._scanning = False
        # A delivery can end before `_start` returns (no free turn for its
        # destination, a lock another process holds): its end must not
        # call `_pump` from inside `_pump`, or a backlog of such messages
        # nests one call per message until Python's recursion limit.
        self._pumping = False

    # --- life cycle ----------------------------------------------------

    def start(self) -> None:
        removed = self.spool.clean_orphans()
        if removed:
            log_event("warn", f"spool: removed {len(removed)} half-written "
                      "files left by a crash", "spool-clean")
        self._scanner.start(SCAN_INTERVAL, now=True)

    def stop(self) -> Deferred[None]:
        """Stop starting deliveries; fires when those under way are done."""
        self._stopping = True
        if self._scanner.running:
            self._scanner.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        return Deferred.fromCoroutine(self._drained())

    async def _drained(self) -> None:
        # Deliveries under way end in removals; wait for those too, so
        # that each message removed is logged as such before the stop.
        await DeferredList(list(self._active.values()))
        while self._removing:
            await DeferredList(list(self._removing))

    @property
    def delivering(self) -> int:
        """How many messages are being delivered now."""
        return len(self._active)

    # --- scheduling ----------------------------------------------------

    def wakeup(self, queue_id: str, due: float | None = None) -> None:
        # A full schedule leaves the message to the next scan.
        self._schedule.add(queue_id, self.clock() if due is None else due)
        self._pump()

    def adopt(self, envelope: Envelope, lock: MessageLock) -> None:
        """A message this process has just committed, with the lock its
        commit kept: delivered now if there is room, from the envelope in
        hand (reading back what was just written would cost a lock, two
        stats and a parse); otherwise left to the schedule."""
        queue_id = envelope.queue_id
        limit = self.get_config().delivery.concurrency
        if (self._stopping or len(self._active) >= limit
                or queue_id in self._active):
            lock.release()
            self.wakeup(queue_id)
            return
        self._start(queue_id, (envelope, lock))

    def scan(self) -> Deferred[None]:
        # Whatever the spool holds, the scan goes on: it is what finds
        # every other message (a LoopingCall stops for good on an error).
        self._scanning = True
        scanning = threads.deferToThread(self.spool.earliest_due, SCAN_BATCH)
        scanning.addCallbacks(self._scanned, self._scan_failed)

        def done(result: object) -> object:
            self._scanning = False
            return result

        return scanning.addBoth(done)

    def _scanned(self, stamps: list[tuple[float, str]]) -> None:
        now = self.clock()
        self._backlog = len(stamps) >= SCAN_BATCH and stamps[-1][0] <= now
        for due, queue_id in stamps:
            if queue_id in self._active:
                continue
            parked = self._parked.get(queue_id)
            if parked is not None:
                if now - parked < PARKED_AT_MOST:
                    continue
                del self._parked[queue_id]  # a wake-up lost: take it up
            self._schedule.add(queue_id, due)
        self._pump()

    def _scan_failed(self, failure: Failure) -> None:
        error = failure.value
        why = error.strerror if isinstance(error, OSError) else str(error)
        log_event("error", f"spool: cannot scan {self.spool.queue}: {why}; "
                  f"retrying in {SCAN_INTERVAL:g}s", "spool-scan")

    def _quarantine(self, problem: SpoolError) -> None:
        # A name that is no queue id is shown quoted: it may hold anything.
        name = problem.queue_id
        shown = name if is_queue_id(name) else repr(name)
        try:
            self.spool.quarantine(name)
        except OSError as error:
            # Left where it is: the next scan tries again.
            log_event("error", f"{shown}: {problem}; cannot move it to "
                      f"{self.spool.corrupt}: {error}", "spool-corrupt",
                      queue_id=name)
            return
        log_event("error", f"{shown}: moved to {self.spool.corrupt}: {problem}; "
                  "it will not be delivered until an operator repairs it",
                  "spool-corrupt", queue_id=name)

    def _pump(self) -> None:
        if self._stopping or self._pumping:
            return  # the loop under way sees the place just freed
        now = self.clock()
        limit = self.get_config().delivery.concurrency
        self._pumping = True
        try:
            while len(self._active) < limit:
                queue_id = self._schedule.pop_due(now)
                if queue_id is None:
                    break
                # One under way reschedules itself when done; a parked one
                # is woken by its destination.
                if queue_id not in self._active and queue_id not in self._parked:
                    self._start(queue_id)
        finally:
            self._pumping = False
        self._arm_timer(now)
        self._scan_again_if_drained(now)

    def _scan_again_if_drained(self, now: float) -> None:
        due = self._schedule.next_due()
        if (self._backlog and not self._scanning and self._scanner.running
                and (due is None or due > now)):
            self._backlog = False
            self.scan()

    def _arm_timer(self, now: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        due = self._schedule.next_due()
        if due is not None and len(self._active) < self.get_config().delivery.concurrency:
            self._timer = self.reactor.callLater(max(0.0, due - now), self._pump)

    def _start(
        self, queue_id: str, taken: tuple[Envelope, MessageLock] | None = None
    ) -> None:
        done = Deferred.fromCoroutine(self._process(queue_id, taken))
        self._active[queue_id] = done

        def finished(result: list[NextHop] | Failure) -> None:
            del self._active[queue_id]
            if isinstance(result, Failure):
                log.failure("delivery of {queue_id} failed unexpectedly",
                            result, queue_id=queue_id)
            elif result:
                self._park(queue_id, result)
            self._pump()

        done.addBoth(finished)

    def _park(self, queue_id: str, hops: list[NextHop]) -> None:
        """Set the message aside until one of ``hops`` has a free turn."""
        self._parked[queue_id] = self.clock()

        def wake() -> None:
            if self._parked.pop(queue_id, None) is not None:
                self.wakeup(queue_id)

        destinations = self.get_deliverer().destinations
        for hop in hops:
            destinations.when_free(hop, wake)

    # --- one message ---------------------------------------------------

    async def _process(
        self, queue_id: str, taken: tuple[Envelope, MessageLock] | None
    ) -> list[NextHop]:
        """Deliver what is due of one message (``taken``: its envelope and
        lock in hand, see `adopt`); the destinations it must wait for, if
        any (see `_park`)."""
        given: Envelope | None = None
        lock: MessageLock | None
        if taken is not None:
            given, lock = taken
        else:
            lock = self._lock(queue_id)
        if lock is None:
            return []
        try:
            envelope = given if given is not None else self._load(queue_id)
            if envelope is None:
                return []
            due = due_time(envelope)
            if due > self.clock():
                self._not_due(envelope, due)
                return []
            # A done envelope here is one a crash caught between its last
            # save and its removal: only the removal is left to do.
            waiting: list[Group] = []
            if not envelope.is_done:
                envelope, waiting = await self._deliver(envelope)
            if await self._finish(envelope, waiting):
                self._remove(envelope, lock)
                lock = None  # the removal releases it, once durable
            return list(dict.fromkeys(group.next_hop for group in waiting))
        except Exception:
            log.failure("{queue_id}: internal error while delivering; the "
                        "message is put on hold", queue_id=queue_id)
            self._hold_after_error(queue_id)
            return []
        finally:
            if lock is not None:
                lock.release()

    def _lock(self, queue_id: str) -> MessageLock | None:
        try:
            return self.spool.lock(queue_id)
        except Locked:
            return None  # another process has it
        except FileNotFoundError:
            self._lost_message_file(queue_id)
        except SpoolError as error:
            self._quarantine(error)
        except OSError as error:
            self._cannot_read(queue_id, error)
        return None

    def _lost_message_file(self, queue_id: str) -> None:
        # Gone, or an envelope without its message file: the latter can
        # never be delivered, and would come up at every scan.
        if self.spool.envelope_path(queue_id).exists():
            self._quarantine(SpoolError(f"{queue_id}: message file is missing"))

    def _not_due(self, envelope: Envelope, due: float) -> None:
        """Held, or not due yet (its file's time said otherwise: a spool
        from an older version, or a change since the scan)."""
        queue_id = envelope.queue_id
        try:
            self.spool.stamp(queue_id, due)
        except OSError:
            pass  # it comes up early again; no harm
        if due != HELD_DUE:
            self._schedule.add(queue_id, due)

    def _hold_after_error(self, queue_id: str) -> None:
        # An error we did not foresee may strike again after the next
        # delivery, before its result is saved: holding the message keeps
        # it from going out again and again.  The operator releases it.
        try:
            envelope = self.spool.load(queue_id)
            self.spool.save(replace(envelope, hold=True))
        except (OSError, SpoolError):
            pass

    def _load(self, queue_id: str) -> Envelope | None:
        try:
            envelope = self.spool.load(queue_id)
            self.spool.check_message(envelope)
        except FileNotFoundError:
            return None
        except SpoolError as error:
            self._quarantine(error)
            return None
        except OSError as error:
            self._cannot_read(queue_id, error)
            return None
        return envelope

    def _cannot_read(self, queue_id: str, error: OSError) -> None:
        # Permissions, or no file descriptor left: nothing is wrong with
        # the message, so it is neither moved aside nor held.
        log_event("warn", f"{queue_id}: cannot read its spool files now: "
                  f"{error.strerror or error}; trying again in "
                  f"{RETRY_UNREADABLE:g}s", "spool-unreadable", queue_id=queue_id)
        self._schedule.add(queue_id, self.clock() + RETRY_UNREADABLE)

    async def _deliver(self, envelope: Envelope) -> tuple[Envelope, list[Group]]:
        """Deliver each group of due recipients that its destination
        admits; the groups that must wait for a turn, untouched."""
        now = self.clock()
        due = [recipient.address for recipient in envelope.recipients
               if not recipient.is_final
               and (recipient.next_attempt or 0) <= now]
        deliverer = self.get_deliverer()
        body = self.spool.message_path(envelope.queue_id)
        waiting = []

        for group in group_recipients(deliverer.config, due):
            admission = deliverer.admit(group)
            if admission.kind == WAIT:
                waiting.append(group)
                continue
            result = await deliverer.deliver(envelope, group, body, admission)
            envelope = self._record(envelope, group, result, deliverer)
            if _all_delivered(envelope):
                # Its removal (`_finish`) is the durable record, one file
                # write and two fsyncs cheaper than saving it first.
                break
            # A full disk must not cost the record of who got the mail.
            await save_envelope(self.reactor, self.spool, envelope,
                                lambda: self._stopping)
        return envelope, waiting

    def _record(
        self,
        envelope: Envelope,
        group: Group,
        result: GroupResult,
        deliverer: Deliverer,
    ) -> Envelope:
        now = self.clock()
        for address, attempt in result.attempts.items():
            recipient, attempt = settle(
                envelope.recipient(address), attempt, envelope.arrival, now,
                deliverer.config.delivery, result.not_after,
            )
            envelope = envelope.with_recipient(recipient)
            log_delivery(envelope.queue_id, address, attempt,
                         now - envelope.arrival)
        return envelope

    async def _finish(self, envelope: Envelope, waiting: list[Group]) -> bool:
        """Notices, then what comes next: True when the message is to be
        removed (`_remove`), else it is scheduled again."""
        # Bounces and delay notices first: a message leaves the spool only
        # once every recipient is final and every failure reported.
        notified = await self._send_notices(envelope)
        if notified is None:
            return False  # the next scan tries again
        envelope = notified
        if is_finished(envelope):
            return True
        # Recipients waiting for a turn are due now, but their destination
        # wakes the message (`_park`): only the others set the time.
        parked = {address for group in waiting for address in group.recipients}
        rest = tuple(recipient for recipient in envelope.recipients
                     if not recipient.is_final and recipient.address not in parked)
        due = due_time(replace(envelope, recipients=rest))
        if rest and due != HELD_DUE:
            self._schedule.add(envelope.queue_id, due)
        return False

    def _remove(self, envelope: Envelope, lock: MessageLock) -> None:
        """Remove the message, which takes its lock: released, and the
        message logged as removed, once the removal is durable.  Nothing
        waits for that (`mta.spoolworker` lets a removal share the next
        commit's fsync): the lock keeps every other reader out meanwhile,
        so the message's place is free for the next one at once."""
        queue_id = envelope.queue_id
        removing: Deferred[None]
        if self.spool_worker is not None:
            removing = self.spool_worker.remove(queue_id, lock)
        else:
            removing = threads.deferToThread(self.spool.remove, queue_id, lock)
        self._removing.add(removing)

        def removed(_: None) -> None:
            log_event("info", f"{queue_id}: removed", "removed", queue_id=queue_id)

        def not_removed(failure: Failure) -> Deferred[None]:
            return Deferred.fromCoroutine(
                self._not_removed(envelope, lock, failure))

        removing.addCallbacks(removed, not_removed)
        removing.addBoth(lambda _: self._removing.discard(removing))

    async def _not_removed(
        self, envelope: Envelope, lock: MessageLock, failure: Failure
    ) -> None:
        queue_id = envelope.queue_id
        try:
            if isinstance(failure.value, OSError):
                # The envelope on disk may predate the deliveries (see
                # `_deliver`): record them before the error holds it.
                await save_envelope(self.reactor, self.spool, envelope,
                                    lambda: self._stopping)
            log.failure("{queue_id}: internal error while removing it; the "
                        "message is put on hold", failure, queue_id=queue_id)
            self._hold_after_error(queue_id)
        finally:
            lock.release()

    async def _send_notices(self, envelope: Envelope) -> Envelope | None:
        """Write the bounces and delay notice ``envelope`` needs into the
        spool, then record that they were made; the updated envelope, or
        None when one could not be written.  The notice is committed
        before the mark is saved: a crash in between makes it twice, never
        loses it (mta.noticewriter)."""
        config = self.get_config()
        for notice in notices_due(envelope, self.clock(), config.notices):
            if not await self._make_notice(envelope, notice, config):
                return None
            envelope = mark_notified(envelope, notice)
            try:
                await threads.deferToThread(self.spool.save, envelope)
            except OSError as error:
                log_event("error", f"{envelope.queue_id}: cannot record its "
                          f"{notice.kind} notice: {error}; the notice may be "
                          "made again at the next scan", "notice-error",
                          queue_id=envelope.queue_id)
                return None
        return envelope

    async def _make_notice(
        self, envelope: Envelope, notice: Notice, config: Config
    ) -> bool:
        """Commit one notice to the spool and wake up for it, or log the
        one line of a notice no one may get; False if it failed."""
        queue_id = envelope.queue_id
        if notice.to is None:
            log_event("warn", discarded_line(envelope, notice),
                      "bounce-discarded", queue_id=queue_id)
            return True
        try:
            made = await threads.deferToThread(
                write_notice, self.spool, envelope, notice, config, self.clock())
        except OSError as error:
            log_event("error", f"{queue_id}: cannot write its {notice.kind} "
                      f"notice to the spool: {error}; trying again at the "
                      "next scan", "notice-error", queue_id=queue_id)
            return False
        log_accepted(made)
        log_event("info", notified_line(queue_id, notice, made.queue_id),
                  "notice", queue_id=queue_id)
        self.wakeup(made.queue_id)
        return True


def _all_delivered(envelope: Envelope) -> bool:
    return all(recipient.state == DELIVERED for recipient in envelope.recipients)

