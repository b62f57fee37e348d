"""Hostile servers (issue 5, item 4): what a server the relay delivers to
may try, one test per example, against real servers on loopback.

- STARTTLS response injection: bytes after the 220 to STARTTLS are
  dropped, and only the capabilities read inside TLS are used.
- Downgrade: a server that stops offering STARTTLS, answers it 454, or
  answers 220 and then closes, drops the handshake or talks plaintext,
  never gets mail in clear under ``enforce-tls`` or ``enforce-secure``.
- Our own output never smuggles: every line ends in exactly CRLF and every
  leading dot is stuffed, wherever it falls: at each 16 KiB where Twisted's
  stock client cut its chunks (a fault it has, TWISTED-NOTES), at each
  64 KiB where ours reads, in TLS records or not; bare CR, bare LF and
  CRLF mixed in a spooled body go out as CRLF.
- Credentials: the relay never authenticates to a server, so a server
  that advertises AUTH before and after STARTTLS never receives AUTH.

The first and third kinds drive the delivery client (`mta.smtpclient`)
against a scripted server on the test reactor (tests/peers/scripted.py),
which records the DATA stream as it came; the others run the relay
(`twistd -n mta`) with its MX records from the DNS responder, against
aiosmtpd peers (tests/peers/smtppeer.py) that record every command.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import protocol, reactor, task

from mta.clientsession import ClientSettings, SessionResult, Target, Transaction
from mta.config import DEFAULT_CIPHERS, DEFAULT_CIPHERSUITES, Timeouts, TLSConfig
from mta.smtpclient import deliver
from mta.tlsctx import ServerCreator, client_context, server_context
from tests.matrix import (
    DEFERRED,
    FALLBACK,
    Expected,
    Loopback,
    Report,
    domain_for,
    recipient_for,
    rule_for,
    sender_for,
    wait_until,
)
from tests.peers import certs, scripted, smtppeer
from tests.peers.certs import CertFiles
from tests.peers.dnsserver import DNSServer
from tests.peers.scripted import Script
from tests.peers.smtppeer import Peer
from tests.test_bodyencoder import canonical, dots_at_chunk_starts, unstuff

TIMEOUTS = Timeouts(connect=5.0, command=5.0, data=10.0)
NET = "127.0.12."  # this file's peers, port 25 (mx_port) on each
SENDER = "sender@relay.test"
RECIPIENT = "rcpt@peer.test"


# --- the delivery client against a scripted server ---------------------------


@pytest.fixture(scope="module")
def tls_config(tmp_path_factory: pytest.TempPathFactory) -> TLSConfig:
    files = certs.write_cert_files(certs.issue_server_cert("mx.peer.test"),
                                   tmp_path_factory.mktemp("tls"))
    return TLSConfig(
        certificate=files.chain, private_key=files.key, min_version="TLSv1.2",
        ciphers=DEFAULT_CIPHERS, ciphersuites=DEFAULT_CIPHERSUITES, trust=None,
    )


@pytest.fixture(scope="module")
def context(tls_config: TLSConfig) -> SSL.Context:
    return client_context(tls_config)


def settings(context: SSL.Context | None = None) -> ClientSettings:
    return ClientSettings(helo="relay.test", tls_context=context,
                          starttls=context is not None, require_tls=False,
                          timeouts=TIMEOUTS)


async def run(script: Script, body: Path, settings: ClientSettings) -> (
    SessionResult
):
    port = scripted.listen(reactor, script)
    message = Transaction(sender=SENDER, recipients=(RECIPIENT,),
                          body_path=body, size=body.stat().st_size,
                          body_8bit=False)
    try:
        result = await deliver(reactor,
                               Target("mx.peer.test", "127.0.0.1",
                                      port.getHost().port),
                               message, settings)
        await scripted.closed(reactor, script)
        return result
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_starttls_response_injection_is_dropped(
    tmp_path: Path, tls_config: TLSConfig, context: SSL.Context
) -> None:
    """After its 220 the server sends an EHLO reply of its own, before
    the handshake: a stock Twisted client reads it as the reply to the
    EHLO it sends inside TLS (TWISTED-NOTES).  It advertises SIZE, which
    the server's EHLO inside TLS does not: MAIL must carry no SIZE."""
    body = tmp_path / "body"
    body.write_bytes(b"Subject: test\r\n\r\nHello.\r\n")
    script = Script(
        plain={
            # A SIZE limit the message exceeds: if the client kept these
            # capabilities after STARTTLS, it would refuse to send.
            "EHLO": b"250-fake.test\r\n250-SIZE 10\r\n250 STARTTLS",
            "STARTTLS": (b"220 go ahead\r\n"
                         b"250-fake.test\r\n250-SIZE 1000000\r\n250 PIPELINING"),
        },
        tls={"EHLO": b"250-fake.test\r\n250 8BITMIME"},
        creator=ServerCreator(server_context(tls_config)),
    )

    result = await run(script, body, settings(context))

    assert result.failure is None, result.failure
    assert result.tls is not None and result.starttls_offered
    # EHLO went again inside TLS; MAIL has no SIZE=, and RCPT waited for
    # MAIL's reply (no PIPELINING but in the injected bytes).
    assert script.log == [
        "plain: EHLO relay.test",
        "plain: STARTTLS",
        "tls: EHLO relay.test",
        f"tls: MAIL FROM:<{SENDER}>",
        f"tls: RCPT TO:<{RECIPIENT}>",
        "tls: DATA",
        "tls: QUIT",
    ]
    assert script.bodies == [body.read_bytes() + b".\r\n"]


# --- a success that proves nothing -------------------------------------------


@pytest.mark.parametrize(("data_reply", "end_of_data", "while_doing"), [
    # 250 instead of 354: no body was asked for, and none was sent.
    (b"250 2.0.0 ok", b"250 2.0.0 stored", "while sending DATA command"),
    # 354, then at once a 250, before the body could have been seen.
    (b"354 go on\r\n250 2.0.0 ok", b"250 2.0.0 stored",
     "after its 354, before the message body was sent"),
    # A 3xx other than 354 to DATA.
    (b"334 what", b"250 2.0.0 stored", "while sending DATA command"),
])
@pytest.mark.parametrize("pipelining", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_success_out_of_step_never_counts_as_delivered(
    tmp_path: Path, data_reply: bytes, end_of_data: bytes, while_doing: str,
    pipelining: bool,
) -> None:
    """A server whose replies fall out of step with our commands may say
    250 where it never took the message: the recipient must be deferred
    (no reply decides it), never taken as sent and removed from the spool."""
    body = tmp_path / "body"
    body.write_bytes(b"Subject: test\r\n\r\n" + b"x" * 998 + b"\r\n" * 200)
    ehlo = b"250-fake.test\r\n250 PIPELINING" if pipelining else b"250 fake.test"
    script = Script(plain={"EHLO": ehlo, "DATA": data_reply},
                    end_of_data=end_of_data)

    result = await run(script, body, settings())

    assert result.failure is not None
    assert result.reply_for(RECIPIENT) is None, result.reply_for(RECIPIENT)
    assert while_doing in result.reason_for(RECIPIENT)
    assert result.data_reply is None


# --- our output: exactly CRLF, every leading dot stuffed ---------------------


def delivered_stream(script: Script, tls: bool) -> bytes:
    """The one DATA stream the server got, after checking that nothing
    but our five commands was read as a command (a body that ended early
    would leave its rest there)."""
    where = "tls: " if tls else "plain: "
    commands = [line for line in script.log if line.startswith(where)]
    assert commands == [f"{where}EHLO relay.test", f"{where}MAIL FROM:<{SENDER}>",
                        f"{where}RCPT TO:<{RECIPIENT}>", f"{where}DATA",
                        f"{where}QUIT"], script.log
    [stream] = script.bodies
    return stream


def wire_script(tls_config: TLSConfig, tls: bool) -> Script:
    if not tls:
        return Script(plain={"EHLO": b"250 fake.test"})
    return Script(plain={"EHLO": b"250-fake.test\r\n250 STARTTLS",
                         "STARTTLS": b"220 go ahead"},
                  tls={"EHLO": b"250 fake.test"},
                  creator=ServerCreator(server_context(tls_config)))


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
@pytest.mark.parametrize("line_end", [b"\r\n", b"\n"], ids=["crlf", "lf"])
@pytest_twisted.ensureDeferred
async def test_a_dot_line_at_every_chunk_start_is_stuffed(
    tmp_path: Path, tls_config: TLSConfig, context: SSL.Context,
    line_end: bytes, tls: bool,
) -> None:
    """A lone "." line at every offset 16384 * k of the spooled body, k
    from 0 to 12: where the stock client's chunks began (it sends these
    unstuffed, ending the message early), and so at each 64 KiB where ours
    read, and at TLS record boundaries."""
    body = tmp_path / "dots"
    body.write_bytes(dots_at_chunk_starts(line_end, 13))
    script = wire_script(tls_config, tls)

    result = await run(script, body, settings(context if tls else None))

    assert result.failure is None and result.data_reply is not None
    assert (result.tls is not None) == tls
    stream = delivered_stream(script, tls)
    assert unstuff(stream) == canonical(body.read_bytes())
    assert stream.count(b"\r\n.\r\n") == 1 and stream.startswith(b"..\r\n")


def line_end_mixtures(seed: int) -> bytes:
    """Bare CR, bare LF, CRLF, CR CR LF and dots in every order, with a
    CRLF split across each 64 KiB read of the client, and a bare CR just
    before a dot that starts the next read."""
    rng = random.Random(seed)
    text = bytearray(rng.choice(b".\r\nab") for _ in range(200_000))
    text[65535:65537] = b"\r\n"
    text[131071:131073] = b"\r."
    return b"Subject: mixed line ends\r\n\r\nunix\nmac\rdos\r\nboth\r\r\n" + (
        bytes(text))


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
@pytest_twisted.ensureDeferred
async def test_bare_cr_and_lf_in_a_spooled_body_go_out_as_crlf(
    tmp_path: Path, tls_config: TLSConfig, context: SSL.Context, tls: bool,
) -> None:
    """The listener refuses bare CR and LF, but a spool may still hold
    them (a message written by another tool, an old spool): what goes out
    is CRLF only, and the message ends where it ends."""
    body = tmp_path / "mixed"
    body.write_bytes(line_end_mixtures(5))
    script = wire_script(tls_config, tls)

    result = await run(script, body, settings(context if tls else None))

    assert result.failure is None and result.data_reply is not None
    stream = delivered_stream(script, tls)
    assert b"\r\r" not in stream
    assert unstuff(stream) == canonical(body.read_bytes())


# --- the running relay: downgrades and AUTH ----------------------------------


@pytest.fixture
def world(tmp_path: Path, relay_cert: CertFiles, dns: DNSServer,
          mx_port: int) -> Iterator[Loopback]:
    world = Loopback(tmp_path, relay_cert, dns, mx_port)
    yield world
    world.close()


def without_starttls(lines: list[str]) -> list[str]:
    return [line for line in lines if "STARTTLS" not in line.upper()]


ENFORCED = ("enforce-tls", "enforce-secure")
# kind -> how its peer betrays STARTTLS, on 127.0.12.N
DOWNGRADES = {
    "stripped": "offers STARTTLS, then stops offering it",
    "refused": "answers STARTTLS with 454",
    "closed": "answers STARTTLS with 220, then closes",
    "dropped": "answers STARTTLS with 220, reads the ClientHello, closes",
    "garbled": "answers STARTTLS with 220, then plaintext instead of TLS",
}
BETRAYALS = {"closed": "close", "dropped": "drop", "garbled": "garbage"}


def downgrade_peer(kind: str, address: str, port: int) -> Peer:
    names = [f"mx.{domain_for(kind, level)}" for level in ENFORCED]
    leaf = certs.issue_server_cert(*names)
    if kind == "stripped":
        return smtppeer.tls13(address, port, leaf=leaf)
    if kind == "refused":
        return smtppeer.starttls_454(address, port, leaf=leaf)
    return smtppeer.starttls_betrayed(address, port, then=BETRAYALS[kind],
                                      leaf=leaf)


def test_a_downgrade_never_gets_mail_in_clear_under_enforcement(
    world: Loopback,
) -> None:
    peers = {}
    for number, kind in enumerate(DOWNGRADES, start=1):
        address = f"{NET}{number}"
        peers[kind] = world.add_peer(downgrade_peer(kind, address, world.mx_port))
        for level in (*ENFORCED, "opportunistic"):
            domain = domain_for(kind, level)
            world.mx(domain, (10, f"mx.{domain}", address))
    relay = world.start([rule_for(level) for level in (*ENFORCED, "opportunistic")])

    # The stripping peer first takes mail over TLS, as a server that offers
    # STARTTLS does; then STARTTLS vanishes from its EHLO reply, and the
    # connection the relay kept is refused at RSET, so that every later
    # message meets the new EHLO reply.
    stripped = peers["stripped"]
    for level in ENFORCED:
        domain = domain_for("stripped", level)
        relay.submit(f"before.{domain}@org.test", [f"alice@{domain}"],
                     b"Subject: before\r\n\r\nhi\r\n")
    before = stripped.wait_for(2, timeout=20)
    assert all(message.tls is not None for message in before)
    stripped.ehlo_rewrite = without_starttls
    stripped.replies.rset = smtppeer.DISCONNECT

    cases = {(kind, level): world.send(domain_for(kind, level))
             for kind in DOWNGRADES for level in ENFORCED}
    cases["refused", "opportunistic"] = world.send(
        domain_for("refused", "opportunistic"))
    wait_until(lambda: all(world.observe(queue_id, domain_for(*case)).settled()
                           for case, queue_id in cases.items()), 40)

    report = Report()
    for (kind, level), queue_id in cases.items():
        domain = domain_for(kind, level)
        outcome = FALLBACK if level == "opportunistic" else DEFERRED
        report.add(f"{DOWNGRADES[kind]} / {level}",
                   Expected(outcome, level, f"matrix-{level}", f"mx.{domain}"),
                   world.observe(queue_id, domain))
    assert report.failures == 0, "\n" + report.table()
    assert_the_peers_did_what_they_say(peers)
    fallback = world.observe(cases["refused", "opportunistic"],
                             domain_for("refused", "opportunistic")).last
    assert fallback.get("fallback") == "starttls-refused", fallback


def assert_the_peers_did_what_they_say(peers: dict[str, Peer]) -> None:
    """Each betrayal was really met; only the opportunistic fallback went
    in clear (tests.matrix has checked that no enforced MAIL was sent)."""
    for kind, peer in peers.items():
        tried = [c for c in peer.connections if "STARTTLS" in c.commands]
        if kind == "stripped":
            late = [c for c in peer.connections if c.tls is None]
            assert late and not any("STARTTLS" in c.commands for c in late)
        else:
            assert tried, f"{kind}: STARTTLS was never sent"
        if kind in BETRAYALS:
            assert all(c.tls_error == f"STARTTLS betrayed: {BETRAYALS[kind]}"
                       for c in tried), [c.tls_error for c in tried]
    fallback = sender_for(domain_for("refused", "opportunistic"))
    clear = [m.mail_from for peer in peers.values() for m in peer.messages
             if m.tls is None]
    assert clear == [fallback]


def with_auth_everywhere(lines: list[str]) -> list[str]:
    """aiosmtpd offers AUTH after STARTTLS only; offer it before too."""
    if any("AUTH" in line for line in lines):
        return lines
    return [lines[0], "250-AUTH PLAIN LOGIN", *lines[1:]]


def test_no_credentials_are_ever_sent(world: Loopback) -> None:
    """The relay does not authenticate to smarthosts (README,
    Limitations): AUTH offered in clear and inside TLS is never taken."""
    peer = world.add_peer(smtppeer.tls13(f"{NET}10", world.mx_port,
                                         ehlo_rewrite=with_auth_everywhere))
    plain, tls = "auth.none.test", "auth.opportunistic.test"
    for domain in (plain, tls):
        world.mx(domain, (10, f"mx.{domain}", f"{NET}10"))
    world.start([rule_for("none"), rule_for("opportunistic")])

    for domain in (plain, tls):
        world.send(domain)
    messages = peer.wait_for(2, timeout=20)

    assert {m.rcpt_tos for m in messages} == {(recipient_for(plain),),
                                              (recipient_for(tls),)}
    assert {m.tls is not None for m in messages} == {False, True}
    for connection in peer.connections:
        offered = [line for line in connection.transcript
                   if line.startswith("S: 250-AUTH")]
        ehlos = [c for c in connection.commands if c.startswith("EHLO")]
        assert len(offered) == len(ehlos) >= 1, connection.transcript
        assert not any(c.upper().startswith("AUTH") for c in connection.commands)


# --- replies no server should send -------------------------------------------


class Babbler(protocol.Protocol):
    """A greeting that never ends: a continuation line after another, as
    fast as the client takes them (a hostile tester's server grew the
    relay's memory by 400 MB in 20 s with this)."""

    def connectionMade(self) -> None:
        self.sending = task.LoopingCall(self.transport.write, b"220-more\r\n" * 64)
        self.sending.clock = reactor
        self.sending.start(0.001)

    def connectionLost(self, reason: object = None) -> None:
        if self.sending.running:
            self.sending.stop()


@pytest_twisted.ensureDeferred
async def test_a_reply_without_end_is_cut_off(tmp_path: Path) -> None:
    body = tmp_path / "body"
    body.write_bytes(b"Subject: test\r\n\r\nHello.\r\n")
    factory = protocol.Factory.forProtocol(Babbler)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        result = await deliver(
            reactor, Target("mx.peer.test", "127.0.0.1", port.getHost().port),
            Transaction(SENDER, (RECIPIENT,), body, body.stat().st_size, False),
            settings())
    finally:
        await port.stopListening()

    failure = result.failure
    assert failure is not None and failure.stage == "greeting"
    assert "a reply of over 100 lines" in failure.reason
    assert failure.reply is None  # no server reply to bounce on


ODD_REPLIES = [
    # (verb, reply): none is a reply the client may act on, and none may
    # bounce the mail on the server's word.
    ("EHLO", b"999 weird"),
    ("EHLO", b"250-fake.test\r\n550 no"),  # codes differ between lines
    ("RCPT", b"354 go ahead"),  # "go ahead" to anything but DATA
    ("RCPT", b"\r\n".join([b"450-busy"] * 2000 + [b"450 busy"])),
    ("MAIL", b"25 short"),
    ("RCPT", b"+50 plus"),
]


@pytest.mark.parametrize(("verb", "reply"), ODD_REPLIES,
                         ids=[f"{v}-{r[:12]!r}" for v, r in ODD_REPLIES])
@pytest_twisted.ensureDeferred
async def test_a_malformed_reply_defers_and_never_bounces(
    tmp_path: Path, verb: str, reply: bytes
) -> None:
    body = tmp_path / "body"
    body.write_bytes(b"Subject: test\r\n\r\nHello.\r\n")
    replies = {"EHLO": b"250-fake.test\r\n250 8BITMIME", verb: reply}
    script = Script(plain=replies)

    result = await run(script, body, settings())

    assert result.failure is not None
    assert result.failure.reason.startswith("malformed reply from mx.peer.test")
    assert result.reply_for(RECIPIENT) is None  # deferred, with the reason
    assert script.bodies == []


@pytest_twisted.ensureDeferred
async def test_a_long_reply_is_kept_to_its_first_2000_characters(
    tmp_path: Path,
) -> None:
    body = tmp_path / "body"
    body.write_bytes(b"Subject: test\r\n\r\nHello.\r\n")
    script = Script(plain={"EHLO": b"250-fake.test\r\n250 8BITMIME",
                           "RCPT": b"550 5.1.1 " + b"no such user " * 1000})

    result = await run(script, body, settings())

    rcpt = result.rcpt_replies[RECIPIENT]
    assert rcpt.code == 550 and rcpt.dsn == "5.1.1"
    assert len(rcpt.text) <= 2010 and rcpt.text.endswith("[...]")
