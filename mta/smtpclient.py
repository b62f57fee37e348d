"""The delivery client: one connection to one host, one mail transaction.

`deliver` connects, reads the greeting, says EHLO (HELO after a 5xx),
starts TLS when the settings allow and the server offers it, sends one
message to its recipients and quits.  It never retries: the queue owns
retries and the choice of the next host.  Its answer is a `SessionResult`,
a value saying how far the session got, what each recipient and the end of
data were answered, and what TLS looked like.

What this client does that Twisted's stock `ESMTPClient` does not (see
TWISTED-NOTES.md): bytes the server sends after its 220 to STARTTLS are
dropped, and only the capabilities read inside TLS count; EHLO keywords are
case-insensitive; a TLS verdict (`check_tls`) is taken when the handshake
completes, before EHLO leaves; SIZE, BODY=8BITMIME and PIPELINING are used;
the body goes through `BodyEncoder`, with the terminator in the same write
as the last body bytes; every wait has a time limit (RFC 5321 4.5.3.2).

Only the line splitting is reused from Twisted; the reply reader (bounded,
strict about codes) and the writing of commands are ours.  Each command
sent queues the handler for its reply, so pipelined commands (RFC 2920)
are answered in order with no extra state, and leave in one write.
The values a session takes and gives back, and the decisions that need no
socket, are in `mta.clientsession`; the body is sent by `mta.bodyproducer`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.bodyproducer import BodyProducer
from mta.clientsession import (
    NO_EXTENSIONS,
    STEPS,
    ClientSettings,
    Resumption,
    SessionFailure,
    SessionResult,
    Target,
    TLSSession,
    Transaction,
    check_transaction,
    connect_reason,
    mail_parameters,
    parse_ehlo,
    refuse_before_mail,
    said,
    sni_name,
    ssl_reason,
)
from mta.reply import Reply
from mta.sendnow import write_now
from mta.tlsctx import ClientCreator

_log = Logger(namespace="mta.smtpclient")

_Handler = Callable[[Reply, list[str]], None]

# A reply line: a code 2xx-5xx, then a space, a hyphen (more lines follow)
# or nothing (RFC 5321 4.2).
_REPLY_CODE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)")
# The most a reply may hold; real ones (an EHLO reply) have some twenty
# short lines.
MAX_REPLY_LINES = 100
MAX_REPLY_OCTETS = 32 * 1024


class Keeper(Protocol):
    """Who may keep a connection for a later transaction
    (mta.connectioncache)."""

    def keep(self, client: DeliveryClient) -> bool:
        """Take ``client`` as idle, or refuse it (it then says QUIT)."""

    def lost(self, client: DeliveryClient) -> None:
        """``client``'s connection is gone."""

    def resumable(self, client: DeliveryClient, resumption: Resumption) -> None:
        """``client``'s TLS session may be offered to a later connection."""


@implementer(IHandshakeListener)
class DeliveryClient(smtp.ESMTPClient):
    """One session.  Replies are matched to the commands they answer by a
    queue of handlers; `_step` names what the session is doing now."""

    debug = False  # our transcript goes to the logger at debug level

    # Twisted's __setattr__ only warns of the deprecated ``tlsMode``, never
    # set here, yet runs for every attribute set: some seventy a message.
    __setattr__ = object.__setattr__

    def __init__(
        self,
        reactor: Any,
        target: Target,
        transaction: Transaction,
        settings: ClientSettings,
        done: Deferred[SessionResult],
        keeper: Keeper | None = None,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            secret=None, contextFactory=None, identity=settings.helo
        )
        self._reactor = reactor
        self._target = target
        self._transaction = transaction
        self._settings = settings
        self._done = done
        self._keeper = keeper
        self._recipients = tuple(dict.fromkeys(transaction.recipients))
        self._uses = 1  # transactions on this connection, this one included
        self._opened = 0.0

        # (step, handler) for each reply still to come, oldest first.
        self._pending: deque[tuple[str, _Handler]] = deque()
        # Commands queued for the next write (`_queue`, `_flush`).
        self._unsent: list[bytes] = []
        # The reply being read: its code and lines so far.
        self._reply_code: bytes | None = None
        self._reply_lines: list[bytes] = []
        self._reply_size = 0
        self._step = "greeting"
        self._caps = NO_EXTENSIONS
        self._creator: ClientCreator | None = None
        self._body: BodyProducer | None = None
        self._ending = False  # QUIT once the outstanding replies are in
        self._keepable = False  # ...or keep the connection: the transaction is over
        self._closing = False  # QUIT sent or connection being closed

        self._failure: SessionFailure | None = None
        self._starttls_offered = False
        self._tls: TLSSession | None = None
        self._tls_failure: str | None = None
        self._rcpt_replies: dict[str, Reply] = {}
        self._data_reply: Reply | None = None

    # Twisted's own STARTTLS and AUTH logic is never used (TWISTED-NOTES).

    def tryTLS(self, code: int, resp: bytes, items: dict[bytes, Any]) -> None:
        raise NotImplementedError("DeliveryClient runs its own STARTTLS")

    def authenticate(self, code: int, resp: bytes, items: dict[bytes, Any]) -> None:
        raise NotImplementedError("DeliveryClient does not authenticate")

    def callLater(self, period: float, func: Callable[[], None]) -> Any:
        return self._reactor.callLater(period, func)

    @property
    def _wire(self) -> Any:
        # The TCP transport, TLS once started; Twisted's `ITransport` lacks
        # startTLS, getHandle and abortConnection, so it is typed loosely.
        return self.transport

    def _limit(self, seconds: float | None) -> None:
        """Time allowed for the next reply (or body progress)."""
        self.setTimeout(seconds)  # type: ignore[no-untyped-call]

    # Connection events.

    def connectionMade(self) -> None:
        self._opened = self._reactor.seconds()
        # Nagle would hold a short command (or the terminator) for the
        # peer's delayed ACK.
        self._wire.setTcpNoDelay(True)
        self._limit(self._settings.timeouts.command)
        self._pending.append(("greeting", self._on_greeting))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._limit(None)
        if self._keeper is not None:
            self._keeper.lost(self)
        if self._body is not None:
            self._body.stopProducing()
        if not self._closing:
            self._record_loss(reason)
        self._settle()

    def _record_loss(self, reason: Failure) -> None:
        _, doing, _ = STEPS[self._step]
        text = f"lost connection with {self._target} while {doing}"
        if self._step == "TLS handshake":
            if isinstance(reason.value, SSL.Error):
                text += f": {ssl_reason(reason.value)}"
            self._tls_failure = text
        self._fail(text)

    def timeoutConnection(self) -> None:
        if not self._closing:
            _, doing, _ = STEPS[self._step]
            text = f"conversation with {self._target} timed out while {doing}"
            if self._step == "TLS handshake":
                self._tls_failure = text
            self._fail(text)
            self._closing = True
        self._wire.abortConnection()

    def sendError(self, exc: BaseException) -> None:
        # Twisted's own reply reader is not used (see `lineReceived`).
        self._malformed("")

    def _malformed(self, what: str) -> None:
        _, doing, _ = STEPS[self._step]
        self._fail(f"malformed reply from {self._target}{what} while {doing}")
        self._abort()

    # Replies.

    def lineReceived(self, line: bytes) -> None:
        """Gather a reply's lines; dispatch it once its last line is in.

        Unlike Twisted's reader, a reply is malformed unless every line
        starts with the same 2xx-5xx code (RFC 5321 4.2), and it is
        bounded in lines and octets: a server that sends a reply without
        end is cut off instead of filling memory.  The time limit runs
        from the command to the end of its reply, not from line to line.
        """
        if self._settings.transcript:
            _log.debug("{target} S: {line!r}", target=str(self._target), line=line)
        code = _REPLY_CODE.match(line)
        if code is None or (self._reply_code not in (None, code.group(1))):
            self._malformed("")
            return
        self._reply_code = code.group(1)
        self._reply_lines.append(line[4:])
        self._reply_size += len(line)
        if (len(self._reply_lines) > MAX_REPLY_LINES
                or self._reply_size > MAX_REPLY_OCTETS):
            self._malformed(f" (a reply of over {MAX_REPLY_LINES} lines or "
                            f"{MAX_REPLY_OCTETS} octets)")
            return
        if code.group(2) == b"-":
            return  # more lines to come

        lines, self._reply_lines = self._reply_lines, []
        self._reply_code, self._reply_size = None, 0
        self.resetTimeout()  # type: ignore[no-untyped-call]
        self._dispatch(int(code.group(1)), b"\n".join(lines))

    def _command(self, step: str, line: str, handler: _Handler) -> None:
        """Send ``line`` now; its reply goes to ``handler``."""
        self._queue(step, line, handler)
        self._flush()

    def _queue(self, step: str, line: str, handler: _Handler) -> None:
        """``line`` leaves with the next `_flush`, so the commands of a
        pipelined group (RFC 2920) go out in one write."""
        data = line.encode("utf-8")
        if self._settings.transcript:
            _log.debug("{target} C: {line!r}", target=str(self._target), line=data)
        if not self._pending:
            self._step = step
        self._pending.append((step, handler))
        self._unsent.append(data + b"\r\n")

    def _flush(self) -> None:
        if self._unsent:
            data = b"".join(self._unsent)
            self._unsent.clear()
            write_now(self._wire, data)

    def _dispatch(self, code: int, resp: bytes) -> None:
        lines = resp.decode("utf-8", "replace").split("\n")
        reply = Reply.parse_lines(code, lines)
        if not 200 <= code < 600 or not self._pending:
            self._unexpected(reply)
            return

        self._step, handler = self._pending.popleft()
        if 300 <= code < 400 and self._step != "DATA":
            # Only DATA is answered "go ahead"; anywhere else it is no
            # answer at all, and must neither bounce nor pass.
            self._malformed(f" ({reply.line()})")
            return
        if code == 421 and not self._closing:
            # RFC 5321 3.8: the server is closing; so do we, without QUIT.
            self._fail(self._refusal(reply), reply)
            self._close()
            return

        handler(reply, lines)
        if self._pending:
            # Pipelined: what the session waits for now is the next reply.
            self._step = self._pending[0][0]
        elif self._ending and not self._closing:
            self._wind_up()

    def _unexpected(self, reply: Reply) -> None:
        if self._closing:
            return
        # A reply to nothing (a 421 while idle, a reply during the body):
        # what we send next could be misread, so stop here.
        _, doing, _ = STEPS[self._step]
        self._fail(f"host {self._target} said: {reply.line()} while {doing}", reply)
        self._abort()

    def _refusal(self, reply: Reply) -> str:
        if self._step == "greeting":
            return f"{self._target} refused to talk to me: {reply.line()}"
        _, _, command = STEPS[self._step]
        return said(self._target, reply, command)

    # Greeting, EHLO, HELO.

    def _on_greeting(self, reply: Reply, lines: list[str]) -> None:
        if reply.code != 220:
            self._refuse(reply)
            return
        self._command("EHLO", f"EHLO {self._settings.helo}", self._on_ehlo)

    def _on_ehlo(self, reply: Reply, lines: list[str]) -> None:
        if reply.is_permanent:
            # RFC 5321 4.1.4: a server without ESMTP; no extensions then.
            self._command("HELO", f"HELO {self._settings.helo}", self._on_helo)
            return
        if not reply.is_success:
            self._refuse(reply)
            return

        # After STARTTLS only what the server says inside TLS counts
        # (RFC 3207 4.2): the capabilities are replaced, never merged.
        self._caps = parse_ehlo(lines)
        if self._tls is None:
            self._starttls_offered = self._caps.starttls
        else:
            self._offer_session()
        self._after_hello()

    def _offer_session(self) -> None:
        # Read after the first reply inside TLS: a TLS 1.3 server sends its
        # session tickets before that reply.
        session = self._wire.getHandle().get_session()
        if self._keeper is None or session is None or self._tls is None:
            return
        resume = self._settings.resume
        first = resume.first if self._tls.resumed and resume else self._tls
        self._keeper.resumable(self, Resumption(session, first))

    def _on_helo(self, reply: Reply, lines: list[str]) -> None:
        if not reply.is_success:
            self._refuse(reply)
            return
        self._caps = NO_EXTENSIONS
        self._after_hello()

    def _after_hello(self) -> None:
        settings = self._settings
        if self._tls is None and settings.tls_context is not None:
            if settings.starttls and self._caps.starttls:
                self._command("STARTTLS", "STARTTLS", self._on_starttls)
                return

        if self._tls is None and settings.require_tls:
            self._require_tls_failed()
            return
        self._send_mail()

    def _require_tls_failed(self) -> None:
        if not self._caps.starttls:
            reason = f"TLS is required, but was not offered by host {self._target}"
            self._fail(reason, stage="STARTTLS")
        else:
            reason = f"TLS is required, but STARTTLS is turned off for {self._target}"
            self._fail(reason, stage="TLS policy")
        self._end()

    # STARTTLS and the handshake.

    def _on_starttls(self, reply: Reply, lines: list[str]) -> None:
        if reply.code != 220:
            self._tls_failure = self._refusal(reply)
            self._refuse(reply)
            return

        # Whatever the server sent after its 220 and before the handshake
        # is no part of any TLS session: reading it as the EHLO reply is
        # the response injection of CVE-2011-0411's family.  Drop it.
        self.clearLineBuffer()  # type: ignore[no-untyped-call]
        self._step = "TLS handshake"
        context = self._settings.tls_context
        assert context is not None
        resume = self._settings.resume
        self._creator = ClientCreator(context, sni_name(self._target.name),
                                      resume.session if resume else None)
        self._wire.startTLS(self._creator)

    def handshakeCompleted(self) -> None:
        assert self._creator is not None
        handle = self._wire.getHandle()
        facts = self._creator.facts
        resume = self._settings.resume
        if not facts.checked and resume is not None:
            # Resumed: the certificate and its verdict are the first
            # handshake's (this one showed none, and checked none).
            first = resume.first
            certificate, error, reason = (first.peer_certificate,
                                          first.verify_error, first.verify_reason)
        else:
            certificate = handle.get_peer_certificate(as_cryptography=True)
            error, reason = facts.verify_error, facts.verify_reason
        self._tls = TLSSession(
            protocol=handle.get_protocol_version_name(),
            cipher=handle.get_cipher_name(),
            bits=handle.get_cipher_bits(),
            peer_certificate=certificate,
            verify_error=error,
            verify_reason=reason,
            resumed=not facts.checked and resume is not None,
        )

        # The verdict is taken before anything is written inside TLS, so a
        # refused certificate sees neither EHLO nor MAIL.
        check = self._settings.check_tls
        verdict = check(self._tls) if check is not None else None
        if verdict is not None:
            self._fail(verdict, stage="TLS policy")
            self._close()
            return
        self._command("EHLO", f"EHLO {self._settings.helo}", self._on_ehlo)

    # The transaction.

    def _send_mail(self) -> None:
        refusal = refuse_before_mail(self._caps, self._transaction, self._target)
        if refusal is not None:
            self._failure = self._failure or refusal
            self._transaction_over()
            return

        parameters = mail_parameters(self._caps, self._transaction)
        line = f"MAIL FROM:<{self._transaction.sender}>{parameters}"
        self._queue("MAIL", line, self._on_mail)
        if self._caps.pipelining:
            # RFC 2920 3.1: MAIL, RCPT and DATA (last) may go in one group,
            # as Postfix sends them; the replies come back in order.  A
            # server must refuse DATA when no RCPT was taken (RFC 2920
            # 3.1); the body waits for its 354 all the same.
            for recipient in self._recipients:
                self._queue_rcpt(recipient)
            self._queue("DATA", "DATA", self._on_data)
        self._flush()

    def _on_mail(self, reply: Reply, lines: list[str]) -> None:
        if self._ending:
            return  # a pipelined RSET before it failed
        if not reply.is_success:
            # Pipelined RCPTs get 503s; `_ending` makes their handlers
            # ignore them, and QUIT (or RSET later) follows the last.
            self._fail(self._refusal(reply), reply)
            self._transaction_over()
            return
        if not self._caps.pipelining:
            self._send_rcpt(self._recipients[0])

    def _send_rcpt(self, recipient: str) -> None:
        self._queue_rcpt(recipient)
        self._flush()

    def _queue_rcpt(self, recipient: str) -> None:
        handler = partial(self._on_rcpt, recipient)
        self._queue("RCPT", f"RCPT TO:<{recipient}>", handler)

    def _on_rcpt(self, recipient: str, reply: Reply, lines: list[str]) -> None:
        if self._ending:
            return
        self._rcpt_replies[recipient] = reply
        answered = len(self._rcpt_replies)
        if answered < len(self._recipients):
            if not self._caps.pipelining:
                self._send_rcpt(self._recipients[answered])
            return

        if not any(reply.is_success for reply in self._rcpt_replies.values()):
            self._transaction_over()  # a pipelined DATA is refused, or aborted
        elif not self._caps.pipelining:
            self._command("DATA", "DATA", self._on_data)

    def _on_data(self, reply: Reply, lines: list[str]) -> None:
        if self._ending:
            # A pipelined DATA after the transaction failed (RSET, MAIL or
            # every RCPT refused): its refusal is expected.  A server that
            # asks for the body anyway gets none; dropping the connection
            # is the one way to end the DATA it opened without a message.
            if reply.code == 354:
                self._abort()
            return
        if reply.code != 354 and not (reply.is_temporary or reply.is_permanent):
            # A 250 (or any 2xx/3xx but 354) to DATA: no body was asked
            # for, so none was taken; the server is out of step with us.
            self._unexpected(reply)
            return
        if reply.code != 354:
            self._fail(self._refusal(reply), reply)
            self._transaction_over()
            return
        # Nothing may follow a 354 before the body (RFC 2920 3.1: DATA ends
        # a pipelined group); a reply already here was sent before the
        # server could see our data, and would be read as its verdict on
        # it.  Such a server is out of step: stop, deliver nothing.
        early = self.clearLineBuffer()
        if early:
            shown = early.decode("utf-8", "replace")[:200].rstrip()
            self._fail(f"host {self._target} said {shown!r} after its 354, "
                       "before the message body was sent")
            self._abort()
            return

        self._step = "body"
        # RFC 5321 4.5.3.2: the body and the final reply have their own,
        # longer time limit; each chunk the peer takes restarts it.
        self._limit(self._settings.timeouts.data)
        try:
            # Unbuffered: the producer reads in chunks of its own, and a
            # buffered reader would cost an lseek and an ioctl a message.
            body = self._transaction.body_path.open("rb", buffering=0)
        except OSError as error:
            self._body_failed(error)
            return
        self._body = BodyProducer(
            body, self._transaction.size, self._wire, self._body_sent,
            self._body_failed, self.resetTimeout,
        )
        self._body.start()

    def _body_sent(self) -> None:
        self._body = None
        self._step = "end of data"
        self._pending.append(("end of data", self._on_end_of_data))

    def _body_failed(self, error: OSError) -> None:
        # Never send the terminator after a partial body: dropping the
        # connection makes the server discard what it got.
        self._body = None
        path = self._transaction.body_path
        self._fail(f"cannot read message body {path}: {error.strerror or error}")
        self._abort()

    def _on_end_of_data(self, reply: Reply, lines: list[str]) -> None:
        self._data_reply = reply
        self._transaction_over()

    # Ending.

    def _fail(self, reason: str, reply: Reply | None = None, stage: str = "") -> None:
        """Record why the session failed; the first reason wins."""
        if reply is not None and not (reply.is_temporary or reply.is_permanent):
            # A 2xx or 3xx that ends a session early (a 250 to DATA, a 250
            # in the middle of the body) is the server out of step: it
            # proves nothing was delivered, so it must never decide a
            # recipient as sent.  Without a reply the recipients are
            # deferred with the reason, which quotes it.
            reply = None
        if self._failure is None:
            stage = stage or STEPS[self._step][0]
            self._failure = SessionFailure(stage, reply, reason)

    def _refuse(self, reply: Reply) -> None:
        self._fail(self._refusal(reply), reply)
        self._end()

    def _end(self) -> None:
        """QUIT once every outstanding (pipelined) reply is in."""
        self._ending = True
        if not self._pending and not self._closing:
            self._wind_up()

    def _transaction_over(self) -> None:
        """The transaction is over and the session sound: once every
        outstanding reply is in, the connection may be kept."""
        self._keepable = True
        self._end()

    def _wind_up(self) -> None:
        if self._keepable and self._keeper is not None and self._keeper.keep(self):
            self._park()
        else:
            self._quit()

    def _park(self) -> None:
        # Idle until `next_transaction` or `retire`; the keeper times it.
        self._step = "idle"
        self._ending = self._keepable = False
        self._limit(None)
        self._settle()

    # A kept connection.

    @property
    def tls(self) -> TLSSession | None:
        return self._tls

    @property
    def target(self) -> Target:
        return self._target

    @property
    def settings(self) -> ClientSettings:
        return self._settings

    @property
    def opened(self) -> float:
        """When the connection was made (the reactor's clock)."""
        return self._opened

    def abort(self) -> None:
        if self.transport is not None:
            self._abort()

    @property
    def uses(self) -> int:
        return self._uses

    def next_transaction(
        self,
        transaction: Transaction,
        settings: ClientSettings,
        done: Deferred[SessionResult],
    ) -> None:
        """Run another transaction on this idle connection: RSET first
        (the state of the last one is gone, and the server shows it is
        still there), then MAIL as on a new connection."""
        check_transaction(transaction)
        self._transaction = transaction
        self._settings = settings
        self._done = done
        self._recipients = tuple(dict.fromkeys(transaction.recipients))
        self._uses += 1
        self._failure = None
        self._rcpt_replies = {}
        self._data_reply = None
        self._limit(settings.timeouts.command)
        self._queue("RSET", "RSET", self._on_rset)
        if self._caps.pipelining:
            # RFC 2920 3.1: RSET may open the group; one round trip less.
            self._send_mail()
        # A transaction refused before MAIL (`refuse_before_mail`) still
        # has its RSET to send.
        self._flush()

    def _on_rset(self, reply: Reply, lines: list[str]) -> None:
        if not reply.is_success:
            # Pipelined commands after it are answered, and ignored
            # (`_ending`).
            self._refuse(reply)
            return
        if not self._caps.pipelining:
            self._send_mail()

    def retire(self) -> None:
        """Close an idle connection with QUIT."""
        if self._step == "idle" and not self._closing:
            self._quit()

    def _quit(self) -> None:
        self._command("QUIT", "QUIT", self._on_quit)
        self._limit(self._settings.timeouts.command)
        self._closing = True
        # The outcome is known: the queue need not wait for the 221.
        self._settle()

    def _on_quit(self, reply: Reply, lines: list[str]) -> None:
        self._wire.loseConnection()

    def _close(self) -> None:
        self._closing = True
        self._limit(self._settings.timeouts.command)
        self._wire.loseConnection()

    def _abort(self) -> None:
        self._closing = True
        self._wire.abortConnection()

    def _settle(self) -> None:
        if self._done.called:
            return
        self._done.callback(
            SessionResult(
                target=self._target,
                failure=self._failure,
                starttls_offered=self._starttls_offered,
                tls=self._tls,
                tls_failure=self._tls_failure,
                rcpt_replies=dict(self._rcpt_replies),
                data_reply=self._data_reply,
                connection_use=self._uses,
            )
        )


class _Factory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], DeliveryClient]) -> None:
        self._build = build
        self.client: DeliveryClient | None = None

    def buildProtocol(self, addr: Any) -> DeliveryClient:
        self.client = self._build()
        self.client.factory = self
        return self.client


def deliver(
    reactor: Any,
    target: Target,
    transaction: Transaction,
    settings: ClientSettings,
    keeper: Keeper | None = None,
) -> Deferred[SessionResult]:
    """Run one session with ``target``; the Deferred always fires with a
    `SessionResult` (connection problems included), never an error, unless
    cancelled.  With a ``keeper``, a sound connection may outlive the
    transaction (see `DeliveryClient.next_transaction`)."""
    check_transaction(transaction)
    cancelled = False

    def cancel(_: Deferred[SessionResult]) -> None:
        nonlocal cancelled
        cancelled = True
        connecting.cancel()
        if factory.client is not None and factory.client.transport is not None:
            factory.client.transport.abortConnection()

    done: Deferred[SessionResult] = Deferred(cancel)
    # A result from a cancelled session is dropped: cancel() has fired it.
    fire = Deferred[SessionResult]()
    fire.addCallback(lambda result: None if cancelled else done.callback(result))

    factory = _Factory(
        lambda: DeliveryClient(reactor, target, transaction, settings, fire, keeper)
    )
    endpoint_type = TCP6ClientEndpoint if ":" in target.address else TCP4ClientEndpoint
    endpoint = endpoint_type(
        reactor, target.address, target.port, timeout=settings.timeouts.connect
    )
    connecting = endpoint.connect(factory)  # type: ignore[arg-type]

    def connect_failed(failure: Failure) -> None:
        if cancelled:
            return
        assert failure.value is not None
        reason = connect_reason(target, failure.value)
        done.callback(
            SessionResult(target, failure=SessionFailure("connect", None, reason))
        )

    connecting.addErrback(connect_failed)
    return done
