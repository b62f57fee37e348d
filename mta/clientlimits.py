"""How much one client may take of the listener: connections and errors.

The rules are pure functions of counts and `mta.config.Limits`; the one
piece of state, `ClientConnections`, counts the open client connections of
the whole process, in memory.  Every listener shares one, so a client
cannot double its share by using another port.

- ``limits.connections``: client connections open at once, in total.  It
  protects the process (each connection in DATA holds two file
  descriptors), so it applies to every client.
- ``limits.client_connections``: connections open at once from one address
  (Postfix's smtpd_client_connection_count_limit, 50).  Clients in the
  listener's ``networks`` are exempt, as Postfix exempts ``$mynetworks``
  (smtpd_client_event_limit_exceptions): they are the organisation's own
  servers, which often send many messages at once from one address.
- ``limits.errors``: error replies in one session (Postfix's
  smtpd_hard_error_limit, 20); then 421 and the connection is closed.
"""

from __future__ import annotations

from dataclasses import dataclass

from mta.config import Limits
from mta.reply import Reply
from mta.serverreplies import too_many_connections, too_many_connections_from


@dataclass(frozen=True, slots=True)
class ConnectionRefusal:
    """Why a new connection is not taken: the reply it gets, and the
    reason for the log."""

    reply: Reply
    reason: str


def connection_refusal(
    limits: Limits,
    hostname: str,
    address: str,
    open_total: int,
    open_from_client: int,
    exempt: bool,
) -> ConnectionRefusal | None:
    """The refusal for one more connection from ``address``, or None to
    take it; the counts are of the connections already open."""
    if open_total >= limits.connections:
        return ConnectionRefusal(
            too_many_connections(hostname),
            f"{open_total} client connections are open "
            f"(limits.connections: {limits.connections})",
        )
    if not exempt and open_from_client >= limits.client_connections:
        return ConnectionRefusal(
            too_many_connections_from(hostname, address),
            f"{open_from_client} connections from {address} are open "
            f"(limits.client_connections: {limits.client_connections})",
        )
    return None


# Recipients past limits.recipients are refused 452 4.5.3 and, as RFC 5321
# 4.5.3.1.10 asks, sent again by the client in another transaction; so
# that a client which pipelines them all at once does not lose the
# transaction it has (to the 421 for too many errors), this many of those
# refusals are not counted as errors (Postfix's
# smtpd_recipient_overshoot_limit).
RECIPIENT_OVERSHOOT = 1000


def counts_as_error(reply: Reply, overshoot: int = 0) -> bool:
    """Every 4xx and 5xx reply counts, as in Postfix; a 421 ends the session
    and is not one more; ``overshoot`` is how many recipients have been
    refused as too many so far, this one included."""
    if reply.code == 452 and reply.dsn == "4.5.3":
        return overshoot > RECIPIENT_OVERSHOOT
    return reply.code >= 400 and reply.code != 421


def too_many_errors(limits: Limits, errors: int) -> bool:
    return errors >= limits.errors


class ClientConnections:
    """Open client connections by address, for every listener of the
    process."""

    def __init__(self) -> None:
        self.total = 0
        self._by_address: dict[str, int] = {}

    def open_from(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def opened(self, address: str) -> None:
        self.total += 1
        self._by_address[address] = self.open_from(address) + 1

    def closed(self, address: str) -> None:
        count = self.open_from(address)
        if count <= 0:
            return
        self.total -= 1
        if count == 1:
            del self._by_address[address]
        else:
            self._by_address[address] = count - 1
