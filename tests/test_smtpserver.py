"""The SMTP listener: in memory with `StringTransport` and a fake clock for
the state machine, then on loopback with real TLS and Python's smtplib.

The harness (`Server`, `Session`, `Listening`) is in tests/serverharness.py;
what hostile clients try (smuggling, STARTTLS injection, line and size
limits, timeouts, loops, garbage) is in tests/test_hostile_clients.py.
"""

from __future__ import annotations

import errno
import smtplib
import ssl
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from mta.config import DEFAULT_CIPHERS
from mta.datadecoder import DataDecoder
from mta.envelope import Envelope, TLSFacts
from mta.received import received_header
from mta.spool import MessageWriter
from mta.tlsctx import ServerCreator
from tests.peers import certs
from tests.serverharness import (
    LIMIT,
    Listening,
    Server,
    Session,
    body_of,
    client_context,
    codes,
    in_thread,
    lines_of,
    queued_id,
    raw_exchange,
)


class TestGreetingAndEhlo:
    def test_greeting(self, server: Server) -> None:
        assert server.connect().greeting == ["220 relay.test ESMTP"]

    def test_ehlo_lists_exactly_our_extensions(self, server: Server) -> None:
        assert server.connect().send("EHLO client.example\r\n") == [
            "250-relay.test",
            "250-PIPELINING",
            f"250-SIZE {LIMIT}",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250 STARTTLS",
        ]

    def test_no_starttls_without_a_tls_creator(self, server: Server) -> None:
        def broken() -> ServerCreator:
            raise OSError("no certificate")

        server.factory.get_tls_creator = broken
        session = server.connect()
        assert "250 ENHANCEDSTATUSCODES" in session.send("EHLO c.example\r\n")
        assert session.send("STARTTLS\r\n") == [
            "454 4.7.0 TLS not available due to local problem"
        ]

    def test_helo(self, server: Server) -> None:
        assert server.connect().send("HELO client.example\r\n") == ["250 relay.test"]

    def test_ehlo_needs_a_name(self, server: Server) -> None:
        assert server.connect().send("EHLO\r\n") == ["501 Syntax: EHLO hostname"]

    def test_mail_needs_helo(self, server: Server) -> None:
        session = server.connect()
        assert session.send("MAIL FROM:<a@b.example>\r\n") == [
            "503 5.5.1 Error: send HELO/EHLO first"
        ]


class TestCommands:
    @pytest.mark.parametrize(
        ("command", "expected"),
        [
            ("NOOP", "250 2.0.0 Ok"),
            ("noop whatever", "250 2.0.0 Ok"),
            ("RSET", "250 2.0.0 Ok"),
            ("RSET x", "501 5.5.4 Syntax: RSET"),
            ("VRFY postmaster", "252 2.5.0"),
            ("HELP", "214 2.0.0"),
            ("EXPN staff", "502 5.5.2 Error: command not recognized"),
            ("AUTH PLAIN", "502 5.5.2 Error: command not recognized"),
            ("MAIL-FROM:<a@b>", "502 5.5.2 Error: command not recognized"),
            ("", "500 5.5.2 Error: bad syntax"),
            ("RCPT TO:<a@example.com>", "503 5.5.1 Error: need MAIL command"),
            ("DATA", "503 5.5.1 Error: need MAIL command"),
            ("STARTTLS now", "501 5.5.4 Syntax: STARTTLS"),
        ],
    )
    def test_reply(self, server: Server, command: str, expected: str) -> None:
        session = server.connect()
        session.hello()
        (reply,) = session.send(command + "\r\n")
        assert reply.startswith(expected)

    def test_eight_bit_commands(self, server: Server) -> None:
        session = server.connect()
        session.hello()
        replies = session.send(
            b"\xc3\xa9T\xff\r\n"
            b"MAIL FROM:<a@b.example> X\xc3\xa9=1\r\n"
            b"MAIL FROM:<\xc3\xa9@b.example>\r\n"
        )
        assert codes(replies) == ["502 5.5.2", "555 5.5.4", "501 5.1.7"]

    def test_quit(self, server: Server) -> None:
        session = server.connect()
        assert session.send("QUIT\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
        assert session.transport.disconnecting


class TestTransaction:
    def test_relay_refusal_is_answered_and_logged(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        session = server.connect()
        session.hello()
        session.send("MAIL FROM:<s@client.example>\r\n")
        reply = session.send("RCPT TO:<x@other.example>\r\n")
        text = (
            "550 5.7.1 <x@other.example>: Recipient address rejected: "
            "not a domain we accept mail for"
        )
        assert reply == [text]
        assert f"reject: RCPT from unknown[192.0.2.1]: {text}" in lines_of(events)

    def test_outbound_listener_refuses_strangers(self, server: Server) -> None:
        session = server.connect("internal", peer="203.0.113.5")
        session.hello()
        session.send("MAIL FROM:<s@client.example>\r\n")
        assert session.send("RCPT TO:<x@far.example>\r\n") == [
            "554 5.7.1 <x@far.example>: Relay access denied"
        ]

    def test_outbound_listener_relays_for_its_networks(self, server: Server) -> None:
        session = server.connect("internal", peer="192.0.2.7")
        session.start_transaction("x@far.example")

    def test_parameters(self, server: Server) -> None:
        session = server.connect()
        session.hello()
        assert codes(session.send("MAIL FROM:<a@b.example> XFOO=1\r\n")) == [
            "555 5.5.4"
        ]
        session.send("MAIL FROM:<a@b.example>\r\n")
        assert codes(session.send("RCPT TO:<a@example.com> NOTIFY=NEVER\r\n")) == [
            "555 5.5.4"
        ]

    def test_nested_mail_and_data_without_recipients(self, server: Server) -> None:
        session = server.connect()
        session.hello()
        replies = session.send(
            "MAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n"
        )
        assert codes(replies) == ["250 2.1.0", "503 5.5.1", "554 5.5.1"]
        assert server.is_empty()

    def test_bad_addresses(self, server: Server) -> None:
        session = server.connect()
        session.hello()
        assert codes(session.send("MAIL FROM:<a b@c>\r\n")) == ["501 5.1.7"]
        session.send("MAIL FROM:<>\r\n")
        assert codes(session.send("RCPT TO:<>\r\n")) == ["501 5.1.3"]

    def test_ehlo_resets_the_transaction(self, server: Server) -> None:
        session = server.connect()
        session.start_transaction()
        session.hello()
        assert codes(session.send("DATA\r\n")) == ["503 5.5.1"]


class TestAddresses:
    """Addresses are kept in one canonical form from the moment they are
    accepted, so policy, recipient lists and duplicates see one string."""

    def envelope(self, server: Server, session: Session) -> Envelope:
        assert session.send("DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]
        return server.spool.load(queued_id(session.send(".\r\n")[0]))

    def test_quoted_recipient_is_recorded_unquoted(self, server: Server) -> None:
        session = server.connect()
        session.hello()
        session.send('MAIL FROM:<"Sender"@Client.Example>\r\n')
        assert session.send('RCPT TO:<"ceo"@example.com>\r\n') == ["250 2.1.5 Ok"]
        envelope = self.envelope(server, session)
        assert envelope.sender == "Sender@client.example"
        assert [r.address for r in envelope.recipients] == ["ceo@example.com"]

    def test_quoted_and_plain_forms_are_one_recipient(self, server: Server) -> None:
        session = server.connect()
        session.hello()
        session.send("MAIL FROM:<s@client.example>\r\n")
        replies = session.send(
            'RCPT TO:<"ceo"@example.com>\r\n'
            "RCPT TO:<ceo@example.com>\r\n"
            'RCPT TO:<"c\\eo"@EXAMPLE.com>\r\n'
        )
        assert codes(replies) == ["250 2.1.5"] * 3
        envelope = self.envelope(server, session)
        assert [r.address for r in envelope.recipients] == ["ceo@example.com"]

    @pytest.mark.parametrize(
        "command",
        [
            b'MAIL FROM:<"x>y"@org.test>',
            b'MAIL FROM:<"x\x00y"@org.test>',
            b"MAIL FROM:<j\xc3\xb6@org.test>",
            b'RCPT TO:<"a>b"@example.com>',
            b'RCPT TO:<"a<b"@example.com>',
            b'RCPT TO:<"a\tb"@example.com>',
            b"RCPT TO:<j\xc3\xb6@example.com>",
            b"RCPT TO:<j\xff@example.com>",
        ],
    )
    def test_what_cannot_be_relayed_is_refused(
        self, server: Server, command: bytes
    ) -> None:
        """mta.smtpclient could never send these on: refused at once, rather
        than queued to fail for ever."""
        session = server.connect()
        session.hello()
        if command.startswith(b"RCPT"):
            session.send("MAIL FROM:<s@client.example>\r\n")
            expected = "501 5.1.3 Bad recipient address: "
        else:
            expected = "501 5.1.7 Bad sender address: "
        assert session.send(command + b"\r\n") == [
            expected + "<, >, control and non-ASCII characters cannot be relayed"
        ]

    @pytest.mark.parametrize(
        "recipient",
        [
            "user%other.test@example.com",
            "other.test!user@example.com",
            '"user@other.test"@example.com',
        ],
    )
    def test_sender_specified_routing_is_refused_inbound(
        self, server: Server, recipient: str
    ) -> None:
        session = server.connect()
        session.hello()
        session.send("MAIL FROM:<s@client.example>\r\n")
        assert session.send(f"RCPT TO:<{recipient}>\r\n") == [
            f"550 5.7.1 <{recipient}>: Relay access denied: "
            "sender-specified routing is not accepted"
        ]

    def test_trusted_clients_may_route(self, server: Server) -> None:
        session = server.connect("internal", peer="192.0.2.7")
        session.start_transaction("user%other.test@example.com")

    @pytest.mark.parametrize("listener", ["mx", "internal"])
    def test_bare_postmaster_is_ours(self, server: Server, listener: str) -> None:
        session = server.connect(listener, peer="192.0.2.7")
        session.hello()
        session.send("MAIL FROM:<s@client.example>\r\n")
        replies = session.send(
            "RCPT TO:<Postmaster>\r\nRCPT TO:<postmaster@Example.com>\r\n"
        )
        assert codes(replies) == ["250 2.1.5", "250 2.1.5"]
        envelope = self.envelope(server, session)
        assert [r.address for r in envelope.recipients] == ["postmaster@example.com"]


class TestPipelining:
    MESSAGE = (
        "EHLO client.example\r\n"
        "MAIL FROM:<sender@client.example>\r\n"
        "RCPT TO:<a@example.com>\r\n"
        "DATA\r\n"
        "Subject: hi\r\n\r\nbody\r\n.\r\n"
        "QUIT\r\n"
    )

    def test_replies_in_command_order(self, server: Server) -> None:
        session = server.connect()
        replies = session.send(self.MESSAGE)
        assert codes(replies) == [
            "250 STARTTLS",
            "250 2.1.0",
            "250 2.1.5",
            "354 End",
            "250 2.0.0",
            "221 2.0.0",
        ]
        queue_id = queued_id(replies[-2])
        assert server.spool.queue_ids() == [queue_id]
        assert [envelope.queue_id for envelope in server.queued] == [queue_id]

    def test_nothing_is_answered_while_the_commit_runs(self, server: Server) -> None:
        commits = server.hold_commits()
        session = server.connect()
        assert codes(session.send(self.MESSAGE))[-1] == "354 End"
        assert session.send("NOOP\r\n") == []  # buffered, not answered
        assert not server.queued

        envelope = commits.finish()
        replies = session.take()
        assert codes(replies) == ["250 2.0.0", "221 2.0.0"]
        assert queued_id(replies[0]) == envelope.queue_id
        assert server.queued == [envelope]

    def test_reading_stops_during_the_commit_once_much_is_waiting(
        self, server: Server
    ) -> None:
        # Commands that come while the commit runs are kept, and reading
        # goes on; past what a pipelining client has reason to send, the
        # transport is paused until the 250 is out.
        commits = server.hold_commits()
        session = server.connect()
        assert codes(session.send(self.MESSAGE))[-1] == "354 End"
        assert session.send("NOOP\r\n" * 100) == []
        assert session.transport.producerState == "producing"
        assert session.send("NOOP\r\n" * 3000) == []
        assert session.transport.producerState == "paused"

        commits.finish()
        assert codes(session.take()) == ["250 2.0.0", "221 2.0.0"]

    def test_idle_timer_is_stopped_during_the_commit(self, server: Server) -> None:
        writers: list[MessageWriter] = []

        def never(writer: MessageWriter, envelope: Envelope) -> defer.Deferred[None]:
            writers.append(writer)
            return defer.Deferred()

        server.factory.commit = never
        session = server.connect()
        session.send(self.MESSAGE)
        server.clock.advance(3600)
        assert session.take() == []
        assert not session.transport.disconnecting
        writers[0].abort()

    @pytest.mark.parametrize(
        ("error", "expected"),
        [
            (
                OSError(errno.EIO, "I/O error"),
                "451 4.3.0 Error: queue file write error",
            ),
            (
                OSError(errno.ENOSPC, "No space"),
                "452 4.3.1 Insufficient system storage",
            ),
            (RuntimeError("bug"), "451 4.3.0 Error: queue file write error"),
        ],
    )
    def test_commit_failure(
        self,
        server: Server,
        events: list[dict[str, Any]],
        error: Exception,
        expected: str,
    ) -> None:
        server.factory.commit = lambda writer, envelope: defer.fail(error)
        session = server.connect()
        replies = session.send(self.MESSAGE)
        assert replies[-2:] == [expected, "221 2.0.0 Bye"]
        assert server.is_empty()
        assert not server.queued
        assert any("cannot write the queue file" in line for line in lines_of(events))
        # The reactor logs failures that are never handled; none are left.
        for event in events:
            if event.get("log_failure") is not None:
                event["log_failure"].cleanFailure()


class TestStartTLS:
    def test_starttls_with_arguments(self, server: Server) -> None:
        session = server.connect()
        session.hello()
        assert session.send("STARTTLS x\r\n") == ["501 5.5.4 Syntax: STARTTLS"]
        assert session.transport.tls_creator is None

    def test_starttls_inside_a_transaction(self, server: Server) -> None:
        session = server.connect()
        session.start_transaction()
        assert codes(session.send("STARTTLS\r\n")) == ["503 5.5.1"]

    def test_require_tls(self, server: Server) -> None:
        session = server.connect("submission")
        session.hello()
        assert session.send("MAIL FROM:<a@b.example>\r\n") == [
            "530 5.7.0 Must issue a STARTTLS command first"
        ]
        session.send("STARTTLS\r\n")
        session.protocol.handshakeCompleted()
        session.hello()
        assert codes(session.send("MAIL FROM:<a@b.example>\r\n")) == ["250 2.1.0"]

    def test_tls_facts_reach_the_envelope_and_header(self, server: Server) -> None:
        session = server.connect()
        session.hello()
        session.send("STARTTLS\r\n")
        session.protocol.handshakeCompleted()
        session.start_data()
        queue_id = queued_id(session.send("hi\r\n.\r\n")[0])
        envelope = server.spool.load(queue_id)
        assert envelope.client.tls == TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128)
        message = server.message(queue_id)
        assert f"with ESMTPS id {queue_id}\r\n".encode() in message
        assert b"\t(version=TLSv1.3 cipher=TLS_AES_128_GCM_SHA256)\r\n" in message


class TestData:
    def test_message_and_envelope_as_spooled(self, server: Server) -> None:
        session = server.connect(peer="192.0.2.1")
        session.send("EHLO client.example\r\n")
        session.send("MAIL FROM:<Sender@Client.Example> BODY=8BITMIME\r\n")
        session.send("RCPT TO:<Alice@EXAMPLE.com>\r\n")
        session.send("DATA\r\n")
        body = (
            b"Subject: dots\r\n"
            b"\r\n"
            b"..leading dot\r\n"
            b"..\r\n"
            b"...\r\n"
            b"not.a.dot line\r\n"
            b"caf\xc3\xa9\r\n"
        )
        stuffed = body.replace(b"\r\n..", b"\r\n.")
        assert stuffed != body
        replies = session.send(body + b".\r\n")
        queue_id = queued_id(replies[0])

        message = server.message(queue_id)
        assert body_of(message) == (
            b"Subject: dots\r\n\r\n.leading dot\r\n.\r\n..\r\n"
            b"not.a.dot line\r\ncaf\xc3\xa9\r\n"
        )
        header = message[: len(message) - len(body_of(message))]
        assert header.startswith(
            b"Received: from client.example (unknown [192.0.2.1])\r\n"
            b"\tby relay.test (mta) with ESMTP id " + queue_id.encode() + b"\r\n"
            b"\tfor <Alice@example.com>; "
        )
        assert header.count(b"\n") == header.count(b"\r\n") == 3

        envelope = server.spool.load(queue_id)
        assert envelope.sender == "Sender@client.example"
        assert [r.address for r in envelope.recipients] == ["Alice@example.com"]
        assert envelope.body == "8BITMIME"
        assert envelope.size == len(message)
        assert envelope.client.helo == "client.example"
        assert envelope.client.host == "unknown"
        assert envelope.client.address == "192.0.2.1"
        assert envelope.client.listener == "mx"
        assert envelope.client.tls is None

    def test_null_sender_and_several_recipients(self, server: Server) -> None:
        session = server.connect()
        session.hello()
        session.send("MAIL FROM:<>\r\n")
        session.send("RCPT TO:<a@example.com>\r\nRCPT TO:<b@Example.COM>\r\n")
        # The same mailbox again is taken once.
        assert session.send("RCPT TO:<a@EXAMPLE.COM>\r\n") == ["250 2.1.5 Ok"]
        session.send("DATA\r\n")
        queue_id = queued_id(session.send(".\r\n")[0])
        envelope = server.spool.load(queue_id)
        assert envelope.sender == ""
        assert [r.address for r in envelope.recipients] == [
            "a@example.com",
            "b@example.com",
        ]
        message = server.message(queue_id)
        assert b"for <" not in message
        assert body_of(message) == b""

    @pytest.mark.parametrize(
        # What is stored before a failure is found does not matter: the
        # writer is aborted.
        ("stream", "stored", "failure"),
        [
            (
                b"a\r\n..b\r\n...\r\n\r\n..\r\nc.\r\n.x\r\n.\r\nafter\r\n",
                b"a\r\n.b\r\n..\r\n\r\n.\r\nc.\r\nx\r\n",
                None,
            ),
            (b".\r\nafter\r\n", b"", None),
            (b"a\r\n.\r\r\n\r\n.\r\nafter\r\n", b"", "550 5.6.0"),
            (b"a\r\nb\nc\r\n.\r\nafter\r\n", b"", "550 5.6.0"),
            (b"x" * 50 + b"\r\n.\r\nafter\r\n", b"", "552 5.3.4"),
        ],
    )
    def test_every_split_of_the_input_gives_the_same_message(
        self, stream: bytes, stored: bytes, failure: str | None
    ) -> None:
        splits = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
        splits += [[stream[:cut], stream[cut:]] for cut in range(1, len(stream))]
        for chunks in splits:
            decoder = DataDecoder(limit=40)
            got, rest = b"", None
            for chunk in chunks:
                if rest is not None:
                    rest += chunk
                    continue
                piece, rest = decoder.feed(chunk)
                got += piece
            assert rest == b"after\r\n", chunks
            reply = decoder.failure
            assert (reply and f"{reply.code} {reply.dsn}") == failure, chunks
            if failure is None:
                assert got == stored, chunks


def test_received_header_plaintext_several_recipients() -> None:
    header = received_header(
        helo="bad\x01name (x)",
        client_host="unknown",
        client_address="192.0.2.1",
        hostname="relay.test",
        queue_id="ABC",
        esmtp=False,
        tls=None,
        recipients=["a@example.com", "b@example.com"],
        when=1796326800.0,
    )
    assert header == (
        b"Received: from bad?name?(x) (unknown [192.0.2.1])\r\n"
        b"\tby relay.test (mta) with SMTP id ABC; Thu, 03 Dec 2026 19:40:00 +0000\r\n"
    )


# --- on loopback, with real TLS ---------------------------------------------


def send_over_tls(
    listening: Listening, context: ssl.SSLContext
) -> tuple[str | None, tuple[str, str, int] | None, str]:
    """STARTTLS, one message; the protocol, cipher, and the queued reply."""
    with listening.client() as client:
        client.starttls(context=context)
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        version, cipher = sock.version(), sock.cipher()
        client.ehlo("client.example")
        client.mail("sender@client.example")
        client.rcpt("a@example.com")
        code, text = client.data(b"Subject: tls\r\n\r\nhello\r\n")
        assert code == 250, text
    return version, cipher, text.decode()


@pytest_twisted.inlineCallbacks
def test_starttls_is_tls13_and_facts_reach_the_spool(listening: Listening) -> Any:
    version, cipher, reply = yield in_thread(
        lambda: send_over_tls(listening, client_context())
    )
    assert version == "TLSv1.3"
    # Our first TLS 1.3 suite, although OpenSSL clients prefer AES-256.
    assert cipher is not None and cipher[0] == "TLS_AES_128_GCM_SHA256"

    queue_id = reply.rsplit(" ", 1)[1]
    envelope = listening.spool.load(queue_id)
    assert envelope.client.tls == TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128)
    assert envelope.client.listener == "mx"
    assert envelope.client.address == "127.0.0.1"
    assert [item.queue_id for item in listening.queued] == [queue_id]
    message = listening.spool.read_message(envelope)
    assert b"with ESMTPS id" in message
    assert message.endswith(b"\r\n\r\nhello\r\n")


@pytest_twisted.inlineCallbacks
def test_tls12_client_gets_our_cipher_order(listening: Listening) -> Any:
    reverse = ":".join(reversed(DEFAULT_CIPHERS))
    context = client_context(maximum=ssl.TLSVersion.TLSv1_2, ciphers=reverse)
    version, cipher, _ = yield in_thread(lambda: send_over_tls(listening, context))
    assert version == "TLSv1.2"
    assert cipher is not None and cipher[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"


@pytest_twisted.inlineCallbacks
def test_tls10_11_client_is_refused(listening: Listening) -> Any:
    def attempt() -> BaseException | None:
        context = certs.permissive_client_context(
            minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1_1
        )
        client = listening.client()
        try:
            client.starttls(context=context)
        except (ssl.SSLError, OSError, smtplib.SMTPException) as error:
            return error
        finally:
            client.close()
        return None

    error = yield in_thread(attempt)
    assert isinstance(error, ssl.SSLError)
    assert "PROTOCOL_VERSION" in str(error)  # our alert, not a cipher problem
    assert not listening.spool.queue_ids()


@pytest_twisted.inlineCallbacks
def test_pipelined_replies_in_order_on_a_socket(listening: Listening) -> Any:
    replies = yield in_thread(
        lambda: raw_exchange(listening.address, TestPipelining.MESSAGE.encode())
    )
    assert codes(replies) == [
        "250 STARTTLS",
        "250 2.1.0",
        "250 2.1.5",
        "354 End",
        "250 2.0.0",
        "221 2.0.0",
    ]
    assert listening.spool.queue_ids() == [queued_id(replies[-2])]

