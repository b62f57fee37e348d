"""One delivery session as values, and the pure decisions inside it.

What goes into a session (`Target`, `Transaction`, `ClientSettings`), what
comes out (`SessionResult`, `SessionFailure`, `TLSSession`), and what the
client decides without a socket: the capabilities an EHLO reply offers,
the MAIL parameters to send, a MAIL that must not be sent, and the
Postfix-like phrase for each way a session can end.  The Twisted protocol
in `mta.smtpclient` gathers the replies and acts on these answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import error as neterror

from mta.config import Timeouts
from mta.envelope import TLSFacts
from mta.reply import Reply


# Values in and out.


@dataclass(frozen=True, slots=True)
class Target:
    """The host to connect to: ``name`` for SNI and logs (the address
    itself for a literal), ``address`` the IP connected to;
    ``preference`` that of its MX record (0 for the implicit MX), None for
    a configured host.  It is no part of the host's identity."""

    name: str
    address: str
    port: int
    preference: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.name}[{self.address}]"


@dataclass(frozen=True, slots=True)
class Transaction:
    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    body_path: Path
    size: int
    body_8bit: bool


@dataclass(frozen=True, slots=True)
class TLSSession:
    """What a completed handshake showed, for the policy and the log."""

    protocol: str
    cipher: str
    bits: int
    peer_certificate: x509.Certificate | None
    verify_error: int | None
    verify_reason: str | None
    resumed: bool = False  # an abbreviated handshake: see `Resumption`

    @property
    def facts(self) -> TLSFacts:
        return TLSFacts(self.protocol, self.cipher, self.bits)


@dataclass(frozen=True, slots=True)
class Resumption:
    """A TLS session to offer again, and what the full handshake that
    made it showed: a resumed handshake sends no certificate and runs no
    chain check, so its certificate and verdict are the first one's."""

    session: SSL.Session
    first: TLSSession


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How to talk to the host.  ``starttls``: try STARTTLS when offered;
    ``require_tls``: send no MAIL unless TLS is up; ``check_tls``: a verdict
    on the handshake, a reason string aborting the session before EHLO."""

    helo: str
    tls_context: SSL.Context | None
    starttls: bool
    require_tls: bool
    timeouts: Timeouts
    check_tls: Callable[[TLSSession], str | None] | None = None
    transcript: bool = False  # log every line sent and read, at debug
    # Sessions whose settings share this key may share a connection
    # (mta.connectioncache): the policy level, the rule and the names a
    # certificate must carry.  None: never shared.
    reuse_key: Hashable | None = None
    resume: Resumption | None = None  # offered in the TLS handshake


@dataclass(frozen=True, slots=True)
class SessionFailure:
    """Why a session ended early: the stage ("connect", "greeting", "EHLO",
    "HELO", "STARTTLS", "TLS handshake", "TLS policy", "RSET", "MAIL",
    "RCPT", "DATA"), the server's reply if it gave one, and a Postfix-like
    phrase.  "RSET" is the start of a transaction on a kept connection."""

    stage: str
    reply: Reply | None
    reason: str


@dataclass(frozen=True, slots=True)
class SessionResult:
    """What one session achieved.

    ``rcpt_replies`` holds a reply per recipient the server answered;
    ``data_reply`` is the reply to the end of data, which applies to every
    recipient accepted.  ``failure`` says why the session ended early, at
    any stage; ``tls_failure`` is set when STARTTLS was refused or the
    handshake failed (what the opportunistic fallback looks at).
    """

    target: Target
    failure: SessionFailure | None = None
    starttls_offered: bool = False
    tls: TLSSession | None = None
    tls_failure: str | None = None
    rcpt_replies: dict[str, Reply] = field(default_factory=dict)
    data_reply: Reply | None = None
    connection_use: int = 1  # 2 and more: a kept connection (Postfix's conn_use)

    @property
    def stale_connection(self) -> bool:
        """A kept connection that failed before its new transaction began
        (the server closed it while it was idle): the transaction is tried
        again on a new connection, and this result is never recorded."""
        return (self.connection_use > 1 and self.failure is not None
                and self.failure.stage == "RSET")

    @property
    def failed_before_recipients(self) -> bool:
        """True when the session failed before any recipient result: the
        queue tries the next host.  False: the per-recipient replies (and
        `reply_for`) decide."""
        return self.failure is not None and not self.rcpt_replies

    def reply_for(self, recipient: str) -> Reply | None:
        """The reply that decides ``recipient``: its RCPT reply when that
        was not 2xx, else the end-of-data reply, else the reply that cut the
        session short (a 421, a refused DATA).  None: no reply, the
        connection failed (the recipient is deferred with `reason_for`)."""
        rcpt = self.rcpt_replies.get(recipient)
        if rcpt is not None and not rcpt.is_success:
            return rcpt
        if rcpt is not None and self.data_reply is not None:
            return self.data_reply
        return self.failure.reply if self.failure is not None else None

    def reason_for(self, recipient: str) -> str:
        """The phrase for the log and the bounce, as Postfix words it."""
        rcpt = self.rcpt_replies.get(recipient)
        if rcpt is not None and not rcpt.is_success:
            return said(self.target, rcpt, "RCPT TO")
        if rcpt is not None and self.data_reply is not None:
            if self.data_reply.is_success:
                return self.data_reply.line()
            return said(self.target, self.data_reply, "end of DATA")
        if self.failure is not None:
            return self.failure.reason
        return "no reply to RCPT TO"


# Pure decisions: capabilities and phrases.


@dataclass(frozen=True, slots=True)
class Capabilities:
    """EHLO keywords, upper-cased (RFC 5321 2.4: case does not matter)."""

    keywords: frozenset[str]
    size_limit: int | None = None  # SIZE's argument; 0 or None: no limit

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords

    @property
    def size(self) -> bool:
        return "SIZE" in self.keywords

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords


NO_EXTENSIONS = Capabilities(frozenset())


def parse_ehlo(lines: list[str]) -> Capabilities:
    """Capabilities from an EHLO reply's text lines, the first of which is
    the server's greeting, not a keyword."""
    keywords = set()
    size_limit = None
    for line in lines[1:]:
        words = line.split()
        if not words:
            continue
        keyword = words[0].upper()
        keywords.add(keyword)
        if keyword == "SIZE" and len(words) > 1 and words[1].isdigit():
            size_limit = int(words[1])
    return Capabilities(frozenset(keywords), size_limit)


def said(target: Target, reply: Reply, command: str | None) -> str:
    where = f" (in reply to {command} command)" if command else ""
    return f"host {target} said: {reply.line()}{where}"


def mail_parameters(caps: Capabilities, transaction: Transaction) -> str:
    """SIZE (RFC 1870) when offered, BODY=8BITMIME (RFC 6152) when needed."""
    parameters = ""
    if caps.size:
        parameters += f" SIZE={transaction.size}"
    if transaction.body_8bit and caps.eightbitmime:
        parameters += " BODY=8BITMIME"
    return parameters


def refuse_before_mail(
    caps: Capabilities, transaction: Transaction, target: Target
) -> SessionFailure | None:
    """A MAIL that must not be sent, because the server cannot take it."""
    if transaction.body_8bit and not caps.eightbitmime:
        # RFC 6152 3: a relay that cannot convert may bounce.
        reply = Reply(
            554,
            "5.6.3",
            "conversion to 7bit required but not supported; "
            "server does not offer 8BITMIME",
        )
        reason = f"{target} does not offer 8BITMIME for an 8-bit message"
        return SessionFailure("MAIL", reply, reason)

    if caps.size_limit and transaction.size > caps.size_limit:
        text = (
            f"message size {transaction.size} exceeds size limit "
            f"{caps.size_limit} of server {target}"
        )
        return SessionFailure("MAIL", Reply(552, "5.3.4", text), text)
    return None


# Each step of the session: its stage name, what we were doing (for "lost
# connection with HOST while ..."), and the command the reply answers.
STEPS = {
    "greeting": ("greeting", "receiving the initial server greeting", None),
    "EHLO": ("EHLO", "performing the EHLO handshake", "EHLO"),
    "HELO": ("HELO", "performing the HELO handshake", "HELO"),
    "STARTTLS": ("STARTTLS", "sending STARTTLS", "STARTTLS"),
    "TLS handshake": ("TLS handshake", "performing the TLS handshake", None),
    "MAIL": ("MAIL", "sending MAIL FROM", "MAIL FROM"),
    "RCPT": ("RCPT", "sending RCPT TO", "RCPT TO"),
    "DATA": ("DATA", "sending DATA command", "DATA"),
    "body": ("DATA", "sending message body", None),
    "end of data": (
        "DATA",
        "sending end of data -- message may be sent more than once",
        "end of DATA",
    ),
    "QUIT": ("QUIT", "sending QUIT", "QUIT"),
    # A connection kept from an earlier transaction (mta.connectioncache).
    "idle": ("idle", "waiting for the next message", None),
    "RSET": ("RSET", "sending RSET", "RSET"),
}


def connect_reason(target: Target, error: BaseException) -> str:
    if isinstance(error, (neterror.TimeoutError, neterror.TCPTimedOutError)):
        why = "Connection timed out"
    elif isinstance(error, neterror.ConnectError) and error.args and error.args[0]:
        why = str(error.args[0])  # strerror: "Connection refused"
    else:
        why = str(error)
    return f"connect to {target}:{target.port}: {why}"


def ssl_reason(error: BaseException) -> str:
    try:
        return ", ".join(str(entry[2]) for entry in error.args[0])
    except (IndexError, TypeError):
        return str(error)


def check_transaction(transaction: Transaction) -> None:
    """Refuse what would make a wrong command: the spool's addresses were
    checked on the way in, so this is a programming error."""
    if not transaction.recipients:
        raise ValueError("a transaction needs at least one recipient")
    for address in (transaction.sender, *transaction.recipients):
        if any(char in address for char in "\r\n<>"):
            raise ValueError(f"not a valid address for SMTP: {address!r}")


@lru_cache(maxsize=1024)
def sni_name(name: str) -> str | None:
    # RFC 6066 3: SNI carries host names only, never an address literal.
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None
