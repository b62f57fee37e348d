"""A graceful stop (SIGTERM, or the end of ``twistd``).

twistd stops the reactor on SIGTERM and waits for `RelayService.stopService`
before it closes what is left.  The stop, in order:

1. the listening sockets close: a new client is refused at once;
2. every client connection is asked to finish: one in the middle of DATA
   (or whose message is being written to disk) gets its reply, 250 or an
   error, then ``421 4.3.2``; an idle one gets ``421 4.3.2`` now;
3. the queue runner starts no new delivery, and those under way go on;
4. after ``limits.stop_timeout`` (default 30s) whatever is still open is
   closed: a message whose client got no 250 is dropped, and the client
   sends it again; a delivery cut short was never recorded as done, so it
   is retried after the next start.

The spool stays consistent whatever the moment: a message is only in the
queue once committed, and an envelope is only replaced by a rename.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred

from mta.logs import log_event
from mta.queue import QueueRunner
from mta.smtpserver import RelayServerFactory

# After the bound, aborted connections need a reactor turn or two to close
# (and drop their half-written files): this long at most.
ABORT_GRACE = 2.0


async def stop_gracefully(
    reactor: Any,
    ports: Iterable[Any],
    factories: list[RelayServerFactory],
    queue: QueueRunner,
    timeout: float,
) -> None:
    quiet_further_stop_signals(reactor, timeout)
    # Once these fire the sockets are closed: a new client is refused.
    await DeferredList([maybeDeferred(port.stopListening) for port in ports])
    clients = sum(len(factory.connections) for factory in factories)
    deliveries = queue.delivering
    log_event("info", f"stop: listeners closed; waiting up to {timeout:g}s for "
              f"{clients} client connection(s) and {deliveries} "
              "delivery(ies) under way", "stop")

    receiving = DeferredList([factory.shut_down() for factory in factories])
    delivering = queue.stop()
    if await within(reactor, DeferredList([receiving, delivering]), timeout):
        log_event("info", "stop: done, nothing left under way", "stop")
        return

    clients = sum(len(factory.connections) for factory in factories)
    for factory in factories:
        factory.abort_all()
    await within(reactor, receiving, ABORT_GRACE)
    log_event("warn", f"stop: after {timeout:g}s, closed {clients} client "
              f"connection(s) (a message without its 250 is theirs to send "
              f"again) and left {queue.delivering} delivery(ies) (retried "
              "after the next start)", "stop")


def quiet_further_stop_signals(reactor: Any, timeout: float) -> None:
    """A second SIGTERM or SIGINT during the stop: one line instead of
    Twisted's traceback (it cannot stop a reactor that is stopping)."""

    def again(signum: int, frame: Any) -> None:
        reactor.callFromThread(
            log_event, "warn", f"stop: already stopping (at most {timeout:g}s "
            "and a moment); SIGKILL stops at once, and loses no accepted "
            "mail", "stop")

    for name in ("SIGTERM", "SIGINT"):
        try:
            signal.signal(getattr(signal, name), again)
        except (AttributeError, ValueError):
            pass  # no such signal here, or not the main thread (tests)


def within(reactor: Any, waited: Deferred[Any], seconds: float) -> Deferred[bool]:
    """True when ``waited`` fires within ``seconds``, else False then.
    ``waited`` is never cancelled: a delivery cancelled half-way would be
    taken for an internal error."""
    result: Deferred[bool] = Deferred()

    def expire() -> None:
        if not result.called:
            result.callback(False)

    timer = reactor.callLater(seconds, expire)

    def fired(_: object) -> None:
        if not result.called:
            timer.cancel()
            result.callback(True)

    waited.addBoth(fired)
    return result
