"""Saving a delivered-to envelope when the spool cannot take it (a full
disk): the queue runner keeps the new state in memory and tries again.

`Spool.save` writes a new file and renames it over the old one, so a failed
save leaves the old envelope whole.  But the new one says which recipients
got their 250: dropping it would send them the message again.  So the
runner holds the message (its lock) and retries, with a growing pause, until
the save goes through; only when the relay is stopping does it give up, and
says what that means.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import threads
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from mta.envelope import Envelope
from mta.logs import log_event
from mta.spool import Spool

FIRST_PAUSE = 1.0
LONGEST_PAUSE = 10.0  # also how long a stop may wait for a failing save


def next_pause(pause: float) -> float:
    return min(pause * 2, LONGEST_PAUSE)


async def save_envelope(
    reactor: IReactorTime,
    spool: Spool,
    envelope: Envelope,
    stopping: Callable[[], bool],
) -> bool:
    """Save ``envelope``, retrying on `OSError`; False if the relay stopped
    first (the old envelope stays in the spool)."""
    queue_id = envelope.queue_id
    pause = FIRST_PAUSE
    failures = 0
    while True:
        try:
            await threads.deferToThread(spool.save, envelope)
        except OSError as error:
            failures += 1
            if failures == 1:
                log_event(
                    "error",
                    f"{queue_id}: cannot save the envelope in {spool.queue}: "
                    f"{error}; the old one stays, the delivery results are "
                    "kept in memory and the save is retried",
                    "spool-save",
                    queue_id=queue_id,
                )
            if stopping():
                _gave_up(queue_id)
                return False
            await deferLater(reactor, pause, lambda: None)
            pause = next_pause(pause)
            continue
        if failures:
            log_event("info", f"{queue_id}: envelope saved after {failures} "
                      "failed attempts", "spool-save", queue_id=queue_id)
        return True


def _gave_up(queue_id: str) -> None:
    log_event(
        "error",
        f"{queue_id}: envelope not saved before stopping; recipients "
        "delivered since its last save may be sent again at the next start",
        "spool-save",
        queue_id=queue_id,
    )
