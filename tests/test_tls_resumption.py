"""TLS sessions resumed on new delivery connections (mta.connectioncache),
end to end against peers on 127.0.12.x that issue session tickets (TLS 1.3)
or keep session ids (TLS 1.2).

Each message below goes on a connection of its own (connection reuse off),
so every connection after the first may resume the first one's session.
What matters most is that a resumed connection is judged on what the full
handshake showed: a session made with a certificate that did not verify
never becomes "Verified" by being resumed, and a certificate the policy
refused leaves no session to resume.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.peers import certs, smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer
from tests.test_relay_e2e import MESSAGE, World

PEER = "127.0.12.2"
ONE_PER_CONNECTION = {"connection_reuse": {"messages": 1}}


@pytest.fixture
def world(tmp_path: Path, relay_cert: Any, dns: DNSServer,
          mx_port: int) -> Iterator[World]:
    world = World(tmp_path, relay_cert, dns, mx_port)
    yield world
    world.close()


def trusting(world: World) -> dict[str, Any]:
    """The relay's tls section, trusting the tests' CA."""
    bundle = certs.write_ca_file(certs.trusted_ca(),
                                 world.tmp_path / "trust" / "ca.pem")
    return {"certificate": str(world.relay_cert.chain),
            "private_key": str(world.relay_cert.key), "trust": str(bundle)}


def secure(domain: str) -> list[dict[str, str]]:
    return [{"name": "secure", "direction": "outbound",
             "recipient_domain": domain, "tls": "enforce-secure"}]


def field(line: str, name: str) -> str | None:
    found = re.search(rf" {name}=(\S+)", line)
    return found.group(1) if found else None


def send(world: World, peer: Peer, count: int) -> list[str]:
    """``count`` messages, one after the other; their log lines."""
    relay = world.relay
    assert relay is not None
    lines = []
    for n in range(count):
        queue_id = relay.submit("alice@org.test", [f"u{n}@dest.test"], MESSAGE)
        peer.wait_for(n + 1, timeout=15)
        lines.append(relay.wait_for_log(f"{queue_id}: to=<"))
    return lines


@pytest.mark.parametrize("factory", [smtppeer.tls13, smtppeer.tls12_only])
def test_later_connections_resume_the_session_and_stay_verified(
    world: World, factory: Any,
) -> None:
    peer = world.peer(factory, PEER, hostname="mx.dest.test")
    world.mx("dest.test", (10, "mx.dest.test", PEER))
    world.start(tls=trusting(world), policies=secure("dest.test"),
                delivery=ONE_PER_CONNECTION)

    lines = send(world, peer, 3)

    connections = peer.connections
    assert len(connections) == 3
    assert [c.tls_resumed for c in connections] == [False, True, True]
    for line in lines:
        assert "status=sent" in line, line
        assert field(line, "trust") == "Verified", line
        assert field(line, "matched") == "mx.dest.test", line


def test_a_resumed_session_keeps_the_first_handshakes_verdict(world: World) -> None:
    # The certificate does not verify: opportunistic delivers anyway, and
    # says Untrusted, resumed or not.
    leaf = certs.issue_server_cert("mx.dest.test", ca=certs.untrusted_ca())
    peer = world.peer(smtppeer.tls13, PEER, leaf=leaf, hostname="mx.dest.test")
    world.mx("dest.test", (10, "mx.dest.test", PEER))
    world.start(tls=trusting(world), delivery=ONE_PER_CONNECTION)

    lines = send(world, peer, 2)

    assert [c.tls_resumed for c in peer.connections] == [False, True]
    assert [field(line, "trust") for line in lines] == ["Untrusted", "Untrusted"]


def test_a_refused_certificate_leaves_no_session_to_resume(world: World) -> None:
    leaf = certs.issue_server_cert("mx.dest.test", ca=certs.untrusted_ca())
    peer = world.peer(smtppeer.tls13, PEER, leaf=leaf, hostname="mx.dest.test")
    world.mx("dest.test", (10, "mx.dest.test", PEER))
    relay = world.start(tls=trusting(world), policies=secure("dest.test"),
                        delivery=ONE_PER_CONNECTION)

    queue_id = relay.submit("alice@org.test", ["u@dest.test"], MESSAGE)
    # The first attempt and the retry a second later: each a full
    # handshake, each refused before EHLO.
    peer.wait_for_connections(2, timeout=15)
    assert not any(c.tls_resumed for c in peer.connections)
    assert peer.messages == []
    line = relay.wait_for_log(f"{queue_id}: to=<")
    assert "status=deferred" in line and "dsn=4.7." in line


def test_session_reuse_off_makes_a_full_handshake_each_time(world: World) -> None:
    peer = world.peer(smtppeer.tls13, PEER, hostname="mx.dest.test")
    world.mx("dest.test", (10, "mx.dest.test", PEER))
    world.start(delivery={"connection_reuse": {"messages": 1,
                                               "tls_sessions": "0s"}})

    send(world, peer, 2)

    assert [c.tls_resumed for c in peer.connections] == [False, False]
