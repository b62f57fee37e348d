"""Delivery connections kept between messages (mta.connectioncache), end to
end: the running relay, the DNS responder and recording peers on 127.0.12.x.

A kept connection carries the next message to the same host after a RSET;
it is never handed to a message under another policy; it carries at most
`connection_reuse.messages` transactions and is closed with QUIT once idle
for `connection_reuse.idle`; one the server drops while idle costs the
next message nothing but a new connection.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.peers import smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import DISCONNECT, Connection, Peer
from tests.test_relay_e2e import MESSAGE, World

PEER = "127.0.12.1"


@pytest.fixture
def world(tmp_path: Path, relay_cert: Any, dns: DNSServer,
          mx_port: int) -> Iterator[World]:
    world = World(tmp_path, relay_cert, dns, mx_port)
    yield world
    world.close()


def commands(connection: Connection, verb: str) -> list[str]:
    return [line for line in connection.commands if line.startswith(verb)]


def send_one_by_one(world: World, peer: Peer, recipients: list[str]) -> list[str]:
    """Submit a message per recipient, each once the last has arrived, so
    that a kept connection is waiting for it."""
    assert world.relay is not None
    queue_ids = []
    already = len(peer.messages)
    for count, recipient in enumerate(recipients, start=already + 1):
        queue_ids.append(world.relay.submit("alice@org.test", [recipient], MESSAGE))
        peer.wait_for(count, timeout=15)
    return queue_ids


def test_a_kept_connection_carries_several_messages_with_rset_between(
    world: World,
) -> None:
    peer = world.peer(smtppeer.tls13, PEER)
    world.mx("dest.test", (10, "mx.dest.test", PEER))
    relay = world.start()

    queue_ids = send_one_by_one(world, peer, [f"u{n}@dest.test" for n in range(4)])

    [connection] = peer.connections
    assert len(commands(connection, "MAIL FROM")) == 4
    assert len(commands(connection, "EHLO")) == 2  # before and inside TLS
    # Each later transaction starts with RSET.
    verbs = [line.split()[0] for line in connection.commands]
    assert verbs.count("RSET") == 3
    for index, verb in enumerate(verbs):
        if verb == "MAIL" and index > verbs.index("MAIL"):
            assert verbs[index - 1] == "RSET"
    # Every message went over TLS, and each log line says so.
    assert all(m.tls is not None and m.tls.protocol == "TLSv1.3"
               for m in peer.messages)
    for queue_id in queue_ids:
        line = relay.wait_for_log(f"{queue_id}: to=<")
        assert "tls=TLSv1.3/" in line and "status=sent" in line


def test_no_connection_is_shared_across_policies(world: World) -> None:
    # Both domains have the same MX host, so only the policy tells them
    # apart: enforce-tls for strict.test, the default for loose.test.
    peer = world.peer(smtppeer.tls13, PEER)
    world.mx("strict.test", (10, "mx.shared.test", PEER))
    world.mx("loose.test", (10, "mx.shared.test", PEER))
    world.start(policies=[{"name": "strict", "direction": "outbound",
                           "recipient_domain": "strict.test",
                           "tls": "enforce-tls"}])

    send_one_by_one(world, peer, ["a@strict.test", "b@loose.test",
                                  "c@strict.test", "d@loose.test"])

    domains = []
    for connection in peer.connections:
        rcpts = commands(connection, "RCPT TO")
        assert rcpts, connection.commands
        kinds = {rcpt.rsplit("@", 1)[1] for rcpt in rcpts}
        assert len(kinds) == 1, connection.commands
        domains.append(kinds.pop())
    # One connection per policy, each carrying both of its messages.
    assert sorted(domains) == ["loose.test>", "strict.test>"]


def test_messages_per_connection_are_bounded(world: World) -> None:
    peer = world.peer(smtppeer.plain, PEER)
    world.mx("dest.test", (10, "mx.dest.test", PEER))
    world.start(delivery={"connection_reuse": {"messages": 2}})

    send_one_by_one(world, peer, [f"u{n}@dest.test" for n in range(5)])

    carried = [len(commands(c, "MAIL FROM")) for c in peer.connections]
    assert carried == [2, 2, 1]


def test_one_message_per_connection_when_reuse_is_off(world: World) -> None:
    peer = world.peer(smtppeer.plain, PEER)
    world.mx("dest.test", (10, "mx.dest.test", PEER))
    world.start(delivery={"connection_reuse": {"messages": 1}})

    send_one_by_one(world, peer, [f"u{n}@dest.test" for n in range(3)])

    assert [len(commands(c, "MAIL FROM")) for c in peer.connections] == [1, 1, 1]
    assert not any(commands(c, "RSET") for c in peer.connections)


def test_an_idle_connection_is_closed_with_quit(world: World) -> None:
    peer = world.peer(smtppeer.plain, PEER)
    world.mx("dest.test", (10, "mx.dest.test", PEER))
    world.start(delivery={"connection_reuse": {"idle": "300ms"}})

    send_one_by_one(world, peer, ["u@dest.test"])
    [connection] = peer.wait_for_connections(1, timeout=5)
    assert connection.commands[-1] == "QUIT"

    # The next message, later, gets a connection of its own.
    time.sleep(0.2)
    send_one_by_one(world, peer, ["v@dest.test"])
    assert len(peer.connections) == 2


@pytest.mark.parametrize("rset", [DISCONNECT, "421 4.3.2 closing",
                                  "502 5.5.1 no RSET here"])
def test_a_kept_connection_gone_stale_costs_only_a_new_connection(
    world: World, rset: str,
) -> None:
    peer = world.peer(smtppeer.plain, PEER)
    peer.replies.rset = rset
    world.mx("dest.test", (10, "mx.dest.test", PEER))
    relay = world.start()

    queue_ids = send_one_by_one(world, peer, ["u@dest.test", "v@dest.test",
                                              "w@dest.test"])

    # Every RSET failed, so every message went on a new connection, at
    # its first attempt: nothing was deferred.
    assert [len(commands(c, "MAIL FROM")) for c in peer.connections] == [1, 1, 1]
    for queue_id in queue_ids:
        line = relay.wait_for_log(f"{queue_id}: to=<")
        assert "status=sent" in line, line
    assert "status=deferred" not in relay.log()
