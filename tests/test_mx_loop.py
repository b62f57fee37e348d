"""An MX record that points back at the relay (issue 5, item 3, "Loops"),
end to end: the running relay, a DNS responder whose MX records name the
relay's own listener, and a recording peer for everything else.

RFC 5321 5.1 and Postfix: the relay drops itself and every MX host behind
it; with nothing left the recipient bounces at once, 5.4.6 "loops back to
myself", without a connection, rather than going round until the hop
limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer
from tests.relay import RelayProcess, base_config, free_port

RELAY = "127.0.14.1"  # both listeners; its MX host name is relay.loop.test
PEER = "127.0.14.2"  # every other MX host
DOWN = "127.0.14.3"  # an MX host where nothing listens
MESSAGE = b"From: alice@org.test\r\nSubject: round and round\r\n\r\nhi\r\n"


@pytest.fixture
def world(tmp_path: Path, relay_cert: Any,
          dns: DNSServer) -> Iterator[tuple[RelayProcess, Peer]]:
    # MX hosts are contacted on delivery.port: the submission listener's,
    # so an MX naming the relay reaches the listener that relays anything
    # from 127/8 (the true loop, not just a refusal at RCPT).
    port = free_port(RELAY)
    peer = smtppeer.plain(PEER, port)
    dns.set("relay.loop.test", "A", [RELAY])
    dns.set("mx.org.test", "A", [PEER])
    dns.set("org.test", "MX", ["10 mx.org.test."])
    dns.set("loop.test", "MX", ["10 relay.loop.test."])
    dns.set("mx.down.test", "A", [DOWN])
    dns.set("backup.test", "MX", ["10 mx.down.test.", "20 relay.loop.test."])
    config = base_config(
        tmp_path, relay_cert.chain, relay_cert.key,
        listeners=[
            {"name": "mx", "address": RELAY, "port": free_port(RELAY),
             "role": "inbound"},
            {"name": "submission", "address": RELAY, "port": port,
             "role": "outbound", "networks": ["127.0.0.0/8"]},
        ],
        dns={"nameservers": [f"127.0.0.1:{dns.port}"]},
    )
    config["delivery"]["port"] = port
    relay = RelayProcess(tmp_path / "relay", config).start()
    yield relay, peer
    relay.stop()
    peer.stop()


def delivery_lines(relay: RelayProcess, recipient: str) -> list[str]:
    return [line for line in relay.log().splitlines()
            if f": to=<{recipient}>" in line]


def test_an_mx_pointing_at_the_relay_bounces_without_a_connection(
    world: tuple[RelayProcess, Peer],
) -> None:
    relay, peer = world
    queue_id = relay.submit("alice@org.test", ["bob@loop.test"], MESSAGE)

    # The sender hears of it: the bounce reaches org.test's MX host.
    [bounce] = peer.wait_for(1, timeout=20)
    assert bounce.rcpt_tos == ("alice@org.test",) and bounce.mail_from == ""
    assert b"Status: 5.4.6" in bounce.content
    assert b"mail for loop.test loops back to myself" in bounce.content

    [line] = delivery_lines(relay, "bob@loop.test")
    assert f"] {queue_id}: to=<bob@loop.test> relay=none " in line
    assert "tls=" not in line  # no SMTP session was made
    assert "dsn=5.4.6 status=bounced" in line
    assert re.search(
        r"\(mail for loop.test loops back to myself: relay\.loop\.test"
        rf"\[{re.escape(RELAY)}\]:\d+ is this relay \(listener submission\)\)$",
        line), line
    # One message was ever taken on the submission listener: the relay
    # never connected to itself.
    accepted = [text for text in relay.log().splitlines()
                if ": accepted from=" in text and "listener=submission" in text]
    assert len(accepted) == 1, accepted


def test_a_backup_mx_never_sends_to_itself_when_the_better_host_is_down(
    world: tuple[RelayProcess, Peer],
) -> None:
    relay, _ = world
    queue_id = relay.submit("alice@org.test", ["carol@backup.test"], MESSAGE)

    # backup.test: MX 10 is down, MX 20 is the relay.  RFC 5321 5.1: the
    # relay is no host to try, so the recipient waits for MX 10.
    envelope = relay.wait_for_envelope(
        lambda e: e.queue_id == queue_id
        and e.recipient("carol@backup.test").state == "deferred")
    assert envelope.recipient("carol@backup.test").dsn == "4.4.1"
    [line] = delivery_lines(relay, "carol@backup.test")
    assert f"relay=mx.down.test[{DOWN}]" in line and "status=deferred" in line
    accepted = [text for text in relay.log().splitlines()
                if ": accepted from=" in text and "listener=submission" in text]
    assert len(accepted) == 1, accepted
