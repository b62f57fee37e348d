"""The delivery client against real servers on loopback, with real TLS.

aiosmtpd peers (tests/peers/smtppeer.py) run in threads of their own;
the scripted servers (tests/peers/scripted.py) for the silent host and
HELO run on the test reactor.  Pure pieces (EHLO parsing, MAIL parameters,
the result's per-recipient view) are tested in memory at the end.  What a
hostile server may try (STARTTLS response injection, a downgrade, dots and
bare line ends in the body) is in test_hostile_servers.py.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, task

from mta.clientsession import (
    ClientSettings,
    SessionFailure,
    SessionResult,
    Target,
    Transaction,
    TLSSession,
    mail_parameters,
    parse_ehlo,
    refuse_before_mail,
)
from mta.config import DEFAULT_CIPHERS, DEFAULT_CIPHERSUITES, Timeouts, TLSConfig
from mta.reply import Reply
from mta.smtpclient import deliver
from mta.tlsctx import client_context
from tests.peers import certs, scripted, smtppeer
from tests.peers.scripted import Script

TIMEOUTS = Timeouts(connect=5.0, command=5.0, data=10.0)


# Fixtures and helpers.


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> certs.CertFiles:
    folder = tmp_path_factory.mktemp("tls")
    certs.write_ca_file(certs.trusted_ca(), folder / "ca.pem")
    return certs.write_cert_files(certs.issue_server_cert("mx.peer.test"), folder)


@pytest.fixture(scope="module")
def tls_config(tls_files: certs.CertFiles) -> TLSConfig:
    # The certificate and key are not used by the client context.
    return TLSConfig(
        certificate=tls_files.chain,
        private_key=tls_files.key,
        min_version="TLSv1.2",
        ciphers=DEFAULT_CIPHERS,
        ciphersuites=DEFAULT_CIPHERSUITES,
        trust=tls_files.chain.parent / "ca.pem",
    )


@pytest.fixture(scope="module")
def context(tls_config: TLSConfig) -> SSL.Context:
    return client_context(tls_config)


def settings(
    context: SSL.Context | None = None, require_tls: bool = False, **changes: Any
) -> ClientSettings:
    return ClientSettings(
        helo="relay.test",
        tls_context=context,
        starttls=context is not None,
        require_tls=require_tls,
        timeouts=changes.pop("timeouts", TIMEOUTS),
        **changes,
    )


def transaction(
    path: Path, *recipients: str, body_8bit: bool = False
) -> Transaction:
    return Transaction(
        sender="sender@relay.test",
        recipients=recipients or ("rcpt@peer.test",),
        body_path=path,
        size=path.stat().st_size,
        body_8bit=body_8bit,
    )


def target(port: int) -> Target:
    return Target("mx.peer.test", "127.0.0.1", port)


@pytest.fixture
def body(tmp_path: Path) -> Path:
    path = tmp_path / "body"
    path.write_bytes(b"Subject: test\r\n\r\nHello.\r\n")
    return path


@pytest.fixture
def peers() -> Iterator[list[smtppeer.Peer]]:
    """Started peers go in this list and are stopped after the test."""
    started: list[smtppeer.Peer] = []
    yield started
    for peer in started:
        peer.stop()


def start(peers: list[smtppeer.Peer], peer: smtppeer.Peer) -> smtppeer.Peer:
    peers.append(peer)
    return peer


async def closed(peer: smtppeer.Peer) -> None:
    """Wait, without blocking the reactor, until the client has gone: what
    it sent last (QUIT) may still be in our transport's buffer."""
    deadline = time.monotonic() + 5
    while not all(c.closed for c in peer.connections) or not peer.connections:
        assert time.monotonic() < deadline, "the client did not close"
        await task.deferLater(reactor, 0.01)


def no_8bitmime(lines: list[str]) -> list[str]:
    return [line for line in lines if "8BITMIME" not in line]


def with_pipelining(lines: list[str]) -> list[str]:
    return [lines[0], "250-PIPELINING", *lines[1:]]


# Plaintext.


@pytest_twisted.ensureDeferred
async def test_recipients_each_get_their_reply(
    body: Path, peers: list[smtppeer.Peer]
) -> None:
    replies = smtppeer.Replies(
        rcpt={"later@peer.test": "450 4.2.0 try later", "no@peer.test": "550 5.1.1 no"}
    )
    peer = start(peers, smtppeer.plain(replies=replies))
    result = await deliver(
        reactor,
        target(peer.port),
        transaction(body, "yes@peer.test", "later@peer.test", "no@peer.test"),
        settings(),
    )

    codes = {rcpt: reply.code for rcpt, reply in result.rcpt_replies.items()}
    assert codes == {"yes@peer.test": 250, "later@peer.test": 450, "no@peer.test": 550}
    assert result.data_reply is not None and result.data_reply.code == 250
    assert not result.failed_before_recipients
    assert [m.rcpt_tos for m in peer.messages] == [("yes@peer.test",)]
    assert result.reply_for("yes@peer.test") == result.data_reply
    assert "(in reply to RCPT TO command)" in result.reason_for("no@peer.test")


@pytest_twisted.ensureDeferred
async def test_pipelining_sends_mail_and_rcpt_together(
    body: Path, peers: list[smtppeer.Peer]
) -> None:
    replies = smtppeer.Replies(rcpt={"no@peer.test": "550 5.1.1 no"})
    peer = start(
        peers, smtppeer.plain(replies=replies, ehlo_rewrite=with_pipelining)
    )
    result = await deliver(
        reactor,
        target(peer.port),
        transaction(body, "yes@peer.test", "no@peer.test"),
        settings(),
    )

    assert result.rcpt_replies["no@peer.test"].code == 550
    assert result.data_reply is not None and result.data_reply.code == 250
    assert peer.messages[0].rcpt_tos == ("yes@peer.test",)


@pytest_twisted.ensureDeferred
async def test_pipelined_mail_refused(body: Path, peers: list[smtppeer.Peer]) -> None:
    """The RCPT replies after a refused MAIL are the server's 503s, not
    recipient results."""
    replies = smtppeer.Replies(mail={"sender@relay.test": "553 5.7.1 not you"})
    peer = start(
        peers, smtppeer.plain(replies=replies, ehlo_rewrite=with_pipelining)
    )
    result = await deliver(
        reactor, target(peer.port), transaction(body, "a@peer.test"), settings()
    )

    assert result.failure is not None and result.failure.stage == "MAIL"
    assert result.failure.reply == Reply(553, "5.7.1", "not you")
    assert result.rcpt_replies == {} and result.failed_before_recipients
    assert "(in reply to MAIL FROM command)" in result.failure.reason


@pytest_twisted.ensureDeferred
async def test_no_recipient_accepted_sends_no_data(
    body: Path, peers: list[smtppeer.Peer]
) -> None:
    replies = smtppeer.Replies(rcpt={"no@peer.test": "550 5.1.1 no"})
    peer = start(peers, smtppeer.plain(replies=replies))
    result = await deliver(
        reactor, target(peer.port), transaction(body, "no@peer.test"), settings()
    )

    assert result.failure is None and result.data_reply is None
    assert result.reply_for("no@peer.test") == Reply(550, "5.1.1", "no")
    await closed(peer)
    assert "DATA" not in peer.connections[0].commands


@pytest_twisted.ensureDeferred
async def test_421_at_rcpt_ends_the_session(
    body: Path, peers: list[smtppeer.Peer]
) -> None:
    replies = smtppeer.Replies(rcpt={"b@peer.test": "421 4.3.2 shutting down"})
    peer = start(peers, smtppeer.plain(replies=replies))
    result = await deliver(
        reactor,
        target(peer.port),
        transaction(body, "a@peer.test", "b@peer.test", "c@peer.test"),
        settings(),
    )

    assert result.failure is not None and result.failure.stage == "RCPT"
    assert result.failure.reply is not None and result.failure.reply.code == 421
    assert list(result.rcpt_replies) == ["a@peer.test"]
    assert result.reply_for("a@peer.test") == result.failure.reply
    assert result.reply_for("c@peer.test") == result.failure.reply
    assert peer.messages == []


@pytest_twisted.ensureDeferred
async def test_greeting_refused(body: Path, peers: list[smtppeer.Peer]) -> None:
    replies = smtppeer.Replies(greeting="554 5.7.1 go away")
    peer = start(peers, smtppeer.plain(replies=replies))
    result = await deliver(reactor, target(peer.port), transaction(body), settings())

    assert result.failure == SessionFailure(
        "greeting",
        Reply(554, "5.7.1", "go away"),
        "mx.peer.test[127.0.0.1] refused to talk to me: 554 5.7.1 go away",
    )
    await closed(peer)
    assert peer.connections[0].commands == ["QUIT"]


@pytest_twisted.ensureDeferred
async def test_8bit_body_without_8bitmime_is_not_sent(
    body: Path, peers: list[smtppeer.Peer]
) -> None:
    peer = start(peers, smtppeer.plain(ehlo_rewrite=no_8bitmime))
    result = await deliver(
        reactor, target(peer.port), transaction(body, body_8bit=True), settings()
    )

    assert result.failure is not None and result.failure.stage == "MAIL"
    assert result.failure.reply == Reply(
        554,
        "5.6.3",
        "conversion to 7bit required but not supported; "
        "server does not offer 8BITMIME",
    )
    await closed(peer)
    assert [c.split()[0] for c in peer.connections[0].commands] == ["EHLO", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_8bit_body_declared(body: Path, peers: list[smtppeer.Peer]) -> None:
    peer = start(peers, smtppeer.plain())
    result = await deliver(
        reactor, target(peer.port), transaction(body, body_8bit=True), settings()
    )

    assert result.failure is None
    assert "BODY=8BITMIME" in peer.messages[0].mail_options


@pytest_twisted.ensureDeferred
async def test_ten_megabytes_arrive_intact(
    tmp_path: Path, peers: list[smtppeer.Peer]
) -> None:
    line = b"z" * 996 + b"\r\n"
    path = tmp_path / "big"
    with path.open("wb") as big:
        for number in range(10_000):
            big.write(b"." + line[1:] if number % 997 == 0 else line)
    data = path.read_bytes()

    peer = start(peers, smtppeer.plain(data_size_limit=32 * 1024 * 1024))
    result = await deliver(reactor, target(peer.port), transaction(path), settings())

    assert result.failure is None and result.data_reply is not None
    assert result.data_reply.code == 250
    [message] = peer.messages
    assert hashlib.sha256(message.content).digest() == hashlib.sha256(data).digest()


@pytest_twisted.ensureDeferred
async def test_unreadable_body_sends_no_terminator(
    body: Path, peers: list[smtppeer.Peer]
) -> None:
    peer = start(peers, smtppeer.plain())
    message = transaction(body)
    body.unlink()
    result = await deliver(reactor, target(peer.port), message, settings())

    assert result.failure is not None and result.failure.stage == "DATA"
    assert result.failure.reason.startswith("cannot read message body")
    assert result.reply_for("rcpt@peer.test") is None
    await closed(peer)
    assert peer.messages == []


# Connection problems and timeouts.


@pytest_twisted.ensureDeferred
async def test_connection_refused(body: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await deliver(reactor, target(port), transaction(body), settings())

    assert result.failure == SessionFailure(
        "connect",
        None,
        f"connect to mx.peer.test[127.0.0.1]:{port}: Connection refused",
    )
    assert result.failed_before_recipients


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out_at_the_greeting(body: Path) -> None:
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
    )
    try:
        began = time.monotonic()
        quick = replace(TIMEOUTS, command=0.3)
        result = await deliver(
            reactor,
            target(port.getHost().port),
            transaction(body),
            settings(timeouts=quick),
        )
        elapsed = time.monotonic() - began
    finally:
        await port.stopListening()

    assert elapsed < 2
    assert result.failure is not None and result.failure.stage == "greeting"
    assert result.failure.reason == (
        "conversation with mx.peer.test[127.0.0.1] timed out while "
        "receiving the initial server greeting"
    )


# STARTTLS.


@pytest_twisted.ensureDeferred
async def test_starttls_tls13(
    body: Path, peers: list[smtppeer.Peer], context: SSL.Context
) -> None:
    seen: list[TLSSession] = []

    def check(session: TLSSession) -> None:
        seen.append(session)

    peer = start(peers, smtppeer.tls13())
    result = await deliver(
        reactor,
        target(peer.port),
        transaction(body),
        settings(context, check_tls=check),
    )

    assert result.failure is None and result.starttls_offered
    assert result.tls is not None and seen == [result.tls]
    assert result.tls.protocol == "TLSv1.3"
    assert result.tls.cipher in DEFAULT_CIPHERSUITES
    assert result.tls.facts.protocol == "TLSv1.3" and result.tls.bits >= 128
    assert result.tls.peer_certificate is not None
    assert result.tls.verify_error is None  # the test CA is trusted
    [message] = peer.messages
    assert message.tls is not None and message.tls.protocol == "TLSv1.3"
    assert message.content == body.read_bytes()


@pytest_twisted.ensureDeferred
async def test_starttls_tls12_only(
    body: Path, peers: list[smtppeer.Peer], context: SSL.Context
) -> None:
    peer = start(peers, smtppeer.tls12_only(rsa=True))
    result = await deliver(
        reactor, target(peer.port), transaction(body), settings(context)
    )

    assert result.failure is None and result.tls is not None
    assert result.tls.protocol == "TLSv1.2"
    assert result.tls.cipher in DEFAULT_CIPHERS
    assert str(result.tls.facts) == f"TLSv1.2/{result.tls.cipher}"
    assert peer.messages[0].tls is not None


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate_is_recorded(
    body: Path, peers: list[smtppeer.Peer], context: SSL.Context
) -> None:
    leaf = certs.issue_server_cert("mx.peer.test", ca=certs.untrusted_ca())
    peer = start(peers, smtppeer.tls13(leaf=leaf))
    result = await deliver(
        reactor, target(peer.port), transaction(body), settings(context)
    )

    assert result.failure is None and result.tls is not None
    assert result.tls.verify_error == 20
    assert len(peer.messages) == 1


@pytest_twisted.ensureDeferred
async def test_tls10_only_server_gets_no_tls_and_no_mail(
    body: Path, peers: list[smtppeer.Peer], context: SSL.Context
) -> None:
    peer = start(peers, smtppeer.tls10_only(rsa=True))
    result = await deliver(
        reactor, target(peer.port), transaction(body), settings(context)
    )

    assert result.tls is None and result.tls_failure is not None
    assert result.failure is not None and result.failure.stage == "TLS handshake"
    assert result.failure.reason.startswith(
        "lost connection with mx.peer.test[127.0.0.1] while performing the TLS "
        "handshake"
    )
    assert result.failed_before_recipients
    await closed(peer)
    assert peer.messages == []
    assert peer.connections[0].commands[-1] == "STARTTLS"


@pytest_twisted.ensureDeferred
async def test_starttls_refused_with_454(
    body: Path, peers: list[smtppeer.Peer], context: SSL.Context
) -> None:
    peer = start(peers, smtppeer.starttls_454())
    result = await deliver(
        reactor, target(peer.port), transaction(body), settings(context)
    )

    assert result.failure is not None and result.failure.stage == "STARTTLS"
    assert result.failure.reply == Reply(454, "4.7.0", "TLS not available")
    assert result.tls_failure == (
        "host mx.peer.test[127.0.0.1] said: 454 4.7.0 TLS not available "
        "(in reply to STARTTLS command)"
    )
    await closed(peer)
    assert peer.messages == []
    assert peer.connections[0].commands[-2:] == ["STARTTLS", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_starttls_keyword_in_lower_case(
    body: Path, peers: list[smtppeer.Peer], context: SSL.Context
) -> None:
    peer = start(peers, smtppeer.starttls_lowercase())
    result = await deliver(
        reactor, target(peer.port), transaction(body), settings(context)
    )

    assert result.starttls_offered and result.tls is not None
    assert peer.messages[0].tls is not None


@pytest_twisted.ensureDeferred
async def test_level_none_never_starts_tls(
    body: Path, peers: list[smtppeer.Peer], context: SSL.Context
) -> None:
    peer = start(peers, smtppeer.tls13())
    plain = replace(settings(context), starttls=False)
    result = await deliver(reactor, target(peer.port), transaction(body), plain)

    assert result.starttls_offered and result.tls is None and result.failure is None
    assert peer.messages[0].tls is None


@pytest_twisted.ensureDeferred
async def test_required_tls_not_offered(
    body: Path, peers: list[smtppeer.Peer], context: SSL.Context
) -> None:
    peer = start(peers, smtppeer.plain())
    result = await deliver(
        reactor, target(peer.port), transaction(body), settings(context, True)
    )

    assert result.failure == SessionFailure(
        "STARTTLS",
        None,
        "TLS is required, but was not offered by host mx.peer.test[127.0.0.1]",
    )
    await closed(peer)
    assert [c.split()[0] for c in peer.connections[0].commands] == ["EHLO", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_check_tls_verdict_aborts_before_ehlo(
    body: Path, peers: list[smtppeer.Peer], context: SSL.Context
) -> None:
    peer = start(peers, smtppeer.tls13())
    result = await deliver(
        reactor,
        target(peer.port),
        transaction(body),
        settings(context, True, check_tls=lambda session: "name not matched"),
    )

    assert result.failure == SessionFailure("TLS policy", None, "name not matched")
    assert result.tls is not None and result.tls_failure is None
    await closed(peer)
    assert [c.split()[0] for c in peer.connections[0].commands] == [
        "EHLO",
        "STARTTLS",
    ]
    assert peer.messages == []


# Raw servers on the test reactor (tests/peers/scripted.py), for what
# aiosmtpd cannot be made to do.  STARTTLS response injection is in
# test_hostile_servers.py.


async def run_script(
    script: Script, body: Path, settings: ClientSettings
) -> SessionResult:
    port = scripted.listen(reactor, script)
    try:
        return await deliver(
            reactor, target(port.getHost().port), transaction(body), settings
        )
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_helo_after_ehlo_refused(body: Path) -> None:
    script = Script(plain={"EHLO": b"502 5.5.2 what", "HELO": b"250 fake.test"})
    result = await run_script(script, body, settings())

    assert result.failure is None and not result.starttls_offered
    assert result.data_reply is not None and result.data_reply.code == 250
    assert script.log[:3] == [
        "plain: EHLO relay.test",
        "plain: HELO relay.test",
        "plain: MAIL FROM:<sender@relay.test>",  # no extensions after HELO
    ]


@pytest_twisted.ensureDeferred
async def test_silent_after_end_of_data_times_out(body: Path) -> None:
    script = Script(plain={"EHLO": b"250 fake.test"}, end_of_data=None)
    quick = replace(TIMEOUTS, data=0.3)
    result = await run_script(script, body, settings(timeouts=quick))

    assert result.failure is not None and result.failure.stage == "DATA"
    assert result.failure.reason == (
        "conversation with mx.peer.test[127.0.0.1] timed out while sending end "
        "of data -- message may be sent more than once"
    )
    assert result.reply_for("rcpt@peer.test") is None
    assert not result.failed_before_recipients


@pytest_twisted.ensureDeferred
async def test_cancel(body: Path) -> None:
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
    )
    try:
        session = deliver(
            reactor, target(port.getHost().port), transaction(body), settings()
        )
        await task.deferLater(reactor, 0.1)
        session.cancel()
        with pytest.raises(defer.CancelledError):
            await session
    finally:
        await port.stopListening()


# Pure pieces.


def test_parse_ehlo_is_case_insensitive() -> None:
    caps = parse_ehlo(["mx.test hello", "starttls", "Size 1000", "8bitmime", ""])
    assert caps.starttls and caps.eightbitmime and not caps.pipelining
    assert caps.size and caps.size_limit == 1000
    assert not parse_ehlo(["STARTTLS is the greeting line"]).starttls


def test_size_without_limit() -> None:
    caps = parse_ehlo(["mx.test", "SIZE"])
    assert caps.size and caps.size_limit is None


@pytest.mark.parametrize(
    "lines, eight_bit, expected",
    [
        (["mx", "SIZE 100", "8BITMIME"], True, " SIZE=50 BODY=8BITMIME"),
        (["mx", "SIZE 100", "8BITMIME"], False, " SIZE=50"),
        (["mx", "8BITMIME"], True, " BODY=8BITMIME"),
        (["mx"], False, ""),
    ],
)
def test_mail_parameters(
    lines: list[str], eight_bit: bool, expected: str, body: Path
) -> None:
    message = Transaction("a@b", ("c@d",), body, 50, eight_bit)
    assert mail_parameters(parse_ehlo(lines), message) == expected


def test_size_limit_refused_before_mail(body: Path) -> None:
    message = Transaction("a@b", ("c@d",), body, 5000, False)
    refusal = refuse_before_mail(parse_ehlo(["mx", "SIZE 1000"]), message, target(25))
    assert refusal is not None and refusal.stage == "MAIL"
    assert refusal.reply is not None
    assert (refusal.reply.code, refusal.reply.dsn) == (552, "5.3.4")
    assert refuse_before_mail(parse_ehlo(["mx", "SIZE 0"]), message, target(25)) is None


def test_result_reply_for_after_data() -> None:
    ok = Reply(250, "2.0.0", "queued")
    result = SessionResult(
        target(25),
        rcpt_replies={
            "a@b": Reply(250, "2.1.5", "ok"),
            "c@d": Reply(450, "4.2.0", "x"),
        },
        data_reply=ok,
    )
    assert result.reply_for("a@b") == ok and result.reason_for("a@b") == ok.line()
    assert result.reply_for("c@d") == Reply(450, "4.2.0", "x")
    assert not result.failed_before_recipients


def test_result_lost_during_body() -> None:
    failure = SessionFailure("DATA", None, "lost connection while sending body")
    result = SessionResult(
        target(25), failure=failure, rcpt_replies={"a@b": Reply(250, "2.1.5", "ok")}
    )
    assert result.reply_for("a@b") is None
    assert result.reason_for("a@b") == failure.reason
    assert not result.failed_before_recipients


@pytest.mark.parametrize(
    "sender, recipients",
    [("a@b", ()), ("a@b\r\nRCPT TO:<x@y>", ("c@d",)), ("a@b", ("c@d>",))],
)
def test_bad_transaction_is_refused(
    sender: str, recipients: tuple[str, ...], body: Path
) -> None:
    with pytest.raises(ValueError):
        message = Transaction(sender, recipients, body, 1, False)
        deliver(reactor, target(25), message, settings())


# SNI: the host name we connect to, never an address (RFC 6066 3).


@pytest.mark.parametrize("name, sent", [("mx.peer.test", "mx.peer.test"),
                                        ("127.0.0.1", None)])
@pytest_twisted.ensureDeferred
async def test_the_host_name_goes_as_sni(
    peers: list[smtppeer.Peer], body: Path, context: SSL.Context,
    name: str, sent: str | None,
) -> None:
    server_context = certs.server_context(certs.issue_server_cert("mx.peer.test"))
    seen: list[str | None] = []
    server_context.sni_callback = lambda ssl_object, server_name, ctx: (
        seen.append(server_name))
    peer = start(peers, smtppeer.Peer("127.0.0.1", 0,
                                      tls_context=server_context).start())

    result = await deliver(reactor, Target(name, "127.0.0.1", peer.port),
                           transaction(body), settings(context))

    assert result.tls is not None
    assert seen == [sent]


# Pipelining: the groups a client sends (RFC 2920).


class GroupServer(protocol.Protocol):
    """Answers nothing until the group it waits for is complete: the
    commands up to DATA (each answered as ``replies`` says), then all
    their replies in one write.  A client that waited for a reply before
    sending the rest of its group would wait for ever.  Records each
    group, and the body of each message taken."""

    def __init__(self, groups: list[list[str]], bodies: list[bytes],
                 replies: dict[str, bytes]) -> None:
        self.groups, self.bodies, self.replies = groups, bodies, replies
        self.buffer = b""
        self.group: list[str] = []
        self.in_body = False

    def connectionMade(self) -> None:
        self.transport.write(b"220 group.test ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_body:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.bodies.append(self.buffer[: end + 5])
                self.buffer = self.buffer[end + 5:]
                self.in_body = False
                self.transport.write(b"250 2.0.0 taken\r\n")
                continue
            line, found, rest = self.buffer.partition(b"\r\n")
            if not found:
                return
            self.buffer = rest
            self.command(line.decode())

    def command(self, line: str) -> None:
        verb = line.split(" ")[0].upper()
        if verb == "EHLO":
            self.transport.write(b"250-group.test\r\n250 PIPELINING\r\n")
        elif verb == "QUIT":
            self.transport.write(b"221 bye\r\n")
            self.transport.loseConnection()
        else:
            self.group.append(line)
            if verb == "DATA":
                self.groups.append(self.group)
                answers = [self.replies.get(command.split(" ")[0].upper(), b"250 ok")
                           for command in self.group]
                self.group = []
                self.transport.write(b"".join(a + b"\r\n" for a in answers))
                self.in_body = answers[-1].startswith(b"354")


def group_server(groups: list[list[str]], bodies: list[bytes],
                 replies: dict[str, bytes] | None = None) -> Any:
    answers = {"DATA": b"354 go on", **(replies or {})}
    factory = protocol.Factory.forProtocol(
        lambda: GroupServer(groups, bodies, answers))
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_a_kept_connection_sends_rset_mail_rcpt_and_data_in_one_group(
    body: Path,
) -> None:
    from mta.config import ConnectionReuse
    from mta.connectioncache import ConnectionCache

    groups: list[list[str]] = []
    bodies: list[bytes] = []
    port = group_server(groups, bodies)
    cache = ConnectionCache(reactor, ConnectionReuse())
    kept = settings(reuse_key="one")
    try:
        results = []
        for recipient in ("a@peer.test", "b@peer.test"):
            results.append(await cache.session(
                target(port.getHost().port), transaction(body, recipient, "c@peer.test"),
                kept))
    finally:
        cache.close()
        await port.stopListening()

    assert [result.data_reply.code for result in results
            if result.data_reply] == [250, 250]
    assert results[1].connection_use == 2
    mail = "MAIL FROM:<sender@relay.test>"  # no SIZE offered
    assert groups == [
        [mail, "RCPT TO:<a@peer.test>", "RCPT TO:<c@peer.test>", "DATA"],
        ["RSET", mail, "RCPT TO:<b@peer.test>", "RCPT TO:<c@peer.test>", "DATA"],
    ]
    assert bodies == [body.read_bytes() + b".\r\n"] * 2


@pytest.mark.parametrize("refused", ["RCPT", "MAIL"])
@pytest_twisted.ensureDeferred
async def test_a_354_to_a_pipelined_data_after_a_refusal_gets_no_body(
    body: Path, refused: str
) -> None:
    """RFC 2920 3.1 says the server refuses DATA when no RCPT was taken;
    one that says 354 anyway gets no message: the connection is dropped,
    since only that ends the DATA it opened without one."""
    groups: list[list[str]] = []
    bodies: list[bytes] = []
    port = group_server(groups, bodies, {refused: b"550 5.1.1 no"})
    try:
        result = await deliver(reactor, target(port.getHost().port),
                               transaction(body, "a@peer.test"), settings())
    finally:
        await port.stopListening()

    assert len(groups) == 1 and groups[0][-1] == "DATA"
    assert bodies == []
    assert result.data_reply is None
    if refused == "RCPT":
        assert result.rcpt_replies["a@peer.test"].code == 550
    else:
        assert result.failure is not None and result.failure.reply is not None
        assert result.failure.reply.code == 550
