"""Receiving SMTP servers on loopback with chosen TLS behaviour.

A `Peer` is an aiosmtpd server in a thread of its own that records what
clients did to it: every connection (commands, replies, EHLO names, TLS
facts) and every message that reached the end of DATA.  Its replies can be
chosen per address through `Replies`, and the factories at the bottom build
the peers the relay's tests need: plain, TLS 1.3, TLS 1.2 only, TLS 1.0/1.1
only, no shared cipher, client cipher order, STARTTLS refused with 454,
STARTTLS answered 220 and then no handshake, STARTTLS advertised in lower
case.

What aiosmtpd does to what it receives, and so what is recorded:

- the content is the bytes between DATA and the final dot with dot-stuffing
  removed and every line ending kept as sent (CRLF, and a bare LF inside a
  line stays a bare LF);
- the null reverse-path arrives as the two characters "<>" (recorded here
  as "");
- MAIL and RCPT parameters are upper-cased ("size=10" is "SIZE=10");
- MAIL accepts SIZE, BODY and SMTPUTF8 and answers 555 to any other
  parameter; RCPT answers 555 to every parameter (no DSN);
- EHLO advertises SIZE, 8BITMIME, SMTPUTF8, STARTTLS (when it has a TLS
  context) and HELP, and AUTH LOGIN PLAIN after STARTTLS (every attempt
  fails); no PIPELINING, although pipelined commands work;
- the TLS facts come from the SSL object: the protocol in aiosmtpd's
  session.ssl["cipher"] tuple is the cipher suite's, not the connection's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from . import certs

log = logging.getLogger(__name__)

# A reply that closes the connection without answering.
DISCONNECT = "<disconnect>"

DEFAULT_HOSTNAME = "mx.peer.test"


@dataclass(frozen=True, slots=True)
class TLSFacts:
    """What a TLS handshake negotiated."""

    protocol: str  # as ssl.SSLObject.version() says it: "TLSv1.3", "TLSv1"
    cipher: str  # OpenSSL's name: "TLS_AES_256_GCM_SHA384"
    bits: int


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message that reached the end of DATA."""

    mail_from: str  # without angle brackets; "" for the null reverse-path
    rcpt_tos: tuple[str, ...]  # the accepted recipients, in order
    mail_options: tuple[str, ...]
    rcpt_options: tuple[tuple[str, ...], ...]  # one tuple per rcpt_tos entry
    content: bytes
    ehlo_name: str | None
    tls: TLSFacts | None
    client: tuple[str, int]
    reply: str  # what the peer answered to the final dot


@dataclass(slots=True)
class Connection:
    """One client connection, filled in while it lasts."""

    client: tuple[str, int]
    commands: list[str] = field(default_factory=list)  # "MAIL FROM:<a@b>"
    transcript: list[str] = field(default_factory=list)  # "C: ...", "S: ..."
    ehlo_names: list[str] = field(default_factory=list)
    tls: TLSFacts | None = None
    tls_resumed: bool = False  # the client resumed an earlier TLS session
    tls_error: str | None = None
    closed: bool = False
    ended: bool = False  # QUIT received or closed: no longer a session


@dataclass(slots=True)
class Replies:
    """Replies the peer gives instead of its own; None or absent: its own.

    Addresses are matched without regard to case.  A reply may be
    `DISCONNECT`; after a "421" reply the peer closes the connection.
    Tests may change these while the peer runs.
    """

    greeting: str | None = None  # e.g. "554 5.7.1 no" or "421 4.3.2 busy"
    mail: dict[str, str] = field(default_factory=dict)  # sender -> reply
    rcpt: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    data: str | None = None  # reply to the final dot, for every message
    data_for: dict[str, str] = field(default_factory=dict)  # by recipient
    starttls: str | None = None  # e.g. "454 4.7.0 TLS not available"
    rset: str | None = None  # e.g. DISCONNECT: a kept connection gone stale
    # What follows a scripted 220 to STARTTLS instead of a handshake:
    # "close" (hang up at once), "drop" (read the ClientHello, then hang
    # up) or "garbage" (answer it with plaintext, then hang up).
    after_starttls: str | None = None

    def for_mail(self, address: str) -> str | None:
        return _lookup(self.mail, address)

    def for_rcpt(self, address: str) -> str | None:
        return _lookup(self.rcpt, address)

    def for_data(self, recipients: tuple[str, ...]) -> str | None:
        for address in recipients:
            reply = _lookup(self.data_for, address)
            if reply is not None:
                return reply
        return self.data


def _lookup(replies: Mapping[str, str], address: str) -> str | None:
    wanted = address.lower()
    for key, reply in list(replies.items()):
        if key.lower() == wanted:
            return reply
    return None


class Peer:
    """A receiving SMTP server on (address, port) that records everything.

    Without `tls_context` STARTTLS is not offered.  `ehlo_rewrite` may
    change the EHLO reply lines ("250-STARTTLS", ...) before they are sent.
    `data_delay` seconds pass before the reply to the final dot (a slow
    server); `most_sessions` is the most sessions it had at once, a session
    lasting from the connection to its QUIT or its close (a client need not
    wait for the reply to QUIT: Postfix's smtp_skip_quit_response).
    """

    def __init__(
        self,
        address: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_context: ssl.SSLContext | None = None,
        hostname: str = DEFAULT_HOSTNAME,
        replies: Replies | None = None,
        ehlo_rewrite: Callable[[list[str]], list[str]] | None = None,
        data_size_limit: int = 10 * 1024 * 1024,
        data_delay: float = 0.0,
    ) -> None:
        self.address = address
        self.port = port
        self.tls_context = tls_context
        self.hostname = hostname
        self.replies = replies or Replies()
        self.ehlo_rewrite = ehlo_rewrite
        self.data_size_limit = data_size_limit
        self.data_delay = data_delay

        self._messages: list[ReceivedMessage] = []
        self._connections: list[Connection] = []
        self._open = 0
        self.most_sessions = 0
        self._changed = threading.Condition()
        self._controller: _Controller | None = None

    # Life cycle.

    def start(self) -> Peer:
        """Listen and serve in a thread; returns once the port answers."""
        self._controller = _Controller(self)
        self._controller.start()
        self.port = self._controller.port

        # aiosmtpd opens one connection of its own to check that the server
        # answers; it is no client's.
        with self._changed:
            self._connections.clear()
            self.most_sessions = self._open
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and join the thread."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> Peer:
        return self if self._controller is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # What was recorded.

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._changed:
            return list(self._messages)

    @property
    def connections(self) -> list[Connection]:
        with self._changed:
            return list(self._connections)

    def wait_for(self, n: int = 1, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait until `n` messages have been received; return all of them."""
        self._wait(lambda: len(self._messages) >= n, timeout, f"{n} message(s)")
        return self.messages

    def wait_for_connections(
        self, n: int = 1, timeout: float = 5.0, closed: bool = True
    ) -> list[Connection]:
        """Wait until `n` connections were made (and closed, by default)."""

        def done() -> bool:
            finished = [c for c in self._connections if c.closed or not closed]
            return len(finished) >= n

        self._wait(done, timeout, f"{n} connection(s)")
        return self.connections

    def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        with self._changed:
            if self._changed.wait_for(done, timeout):
                return
            transcripts = "\n\n".join(
                "\n".join(c.transcript) for c in self._connections
            )
        raise TimeoutError(
            f"peer {self.address}:{self.port} did not see {what} in {timeout}s;"
            f" {len(self._messages)} message(s) so far; transcripts:\n"
            f"{transcripts or '(no connection)'}"
        )

    def _record_connection(self, connection: Connection) -> None:
        with self._changed:
            self._connections.append(connection)
            self._open += 1
            self.most_sessions = max(self.most_sessions, self._open)
            self._changed.notify_all()

    def _record_end(self, connection: Connection) -> None:
        """The session is over (QUIT or close), once per connection."""
        with self._changed:
            if not connection.ended:
                connection.ended = True
                self._open -= 1
            self._changed.notify_all()

    def _record_message(self, message: ReceivedMessage) -> None:
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


class _Controller(Controller):
    def __init__(self, peer: Peer) -> None:
        super().__init__(
            _Handler(peer),
            hostname=peer.address,
            port=peer.port,
            server_hostname=peer.hostname,
            tls_context=peer.tls_context,
            data_size_limit=peer.data_size_limit,
            ready_timeout=5.0,
        )
        self.peer = peer

    def factory(self) -> SMTP:
        return _PeerSMTP(self.peer, self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # aiosmtpd connects to self.port to check the server; with port 0
        # that must be the port the kernel chose.
        server = self.server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class _Envelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.options_per_rcpt: list[tuple[str, ...]] = []


class _PeerSMTP(SMTP):
    """aiosmtpd's server, recording a `Connection` and applying `Replies`."""

    def __init__(self, peer: Peer, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.peer = peer
        self.record: Connection | None = None
        self._greeted = False
        self._refused = False
        self._smtp_methods = {
            name: self._recorded(name, method)
            for name, method in self._smtp_methods.items()
        }

    def _create_envelope(self) -> Envelope:
        return _Envelope()

    def _recorded(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        async def run(arg: str | None) -> None:
            line = name if arg is None else f"{name} {arg}"
            if self.record is not None:
                self.record.commands.append(line)
                self.record.transcript.append("C: " + line)
                if name == "QUIT":
                    self.peer._record_end(self.record)

            # RFC 5321 3.1: after a 554 greeting the server waits for QUIT
            # and answers 503 to everything else.
            if self._refused and name != "QUIT":
                await self.push("503 5.5.1 Error: no service here")
                return
            await method(arg)

        return run

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        assert self.session is not None
        if self.record is None:
            self.record = Connection(client=_client(self.session))
            self.peer._record_connection(self.record)
        else:
            # The second call is the TLS layer after STARTTLS.
            self.record.tls = tls_facts(self.session)
            ssl_object = (self.session.ssl or {}).get("ssl_object")
            self.record.tls_resumed = bool(ssl_object and ssl_object.session_reused)
            self.peer._notify()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self.record is not None and not self.record.closed:
            self.record.closed = True
            self.peer._record_end(self.record)

    async def push(self, status: Any) -> None:
        if not self._greeted:
            self._greeted = True
            greeting = self.peer.replies.greeting
            if greeting is not None:
                status = greeting
                self._refused = not greeting.startswith("2")

        text = status.decode() if isinstance(status, bytes) else status
        if self.record is not None:
            self.record.transcript.extend("S: " + line for line in text.splitlines())
        if text == DISCONNECT:
            self._close()
            return

        await super().push(status)
        if text.startswith("421"):
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def smtp_RSET(self, arg: str) -> None:
        reply = self.peer.replies.rset
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_RSET(arg)

    async def _betray(self, how: str | None) -> None:
        """After a 220 to STARTTLS, anything but a TLS handshake."""
        if how in ("drop", "garbage"):
            await self._reader.read(5)  # a TLS record header, at least
        if how == "garbage" and self.transport is not None:
            self.transport.write(b"250 2.0.0 no TLS here, carry on\r\n")
        if self.record is not None:
            self.record.tls_error = f"STARTTLS betrayed: {how}"
        self._close()

    async def smtp_STARTTLS(self, arg: str) -> None:
        reply = self.peer.replies.starttls
        if reply is not None and not arg:
            await self.push(reply)
            if reply.startswith("220"):
                await self._betray(self.peer.replies.after_starttls)
            return

        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as error:
            if self.record is not None:
                self.record.tls_error = repr(error.__cause__)
                self.peer._notify()
            raise


class _Handler:
    """aiosmtpd hooks: EHLO names, per-address replies, the message record."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    async def handle_exception(self, error: Exception) -> str:
        # A failed TLS handshake is an outcome tests look for (recorded as
        # Connection.tls_error), not a fault of the peer: no traceback.
        if not isinstance(error, TLSSetupException):
            log.error("SMTP peer error", exc_info=error)
        return f"500 5.3.0 Error: ({type(error).__name__}) {error}"

    async def handle_HELO(
        self, server: _PeerSMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        if server.record is not None:
            server.record.ehlo_names.append(hostname)
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self,
        server: _PeerSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if server.record is not None:
            server.record.ehlo_names.append(hostname)
        if self.peer.ehlo_rewrite is not None:
            responses = self.peer.ehlo_rewrite(list(responses))
        return responses

    async def handle_MAIL(
        self,
        server: _PeerSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        reply = self.peer.replies.for_mail(_bare(address))
        if reply is not None and not reply.startswith("2"):
            return reply

        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return reply or "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: _PeerSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        reply = self.peer.replies.for_rcpt(address)
        if reply is not None and not reply.startswith("2"):
            return reply

        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        assert isinstance(envelope, _Envelope)
        envelope.options_per_rcpt.append(tuple(options))
        return reply or "250 2.1.5 OK"

    async def handle_DATA(
        self, server: _PeerSMTP, session: Session, envelope: Envelope
    ) -> str:
        assert isinstance(envelope, _Envelope)
        assert envelope.original_content is not None
        assert envelope.mail_from is not None
        recipients = tuple(envelope.rcpt_tos)
        if self.peer.data_delay:
            await asyncio.sleep(self.peer.data_delay)
        reply = self.peer.replies.for_data(recipients) or "250 2.0.0 OK queued"

        self.peer._record_message(
            ReceivedMessage(
                mail_from=_bare(envelope.mail_from),
                rcpt_tos=recipients,
                mail_options=tuple(envelope.mail_options),
                rcpt_options=tuple(envelope.options_per_rcpt),
                content=envelope.original_content,
                ehlo_name=session.host_name,
                tls=tls_facts(session),
                client=_client(session),
                reply=reply,
            )
        )
        return reply


def _client(session: Session) -> tuple[str, int]:
    # aiosmtpd annotates Session.peer as a string; it holds the peername.
    peer: Any = session.peer
    return (str(peer[0]), int(peer[1])) if peer else ("", 0)


def _bare(address: str) -> str:
    # aiosmtpd keeps the null reverse-path as the two characters "<>".
    return "" if address == "<>" else address


def tls_facts(session: Session) -> TLSFacts | None:
    """The negotiated protocol and cipher of `session`, None if plaintext.

    The protocol comes from the connection, not from the cipher tuple: that
    names the protocol the cipher suite first appeared in ("TLSv1.0" for
    ECDHE-RSA-AES256-SHA even on a TLS 1.1 connection).
    """
    if not session.ssl:
        return None
    ssl_object = session.ssl.get("ssl_object")
    if ssl_object is None:
        return None
    name, _, bits = ssl_object.cipher()
    return TLSFacts(protocol=ssl_object.version(), cipher=name, bits=bits)


# Factories: each returns a started Peer; stop it when done.  Every one
# takes (address, port) and the keyword arguments of `tls_peer` and `Peer`.

OLD_TLS_CIPHERS = "DEFAULT:@SECLEVEL=0"
NO_SHARED_CIPHER_SUITE = "ECDHE-ECDSA-AES128-SHA"


def plain(address: str = "127.0.0.1", port: int = 0, **options: Any) -> Peer:
    """No STARTTLS offered."""
    return Peer(address, port, **options).start()


def tls_peer(
    address: str = "127.0.0.1",
    port: int = 0,
    *,
    leaf: trustme.LeafCert | None = None,
    hostname: str = DEFAULT_HOSTNAME,
    rsa: bool = False,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    server_order: bool = True,
    **options: Any,
) -> Peer:
    """A peer offering STARTTLS with these settings: the factories' base.

    The certificate is `leaf`, or one for `hostname` from the trusted CA
    (RSA if `rsa`, else ECDSA).  `ciphers` is an OpenSSL cipher string for
    TLS 1.2 and older; with `server_order` False the client's order of
    suites decides.
    """
    if leaf is None:
        key_type = certs.RSA if rsa else certs.ECDSA
        leaf = certs.issue_server_cert(hostname, key_type=key_type)
    context = certs.server_context(
        leaf, minimum=minimum, maximum=maximum, ciphers=ciphers
    )
    if not server_order:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE

    return Peer(
        address, port, tls_context=context, hostname=hostname, **options
    ).start()


def tls13(address: str = "127.0.0.1", port: int = 0, **settings: Any) -> Peer:
    """Modern TLS: 1.2 and 1.3 allowed, 1.3 negotiated with a 1.3 client."""
    return tls_peer(address, port, **settings)


def tls12_only(address: str = "127.0.0.1", port: int = 0, **settings: Any) -> Peer:
    """TLS 1.2 at most; `rsa=True` for an RSA key (RSA-only suites)."""
    return tls_peer(address, port, maximum=ssl.TLSVersion.TLSv1_2, **settings)


def tls10_only(address: str = "127.0.0.1", port: int = 0, **settings: Any) -> Peer:
    """TLS 1.0 and nothing else."""
    return _old_tls_only(ssl.TLSVersion.TLSv1, address, port, settings)


def tls11_only(address: str = "127.0.0.1", port: int = 0, **settings: Any) -> Peer:
    """TLS 1.1 and nothing else."""
    return _old_tls_only(ssl.TLSVersion.TLSv1_1, address, port, settings)


def _old_tls_only(
    version: ssl.TLSVersion, address: str, port: int, settings: dict[str, Any]
) -> Peer:
    # OpenSSL 3 refuses TLS 1.0 and 1.1 at its default security level
    # (their handshakes sign with SHA-1); level 0 lets them through.
    return tls_peer(
        address,
        port,
        minimum=version,
        maximum=version,
        ciphers=OLD_TLS_CIPHERS,
        **settings,
    )


def no_shared_cipher(
    address: str = "127.0.0.1", port: int = 0, **settings: Any
) -> Peer:
    """TLS 1.2 only, with one CBC suite: a client offering only AEAD fails.

    The key is ECDSA, as the suite's authentication requires.
    """
    return tls_peer(
        address,
        port,
        maximum=ssl.TLSVersion.TLSv1_2,
        ciphers=NO_SHARED_CIPHER_SUITE,
        **settings,
    )


def client_order(address: str = "127.0.0.1", port: int = 0, **settings: Any) -> Peer:
    """TLS 1.2 only, following the client's cipher order.

    With OP_CIPHER_SERVER_PREFERENCE cleared the server takes the first
    suite in the client's list that it supports, so the negotiated cipher
    shows which suite the client put first.
    """
    return tls_peer(
        address,
        port,
        maximum=ssl.TLSVersion.TLSv1_2,
        ciphers="ALL:@SECLEVEL=0",
        server_order=False,
        **settings,
    )


def starttls_454(
    address: str = "127.0.0.1",
    port: int = 0,
    *,
    reply: str = "454 4.7.0 TLS not available",
    **settings: Any,
) -> Peer:
    """Advertises STARTTLS, then refuses it with `reply`."""
    replies = settings.pop("replies", None) or Replies()
    replies.starttls = reply
    return tls_peer(address, port, replies=replies, **settings)


def starttls_betrayed(
    address: str = "127.0.0.1", port: int = 0, *, then: str, **settings: Any
) -> Peer:
    """Advertises STARTTLS, answers 220, and then does ``then`` instead of
    the handshake: "close", "drop" or "garbage" (see `Replies`)."""
    replies = settings.pop("replies", None) or Replies()
    replies.starttls = "220 2.0.0 Ready to start TLS"
    replies.after_starttls = then
    return tls_peer(address, port, replies=replies, **settings)


def starttls_lowercase(
    address: str = "127.0.0.1", port: int = 0, **settings: Any
) -> Peer:
    """Advertises the keyword as "starttls" (RFC 5321 2.4: case-insensitive)."""
    return tls_peer(address, port, ehlo_rewrite=_lowercase_starttls, **settings)


def _lowercase_starttls(lines: list[str]) -> list[str]:
    return [line.replace("STARTTLS", "starttls") for line in lines]
