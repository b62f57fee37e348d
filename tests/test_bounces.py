"""Bounces and delay notices end to end: the real relay (`twistd -n mta`),
real SMTP peers on loopback (127.0.5.x), MX records from a DNS responder.

The sender's domain, org.test, has an MX of its own (a plain peer): the
notices the relay writes are delivered there like any other mail, and each
test reads them back with Python's email package.
"""

from __future__ import annotations

import email
import time
from email.message import Message
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from mta.envelope import FAILED, Client, Envelope, Recipient
from mta.spool import Spool
from tests.peers import smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer, ReceivedMessage, Replies
from tests.relay import RelayProcess, base_config

MESSAGE = (
    b"From: Alice <alice@org.test>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: bounce me\r\n"
    b"Message-ID: <bounce.me@org.test>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
SENDER_MX = "127.0.5.10"  # org.test, where notices to alice@org.test go
DEST_MX = "127.0.5.11"  # dest.test
DEAD_MX = "127.0.5.12"  # dead.test: nothing listens
PLAIN_MX = "127.0.5.13"  # partner.test: no STARTTLS


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
        self.sender_peer = self.peer(smtppeer.plain, SENDER_MX)
        self.mx("org.test", SENDER_MX)

    def peer(self, factory: Callable[..., Peer], address: str,
             **options: Any) -> Peer:
        peer = factory(address, self.mx_port, **options)
        self.peers.append(peer)
        return peer

    def mx(self, domain: str, address: str) -> None:
        self.dns.set(domain, "MX", [f"10 mx.{domain}."])
        self.dns.set(f"mx.{domain}", "A", [address])

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


# --- reading a notice ----------------------------------------------------------

def parse(received: ReceivedMessage) -> Message:
    report = email.message_from_bytes(received.content)
    assert report.get_content_type() == "multipart/report", received.content
    assert report.get_param("report-type") == "delivery-status"
    return report


def groups(report: Message) -> list[Message]:
    """The delivery-status part's field groups: per message, then one per
    recipient."""
    status = report.get_payload(1)
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()


def by_recipient(report: Message) -> dict[str, Message]:
    return {group["Final-Recipient"].removeprefix("rfc822; "): group
            for group in groups(report)[1:]}


def text(report: Message) -> str:
    return " ".join(str(report.get_payload(0).get_payload()).split())


def original_headers(report: Message) -> bytes:
    part = report.get_payload(2)
    assert part.get_content_type() == "text/rfc822-headers"
    return part.get_payload(decode=True)


def assert_notice_envelope(received: ReceivedMessage) -> None:
    assert received.mail_from == ""  # RFC 5321 4.5.5: the null sender
    assert received.rcpt_tos == ("alice@org.test",)


def wait_until_removed(relay: RelayProcess, queue_id: str) -> None:
    relay.wait_for_log(f"{queue_id}: removed", timeout=20)
    assert not relay.spool.envelope_path(queue_id).exists()
    assert not relay.spool.message_path(queue_id).exists()


# --- the cases -------------------------------------------------------------------

def test_a_permanent_failure_bounces_to_the_sender(world: World) -> None:
    replies = Replies(rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    world.peer(smtppeer.plain, DEST_MX, replies=replies)
    world.mx("dest.test", DEST_MX)
    relay = world.start()

    queue_id = relay.submit("alice@org.test", ["bob@dest.test", "gone@dest.test"],
                            MESSAGE)

    received = world.sender_peer.wait_for(1, timeout=20)[0]
    assert_notice_envelope(received)
    report = parse(received)
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert report["To"] == "<alice@org.test>"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["In-Reply-To"] == "<bounce.me@org.test>"
    reported = by_recipient(report)
    assert list(reported) == ["gone@dest.test"]  # bob@ got it
    gone = reported["gone@dest.test"]
    assert gone["Action"] == "failed" and gone["Status"] == "5.1.1"
    assert gone["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert gone["Remote-MTA"] == "dns; mx.dest.test"
    assert groups(report)[0]["Reporting-MTA"] == "dns; relay.test"
    headers = original_headers(report)
    assert b"Subject: bounce me" in headers
    assert headers.startswith(b"Received: from client.test")
    assert "the address does not exist there" in text(report)

    notice_id = relay.wait_for_log(f"{queue_id}: sender non-delivery "
                                   "notification: ").rsplit(" ", 1)[1]
    accepted = relay.wait_for_log(f"{notice_id}: accepted")
    assert "from=<> " in accepted and "listener=bounce" in accepted
    # The original leaves the spool after its bounce; so does the bounce.
    wait_until_removed(relay, queue_id)
    wait_until_removed(relay, notice_id)
    assert len(world.sender_peer.messages) == 1


def test_expiry_bounces_with_a_5xx_status(world: World) -> None:
    world.mx("dead.test", DEAD_MX)
    relay = world.start(delivery={"max_lifetime": "2s"})

    queue_id = relay.submit("alice@org.test", ["bob@dead.test"], MESSAGE)

    received = world.sender_peer.wait_for(1, timeout=20)[0]
    assert_notice_envelope(received)
    report = parse(received)
    bob = by_recipient(report)["bob@dead.test"]
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.4.7"  # was 4.4.1 while it was retried
    assert "Remote-MTA" not in bob  # nothing answered
    assert bob["Diagnostic-Code"].startswith("X-mta; message expired after 2 ")
    assert "Connection refused" in bob["Diagnostic-Code"]
    assert "has given up" in text(report)
    line = relay.wait_for_log(f"{queue_id}: to=<bob@dead.test>", timeout=5)
    assert "dsn=4.4.1" in line and "status=deferred" in line
    wait_until_removed(relay, queue_id)


def test_a_tls_enforcement_failure_says_which_policy_required_what(
    world: World,
) -> None:
    peer = world.peer(smtppeer.plain, PLAIN_MX)
    world.mx("partner.test", PLAIN_MX)
    relay = world.start(
        policies=[{"name": "partner", "direction": "outbound",
                   "recipient_domain": "partner.test", "tls": "enforce-tls"}],
        delivery={"max_lifetime": "2s"},
    )

    queue_id = relay.submit("alice@org.test", ["carol@partner.test"], MESSAGE)

    report = parse(world.sender_peer.wait_for(1, timeout=20)[0])
    carol = by_recipient(report)["carol@partner.test"]
    assert carol["Status"] == "5.7.4"
    assert "TLS required by rule partner (enforce-tls)" in carol["Diagnostic-Code"]
    assert carol["Remote-MTA"] == "dns; mx.partner.test"
    words = text(report)
    assert "(rule partner, level enforce-tls)" in words
    assert "must travel encrypted (TLS)" in words
    assert (f"mx.partner.test[{PLAIN_MX}] did not offer encryption (STARTTLS)"
            in words)
    assert peer.messages == []  # never in plaintext
    wait_until_removed(relay, queue_id)


def test_a_null_sender_message_that_fails_gets_no_bounce(world: World) -> None:
    replies = Replies(rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    world.peer(smtppeer.plain, DEST_MX, replies=replies)
    world.mx("dest.test", DEST_MX)
    relay = world.start()

    queue_id = relay.submit("", ["gone@dest.test"], MESSAGE)

    line = relay.wait_for_log(f"{queue_id}: bounce discarded", timeout=20)
    assert "undeliverable mail from the null sender <>" in line
    assert "<gone@dest.test> dsn=5.1.1" in line
    wait_until_removed(relay, queue_id)
    # A notice is committed before the original is removed: none was.
    log = relay.log()
    assert "notification:" not in log and "listener=bounce" not in log
    assert sum(f"{queue_id}: bounce discarded" in x
               for x in log.splitlines()) == 1
    assert world.sender_peer.messages == []


def test_a_null_sender_failure_goes_to_the_postmaster_when_set(
    world: World,
) -> None:
    replies = Replies(rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    world.peer(smtppeer.plain, DEST_MX, replies=replies)
    world.mx("dest.test", DEST_MX)
    relay = world.start(notices={"postmaster": "postmaster@org.test"})

    queue_id = relay.submit("", ["gone@dest.test"], MESSAGE)

    received = world.sender_peer.wait_for(1, timeout=20)[0]
    assert received.mail_from == ""
    assert received.rcpt_tos == ("postmaster@org.test",)
    report = parse(received)
    assert by_recipient(report)["gone@dest.test"]["Status"] == "5.1.1"
    assert "from the null sender <>" in text(report)
    relay.wait_for_log(f"{queue_id}: postmaster non-delivery notification: ")
    wait_until_removed(relay, queue_id)


def test_one_delay_notice_then_delivery_goes_on(world: World) -> None:
    world.mx("dead.test", DEAD_MX)
    relay = world.start(notices={"delay_warning": "1s"})

    queue_id = relay.submit("alice@org.test", ["bob@dead.test"], MESSAGE)

    report = parse(world.sender_peer.wait_for(1, timeout=20)[0])
    bob = by_recipient(report)["bob@dead.test"]
    assert bob["Action"] == "delayed" and bob["Status"] == "4.4.1"
    assert "Will-Retry-Until" in bob
    assert report["Subject"].startswith("Delivery delayed")
    assert "keeps trying until" in text(report)
    relay.wait_for_log(f"{queue_id}: sender delay notification: ")

    # Two more attempts after the notice, and still only the one notice.
    attempts = f"{queue_id}: to=<bob@dead.test>"
    seen = relay.log().count(attempts)
    relay.wait_for_envelope(
        lambda e: e.queue_id == queue_id
        and len(e.recipients[0].history) >= seen + 2, timeout=10)
    envelope = relay.spool.load(queue_id)
    assert envelope.delay_notified and envelope.recipients[0].state == "deferred"
    assert relay.log().count(f"{queue_id}: sender delay notification") == 1
    assert len(world.sender_peer.messages) == 1


def test_a_bounce_that_fails_is_discarded_with_one_line(world: World) -> None:
    replies = Replies(rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    world.peer(smtppeer.plain, DEST_MX, replies=replies)
    world.mx("dest.test", DEST_MX)
    relay = world.start()  # nowhere.test is not in the DNS

    queue_id = relay.submit("alice@nowhere.test", ["gone@dest.test"], MESSAGE)

    notice_id = relay.wait_for_log(f"{queue_id}: sender non-delivery "
                                   "notification: ").rsplit(" ", 1)[1]
    line = relay.wait_for_log(f"{notice_id}: bounce discarded")
    assert "<alice@nowhere.test> dsn=5.1.2" in line
    wait_until_removed(relay, queue_id)
    wait_until_removed(relay, notice_id)
    assert relay.log().count("notification:") == 1  # no bounce of a bounce


def test_a_failure_left_unreported_by_a_crash_is_bounced_at_start(
    world: World,
) -> None:
    """A crash after a recipient failed and before its bounce was
    recorded (or an envelope of an older version) leaves a failed,
    unreported recipient: the next start reports it and removes the
    message."""
    spool = Spool(world.tmp_path / "spool")
    spool.create()
    writer = spool.new_message()
    writer.write(b"Received: by relay.test (mta) id 0LEFT; "
                 b"Fri, 15 Jan 2027 08:00:00 +0000\r\n" + MESSAGE)
    failed = Recipient("gone@dest.test", state=FAILED, dsn="5.1.1",
                       reason="host mx.dest.test[127.0.5.11] said: 550 5.1.1 "
                       "no such user (in reply to RCPT TO command)")
    writer.commit(Envelope(
        writer.queue_id, "alice@org.test", time.time() - 60, writer.size,
        Client("client.test", "unknown", "127.0.0.1", "submission"),
        (failed,)))

    relay = world.start()

    report = parse(world.sender_peer.wait_for(1, timeout=20)[0])
    assert by_recipient(report)["gone@dest.test"]["Status"] == "5.1.1"
    wait_until_removed(relay, writer.queue_id)
