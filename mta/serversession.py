"""One listener connection as values: what it works with, the mail
transaction it builds from MAIL to DATA, and the message being received.

The protocol in `mta.smtpserver` holds these; none of them touches a
socket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred

from mta.authfailures import FailureTable
from mta.config import Config, Listener
from mta.datadecoder import DataDecoder
from mta.envelope import Envelope
from mta.hops import HopCounter
from mta.spool import MessageLock, MessageWriter, Spool
from mta.tlsctx import ServerCreator

# Fires once the message is durable, with its lock when the committer
# kept it for a first delivery in this process (`mta.spoolworker`).
CommitMessage = Callable[[MessageWriter, Envelope], "Deferred[MessageLock | None]"]
# Told of each message once its client has the 250: the envelope, and the
# lock when the commit kept one (the callee must release or use it).
Queued = Callable[[Envelope, "MessageLock | None"], None]


@dataclass(frozen=True, slots=True)
class Transaction:
    """A mail transaction from MAIL to the end of DATA (RFC 5321 3.3)."""

    sender: str  # "" for the null reverse-path
    arrival: float
    body: str
    recipients: tuple[str, ...] = ()

    def has_recipient(self, address: str) -> bool:
        # The local part is case-sensitive (RFC 5321 2.4); the domain is not.
        wanted = _mailbox_key(address)
        return any(_mailbox_key(known) == wanted for known in self.recipients)


def _mailbox_key(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


@dataclass(slots=True)
class MessageInProgress:
    transaction: Transaction
    writer: MessageWriter
    decoder: DataDecoder
    hops: HopCounter = field(default_factory=HopCounter)


@dataclass(frozen=True, slots=True)
class Settings:
    """What one connection works with, fixed when it opens: a reload
    changes the next connection, never one in progress."""

    config: Config
    listener: Listener
    spool: Spool
    tls_creator: ServerCreator | None
    on_queued: Queued
    commit: CommitMessage
    reactor: Any  # IReactorTime
    portal: Portal | None = None  # AUTH is offered (after TLS) when set
    auth_failures: FailureTable | None = None
    implicit_tls: bool = False  # RFC 8314: TLS from the first byte
