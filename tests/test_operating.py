"""Operating the relay end to end (issue 4): the real relay (`twistd -n
mta`), real peers on loopback, MX records from a DNS responder.

- the server's reply is logged in its own words;
- a reload that changes `domains` and `routes` takes effect for mail
  already queued;
- SIGTERM while an outbound delivery is under way: it finishes, or it is
  retried after the restart; nothing is lost, nothing recorded is sent
  twice;
- one bounce for a message with two failed recipients, each with its own
  Status and Diagnostic-Code;
- a DNS time-out defers the recipient.

Peers listen on 127.0.12.50-59: addresses no other test file uses.
"""

from __future__ import annotations

import email
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from mta.envelope import DEFERRED
from tests.peers import smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer, Replies
from tests.relay import RelayProcess, base_config

SENDER_MX = "127.0.12.50"  # org.test: where bounces to alice@org.test go
DEST_MX = "127.0.12.51"  # dest.test
DEAD = "127.0.12.52"  # nothing listens
PEER_A = "127.0.12.53"
PEER_B = "127.0.12.54"
SLOW_MX = "127.0.12.55"

MESSAGE = (b"From: Alice <alice@org.test>\r\nSubject: %s\r\n"
           b"Message-ID: <%s@org.test>\r\n\r\nHello.\r\n")


def message(subject: str) -> bytes:
    return MESSAGE % (subject.encode(), subject.encode())


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

    def peer(self, address: str, **options: Any) -> Peer:
        peer = smtppeer.plain(address, self.mx_port, **options)
        self.peers.append(peer)
        return peer

    def mx(self, domain: str, address: str) -> None:
        self.dns.set(domain, "MX", [f"10 mx.{domain}."])
        self.dns.set(f"mx.{domain}", "A", [address])

    def config(self, **overrides: Any) -> dict[str, Any]:
        delivery = {
            "retry_schedule": ["1s"],
            "plaintext_fallback_delay": "0s",
            "port": self.mx_port,
            # Every retry must really try (mta.destinations would suspend
            # a destination that keeps failing).
            "destination_failure_limit": 1000,
            "timeouts": {"connect": "5s", "command": "10s", "data": "20s"},
            **overrides.pop("delivery", {}),
        }
        return base_config(
            self.tmp_path, self.relay_cert.chain, self.relay_cert.key,
            dns={"nameservers": [f"127.0.0.1:{self.dns.port}"]},
            delivery=delivery, **overrides,
        )

    def start(self, **overrides: Any) -> RelayProcess:
        self.relay = RelayProcess(self.tmp_path / "relay",
                                  self.config(**overrides)).start()
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


def lines(relay: RelayProcess, *parts: str) -> list[str]:
    return [line for line in relay.log().splitlines()
            if all(part in line for part in parts)]


def wait_until(done: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


# --- the server's words ---------------------------------------------------------


def test_a_reply_without_an_enhanced_code_is_logged_as_the_server_said_it(
    world: World,
) -> None:
    peer = world.peer(DEST_MX, replies=Replies(data="250 OK queued"))
    world.mx("dest.test", DEST_MX)
    relay = world.start()

    queue_id = relay.submit("alice@org.test", ["bob@dest.test"], message("ok"))
    peer.wait_for(1)
    sent = relay.wait_for_log(f"{queue_id}: to=<bob@dest.test>")

    # dsn= is derived (RFC 3463); the reply in brackets is the server's.
    assert "dsn=2.0.0 status=sent (250 OK queued)" in sent, sent
    envelope_gone = relay.wait_for_log(f"{queue_id}: removed")
    assert envelope_gone


# --- one bounce for two failed recipients -----------------------------------


def test_two_failed_recipients_get_one_bounce_with_a_block_each(
    world: World,
) -> None:
    sender_peer = world.peer(SENDER_MX)
    world.mx("org.test", SENDER_MX)
    world.peer(DEST_MX, replies=Replies(rcpt={
        "gone@dest.test": "550 5.1.1 <gone@dest.test>: no such user",
        "full@dest.test": "552 mailbox full",  # no enhanced code
    }))
    world.mx("dest.test", DEST_MX)
    relay = world.start()

    queue_id = relay.submit(
        "alice@org.test", ["gone@dest.test", "bob@dest.test", "full@dest.test"],
        message("two-failed"))

    [received] = sender_peer.wait_for(1, timeout=20)
    relay.wait_for_log(f"{queue_id}: removed", timeout=20)
    assert received.mail_from == "" and received.rcpt_tos == ("alice@org.test",)
    report = email.message_from_bytes(received.content)
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload(1)
    assert status.get_content_type() == "message/delivery-status"
    per_message, *blocks = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert [block["Final-Recipient"] for block in blocks] == [
        "rfc822; gone@dest.test", "rfc822; full@dest.test"]
    gone, full = blocks
    assert (gone["Action"], gone["Status"]) == ("failed", "5.1.1")
    assert gone["Diagnostic-Code"] == ("smtp; 550 5.1.1 <gone@dest.test>: no "
                                       "such user")
    assert (full["Action"], full["Status"]) == ("failed", "5.0.0")
    # The server's own words: no enhanced code it never sent.
    assert full["Diagnostic-Code"] == "smtp; 552 mailbox full"
    for block in blocks:
        assert block["Remote-MTA"] == "dns; mx.dest.test"
    words = " ".join(str(report.get_payload(0).get_payload()).split())
    assert "gone@dest.test" in words and "full@dest.test" in words
    assert "bob@dest.test" not in words  # delivered
    assert len(lines(relay, f"{queue_id}: sender non-delivery notification")) == 1
    time.sleep(1)
    assert len(sender_peer.messages) == 1


# --- a DNS time-out --------------------------------------------------------------


def test_a_dns_time_out_defers_the_recipient(world: World) -> None:
    world.dns.drop = {"slow.test"}  # the MX query is never answered
    relay = world.start(delivery={"retry_schedule": ["1h"]})

    queue_id = relay.submit("alice@org.test", ["bob@slow.test"],
                            message("dns"))

    # The resolver gives up after its lifetime (15 s).
    line = relay.wait_for_log(f"{queue_id}: to=<bob@slow.test>", timeout=30)
    assert "dsn=4.4.3 status=deferred" in line, line
    assert "name=slow.test type=MX" in line and "try again" in line, line
    assert "tls=" not in line  # no session was made
    envelope = relay.wait_for_envelope(
        lambda e: e.queue_id == queue_id and e.recipients[0].history)
    [recipient] = envelope.recipients
    assert recipient.state == DEFERRED and recipient.dsn == "4.4.3"
    assert recipient.next_attempt is not None
    assert recipient.next_attempt > time.time() + 1800


# --- a reload that changes where queued mail goes --------------------------------


def test_a_reload_moves_queued_mail_to_new_domains_and_routes(
    world: World,
) -> None:
    dead = f"{DEAD}:{world.mx_port}"
    relay = world.start(
        domains={"ours.test": {"relay_to": [dead]}},
        routes={"moved.test": f"[{DEAD}]:{world.mx_port}"},
    )
    inbound = relay.submit("alice@org.test", ["carol@ours.test"],
                           message("inbound"), listener="mx")
    outbound = relay.submit("alice@org.test", ["bob@moved.test"],
                            message("outbound"))
    for queue_id in (inbound, outbound):
        line = relay.wait_for_log(f"{queue_id}: to=<")
        assert "status=deferred" in line and DEAD in line, line

    peer_a, peer_b = world.peer(PEER_A), world.peer(PEER_B)
    new = dict(relay.config,
               domains={"ours.test": {"relay_to": [f"{PEER_B}:{world.mx_port}"]}},
               routes={"moved.test": f"[{PEER_A}]:{world.mx_port}"})
    relay.config_path.write_text(yaml.safe_dump(new))
    assert relay.process is not None
    os.kill(relay.process.pid, signal.SIGHUP)
    relay.wait_for_log("reload: ok")

    [to_b] = peer_b.wait_for(1, timeout=15)
    [to_a] = peer_a.wait_for(1, timeout=15)
    assert to_b.rcpt_tos == ("carol@ours.test",)
    assert to_a.rcpt_tos == ("bob@moved.test",)
    for queue_id, address in ((inbound, PEER_B), (outbound, PEER_A)):
        relay.wait_for_log(f"{queue_id}: removed")
        [sent] = lines(relay, f"{queue_id}: to=<", "status=sent")
        assert f"[{address}]:{world.mx_port}" in sent, sent


# --- SIGTERM while a delivery is under way ------------------------------------


def in_data(peer: Peer) -> bool:
    return any("DATA" in connection.commands for connection in peer.connections)


def test_sigterm_lets_a_delivery_under_way_finish(world: World) -> None:
    peer = world.peer(SLOW_MX, data_delay=2.0)
    world.mx("slow.test", SLOW_MX)
    relay = world.start(limits={"stop_timeout": "20s"})
    assert relay.process is not None

    queue_id = relay.submit("alice@org.test", ["bob@slow.test"],
                            message("finish"))
    wait_until(lambda: in_data(peer), "the relay sent DATA")
    os.kill(relay.process.pid, signal.SIGTERM)
    relay.process.wait(timeout=20)

    assert len(peer.messages) == 1
    [sent] = lines(relay, f"{queue_id}: to=<bob@slow.test>")
    assert "status=sent" in sent, sent
    assert lines(relay, f"{queue_id}: removed")
    assert lines(relay, "stop: done, nothing left under way")
    assert relay.spool.queue_ids() == []

    # The next start has nothing to send again.
    relay.start()
    time.sleep(2)
    relay.stop()
    assert len(peer.messages) == 1


def test_a_delivery_cut_short_by_the_stop_is_retried_after_the_restart(
    world: World,
) -> None:
    peer = world.peer(SLOW_MX, data_delay=3.0)
    world.mx("slow.test", SLOW_MX)
    relay = world.start(limits={"stop_timeout": "1s"})
    assert relay.process is not None

    queue_id = relay.submit("alice@org.test", ["bob@slow.test"],
                            message("retried"))
    wait_until(lambda: in_data(peer), "the relay sent DATA")
    os.kill(relay.process.pid, signal.SIGTERM)
    relay.process.wait(timeout=20)

    assert lines(relay, "stop: after 1s", "left 1 delivery(ies)")
    # Cut off: at most recorded as deferred, never as sent.
    for line in lines(relay, f"{queue_id}: to=<"):
        assert "status=deferred" in line, line
        assert "may be sent more than once" in line, line
    [envelope] = relay.envelopes()
    assert envelope.queue_id == queue_id
    assert envelope.recipients[0].state != "delivered"

    peer.data_delay = 0.0
    relay.start()
    relay.wait_for_log(f"{queue_id}: removed", timeout=20)
    relay.stop()
    [sent] = lines(relay, f"{queue_id}: to=<bob@slow.test>", "status=sent")
    # The cut attempt may have reached the server (it answered after the
    # relay had gone): at most that one copy more, never a lost message.
    assert 1 <= len(peer.messages) <= 2
    assert relay.spool.queue_ids() == []
