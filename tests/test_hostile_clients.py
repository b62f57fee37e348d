"""Hostile clients on the listener: one test per example of issue 5, item 3.

Grouped by kind: SMTP smuggling, STARTTLS command injection, line limits,
size and recipient limits, connections, errors, timeouts, loops, garbage
(binary bytes, half-closed connections, clients that vanish), and clients
that pipeline without reading.  Most run in memory (tests/serverharness.py:
a real spool, a fake clock); a few on loopback, and the last ones against
the real relay process (tests/relay.py).

Where the example is a fault of the stock Twisted classes (the table in
TWISTED-NOTES.md), the test is one that stock `twisted.mail.smtp.ESMTP`
fails; its docstring says how.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from mta.clientlimits import ClientConnections, counts_as_error
from mta.envelope import Envelope, TLSFacts
from mta.reply import Reply
from mta.smtpserver import RelayServerFactory
from mta.spool import MessageWriter
from tests.peers import certs
from tests.relay import RelayProcess, base_config, free_port
from tests.serverharness import (
    HOSTNAME,
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
)

BARE_NEWLINE = "550 5.6.0 Message contains bare CR or LF; lines must end in CRLF"
TIMEOUT = "421 4.4.2 relay.test Error: timeout exceeded"


def levels(events: list[dict[str, Any]]) -> set[str]:
    return {event["log_level"].name for event in events if "log_level" in event}


def no_failure_logged(events: list[dict[str, Any]]) -> bool:
    return not any(event.get("log_failure") for event in events) and not (
        levels(events) & {"error", "critical"}
    )


# --- SMTP smuggling --------------------------------------------------------


class TestSmuggling:
    """Only CRLF.CRLF ends DATA; a bare CR or LF is refused, never a line
    end, so a second message can never appear."""

    @pytest.mark.parametrize(
        "body",
        [
            b"one\ntwo\r\n",
            b"one\rtwo\r\n",
            b"one\r\r\n",
            b".\n",
            b".\r.\r\n",
            b"\n.\n",
            b"last\n",
        ],
    )
    def test_bare_cr_or_lf_fails_the_message(
        self, server: Server, events: list[dict[str, Any]], body: bytes
    ) -> None:
        session = server.connect()
        session.start_data()
        # A bare LF or CR never ends a line, so the end needs a CRLF first.
        replies = session.send(body + b"\r\n.\r\nNOOP\r\n")
        assert replies == [BARE_NEWLINE, "250 2.0.0 Ok"]
        assert server.is_empty()
        assert not server.queued
        assert (
            f"reject: END-OF-MESSAGE from unknown[192.0.2.1]: {BARE_NEWLINE}"
            in lines_of(events)
        )

    @pytest.mark.parametrize(
        "false_end",
        [
            b"\n.\n",
            b"\r.\r",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\n.\r",
            b"\r.\n",
        ],
    )
    @pytest.mark.parametrize("reads", ["one read", "byte by byte"])
    def test_no_second_message_after_a_false_end(
        self, server: Server, false_end: bytes, reads: str
    ) -> None:
        """The smuggler's message: a false end, then the commands of a
        forged second message, then the real end."""
        session = server.connect()
        session.start_data()
        stream = (
            b"Subject: first\r\n\r\nhello"
            + false_end
            + b"MAIL FROM:<forged@victim.example>\r\n"
            b"RCPT TO:<a@example.com>\r\nDATA\r\nSubject: forged\r\n\r\n"
            b"forged\r\n.\r\n"
        )
        if reads == "one read":
            replies = session.send(stream)
        else:
            replies = [line for byte in stream for line in session.send(bytes([byte]))]
        assert replies == [BARE_NEWLINE]
        assert server.is_empty()

    def test_a_bare_lf_dot_does_not_end_data(self, server: Server) -> None:
        session = server.connect()
        session.start_data()
        assert session.send(b"x\r\n.\nQUIT\r\n") == []
        assert codes(session.send(b".\r\n")) == ["550 5.6.0"]

    @pytest.mark.parametrize("bad", [b"NOOP\nNOOP\r\n", b"NOOP\rNOOP\r\n"])
    def test_bare_newline_in_a_command(self, server: Server, bad: bytes) -> None:
        session = server.connect()
        # Neither a bare LF nor a bare CR ends the line: one line, one error.
        assert session.send(bad[:5]) == []
        assert codes(session.send(bad[5:])) == ["500 5.5.2"]


# --- STARTTLS command injection ---------------------------------------------


class TestStartTLSInjection:
    def test_pipelined_commands_after_starttls_are_discarded(
        self, server: Server
    ) -> None:
        """Stock ESMTP answers the pipelined MAIL and RCPT (inside TLS, as
        CVE-2011-0411) and keeps the HELO: MAIL then gets 250, not 503."""
        session = server.connect()
        replies = session.send(
            "EHLO client.example\r\nSTARTTLS\r\n"
            "MAIL FROM:<a@b.example>\r\nRCPT TO:<a@example.com>\r\n"
        )
        assert replies[-1] == "220 2.0.0 Ready to start TLS"
        assert codes(replies) == ["250 STARTTLS", "220 2.0.0"]
        assert session.transport.tls_creator is server.creator

        session.protocol.handshakeCompleted()
        assert session.protocol.tls == TLSFacts(
            "TLSv1.3", "TLS_AES_128_GCM_SHA256", 128
        )
        # All was forgotten, HELO included (RFC 3207 4.2).
        assert session.send("MAIL FROM:<a@b.example>\r\n") == [
            "503 5.5.1 Error: send HELO/EHLO first"
        ]
        ehlo = session.send("EHLO client.example\r\n")
        assert ehlo[-1] == "250 ENHANCEDSTATUSCODES"
        assert session.send("STARTTLS\r\n") == ["503 5.5.1 Error: TLS already active"]


@pytest_twisted.inlineCallbacks
def test_commands_pipelined_after_starttls_never_run(listening: Listening) -> Any:
    def exchange() -> list[str]:
        with socket.create_connection(listening.address, timeout=10) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(
                b"EHLO client.example\r\nSTARTTLS\r\n"
                b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<a@example.com>\r\n"
            )
            while not reader.readline().startswith(b"220 "):
                pass
            context = client_context()
            with context.wrap_socket(sock, server_hostname=HOSTNAME) as tls:
                tls.sendall(b"NOOP\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
                return [line.decode().rstrip() for line in tls.makefile("rb")]

    replies = yield in_thread(exchange)
    assert replies == [
        "250 2.0.0 Ok",
        "503 5.5.1 Error: send HELO/EHLO first",
        "221 2.0.0 Bye",
    ]


# --- lines ------------------------------------------------------------------


class TestLines:
    def test_line_too_long_then_the_session_goes_on(self, server: Server) -> None:
        """Stock ESMTP takes command lines up to 16 KiB."""
        session = server.connect()
        longest = "NOOP " + "x" * (2048 - 7) + "\r\n"
        assert session.send(longest) == ["250 2.0.0 Ok"]
        assert session.send("NOOP " + "x" * 2043 + "\r\nNOOP\r\n") == [
            "500 5.5.2 Error: line too long",
            "250 2.0.0 Ok",
        ]

    def test_line_too_long_across_reads_is_not_kept(self, server: Server) -> None:
        session = server.connect()
        assert session.send("MAIL FROM:<" + "a" * 5000) == []
        for _ in range(10):
            assert session.send("b" * 5000) == []
        assert len(session.protocol._input) <= 1
        # The CRLF split over two reads still ends the line.
        assert session.send("c\r") == []
        assert session.send("\nNOOP\r\n") == [
            "500 5.5.2 Error: line too long",
            "250 2.0.0 Ok",
        ]

    def test_a_body_line_over_998_octets_is_relayed_unchanged(
        self, server: Server
    ) -> None:
        """The README's choice: accepted and relayed as it came, never
        folded (RFC 5322 2.1.1 is the sender's rule to keep)."""
        session = server.connect()
        session.start_data()
        body = b"Subject: long\r\n\r\n" + b"x" * 999 + b"\r\n" + b"y" * 5000 + b"\r\n"
        (reply,) = session.send(body + b".\r\n")
        assert body_of(server.message(queued_id(reply))) == body

    def test_a_line_over_16_kib_never_ends_data(self, server: Server) -> None:
        """Stock ESMTP (LineOnlyReceiver, 16 KiB) answers "500 Line too
        long" to the long line and leaves DATA; the later reads then run as
        commands and a forged second message is accepted with 250 (the
        commands must come in later reads: stock drops the rest of the read
        that held the long line).  Here it is all one message."""
        session = server.connect()
        session.start_data()
        reads = [
            b"Subject: long\r\n\r\n" + b"A" * 17000 + b"\r\n",
            b"MAIL FROM:<forged@victim.example>\r\n",
            b"RCPT TO:<a@example.com>\r\n",
            b"DATA\r\n",
            b"Subject: forged\r\n\r\nforged\r\n",
        ]
        for read in reads:
            assert session.send(read) == []
        (reply,) = session.send(b".\r\n")
        assert body_of(server.message(queued_id(reply))) == b"".join(reads)
        assert len(server.spool.queue_ids()) == 1

    def test_a_line_without_crlf_is_not_buffered(self, server: Server) -> None:
        session = server.connect()
        session.start_data()
        assert session.send(b"C" * 20480) == []
        assert len(session.protocol._input) == 0
        assert session.send(b".\r\nQUIT\r\n") == []
        assert session.send(b"C" * 100 + b"\r\nend\r\n") == []
        replies = session.send(b".\r\n")
        body = b"C" * 20480 + b".\r\nQUIT\r\n" + b"C" * 100 + b"\r\nend\r\n"
        assert body_of(server.message(queued_id(replies[0]))) == body

    def test_a_line_over_a_megabyte(self, server: Server) -> None:
        session = server.connect()
        session.start_data()
        line = b"D" * (1024 * 1024 + 10)
        for start in range(0, len(line), 65536):
            assert session.send(line[start : start + 65536]) == []
        replies = session.send(b"\r\n.\r\n")
        assert body_of(server.message(queued_id(replies[0]))) == line + b"\r\n"


# --- sizes and recipients ------------------------------------------------------


class TestSizeAndRecipients:
    def test_oversize_declared_size(self, server: Server) -> None:
        """Stock ESMTP parses SIZE= and ignores it."""
        session = server.connect()
        session.hello()
        assert session.send(f"MAIL FROM:<a@b.example> SIZE={LIMIT + 1}\r\n") == [
            "552 5.3.4 Message size exceeds fixed limit"
        ]
        assert codes(session.send(f"MAIL FROM:<a@b.example> SIZE={LIMIT}\r\n")) == [
            "250 2.1.0"
        ]

    def test_oversize_body_is_read_to_its_end(self, server: Server) -> None:
        session = server.connect()
        session.start_data()
        line = b"E" * 998 + b"\r\n"
        for _ in range(LIMIT // len(line) + 2):
            assert session.send(line) == []
        # Past the limit, nothing more is written.
        (partial,) = server.spool.tmp.iterdir()
        assert partial.stat().st_size <= LIMIT + 1000
        replies = session.send(b".\r\nNOOP\r\n")
        assert replies == ["552 5.3.4 Message size exceeds fixed limit", "250 2.0.0 Ok"]
        assert server.is_empty()

    def test_too_many_recipients(self, server: Server) -> None:
        session = server.connect()
        session.start_transaction("a@example.com", "b@example.com", "c@example.com")
        assert session.send("RCPT TO:<d@example.com>\r\n") == [
            "452 4.5.3 Error: too many recipients"
        ]

    def test_recipients_past_the_limit_do_not_lose_the_transaction(
        self, server: Server
    ) -> None:
        """A client that pipelines more recipients than the limit gets
        452 for the rest (to send them again later, RFC 5321 4.5.3.1.10);
        those refusals are no errors, so its message still goes (up to
        Postfix's overshoot of 1000, after which they count)."""
        server.set_limits(recipients=3, errors=5)
        session = server.connect()
        session.hello()
        rcpts = "".join(f"RCPT TO:<u{n}@example.com>\r\n" for n in range(30))
        replies = session.send(f"MAIL FROM:<s@client.example>\r\n{rcpts}DATA\r\n")
        assert codes(replies) == (["250 2.1.0"] + ["250 2.1.5"] * 3
                                  + ["452 4.5.3"] * 27 + ["354 End"])
        replies = session.send(b"Subject: many\r\n\r\nhello\r\n.\r\n")
        assert codes(replies) == ["250 2.0.0"]
        assert not session.transport.disconnecting


# --- connections ---------------------------------------------------------------


class TestConnections:
    def test_too_many_connections_from_one_address(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        server.set_limits(client_connections=3)
        sessions = [server.connect(peer="192.0.2.1") for _ in range(3)]
        assert server.refused(peer="192.0.2.1") == [
            "421 4.7.0 relay.test Error: too many connections from 192.0.2.1"
        ]
        assert (
            "refused connection from unknown[192.0.2.1] to listener mx: 3 "
            "connections from 192.0.2.1 are open (limits.client_connections: 3); "
            "answered 421 4.7.0, connection closed"
        ) in lines_of(events)
        assert "warn" in levels(events)

        # Another address is not affected; a closed connection frees its place.
        server.connect(peer="192.0.2.2").hello()
        sessions[0].close()
        server.connect(peer="192.0.2.1").hello()
        assert server.factory.clients.open_from("192.0.2.1") == 3

    def test_clients_in_networks_are_exempt_from_the_per_address_limit(
        self, server: Server
    ) -> None:
        """The organisation's own servers (the listener's ``networks``) may
        send over many connections from one address; the count is still
        the address's own, on whichever listener."""
        server.set_limits(client_connections=2)
        for _ in range(4):
            server.connect("internal", peer="192.0.2.7").hello()
        assert server.refused("mx", peer="192.0.2.7") == [
            "421 4.7.0 relay.test Error: too many connections from 192.0.2.7"
        ]

    def test_too_many_connections_in_total(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        server.set_limits(connections=2)
        first = server.connect(peer="192.0.2.1")
        server.connect("internal", peer="192.0.2.7")
        expected = ["421 4.3.2 relay.test Error: too many connections; try again later"]
        # Nobody is exempt from the total: it protects the process.
        assert server.refused("internal", peer="192.0.2.8") == expected
        assert server.refused(peer="198.51.100.1") == expected
        assert any(
            "2 client connections are open (limits.connections: 2)" in line
            for line in lines_of(events)
        )
        first.close()
        server.connect(peer="198.51.100.1").hello()

    def test_every_listener_shares_one_count(self, server: Server) -> None:
        """As the relay builds them (mta.service): one `ClientConnections`
        for the factories of every listener."""
        server.set_limits(client_connections=2)
        other = RelayServerFactory(
            "mx",
            lambda: server.config,
            server.spool,
            lambda: server.creator,  # type: ignore[arg-type,return-value]
            lambda envelope, lock: server.queued.append(envelope),
            reactor=server.clock,
            clients=server.factory.clients,
        )
        server.connect(peer="192.0.2.1")
        Session(other, "192.0.2.1").hello()
        assert server.refused(peer="192.0.2.1")[0].startswith("421 4.7.0 ")
        assert isinstance(server.factory.clients, ClientConnections)


# --- errors --------------------------------------------------------------------


class TestErrors:
    def test_too_many_errors_ends_the_session(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        """The 20th error reply (limits.errors, Postfix's
        smtpd_hard_error_limit) is followed by 421; what was pipelined
        after it is never answered."""
        session = server.connect()
        replies = session.send(b"\x00garbage\r\n" * 19 + b"NOOP\r\n")
        assert codes(replies) == ["502 5.5.2"] * 19 + ["250 2.0.0"]
        assert not session.transport.disconnecting

        replies = session.send(b"EXPN root\r\nNOOP\r\nQUIT\r\n")
        assert replies == [
            "502 5.5.2 Error: command not recognized",
            "421 4.7.0 relay.test Error: too many errors",
        ]
        assert session.transport.disconnecting
        assert session.send("NOOP\r\n") == []
        logged = [line for line in lines_of(events) if "too many errors" in line]
        assert logged == [
            "too many errors after UNKNOWN from unknown[192.0.2.1]: 20 error "
            "replies (limits.errors: 20); answered 421 4.7.0, connection closed"
        ]

    def test_too_many_errors_after_a_message_names_no_command(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        # Over-long lines after a message are no command: the log line
        # must not blame the end of the message.
        session = server.connect()
        session.hello()
        session.send("MAIL FROM:<s@client.example>\r\nRCPT TO:<a@example.com>\r\n"
                     "DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n")
        replies = session.send(b"x" * 3000 + b"\r\n" * 20)
        assert codes(replies) == ["500 5.5.2"] * 20 + ["421 4.7.0"]
        logged = [line for line in lines_of(events) if "too many errors" in line]
        assert [line.split(" from ")[0] for line in logged] == [
            "too many errors after UNKNOWN"]

    @pytest.mark.parametrize("verb", ["\u017ftarttls", "ma\u0131l", "qu\u0131t",
                                      "NOO\uff30"])
    def test_a_unicode_look_alike_is_no_command(
        self, server: Server, verb: str
    ) -> None:
        session = server.connect()
        session.hello()
        assert codes(session.send(f"{verb}\r\n".encode())) == ["502 5.5.2"]
        assert not session.transport.disconnecting

    @pytest.mark.parametrize(("reply", "overshoot", "counts"), [
        (Reply(452, "4.5.3", "Error: too many recipients"), 1, False),
        (Reply(452, "4.5.3", "Error: too many recipients"), 1000, False),
        (Reply(452, "4.5.3", "Error: too many recipients"), 1001, True),
        (Reply(452, "4.3.1", "Insufficient system storage"), 0, True),
        (Reply(550, "5.7.1", "relay denied"), 0, True),
        (Reply(421, "4.7.0", "closing"), 0, False),
        (Reply(250, "2.0.0", "Ok"), 0, False),
    ])
    def test_which_replies_count_as_errors(
        self, reply: Reply, overshoot: int, counts: bool
    ) -> None:
        assert counts_as_error(reply, overshoot) is counts

    def test_every_refusal_counts(self, server: Server) -> None:
        server.set_limits(errors=4)
        session = server.connect()
        session.hello()
        replies = session.send(
            "RCPT TO:<a@example.com>\r\n"  # 503: no MAIL
            "MAIL FROM:<a b@c>\r\n"  # 501: bad address
            "MAIL FROM:<s@client.example>\r\n"
            "RCPT TO:<x@elsewhere.example>\r\n"  # 550: not ours to relay
            "\r\n"  # 500: empty
            "RCPT TO:<a@example.com>\r\n"
        )
        assert codes(replies) == [
            "503 5.5.1",
            "501 5.1.7",
            "250 2.1.0",
            "550 5.7.1",
            "500 5.5.2",
            "421 4.7.0",
        ]

    def test_a_failed_message_counts_and_the_421_follows_its_reply(
        self, server: Server
    ) -> None:
        server.set_limits(errors=1)
        session = server.connect()
        session.start_data()
        replies = session.send(b"bare\nLF\r\n.\r\nNOOP\r\n")
        assert codes(replies) == ["550 5.6.0", "421 4.7.0"]
        assert server.is_empty()


# --- timeouts ------------------------------------------------------------------


class TestTimeouts:
    """RFC 5321 4.5.3.2: the listener's own timers, on the injected clock
    (limits.idle_timeout is 60s in these tests)."""

    def test_idle_timeout(self, server: Server) -> None:
        """Stock ESMTP waits 600 s, whatever the configuration."""
        session = server.connect()
        server.clock.advance(59)
        session.send("NOOP\r\n")
        server.clock.advance(59)
        assert session.take() == []
        server.clock.advance(1)
        assert session.take() == [TIMEOUT]
        assert session.transport.disconnecting

    def test_a_partial_line_does_not_reset_the_timer(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        """Slowloris: a byte every 20 seconds never makes a command."""
        session = server.connect()
        session.send("NOOP\r\n")
        for byte in "MA":
            server.clock.advance(20)
            assert session.send(byte) == []
        server.clock.advance(20)
        assert session.take() == [TIMEOUT]
        assert session.transport.disconnecting
        assert (
            "timeout after NOOP from unknown[192.0.2.1]: nothing received for "
            "60s (limits.idle_timeout); answered 421 4.4.2, connection closed"
        ) in lines_of(events)

    def test_a_message_has_its_own_deadline(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        """A body sent a byte every 30 seconds (each read within the idle
        time) is cut off at limits.data_timeout after 354."""
        server.set_limits(data_timeout=300.0)
        session = server.connect()
        session.start_data()
        for _ in range(9):
            server.clock.advance(30)
            assert session.send(b"x") == []
        server.clock.advance(30)
        assert session.take() == [TIMEOUT]
        assert session.transport.disconnecting
        assert server.is_empty()
        assert (
            "timeout after DATA from unknown[192.0.2.1]: the message was not "
            "complete after 300s (limits.data_timeout); answered 421 4.4.2, "
            "connection closed"
        ) in lines_of(events)
        session.close()
        assert no_failure_logged(events)

    def test_a_silent_client_in_data_times_out(self, server: Server) -> None:
        session = server.connect()
        session.start_data()
        session.send(b"Subject: half\r\n")
        server.clock.advance(60)
        assert session.take() == [TIMEOUT]
        assert server.is_empty()

    def test_the_deadline_ends_with_the_message(self, server: Server) -> None:
        server.set_limits(data_timeout=100.0)
        session = server.connect()
        session.start_data()
        assert codes(session.send(b"quick\r\n.\r\n")) == ["250 2.0.0"]
        for _ in range(4):
            server.clock.advance(50)
            assert session.send("NOOP\r\n") == ["250 2.0.0 Ok"]
        assert not session.transport.disconnecting


# --- loops ---------------------------------------------------------------------


class TestLoops:
    def test_a_message_with_too_many_hops_is_refused(self, server: Server) -> None:
        """51 Received headers over the limit of 50: a loop, RFC 5321 6.3."""
        session = server.connect()
        session.start_data()
        head = b"Received: from a by b; Thu, 3 Dec 2026 00:00:00 +0000\r\n" * 51
        replies = session.send(head + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
        assert codes(replies) == ["554 5.4.6"]
        assert server.is_empty()

    def test_received_lines_in_the_body_are_not_hops(self, server: Server) -> None:
        session = server.connect()
        session.start_data()
        body = b"Received: quoted in the body\r\n" * 60
        replies = session.send(b"Subject: x\r\n\r\n" + body + b".\r\n")
        assert codes(replies) == ["250 2.0.0"]


# --- garbage, half-closed connections, vanishing clients -----------------------


class TestGarbage:
    def test_binary_garbage_nul_and_8bit_bytes(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        session = server.connect()
        replies = session.send(
            b"\x00\x00\x00\r\n\xff\xfe\xfd\r\nEHLO \x00host\r\n"
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n"
        )
        assert codes(replies) == ["502 5.5.2", "502 5.5.2", "250 STARTTLS", "502 5.5.2"]
        session.start_data()
        (reply,) = session.send(b"\x00\x01\x80\xff\r\n.\r\n")
        assert body_of(server.message(queued_id(reply))) == b"\x00\x01\x80\xff\r\n"
        assert no_failure_logged(events)

    def test_client_gone_mid_data(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        session = server.connect()
        session.start_data()
        session.send(b"Subject: half\r\n\r\nand then")
        session.close()
        assert server.is_empty()
        assert no_failure_logged(events)
        assert server.factory.clients.total == 0

    def test_half_close_answers_what_was_sent(self, server: Server) -> None:
        """Stock ESMTP is not an IHalfCloseableProtocol: Twisted closes the
        connection at the client's FIN and the replies are never sent."""
        session = server.connect()
        assert session.send("NOOP\r\nNOOP\r\nNOO") == ["250 2.0.0 Ok"] * 2
        session.protocol.readConnectionLost()
        assert session.transport.disconnecting
        assert session.take() == []

    def test_half_close_mid_data_drops_the_message(
        self, server: Server, events: list[dict[str, Any]]
    ) -> None:
        session = server.connect()
        session.start_data()
        session.send(b"Subject: cut\r\n\r\nhalf a mess")
        session.protocol.readConnectionLost()
        assert session.transport.disconnecting
        assert session.take() == []
        assert server.is_empty()
        assert "lost connection after DATA from unknown[192.0.2.1]" in lines_of(events)
        session.close()
        assert no_failure_logged(events)

    def test_half_close_after_a_message_waits_for_its_commit(
        self, server: Server
    ) -> None:
        commits = server.hold_commits()
        session = server.connect()
        session.start_data()
        assert session.send(b"whole\r\n.\r\nNOOP\r\n") == []
        session.protocol.readConnectionLost()
        assert not session.transport.disconnecting

        envelope = commits.finish()
        assert codes(session.take()) == ["250 2.0.0", "250 2.0.0"]
        assert session.transport.disconnecting
        assert server.spool.queue_ids() == [envelope.queue_id]


# --- clients that pipeline without reading -------------------------------------


class TestUnreadReplies:
    def test_no_input_is_read_while_replies_wait(self, server: Server) -> None:
        """The transport pauses its producer (the server) when its buffer
        of unsent replies is full; stock ESMTP registers none, so its
        replies pile up without bound."""
        session = server.connect()
        assert session.transport.producer is session.protocol
        assert session.transport.streaming

        session.protocol.pauseProducing()  # as the full transport does
        assert session.transport.producerState == "paused"
        assert session.send("NOOP\r\n" * 3 + "QUIT\r\n") == []

        session.protocol.resumeProducing()  # the buffer drained
        assert session.take() == ["250 2.0.0 Ok"] * 3 + ["221 2.0.0 Bye"]
        assert session.transport.disconnecting
        # Unregistered, or Twisted's loseConnection would wait for it.
        assert session.transport.producer is None

    def test_a_client_that_never_reads_is_cut_off(self, server: Server) -> None:
        """Twisted closes a connection only once every reply is sent: a
        client that reads nothing would keep it for ever.  The idle timer
        runs (no command is handled), then idle_timeout more to take the
        421, then the connection is aborted."""
        session = server.connect()
        session.protocol.pauseProducing()
        session.send("NOOP\r\n" * 1000)
        server.clock.advance(60)
        assert session.take() == [TIMEOUT]
        assert session.transport.disconnecting
        assert not session.transport.disconnected
        server.clock.advance(60)
        assert session.transport.disconnected  # abortConnection

    def test_a_closed_connection_is_not_aborted(self, server: Server) -> None:
        session = server.connect()
        session.send("QUIT\r\n")
        session.close()
        server.clock.advance(3600)
        assert not session.transport.disconnected
        assert not server.clock.getDelayedCalls()

    def test_a_commit_and_a_full_transport_both_hold_the_input(
        self, server: Server
    ) -> None:
        pending: defer.Deferred[None] = defer.Deferred()

        def hold(writer: MessageWriter, envelope: Envelope) -> defer.Deferred[None]:
            writer.commit(envelope)
            return pending

        server.factory.commit = hold
        session = server.connect()
        session.start_data()
        session.send(b"x\r\n.\r\nNOOP\r\n")
        session.protocol.pauseProducing()
        pending.callback(None)  # the commit is done, the transport still full
        assert session.transport.producerState == "paused"
        assert codes(session.take()) == ["250 2.0.0"]

        session.protocol.resumeProducing()
        assert session.transport.producerState == "producing"
        assert session.take() == ["250 2.0.0 Ok"]


def stall_without_reading(address: tuple[str, int], limit: int) -> tuple[int, int]:
    """Send HELP (a reply 15 times its size) without reading, until the
    server stops reading (nothing more can be sent for 3 seconds) or
    ``limit`` octets went; then read 1000 replies and send once more.
    Returns the octets sent before the stall and after reading."""
    with socket.create_connection(address, timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        chunk = b"HELP\r\n" * 10000
        sent = 0
        while sent < limit and writable(sock, wait=3):
            sent += sock.send(chunk[sent % len(chunk) :])
        for _ in range(1000):
            assert reader.readline().startswith(b"214 2.0.0 See RFC 5321"), sent
        # Reading makes room: the server reads again.
        deadline = time.monotonic() + 20
        while not writable(sock, wait=0) and time.monotonic() < deadline:
            for _ in range(1000):
                reader.readline()
        more = sock.send(chunk[sent % len(chunk) :]) if writable(sock, 0) else 0
        return sent, more


def writable(sock: socket.socket, wait: float) -> bool:
    return bool(select.select([], [sock], [], wait)[1])


@pytest_twisted.inlineCallbacks
def test_a_client_that_never_reads_is_not_read_from(listening: Listening) -> Any:
    """Stock ESMTP reads on and buffers every reply: the client could push
    all 32 MiB, and the server would hold 15 times that in replies."""
    limit = 32 * 1024 * 1024
    sent, more = yield in_thread(
        lambda: stall_without_reading(listening.address, limit)
    )
    # Kernel buffers on both sides take some tens of MiB at most.
    assert sent < limit // 2, sent
    assert more > 0


# --- against the running relay ---------------------------------------------------


def client_hello() -> bytes:
    """The first flight of a real TLS client: what a client configured for
    implicit TLS (port 465 style) sends to the plaintext port."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="relay.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def talk(
    address: tuple[str, int],
    data: bytes,
    *,
    read_greeting: bool = True,
    half_close: bool = False,
    vanish: bool = False,
) -> bytes:
    """Send ``data`` and return whatever comes back until the relay closes
    (``half_close``: after shutting down our sending side; ``vanish``: the
    client resets the connection instead of reading)."""
    with socket.create_connection(address, timeout=15) as sock:
        if read_greeting:
            assert sock.recv(512).startswith(b"220 ")
        sock.sendall(data)
        if vanish:
            # SO_LINGER 0: close with a reset, as a crashed client does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            return b""
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def assert_spool_whole(relay: RelayProcess) -> None:
    """tmp/ empty; queue/ only queue files (and the envelope files of some
    of them), each loading with its size."""
    spool = relay.spool
    deadline = time.monotonic() + 10
    while any(spool.tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(spool.tmp.iterdir()) == []
    names = {path.name for path in spool.queue.iterdir()}
    assert all(name.endswith(".msg") or (name.endswith(".env")
                                         and f"{name[:-4]}.msg" in names)
               for name in names), names
    for queue_id in spool.queue_ids():
        envelope = spool.load(queue_id)
        spool.check_message(envelope)
        assert len(spool.read_message(envelope)) == envelope.size


def assert_log_clean(relay: RelayProcess) -> None:
    log = relay.log()
    assert "Traceback" not in log, log
    assert "Unhandled" not in log, log
    assert "#error]" not in log and "#critical]" not in log, log


@pytest.fixture
def relay(tmp_path: Path, relay_cert: certs.CertFiles) -> Any:
    config = base_config(
        tmp_path,
        relay_cert.chain,
        relay_cert.key,
        domains={"example.com": {"relay_to": [f"127.0.0.1:{free_port()}"]}},
        limits={"client_connections": 2},
    )
    config["listeners"].append(
        {"name": "mx2", "address": "127.0.0.1", "port": free_port(), "role": "inbound"}
    )
    process = RelayProcess(tmp_path / "relay", config).start()
    # start() knocked on each listener and hung up; those connections count
    # against client_connections until the relay has seen them end.
    wait_for_free_place(process.listener("mx"))
    yield process
    process.stop()


def wait_for_free_place(address: tuple[str, int], timeout: float = 10.0) -> None:
    """Until a connection gets a 220; then QUIT, and read until the relay
    has closed it, which it forgets in the same turn (no longer counted)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.create_connection(address, timeout=5) as sock:
            if sock.recv(512).startswith(b"220 "):
                sock.sendall(b"QUIT\r\n")
                while sock.recv(4096):
                    pass
                return
        assert time.monotonic() < deadline, "the relay keeps refusing connections"
        time.sleep(0.05)


MESSAGE_START = (
    b"EHLO client.test\r\nMAIL FROM:<s@client.test>\r\n"
    b"RCPT TO:<bob@example.com>\r\nDATA\r\n"
)


def test_garbage_against_the_running_relay(relay: RelayProcess) -> None:
    mx = relay.listener("mx")

    garbage = b"".join(bytes(range(start, 256)) + b"\r\n" for start in range(0, 256, 8))
    assert b"421 4.7.0 relay.test Error: too many errors\r\n" in talk(mx, garbage)
    nul = talk(mx, b"\x00" * 5000 + b"\r\nEHLO \x00\r\nQUIT\r\n")
    assert nul.endswith(b"221 2.0.0 Bye\r\n")
    eight_bit = talk(mx, b"\xc3\xa9HLO x\r\nMAIL FROM:<\xff@x>\r\nQUIT\r\n")
    assert eight_bit.startswith(b"502 5.5.2 ") and b"\r\n221 " in eight_bit
    # A TLS client on the plaintext port: it sends before any greeting and
    # waits for a ServerHello that never comes; here it gives up.
    hello = talk(mx, client_hello(), read_greeting=False, half_close=True)
    assert hello.startswith(b"220 relay.test ESMTP\r\n")

    replies = talk(mx, b"EHLO client.test\r\nNOOP\r\nNOOP\r\n", half_close=True)
    assert replies.endswith(b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n")
    talk(mx, MESSAGE_START + b"Subject: cut\r\n\r\nhalf", half_close=True)
    talk(mx, MESSAGE_START + b"Subject: gone\r\n\r\nhalf", vanish=True)
    relay.wait_for_log("lost connection after DATA")

    queue_id = relay.submit(
        "s@client.test",
        ["bob@example.com"],
        b"Subject: next\r\n\r\nserved\r\n",
        listener="mx",
        starttls=False,
    )
    assert relay.spool.queue_ids() == [queue_id]
    assert_spool_whole(relay)
    assert_log_clean(relay)


def test_connection_limits_on_the_running_relay(relay: RelayProcess) -> None:
    """limits.client_connections is 2 here, counted over both inbound
    listeners; the third connection is told 421 on the socket."""
    # The probes of RelayProcess.start are gone once a session completes.
    wait_until_served(relay, "mx")
    wait_until_served(relay, "mx2")
    first = socket.create_connection(relay.listener("mx"), timeout=10)
    second = socket.create_connection(relay.listener("mx2"), timeout=10)
    try:
        for sock in (first, second):
            assert sock.recv(512).startswith(b"220 ")
        refused = talk(relay.listener("mx2"), b"", read_greeting=False)
        assert refused == (
            b"421 4.7.0 relay.test Error: too many connections from 127.0.0.1\r\n"
        )
    finally:
        first.close()
        second.close()
    relay.wait_for_log("limits.client_connections: 2")

    # Closed connections free their places.
    wait_until_served(relay, "mx")
    assert_log_clean(relay)


def wait_until_served(relay: RelayProcess, listener: str) -> None:
    served = b"220 relay.test ESMTP\r\n221 2.0.0 Bye\r\n"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reply = talk(relay.listener(listener), b"QUIT\r\n", read_greeting=False)
        if reply == served:
            return
        time.sleep(0.1)
    raise AssertionError(f"{listener} does not serve: {reply!r}\n{relay.log()}")
