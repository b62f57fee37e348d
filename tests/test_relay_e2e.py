"""The running relay (`twistd -n mta`) end to end on loopback: a message is
submitted over SMTP, spooled, its MX found through a DNS responder on
loopback, and delivered to a real peer whose TLS behaviour is chosen; each
test asserts on what the peer recorded and what the spool and log say."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from mta.config import DEFAULT_CIPHERS, DEFAULT_CIPHERSUITES
from tests.peers import smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer, Replies
from tests.relay import RelayProcess, base_config

MESSAGE = (
    b"From: Alice <alice@org.test>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".A line that starts with a dot.\r\n"
)
CONFIGURED = set(DEFAULT_CIPHERS) | set(DEFAULT_CIPHERSUITES)


class World:
    """The relay, the DNS responder and the peers of one test."""

    def __init__(self, tmp_path: Path, relay_cert: Any, dns: DNSServer,
                 mx_port: int) -> None:
        self.tmp_path = tmp_path
        self.relay_cert = relay_cert
        self.dns = dns
        self.mx_port = mx_port
        self.peers: list[Peer] = []
        self.relay: RelayProcess | None = None

    def peer(self, factory: Callable[..., Peer], address: str,
             **options: Any) -> Peer:
        peer = factory(address, self.mx_port, **options)
        self.peers.append(peer)
        return peer

    def mx(self, domain: str, *hosts: tuple[int, str, str]) -> None:
        """MX records for ``domain``: (preference, host name, address)."""
        self.dns.set(domain, "MX", [f"{pref} {name}." for pref, name, _ in hosts])
        for _, name, address in hosts:
            self.dns.set(name, "A", [address])

    def start(self, **overrides: Any) -> RelayProcess:
        delivery = {
            "retry_schedule": ["1s"],
            "plaintext_fallback_delay": "0s",
            "port": self.mx_port,
            "timeouts": {"connect": "5s", "command": "10s", "data": "20s"},
            **overrides.pop("delivery", {}),
        }
        config = base_config(
            self.tmp_path, self.relay_cert.chain, self.relay_cert.key,
            dns={"nameservers": [f"127.0.0.1:{self.dns.port}"]},
            delivery=delivery, **overrides,
        )
        self.relay = RelayProcess(self.tmp_path / "relay", config).start()
        return self.relay

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        for peer in self.peers:
            peer.stop()


@pytest.fixture
def world(tmp_path: Path, relay_cert: Any, dns: DNSServer,
          mx_port: int) -> Iterator[World]:
    world = World(tmp_path, relay_cert, dns, mx_port)
    yield world
    world.close()


def body_after_received(content: bytes) -> bytes:
    """The message as submitted: what follows our Received header."""
    assert content.startswith(b"Received: from "), content[:200]
    end = re.search(rb"\r\n(?![ \t])", content)
    assert end is not None
    return content[end.end():]


def test_peer_without_starttls_gets_plaintext(world: World) -> None:
    peer = world.peer(smtppeer.plain, "127.0.0.11")
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.11"))
    relay = world.start()

    queue_id = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    received = peer.wait_for(1, timeout=15)[0]
    assert received.tls is None
    assert received.rcpt_tos == ("bob@dest.test",)
    assert body_after_received(received.content) == MESSAGE
    line = relay.wait_for_log(f"{queue_id}: to=<bob@dest.test>")
    assert "tls=none" in line and "status=sent" in line


def test_tls13_peer_gets_tls13_with_a_configured_cipher(world: World) -> None:
    peer = world.peer(smtppeer.tls13, "127.0.0.12")
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.12"))
    relay = world.start()

    queue_id = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    received = peer.wait_for(1, timeout=15)[0]
    assert received.tls is not None
    assert received.tls.protocol == "TLSv1.3"
    # The peer picks by its own preference; it can only pick one of ours.
    assert received.tls.cipher in DEFAULT_CIPHERSUITES
    line = relay.wait_for_log(f"{queue_id}: to=<bob@dest.test>")
    assert f"tls=TLSv1.3/{received.tls.cipher}" in line
    assert "trust=" in line and "policy=opportunistic" in line


@pytest.mark.parametrize("rsa", [False, True], ids=["ecdsa", "rsa"])
def test_tls12_only_peer_gets_tls12_with_a_configured_cipher(
    world: World, rsa: bool
) -> None:
    peer = world.peer(smtppeer.tls12_only, "127.0.0.13", rsa=rsa)
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.13"))
    relay = world.start()

    relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    received = peer.wait_for(1, timeout=15)[0]
    assert received.tls is not None
    assert received.tls.protocol == "TLSv1.2"
    assert received.tls.cipher in CONFIGURED
    # The peer prefers its own order; either way it is one of ours, and the
    # first of ours for that key type when the peer follows our order.
    assert received.tls.cipher.startswith("ECDHE-RSA" if rsa else "ECDHE-ECDSA")


def test_client_offers_our_ciphers_in_our_order(world: World) -> None:
    peer = world.peer(smtppeer.client_order, "127.0.0.14")
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.14"))
    relay = world.start()

    relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    received = peer.wait_for(1, timeout=15)[0]
    assert received.tls is not None
    assert received.tls.cipher == DEFAULT_CIPHERS[0]


@pytest.mark.parametrize(
    "factory", [smtppeer.tls10_only, smtppeer.tls11_only,
                smtppeer.no_shared_cipher, smtppeer.starttls_454],
    ids=["tls10", "tls11", "no-shared-cipher", "starttls-454"],
)
def test_tls_failure_falls_back_to_plaintext_at_once(
    world: World, factory: Callable[..., Peer]
) -> None:
    peer = world.peer(factory, "127.0.0.15")
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.15"))
    relay = world.start()

    queue_id = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    received = peer.wait_for(1, timeout=15)[0]
    assert received.tls is None
    assert body_after_received(received.content) == MESSAGE
    # The first connection tried TLS; the second went without STARTTLS.
    connections = peer.wait_for_connections(2, timeout=15)
    assert any("STARTTLS" in c.commands for c in connections[:1])
    assert "STARTTLS" not in connections[-1].commands
    line = relay.wait_for_log(f"{queue_id}: to=<bob@dest.test>")
    assert "tls=none" in line and "status=sent" in line
    assert re.search(r"fallback=(starttls-refused|tls-handshake-failed)", line)


def test_tls_failure_defers_until_the_fallback_delay(world: World) -> None:
    peer = world.peer(smtppeer.tls10_only, "127.0.0.16")
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.16"))
    relay = world.start(delivery={"plaintext_fallback_delay": "3s",
                                  "retry_schedule": ["1s"]})

    queue_id = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    deferred = relay.wait_for_envelope(
        lambda e: e.queue_id == queue_id
        and e.recipients[0].state == "deferred", timeout=10)
    recipient = deferred.recipients[0]
    assert recipient.dsn == "4.7.5"
    assert "plaintext fallback allowed from" in (recipient.reason or "")
    assert recipient.next_attempt is not None
    assert recipient.next_attempt <= deferred.arrival + 3.0 + 0.01
    assert peer.messages == []

    received = peer.wait_for(1, timeout=15)[0]
    assert received.tls is None
    line = relay.wait_for_log("status=sent")
    assert queue_id in line and "fallback=" in line


def test_fallback_defer_mode_never_sends_plaintext(world: World) -> None:
    peer = world.peer(smtppeer.tls10_only, "127.0.0.17")
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.17"))
    relay = world.start(delivery={"opportunistic_fallback": "defer"})

    queue_id = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    relay.wait_for_envelope(
        lambda e: e.queue_id == queue_id
        and len(e.recipients[0].history) >= 2, timeout=10)
    assert peer.messages == []


def test_second_mx_gets_it_over_tls_when_the_first_fails_handshake(
    world: World,
) -> None:
    bad = world.peer(smtppeer.tls10_only, "127.0.0.18")
    good = world.peer(smtppeer.tls13, "127.0.0.19")
    world.mx("dest.test", (10, "mx1.dest.test", "127.0.0.18"),
             (20, "mx2.dest.test", "127.0.0.19"))
    relay = world.start()

    queue_id = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    received = good.wait_for(1, timeout=15)[0]
    assert received.tls is not None and received.tls.protocol == "TLSv1.3"
    assert bad.messages == []
    line = relay.wait_for_log(f"{queue_id}: to=<bob@dest.test>")
    assert "relay=mx2.dest.test[127.0.0.19]" in line and "fallback" not in line


def test_level_none_never_starts_tls(world: World) -> None:
    peer = world.peer(smtppeer.tls13, "127.0.0.20")
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.20"))
    relay = world.start(defaults={"outbound": "none", "inbound": "none"})

    relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    received = peer.wait_for(1, timeout=15)[0]
    assert received.tls is None
    assert all("STARTTLS" not in c.commands for c in peer.connections)


def test_inbound_domain_goes_to_relay_to_over_tls(world: World) -> None:
    peer = world.peer(smtppeer.tls13, "127.0.0.21")
    # relay_to is looked up by A only: an MX record must not be used.
    world.dns.set("mail.example.test", "A", ["127.0.0.21"])
    world.dns.set("example.test", "MX", ["10 elsewhere.test."])
    relay = world.start(domains={"example.test": {
        "relay_to": [f"mail.example.test:{world.mx_port}"]}})

    relay.submit("alice@org.test", ["carol@example.test"], MESSAGE,
                 listener="mx")

    received = peer.wait_for(1, timeout=15)[0]
    assert received.rcpt_tos == ("carol@example.test",)
    assert received.tls is not None and received.tls.protocol == "TLSv1.3"


def test_recipient_replies_are_per_recipient(world: World) -> None:
    replies = Replies(rcpt={"later@dest.test": "450 4.2.0 mailbox busy",
                            "gone@dest.test": "550 5.1.1 no such user"})
    peer = world.peer(smtppeer.tls13, "127.0.0.22", replies=replies)
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.22"))
    relay = world.start(delivery={"retry_schedule": ["1h"]})

    queue_id = relay.submit(
        "alice@org.test",
        ["ok@dest.test", "later@dest.test", "gone@dest.test"], MESSAGE)

    assert peer.wait_for(1, timeout=15)[0].rcpt_tos == ("ok@dest.test",)
    envelope = relay.wait_for_envelope(
        lambda e: e.queue_id == queue_id
        and all(r.history for r in e.recipients), timeout=10)
    states = {r.address: (r.state, r.dsn) for r in envelope.recipients}
    assert states == {
        "ok@dest.test": ("delivered", "2.0.0"),
        "later@dest.test": ("deferred", "4.2.0"),
        "gone@dest.test": ("failed", "5.1.1"),
    }
    line = relay.wait_for_log(f"{queue_id}: to=<gone@dest.test>")
    assert "status=bounced" in line and "550 5.1.1" in line


def test_null_mx_fails_without_a_connection(world: World) -> None:
    world.dns.set("nomail.test", "MX", ["0 ."])
    relay = world.start()

    queue_id = relay.submit("alice@org.test", ["bob@nomail.test"], MESSAGE)

    # The log, not the spool: a failed message leaves the spool once its
    # bounce is written (tests/test_bounces.py).
    line = relay.wait_for_log(f"{queue_id}: to=<bob@nomail.test>")
    assert "relay=none" in line and "status=bounced" in line
    assert "dsn=5.1.10 " in line


def test_nxdomain_fails_and_servfail_defers(world: World) -> None:
    world.dns.servfail.add("broken.test")
    relay = world.start(delivery={"retry_schedule": ["1h"]})

    gone = relay.submit("alice@org.test", ["bob@missing.test"], MESSAGE)
    broken = relay.submit("alice@org.test", ["bob@broken.test"], MESSAGE)

    line = relay.wait_for_log(f"{gone}: to=<bob@missing.test>")
    assert "dsn=5.1.2 " in line and "status=bounced" in line
    envelope = relay.wait_for_envelope(
        lambda e: e.queue_id == broken and e.recipients[0].state == "deferred")
    assert envelope.recipients[0].dsn == "4.4.3"


def test_accepted_log_line_and_spooled_tls_facts(world: World) -> None:
    world.peer(smtppeer.plain, "127.0.0.23")
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.23"))
    relay = world.start()

    queue_id = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    line = relay.wait_for_log(f"{queue_id}: accepted")
    assert re.search(
        rf"{queue_id}: accepted from=<alice@org\.test> size=\d+ nrcpt=1 "
        r"client=\S+\[127\.0\.0\.1\] listener=submission tls=TLSv1\.3/\S+$",
        line,
    ), line
    delivered = relay.wait_for_log(f"{queue_id}: to=")
    assert re.search(
        rf"{queue_id}: to=<bob@dest\.test> relay=mx\.dest\.test\[127\.0\.0\.23\]"
        rf":{world.mx_port} delay=[\d.]+ tls=none policy=opportunistic "
        r"dsn=2\.\d\.\d status=sent \(250 ",
        delivered,
    ), delivered


def test_a_damaged_spool_file_is_quarantined_and_the_queue_goes_on(
    world: World,
) -> None:
    peer = world.peer(smtppeer.plain, "127.0.0.24")
    world.mx("dest.test", (10, "mx.dest.test", "127.0.0.24"))
    relay = world.start(delivery={"retry_schedule": ["1h"]})
    # One message waits (its first attempt is over); then damage it, as a
    # bad disk or a hand edit would, and queue a good one behind it.
    world.dns.servfail.add("later.test")
    waiting = relay.submit("alice@org.test", ["bob@later.test"], MESSAGE)
    relay.wait_for_envelope(lambda e: e.queue_id == waiting
                            and e.recipients[0].state == "deferred")
    path = relay.spool.envelope_path(waiting)
    path.write_text(path.read_text().replace('"arrival":', '"arrival":"x","y":'))
    # Due now (its queue file's time says when): the next scan takes it up.
    os.utime(relay.spool.message_path(waiting))

    good = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE)

    assert peer.wait_for(1, timeout=15)[0].rcpt_tos == ("bob@dest.test",)
    line = relay.wait_for_log(f"{waiting}: moved to ", timeout=20)
    assert "not a valid envelope" in line
    assert sorted(p.name for p in relay.spool.corrupt.iterdir()) == [
        f"{waiting}.env", f"{waiting}.msg"]
    assert relay.wait_for_log(f"{good}: removed")
