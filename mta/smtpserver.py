# Twisted's smtp module and TimeoutMixin carry no type hints.
# mypy: disallow-untyped-calls=False
"""The SMTP listener: takes mail from clients and puts it in the spool.

`RelayServer` subclasses Twisted's `smtp.ESMTP` for what is sound there (the
greeting, `sendCode`, the idle timer of `TimeoutMixin`) and replaces the
rest, whose faults TWISTED-NOTES.md lists:

- input is split by our own reader in `dataReceived`, never by
  `LineOnlyReceiver`: a command line ends only at CRLF, and DATA ends only
  at CRLF.CRLF whatever the length of the lines before it;
- replies go out strictly in command order under pipelining (RFC 2920
  3.1): while the spool commit of a message runs in a thread, buffered
  input waits, and the transport is paused;
- STARTTLS throws away whatever was pipelined after it and forgets the
  HELO and the transaction (RFC 3207 4.2, CVE-2011-0411);
- one spool writer per transaction, fed as the bytes arrive, so memory stays
  flat whatever the message size;
- a client that sends without reading our replies is not read from while
  the transport holds more unsent replies than its buffer size: the server
  is the transport's push producer, paused and resumed by it;
- the command timer runs from the last complete command line, never from a
  partial one (a client sending a byte now and then does not keep a
  session), and a message has its own deadline from 354 to CRLF.CRLF;
- a client that shuts down its sending side (half-close) has what it sent
  before answered, then the connection is closed; a message it cut short
  is dropped;
- AUTH (RFC 4954) is offered only inside TLS, on an outbound listener with
  a users file; its exchange is `mta.smtpauth.AuthSession`, which this
  reader hands every response line while a 334 is outstanding.  On an
  implicit-TLS listener (RFC 8314) the handshake comes before the greeting.

How many connections and errors one client may have are pure rules in
`mta.clientlimits`, with the process-wide connection count.

Which recipients a listener takes, and the MAIL and RCPT syntax, are pure
functions in `mta.relaycontrol`; the DATA stream is decoded by the pure
`DataDecoder` of `mta.datadecoder`.  The values a connection holds are in
`mta.serversession`, the fixed replies in `mta.serverreplies`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.clientaddress import client_address
from mta.clientlimits import (
    ClientConnections,
    connection_refusal,
    counts_as_error,
    too_many_errors,
)
from mta.authcheck import Verifier, make_portal
from mta.authfailures import FailureTable
from mta.config import Config, Listener
from mta.datadecoder import DataDecoder
from mta.envelope import Client, Envelope, Recipient, TLSFacts
from mta.hops import too_many_hops
from mta.logs import log_accepted, log_event, log_reject
from mta.received import received_header
from mta.relaycontrol import (
    parse_mail,
    parse_rcpt,
    postmaster_domain,
    recipient_limit,
    recipient_verdict,
)
from mta.reply import Reply
from mta.serverreplies import (
    BAD_SYNTAX,
    BARE_NEWLINE_IN_COMMAND,
    BYE,
    CANNOT_VRFY,
    HELP,
    IN_TRANSACTION,
    LINE_TOO_LONG,
    MUST_STARTTLS,
    NEED_HELO,
    NEED_MAIL,
    NEED_RECIPIENTS,
    NESTED_MAIL,
    OK,
    OK_RECIPIENT,
    OK_SENDER,
    START_DATA,
    START_TLS,
    TLS_ACTIVE,
    TLS_UNAVAILABLE,
    UNKNOWN_COMMAND,
    reply_text,
    syntax,
    timeout_exceeded,
    write_error_reply,
)
from mta.serverreplies import too_many_errors as too_many_errors_reply
from mta.sendnow import write_now
from mta.serversession import (
    CommitMessage,
    MessageInProgress,
    Queued,
    Settings,
    Transaction,
)
from mta.smtpauth import MAX_AUTH_LINE, AuthSession
from mta.spool import MessageLock, MessageWriter, Spool
from mta.spoolworker import SpoolWorker
from mta.tlsctx import ServerCreator

_log = Logger(namespace="mta.smtpserver")

# RFC 5321 4.5.3.1.4 allows 512 octets; Postfix takes 2048 (line_length_limit),
# which leaves room for long parameter lists.  The CRLF counts.
MAX_COMMAND_LINE = 2048

# Input kept while a reply waits before reading stops (see
# `RelayServer._pause_or_resume_reading`): some commands of the next
# transaction, not a body.
WAITING_INPUT = 8 * MAX_COMMAND_LINE

# We do no reverse lookup yet: Postfix's word for a client without a
# verified name, so log lines and Received headers read the same.
UNKNOWN_HOST = "unknown"


# --- the session ---------------------------------------------------------------


@implementer(IHandshakeListener, IHalfCloseableProtocol, IPushProducer)
class RelayServer(smtp.ESMTP):
    """One client connection.  Commands are dispatched to ``smtp_VERB``
    methods, each of which sends exactly one reply.

    Input waits in ``_input`` while a reply must wait: a commit in
    progress, or replies the client does not read.  The transport is
    paused while the replies fill it, or once the input waiting for a
    commit passes `WAITING_INPUT`."""

    transport: Any  # ITCPTransport, and ITLSTransport when it can

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.host = settings.config.hostname.encode("ascii")
        self.idle_timeout = settings.config.limits.idle_timeout
        self.data_timeout = settings.config.limits.data_timeout
        self.client_address = UNKNOWN_HOST
        self.tls: TLSFacts | None = None

        self._input = bytearray()
        self._discarding = False  # inside an over-long command line
        self._helo_name: str | None = None
        self._esmtp = False
        self._transaction: Transaction | None = None
        self._message: MessageInProgress | None = None
        self._tls_started = False
        self._waiting = False  # a reply is pending: hold the input
        self._processing = False
        self._unsent: list[bytes] = []  # replies made while input is handled
        self._closing = False
        self._stopping = False  # the relay stops: no new transaction
        self._errors = 0  # error replies so far (limits.errors)
        self._overshoot = 0  # recipients refused as too many so far
        self._command = "CONNECT"  # the last command, for log lines
        self._data_deadline: Any = None  # an IDelayedCall while in DATA
        self._abort_call: Any = None  # an IDelayedCall once closing
        self._read_closed = False  # the client half-closed: no more input
        self._write_blocked = False  # unsent replies fill the transport
        self._reading_paused = False
        self._producing = False  # registered as the transport's producer
        self._auth: AuthSession | None = None  # made with the connection

    # --- connection events -------------------------------------------

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        # TimeoutMixin's hook: the injected reactor, so tests own the clock.
        return self.settings.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_address = client_address(
            str(getattr(peer, "host", "") or UNKNOWN_HOST))
        # Nagle would hold a short reply behind unacknowledged data (a TLS
        # 1.3 session ticket) until the client's delayed ACK.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:  # a TCP connection
            no_delay(True)
        # The transport pauses us when its buffer of unsent replies is full
        # and resumes us when it has drained (IConsumer.registerProducer).
        self.transport.registerProducer(self, True)
        self._producing = True
        self._auth = self._auth_session()
        if self.settings.implicit_tls:
            # The greeting waits for the handshake (`handshakeCompleted`):
            # written before it, it would sit in the TLS layer's buffer,
            # which pauses us as its producer, and nothing would be read.
            if self._start_implicit_tls():
                self.setTimeout(self.idle_timeout)
            return
        self._greet()

    def _greet(self) -> None:
        # RFC 2034: no enhanced status code in the greeting.
        self._write(b"220 " + self.greeting() + b"\r\n")
        self.setTimeout(self.idle_timeout)

    def greeting(self) -> bytes:
        return self.settings.config.hostname.encode("ascii") + b" ESMTP"

    def timeoutConnection(self) -> None:
        # TimeoutMixin's hook: no complete command line for idle_timeout,
        # or, inside DATA, no byte at all.
        self._timed_out(
            f"nothing received for {self.idle_timeout:g}s (limits.idle_timeout)"
        )

    def _data_timed_out(self) -> None:
        self._data_deadline = None
        self._timed_out(
            f"the message was not complete after {self.data_timeout:g}s "
            "(limits.data_timeout)"
        )

    def _timed_out(self, why: str) -> None:
        where = "DATA" if self._message is not None else self._command
        self._drop_message()
        # RFC 5321 4.5.3.2.7: a server may close a session that stays idle;
        # 421 tells the client to try again later.
        log_event(
            "info",
            f"timeout after {where} from {self._client()}: {why}; "
            "answered 421 4.4.2, connection closed",
            "timeout",
            client=self._client(),
        )
        self._reply(timeout_exceeded(self.settings.config.hostname))
        self._close()

    def shut_down(self) -> None:
        """The relay is stopping: a message being received or committed
        is finished and answered; then, or now if there is none, the client
        is told 421 and the connection closed."""
        self._stopping = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._closing or self._waiting or self._message is not None:
            return
        hostname = self.settings.config.hostname
        # RFC 5321 3.8: 421 is the reply to any command when the service
        # knows it must shut down.
        self._reply(Reply(421, "4.3.2", f"{hostname} Service shutting down, "
                          "closing transmission channel"))
        self._close()

    def _close(self) -> None:
        """Close once the replies written so far are sent; a client that
        does not take them within idle_timeout is cut off."""
        if self._closing:
            return
        self._closing = True
        self.setTimeout(None)
        self._stop_data_deadline()
        self._send_replies()
        if self._producing:
            # Twisted's loseConnection waits for a registered producer that
            # is paused: it would never close.
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        # Twisted closes only once every reply is sent: a client that never
        # reads would keep the connection (and its place) for ever.
        self._abort_call = self.settings.reactor.callLater(
            self.idle_timeout, self.transport.abortConnection
        )

    def handshakeCompleted(self) -> None:
        connection = self.transport.getHandle()
        self.tls = TLSFacts(
            protocol=connection.get_protocol_version_name(),
            cipher=connection.get_cipher_name(),
            bits=connection.get_cipher_bits(),
        )
        log_event(
            "info",
            f"TLS connection established from {self._client()}: {self.tls}",
            "tls_established",
            client=self._client(),
        )
        if self.settings.implicit_tls:
            self._greet()  # RFC 8314 3.3: the greeting inside TLS

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._producing = False
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._lost_in_data()
        if self._auth is not None:
            self._auth.cancel()
        if self._tls_started and self.tls is None:
            self._log_failed_handshake(reason)
        if isinstance(self.factory, RelayServerFactory):
            self.factory.forget(self)
        super().connectionLost(reason)

    def readConnectionLost(self) -> None:
        """The client shut down its sending side (TCP half-close): answer
        what came before, then close.  Replies still waiting (a commit, a
        full transport) are sent first; see `_end_if_read_closed`."""
        self._read_closed = True
        self._end_if_read_closed()

    def writeConnectionLost(self) -> None:
        # We never half-close; should the transport say so, we are done.
        self._close()

    def _end_if_read_closed(self) -> None:
        if not self._read_closed or self._closing:
            return
        if self._waiting or self._write_blocked:
            return  # _resume or resumeProducing comes back here
        self._lost_in_data()
        self._close()

    def _lost_in_data(self) -> None:
        if self._message is None:
            return
        # The client gave up mid-DATA: nothing is spooled, and it is theirs
        # to send again, so this is no error of ours.
        self._drop_message()
        log_event(
            "info",
            f"lost connection after DATA from {self._client()}",
            "lost_connection",
            client=self._client(),
        )

    def _drop_message(self) -> None:
        """The message being received will never be complete: nothing of
        it stays in the spool."""
        self._stop_data_deadline()
        if self._message is not None:
            self._message.writer.abort()
            self._message = None

    def _stop_data_deadline(self) -> None:
        if self._data_deadline is not None and self._data_deadline.active():
            self._data_deadline.cancel()
        self._data_deadline = None

    def _log_failed_handshake(self, reason: Failure) -> None:
        # Postfix logs "SSL_accept error" here: a client that cannot (or
        # will not) speak TLS, common on an implicit-TLS port.
        log_event(
            "info",
            f"TLS handshake failed with {self._client()} on listener "
            f"{self.settings.listener.name}: {reason.getErrorMessage()}; "
            "connection closed",
            "tls_failed",
            client=self._client(),
        )

    # --- flow control --------------------------------------------------

    def pauseProducing(self) -> None:
        """The transport holds more unsent replies than its buffer size: a
        client that pipelines without reading is not read from until they
        drain, so they cannot pile up in memory."""
        self._write_blocked = True
        self._pause_or_resume_reading()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self._pause_or_resume_reading()
        self._process()

    def stopProducing(self) -> None:
        """The connection is gone; `connectionLost` does the rest."""

    def _pause_or_resume_reading(self) -> None:
        # While a reply waits (a commit, a login being checked) what comes
        # is kept in `_input`, to be answered in order (RFC 2920 3.1);
        # reading stops only once that is more than a pipelining client
        # has reason to send.  Not stopping for every commit spares two
        # epoll changes a message.
        hold = self._write_blocked or (
            self._waiting and len(self._input) >= WAITING_INPUT)
        if hold and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif not hold and self._reading_paused:
            self._reading_paused = False
            # After a half-close there is nothing left to read (reading
            # again would only find the end once more).
            if not (self._closing or self._read_closed):
                self.transport.resumeProducing()

    # --- input -------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._message is not None:
            # Inside DATA any byte is progress; the message's own deadline
            # bounds a client that sends them slowly.
            self.resetTimeout()
        self._input += data
        if self._waiting:
            self._pause_or_resume_reading()
        self._process()

    def _process(self) -> None:
        """Handle buffered input until it runs out or a reply must wait."""
        if self._processing:
            return
        self._processing = True
        try:
            while not self._must_stop():
                if self._message is not None:
                    self._message_received()
                    continue
                line = self._take_line()
                if line is None:
                    break
                # RFC 5321 4.5.3.2.7: the timer runs from the last complete
                # command; a partial line is no sign of life.
                self.resetTimeout()
                self._line_received(*line)
        finally:
            self._processing = False
            # The replies to what one read brought go out together (a
            # pipelining client gets them in one segment).
            self._send_replies()
        if self._stopping:
            self._close_if_idle()
        self._end_if_read_closed()

    def _must_stop(self) -> bool:
        """Whether buffered input must wait, or the session is over."""
        if self._closing:
            return True
        if too_many_errors(self.settings.config.limits, self._errors):
            self._too_many_errors()
            return True
        return not self._input or self._waiting or self._write_blocked

    def _too_many_errors(self) -> None:
        # Postfix's smtpd_hard_error_limit: a client that keeps being
        # refused is broken or probing; talking on helps neither.
        log_event(
            "info",
            f"too many errors after {self._command} from {self._client()}: "
            f"{self._errors} error replies (limits.errors: "
            f"{self.settings.config.limits.errors}); answered 421 4.7.0, "
            "connection closed",
            "too_many_errors",
            client=self._client(),
        )
        self._reply(too_many_errors_reply(self.settings.config.hostname))
        self._close()

    def _take_line(self) -> tuple[bytes, bool] | None:
        """The next command line without its CRLF, and whether it was too
        long; None until a CRLF arrives.  A bare CR or LF never ends a line.
        An over-long line is dropped as it comes, so it costs no memory."""
        end = self._input.find(b"\r\n")
        limit = self._line_limit()
        if end < 0:
            if self._discarding or len(self._input) >= limit:
                self._discarding = True
                # A final CR may be the first half of the CRLF.
                keep = 1 if self._input.endswith(b"\r") else 0
                del self._input[: len(self._input) - keep]
            return None
        line = bytes(self._input[:end])
        del self._input[: end + 2]
        too_long = self._discarding or end + 2 > limit
        self._discarding = False
        return line, too_long

    def _line_limit(self) -> int:
        # RFC 4954 4: AUTH lines and SASL responses may be longer.
        auth = self._auth
        if auth is not None and auth.offered and (
            auth.in_exchange or self._input[:5].upper() == b"AUTH "
        ):
            return MAX_AUTH_LINE
        return MAX_COMMAND_LINE

    def _line_received(self, line: bytes, too_long: bool) -> None:
        if self._stopping:
            self._close_if_idle()
            return
        if self._auth is not None and self._auth.in_exchange:
            self._auth.response(line, self._bad_line(line, too_long))
            return
        # A line that is no command leaves no name for the log lines
        # ("too many errors after ..."), not the last good one's.
        self._command = "UNKNOWN"
        if too_long:
            self._reply(LINE_TOO_LONG)
            return
        if b"\r" in line or b"\n" in line:
            self._reply(BARE_NEWLINE_IN_COMMAND)
            return
        words = line.decode("utf-8", "replace").strip().split(None, 1)
        if not words:
            self._reply(BAD_SYNTAX)
            return
        # Verbs are ASCII (RFC 5321 2.4): a Unicode look-alike such as
        # "ſtarttls", which upper() would turn into STARTTLS, is unknown.
        verb = words[0].upper() if words[0].isascii() else ""
        argument = words[1] if len(words) > 1 else ""
        handler = getattr(self, f"smtp_{verb}", None) if verb.isalpha() else None
        if handler is None:
            self._reply(UNKNOWN_COMMAND)
            return
        self._command = verb
        handler(argument)

    def _bad_line(self, line: bytes, too_long: bool) -> Reply | None:
        if too_long:
            return LINE_TOO_LONG
        if b"\r" in line or b"\n" in line:
            return BARE_NEWLINE_IN_COMMAND
        return None

    def _message_received(self) -> None:
        message = self._message
        assert message is not None
        data = bytes(self._input)
        self._input.clear()
        stored, rest = message.decoder.feed(data)
        if stored:
            self._store(message, stored)
        if rest is not None:
            self._input += rest
            self._message = None
            self._stop_data_deadline()
            self._command = "END-OF-MESSAGE"
            self._end_of_data(message)

    def _store(self, message: MessageInProgress, data: bytes) -> None:
        message.hops.feed(data)
        try:
            message.writer.write(data)
        except OSError as error:
            # The rest of the body is read and dropped (the reply comes
            # after CRLF.CRLF); the partial file goes now, so a full disk
            # gets its space back for other clients at once.
            message.decoder.fail(write_error_reply(error))
            message.writer.abort()
            self._log_write_error(message.writer.queue_id, error)

    # --- replies -----------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        # Replies are ASCII (RFC 5321 4.2); "replace" keeps a stray
        # character from becoming an exception in the reactor.
        line = reply_text(reply).encode("ascii", "replace")
        self._write(line + b"\r\n")
        if reply.code == 452 and reply.dsn == "4.5.3":
            self._overshoot += 1
        if counts_as_error(reply, self._overshoot):
            self._errors += 1

    def _write(self, data: bytes) -> None:
        """A reply: kept while a read is being handled (`_process` sends
        them all at its end), else sent at once (`mta.sendnow`)."""
        if self._processing:
            self._unsent.append(data)
        else:
            write_now(self.transport, data)

    def _send_replies(self) -> None:
        if self._unsent:
            data = b"".join(self._unsent)
            self._unsent.clear()
            write_now(self.transport, data)

    def _answer(self, command: str, reply: Reply) -> None:
        """Reply to a transaction command; a refusal is logged."""
        self._reply(reply)
        if reply.code >= 400:
            host, address = UNKNOWN_HOST, self.client_address
            log_reject(command, host, address, reply_text(reply))

    def _client(self) -> str:
        return f"{UNKNOWN_HOST}[{self.client_address}]"

    def _user(self) -> str | None:
        """Who logged in with AUTH on this connection, if anyone."""
        return self._auth.user if self._auth is not None else None

    # --- commands ----------------------------------------------------

    def smtp_EHLO(self, argument: str) -> None:
        if not argument:
            self._reply(Reply(501, "", "Syntax: EHLO hostname"))
            return
        self._greeted(argument, esmtp=True)
        # RFC 2034: no enhanced status codes in the reply to EHLO.
        *lines, last = self._ehlo_lines()
        text = "".join(f"250-{line}\r\n" for line in lines) + f"250 {last}\r\n"
        self._write(text.encode("ascii"))

    def smtp_HELO(self, argument: str) -> None:
        if not argument:
            self._reply(Reply(501, "", "Syntax: HELO hostname"))
            return
        self._greeted(argument, esmtp=False)
        self._reply(Reply(250, "", self.settings.config.hostname))

    def _greeted(self, helo: str, esmtp: bool) -> None:
        # RFC 5321 4.1.4: a new EHLO or HELO also resets the transaction.
        self._helo_name = helo
        self._esmtp = esmtp
        self._transaction = None

    def _ehlo_lines(self) -> list[str]:
        limits = self.settings.config.limits
        lines = [
            self.settings.config.hostname,
            "PIPELINING",
            f"SIZE {limits.message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self._can_start_tls():
            lines.append("STARTTLS")
        auth = self._auth.ehlo_keyword(self._tls_started) if self._auth else None
        if auth is not None:
            lines.append(auth)
        return lines

    def _can_start_tls(self) -> bool:
        return (
            not self._tls_started
            and self.settings.tls_creator is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def smtp_STARTTLS(self, argument: str) -> None:
        if argument:
            reply = syntax("STARTTLS")
        elif self._tls_started:
            reply = TLS_ACTIVE
        elif not self._can_start_tls():
            reply = TLS_UNAVAILABLE
        elif self._transaction is not None:
            reply = IN_TRANSACTION
        else:
            self._start_tls()
            return
        self._answer("STARTTLS", reply)

    def _start_tls(self) -> None:
        self._reply(START_TLS)
        # Whatever came after STARTTLS in the same read was sent in the
        # clear and must not run inside TLS (CVE-2011-0411); and RFC 3207
        # 4.2: forget all we were told before, HELO included.
        self._input.clear()
        self._discarding = False
        self._helo_name = None
        self._esmtp = False
        self._transaction = None
        if self._auth is not None:
            self._auth.reset()
        self._tls_started = True
        self._send_replies()  # the 220 in the clear, then TLS
        self.transport.startTLS(self.settings.tls_creator)

    def _start_implicit_tls(self) -> bool:
        """RFC 8314 3.3: TLS from the first byte; the greeting and all else
        go inside it.  False when it cannot be had: the client is told
        nothing in the clear, and the connection closes."""
        if not self._can_start_tls():
            log_event(
                "warn",
                f"listener {self.settings.listener.name}: no TLS for "
                f"{self._client()} on this implicit-TLS listener; connection "
                "closed",
                "tls_unavailable",
                client=self._client(),
            )
            self._close()
            return False
        self._tls_started = True
        self.transport.startTLS(self.settings.tls_creator)
        return True

    # --- AUTH (mta.smtpauth) -------------------------------------------

    def _auth_session(self) -> AuthSession:
        settings = self.settings
        return AuthSession(
            host=self,
            portal=settings.portal,
            failures=settings.auth_failures or FailureTable(settings.reactor),
            limits=settings.config.limits,
            clock=settings.reactor,
            client=self._client(),
            client_address=self.client_address,
            listener=settings.listener.name,
        )

    def smtp_AUTH(self, argument: str) -> None:
        assert self._auth is not None
        self._auth.command(
            argument,
            tls=self._tls_started,
            greeted=self._helo_name is not None,
            in_transaction=self._transaction is not None,
        )

    def reply_auth(self, reply: Reply, logged: bool) -> None:
        if logged:
            self._answer("AUTH", reply)
        else:
            self._reply(reply)

    def send_challenge(self, prompt: str) -> None:
        # RFC 4954 4: "334" SP [base64]; the space stays when it is empty.
        self._write(b"334 " + prompt.encode("ascii") + b"\r\n")

    def hold_input(self) -> None:
        """A login is being checked: later commands wait (RFC 2920 3.1),
        and the time is ours, not the client's idle time."""
        self._waiting = True
        self.setTimeout(None)
        self._pause_or_resume_reading()

    def release_input(self) -> None:
        self._resume(None)

    def close_with(self, reply: Reply) -> None:
        hostname = self.settings.config.hostname
        self._answer("AUTH", replace(reply, text=f"{hostname} {reply.text}"))
        self._waiting = False
        # Reading again (and dropping what comes): the TLS shutdown and
        # the client's own close must be seen for the connection to end.
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self._close()

    def smtp_MAIL(self, argument: str) -> None:
        self._answer("MAIL", self._mail(argument))

    def _mail(self, argument: str) -> Reply:
        if self._helo_name is None:
            return NEED_HELO
        if self.settings.listener.require_tls and not self._tls_started:
            return MUST_STARTTLS
        if self._transaction is not None:
            return NESTED_MAIL
        auth = self._auth
        offered = auth is not None and auth.ehlo_keyword(self._tls_started) is not None
        request = parse_mail(argument, self.settings.config.limits, offered)
        if isinstance(request, Reply):
            return request
        self._transaction = Transaction(
            sender="" if request.sender is None else str(request.sender),
            arrival=self.settings.reactor.seconds(),
            body=request.body,
        )
        return OK_SENDER

    def smtp_RCPT(self, argument: str) -> None:
        self._answer("RCPT", self._rcpt(argument))

    def _rcpt(self, argument: str) -> Reply:
        transaction = self._transaction
        if transaction is None:
            return NEED_MAIL
        recipient = parse_rcpt(argument, postmaster_domain(self.settings.config))
        if isinstance(recipient, Reply):
            return recipient
        address = str(recipient)
        if transaction.has_recipient(address):
            return OK_RECIPIENT  # once in the envelope is enough
        settings = self.settings
        refusal = recipient_limit(
            settings.config.limits, len(transaction.recipients)
        ) or recipient_verdict(
            settings.config, settings.listener, self.client_address, address,
            authenticated=self._user() is not None,
        )
        if refusal is not None:
            return refusal
        self._transaction = replace(
            transaction, recipients=(*transaction.recipients, address)
        )
        return OK_RECIPIENT

    def smtp_DATA(self, argument: str) -> None:
        transaction = self._transaction
        if argument:
            refusal: Reply | None = syntax("DATA")
        elif transaction is None:
            refusal = NEED_MAIL
        elif not transaction.recipients:
            refusal = NEED_RECIPIENTS
        else:
            refusal = self._open_message(transaction)
        if refusal is not None:
            self._answer("DATA", refusal)
            return
        self._reply(START_DATA)
        self._data_deadline = self.settings.reactor.callLater(
            self.data_timeout, self._data_timed_out
        )

    def _open_message(self, transaction: Transaction) -> Reply | None:
        """Start the spool file with our Received header; None when the
        body may come."""
        try:
            writer = self.settings.spool.new_message()
        except OSError as error:
            self._log_write_error("(new)", error)
            return write_error_reply(error)
        header = received_header(
            helo=self._helo_name or "",
            client_host=UNKNOWN_HOST,
            client_address=self.client_address,
            hostname=self.settings.config.hostname,
            queue_id=writer.queue_id,
            esmtp=self._esmtp,
            tls=self.tls,
            authenticated=self._user() is not None,
            recipients=transaction.recipients,
            when=self.settings.reactor.seconds(),
        )
        decoder = DataDecoder(self.settings.config.limits.message_size)
        message = MessageInProgress(transaction, writer, decoder)
        self._store(message, header)
        if decoder.failure is not None:
            writer.abort()
            return decoder.failure
        # RFC 5321 4.1.1.4: the transaction ends with DATA, whatever its
        # outcome; the message carries it from here on.
        self._transaction = None
        self._message = message
        return None

    def smtp_RSET(self, argument: str) -> None:
        if argument:
            self._reply(syntax("RSET"))
            return
        self._transaction = None
        self._reply(OK)

    def smtp_NOOP(self, argument: str) -> None:
        self._reply(OK)

    def smtp_VRFY(self, argument: str) -> None:
        self._reply(CANNOT_VRFY)

    def smtp_HELP(self, argument: str) -> None:
        self._reply(HELP)

    def smtp_QUIT(self, argument: str) -> None:
        self._reply(BYE)
        self._close()

    # --- the end of a message ------------------------------------------

    def _end_of_data(self, message: MessageInProgress) -> None:
        failure = message.decoder.failure
        if failure is None and message.hops.count > self.settings.config.limits.hops:
            failure = too_many_hops(message.hops.count)
        if failure is not None:
            message.writer.abort()
            self._answer("END-OF-MESSAGE", failure)
            return

        envelope = self._envelope(message)
        # SPEC 6: 250 only once the message is on disk.  Until the commit
        # is done, no later command may be answered (RFC 2920 3.1: replies
        # in order), and its time is ours, not the client's idle time.
        self._waiting = True
        self.setTimeout(None)
        self._pause_or_resume_reading()
        committed = self.settings.commit(message.writer, envelope)
        committed.addCallbacks(
            self._queued,
            self._not_queued,
            callbackArgs=(envelope,),
            errbackArgs=(message.writer,),
        )
        committed.addErrback(self._unexpected)
        committed.addBoth(self._resume)

    def _envelope(self, message: MessageInProgress) -> Envelope:
        transaction = message.transaction
        client = Client(
            helo=self._helo_name or "",
            host=UNKNOWN_HOST,
            address=self.client_address,
            listener=self.settings.listener.name,
            tls=self.tls,
            user=self._user(),
        )
        return Envelope(
            queue_id=message.writer.queue_id,
            sender=transaction.sender,
            arrival=transaction.arrival,
            size=message.writer.size,
            client=client,
            recipients=tuple(Recipient(address) for address in transaction.recipients),
            body=transaction.body,
        )

    def _queued(self, lock: MessageLock | None, envelope: Envelope) -> None:
        self._reply(Reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}"))
        log_accepted(envelope)
        # The message is safe on disk and the client has its 250: a fault
        # in whoever is told next must not undo either.
        try:
            self.settings.on_queued(envelope, lock)
        except Exception:
            if lock is not None:
                lock.release()  # the next scan of the spool finds it
            _log.failure("on_queued failed for {queue_id}", queue_id=envelope.queue_id)

    def _not_queued(self, failure: Failure, writer: MessageWriter) -> None:
        writer.abort()
        error = failure.value
        if not isinstance(error, OSError):
            _log.failure(
                "commit of {queue_id} failed", failure, queue_id=writer.queue_id
            )
            error = OSError(str(error))
        # Logged as an error, with the reply: no second, "reject" line.
        self._log_write_error(writer.queue_id, error)
        self._reply(write_error_reply(error))

    def _unexpected(self, failure: Failure) -> None:
        _log.failure("after the end of DATA", failure)

    def _resume(self, _: object) -> None:
        self._waiting = False
        if self._closing:
            return
        self._pause_or_resume_reading()
        self.setTimeout(self.idle_timeout)
        self._process()

    def _log_write_error(self, queue_id: str, error: OSError) -> None:
        reply = write_error_reply(error)
        log_event(
            "error",
            f"{queue_id}: cannot write the queue file for {self._client()}: "
            f"{error}; answered {reply_text(reply)}, the client will retry",
            "spool_error",
            queue_id=queue_id,
        )


# --- the factory ---------------------------------------------------------------


class RelayServerFactory(ServerFactory):
    """Builds a `RelayServer` per connection for the listener named
    ``listener_name``.  The configuration and the TLS creator are fetched
    anew for every connection, so a reload applies to the next one.

    ``commit`` runs `MessageWriter.commit` (blocking: fsync) through the
    relay's `SpoolWorker`, which keeps the message's lock for its first
    delivery, or without one in the reactor's thread pool; tests may
    replace it.

    ``clients`` counts the open connections by client address; the relay
    gives every listener the same one (`mta.clientlimits`).  A connection
    over a limit gets its 421 from a `RefusedConnection`.
    """

    # Twisted's own "Starting factory" lines say nothing an operator needs.
    noisy = False

    def __init__(
        self,
        listener_name: str,
        get_config: Callable[[], Config],
        spool: Spool,
        get_tls_creator: Callable[[], ServerCreator],
        on_queued: Queued,
        reactor: Any = None,
        clients: ClientConnections | None = None,
        verifier: Verifier | None = None,
        auth_failures: FailureTable | None = None,
        tls_mode: str | None = None,
        spool_worker: SpoolWorker | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.listener_name = listener_name
        self.get_config = get_config
        self.spool = spool
        self.get_tls_creator = get_tls_creator
        self.on_queued = on_queued
        self.reactor = reactor
        # Shared by the listeners of one relay: one bound on the threads
        # checking passwords, one memory of each client's failed logins.
        self.verifier = verifier or Verifier(reactor)
        self.auth_failures = auth_failures or FailureTable(reactor)
        # The listener's TLS mode when it was bound: clients expect what
        # the port did at start, so a reload does not change it (None:
        # as the configuration says, per connection).
        self.tls_mode = tls_mode
        self.commit: CommitMessage = (
            self._commit_in_thread if spool_worker is None
            else partial(spool_worker.commit, keep_lock=True))
        self.clients = ClientConnections() if clients is None else clients
        # Live connections, for a stop that lets them finish (mta.stopping),
        # each with the client address it is counted under in ``clients``.
        self.connections: dict[RelayServer, str] = {}
        self._stopping = False
        self._drained: list[Deferred[None]] = []

    def _commit_in_thread(
        self, writer: MessageWriter, envelope: Envelope
    ) -> Deferred[MessageLock | None]:
        pool = self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, writer.commit, envelope)

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if self._stopping:
            return None
        config = self.get_config()
        listener = find_listener(config, self.listener_name)
        if listener is None:
            log_event(
                "warn",
                f"listener {self.listener_name}: no longer in {config.path}; "
                f"connection from {getattr(addr, 'host', addr)} closed",
                "listener_missing",
            )
            return None
        address = client_address(str(getattr(addr, "host", "") or UNKNOWN_HOST))
        refusal = connection_refusal(
            config.limits,
            config.hostname,
            address,
            open_total=self.clients.total,
            open_from_client=self.clients.open_from(address),
            exempt=listener.allows_client(address),
        )
        if refusal is not None:
            log_event(
                "warn",
                f"refused connection from {UNKNOWN_HOST}[{address}] to listener "
                f"{listener.name}: {refusal.reason}; answered "
                f"{refusal.reply.code} {refusal.reply.dsn}, connection closed",
                "connection_refused",
                client=f"{UNKNOWN_HOST}[{address}]",
            )
            return RefusedConnection(refusal.reply)
        protocol = RelayServer(
            Settings(
                config=config,
                listener=listener,
                spool=self.spool,
                tls_creator=self._tls_creator(),
                on_queued=self.on_queued,
                commit=self.commit,
                reactor=self.reactor,
                portal=self._portal(listener),
                auth_failures=self.auth_failures,
                implicit_tls=(self.tls_mode or listener.tls) == "implicit",
            )
        )
        protocol.factory = self
        self.connections[protocol] = address
        self.clients.opened(address)
        return protocol

    def shut_down(self) -> Deferred[None]:
        """Take no new connection; ask each open one to finish (see
        `RelayServer.shut_down`).  Fires once every one is closed."""
        self._stopping = True
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        for protocol in list(self.connections):
            protocol.shut_down()
        self._fire_if_drained()
        return drained

    def abort_all(self) -> None:
        """Close every connection now: a message not yet committed is
        dropped (its client got no 250 and sends it again)."""
        for protocol in list(self.connections):
            protocol.transport.abortConnection()

    def forget(self, protocol: RelayServer) -> None:
        address = self.connections.pop(protocol, None)
        if address is not None:
            self.clients.closed(address)
        self._fire_if_drained()

    def _fire_if_drained(self) -> None:
        if self._stopping and not self.connections:
            drained, self._drained = self._drained, []
            for waiting in drained:
                waiting.callback(None)

    def _portal(self, listener: Listener) -> Any:
        if listener.users is None or listener.role != "outbound":
            return None
        return make_portal(listener.users, self.verifier)

    def _tls_creator(self) -> ServerCreator | None:
        try:
            return self.get_tls_creator()
        except Exception as error:
            log_event(
                "warn",
                f"listener {self.listener_name}: no TLS context ({error}); "
                "STARTTLS is not offered on this connection",
                "tls_unavailable",
            )
            return None


class RefusedConnection(Protocol):
    """A connection over a limit: it is told why, then closed.  A client
    told 421 tries later (RFC 5321 3.8); a silent close looks to it like a
    network fault."""

    transport: Any  # ITCPTransport

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        self.transport.write(reply_text(self.reply).encode("ascii") + b"\r\n")
        self.transport.loseConnection()


def find_listener(config: Config, name: str) -> Listener | None:
    for listener in config.listeners:
        if listener.name == name:
            return listener
    return None
