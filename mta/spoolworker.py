"""The spool's blocking work, done in batches by one thread of its own.

Committing a received message and removing a delivered one both end in an
fsync of the queue folder, and both would cost a hand-off to a thread and
back for each message.  Here the reactor thread only queues the work; one
thread takes everything queued so far, does the file work of each item,
then one fsync of the folder for the whole batch, and hands every result
back to the reactor in one call.  Under load a batch holds the messages of
many clients, so the folder fsync, the thread hand-offs and the contention
for Python's interpreter lock that comes with each are paid once per batch,
not once per message (Postfix's cleanup and qmgr are processes and pay no
such toll; this is the nearest a Python process gets).

Durability is unchanged (SPEC.md section 6): a commit's result is given
back only once its files are fsync'd, renamed into place and the folder
fsync'd after the last rename; a removal is given back once its unlinks
are fsync'd too.  A folder fsync that fails fails every item of its batch:
commits are undone (their clients are told to send again), removals are
reported as errors (the queue runner saves the envelope instead).

A removal is in no hurry (nobody waits for it: the message is gone for
every reader once unlinked, and its lock is held until the unlink is
durable), so it waits for the next commit's folder fsync, which covers it
too, for at most `REMOVAL_WAIT`.  While mail comes in, removals cost no
fsync of their own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.envelope import Envelope
from mta.spool import MessageLock, MessageWriter, Spool

_log = Logger(namespace="mta.spoolworker")

# How long a removal may wait for a commit's folder fsync to share.
REMOVAL_WAIT = 0.05


@dataclass(slots=True)
class _Commit:
    urgent = True  # a client waits for its 250

    writer: MessageWriter
    envelope: Envelope
    done: Deferred[MessageLock | None]
    keep_lock: bool
    lock: MessageLock | None = None

    def run(self) -> None:
        self.lock = self.writer.prepare(self.envelope, self.keep_lock)

    def failed(self) -> None:
        """Undo, in the spool thread: nothing of the message is left."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.writer.undo()

    def result(self) -> MessageLock | None:
        return self.lock


@dataclass(slots=True)
class _Removal:
    urgent = False  # see the module's docstring: it may wait for a commit

    spool: Spool
    queue_id: str
    lock: MessageLock | None
    done: Deferred[None]

    def run(self) -> None:
        self.spool.unlink(self.queue_id)

    def failed(self) -> None:
        pass  # the caller keeps the lock and decides

    def result(self) -> None:
        # Once the removal is durable: nobody can take the message up now.
        if self.lock is not None:
            self.lock.release()


@dataclass(slots=True)
class _Batch:
    items: list[Any] = field(default_factory=list)
    outcomes: list[tuple[Any, object]] = field(default_factory=list)


def _caught() -> Failure:
    """The exception being handled, as a Failure."""
    return Failure()  # type: ignore[no-untyped-call]


class SpoolWorker:
    """Commits and removals for one spool, done by one thread in batches.
    `start` before use; `stop` once nothing more is asked (it waits for
    the batch under way).  The thread is ours rather than one of Twisted's
    pool: the hand-off is one condition to signal, and only when the
    thread waits for work."""

    def __init__(self, reactor: Any, spool: Spool) -> None:
        self._reactor = reactor
        self._spool = spool
        self._changed = threading.Condition()
        self._queued: list[Any] = []
        self._waiting = False  # the thread waits for work
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def _running(self) -> bool:
        return self._thread is not None and not self._stopping

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="mta-spool",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Wait for the work asked so far; later work is done at once, on
        the caller's thread."""
        if self._thread is None:
            return
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join()

    # --- asked on the reactor thread -------------------------------------

    def commit(
        self, writer: MessageWriter, envelope: Envelope, keep_lock: bool = False
    ) -> Deferred[MessageLock | None]:
        """`MessageWriter.commit`, batched; with ``keep_lock`` the result is
        the message's lock, taken before it appears in the queue."""
        done: Deferred[MessageLock | None] = Deferred()
        self._queue(_Commit(writer, envelope, done, keep_lock))
        return done

    def remove(self, queue_id: str, lock: MessageLock | None = None) -> Deferred[None]:
        """`Spool.remove`, batched: the lock is released once the removal
        is durable."""
        done: Deferred[None] = Deferred()
        self._queue(_Removal(self._spool, queue_id, lock, done))
        return done

    def _queue(self, item: Any) -> None:
        if not self._running:
            # Not started, or stopped: blocking, but nothing is lost.
            self._finished(self._run([item], [], sync_now=True))
            return
        with self._changed:
            self._queued.append(item)
            if self._waiting:
                self._changed.notify()
            # Else the thread is at work, and takes it with the next batch.

    # --- in the spool thread ----------------------------------------------

    def _work(self) -> None:
        unsynced: list[Any] = []  # removals done, waiting for an fsync
        since = 0.0  # when the first of them began to wait
        while True:
            with self._changed:
                items, stopping = self._next_items(unsynced, since)
            if not items and not unsynced and stopping:
                return  # stopping, and nothing left
            try:
                waited_enough = (bool(unsynced)
                                 and time.monotonic() - since >= REMOVAL_WAIT)
                batch = self._run(items, unsynced,
                                  sync_now=stopping or waited_enough)
                if not unsynced and batch.items:
                    since = time.monotonic()  # removals begin to wait
                unsynced = batch.items
                if batch.outcomes:
                    self._reactor.callFromThread(self._finished, batch)
            except BaseException:
                # `_run` gives every item an outcome; this is a bug, and
                # the thread must live on for the next batch.
                unsynced = []
                _log.failure("spool work failed")

    def _next_items(
        self, unsynced: list[Any], since: float
    ) -> tuple[list[Any], bool]:
        """What is queued, once there is some, or once removals that wait
        have waited `REMOVAL_WAIT` (called holding ``_changed``)."""
        while not self._queued and not self._stopping:
            timeout = None
            if unsynced:
                timeout = since + REMOVAL_WAIT - time.monotonic()
                if timeout <= 0:
                    break
            self._waiting = True
            self._changed.wait(timeout)
            self._waiting = False
        items, self._queued = self._queued, []
        return items, self._stopping

    def _run(self, items: list[Any], waiting: list[Any], sync_now: bool) -> _Batch:
        """Do ``items``; fsync the folder for them and for the removals
        ``waiting`` when a commit needs it or ``sync_now``.  Without the
        fsync the removals done are the batch's ``items``, still waiting,
        and have no outcome yet."""
        batch = _Batch(items=list(waiting))
        for item in items:
            try:
                item.run()
            except BaseException:
                batch.outcomes.append((item, _caught()))
                item.failed()
                continue
            batch.items.append(item)
        if not batch.items:
            return batch
        if not sync_now and not any(item.urgent for item in batch.items):
            return batch
        try:
            self._spool.queue_sync.sync()
        except BaseException:
            failure = _caught()
            for item in batch.items:
                item.failed()
                batch.outcomes.append((item, failure))
            batch.items = []
            return batch
        for item in batch.items:
            batch.outcomes.append((item, item.result()))
        batch.items = []
        return batch

    # --- back on the reactor thread -----------------------------------------

    def _finished(self, batch: _Batch) -> None:
        for item, outcome in batch.outcomes:
            if isinstance(outcome, Failure):
                item.done.errback(outcome)
            else:
                item.done.callback(outcome)
