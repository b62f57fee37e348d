"""Failed logins slow a client down (issue 5, item 2).

The rules, pure:

- the n-th failed login from one client address waits
  ``limits.auth_failure_delay * 2**(n-1)`` before its 535, at most
  ``limits.auth_failure_max_delay`` (Postfix sleeps a fixed
  ``smtpd_error_sleep_time``; doubling makes guessing dearer still);
- after ``limits.auth_failure_limit`` failures in one session the client is
  told 421 and disconnected (Postfix's ``smtpd_hard_error_limit``, for
  logins only).

The count per address outlives a connection, so reconnecting does not
start afresh; it is kept in memory (`FailureTable`), forgotten
`FORGET_AFTER` seconds after the address's last failure or at its first
success, and for at most `MAX_CLIENTS` addresses, the oldest dropped first.
A restart forgets it, as it forgets suspended destinations.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from mta.config import Limits

FORGET_AFTER = 900.0
MAX_CLIENTS = 10_000


def failure_delay(failures: int, limits: Limits) -> float:
    """Seconds to wait before answering the ``failures``-th failed login
    of an address (1 for its first)."""
    if limits.auth_failure_delay <= 0 or failures < 1:
        return 0.0
    # The exponent is bounded, so a long run of failures cannot overflow.
    doubled = limits.auth_failure_delay * 2.0 ** min(failures - 1, 32)
    return min(doubled, limits.auth_failure_max_delay)


def session_closes(session_failures: int, limits: Limits) -> bool:
    """Whether this failure is the one that ends the session."""
    return session_failures >= limits.auth_failure_limit


class FailureTable:
    """Recent failed logins per client address."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock  # IReactorTime
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def record(self, address: str) -> int:
        """Count a failure of ``address``; its failures so far, this one
        included."""
        now: float = self.clock.seconds()
        self._forget_old(now)
        count, _ = self._failures.pop(address, (0, now))
        self._failures[address] = (count + 1, now)
        while len(self._failures) > MAX_CLIENTS:
            self._failures.popitem(last=False)
        return count + 1

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def count(self, address: str) -> int:
        self._forget_old(self.clock.seconds())
        return self._failures.get(address, (0, 0.0))[0]

    def _forget_old(self, now: float) -> None:
        # The oldest last failure is first: stop at the first recent one.
        while self._failures:
            address, (_, last) = next(iter(self._failures.items()))
            if now - last < FORGET_AFTER:
                return
            del self._failures[address]
