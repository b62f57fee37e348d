"""IPv4 clients of a dual-stack listener (bound to ``::``): the kernel
reports them as IPv4-mapped IPv6 addresses, and the relay must treat them
as the IPv4 hosts they are, in its log, its Received header and in
``networks`` (mta.clientaddress).

The listener here is bound to ``::`` (every address of the machine, the
case under test); the client and the peer use 127.0.12.1-9, addresses no
other test file uses.
"""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path
from typing import Any

import pytest

from mta.clientaddress import client_address
from tests.peers import smtppeer
from tests.relay import RelayProcess, base_config

CLIENT = "127.0.12.1"
PEER = "127.0.12.2"


@pytest.mark.parametrize(("reported", "expected"), [
    ("::ffff:127.0.0.1", "127.0.0.1"),
    ("::FFFF:192.0.2.7", "192.0.2.7"),
    ("192.0.2.7", "192.0.2.7"),
    ("::1", "::1"),
    ("2001:db8::1", "2001:db8::1"),
    # NAT64's well-known prefix (RFC 6052) is not a mapped address.
    ("64:ff9b::c000:207", "64:ff9b::c000:207"),
    ("unknown", "unknown"),
])
def test_a_mapped_address_is_written_in_its_ipv4_form(
    reported: str, expected: str
) -> None:
    assert client_address(reported) == expected


def free_port_on_every_address() -> int:
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::", 0))
        return int(probe.getsockname()[1])


def test_an_ipv4_client_of_a_dual_stack_listener_is_its_ipv4_self(
    tmp_path: Path, relay_cert: Any, mx_port: int
) -> None:
    peer = smtppeer.plain(PEER, mx_port)
    port = free_port_on_every_address()
    config = base_config(
        tmp_path, relay_cert.chain, relay_cert.key,
        listeners=[{"name": "submission", "address": "::", "port": port,
                    "role": "outbound", "networks": ["127.0.0.0/8"]}],
        routes={"dest.test": f"[{PEER}]:{mx_port}"},
    )
    relay = RelayProcess(tmp_path / "relay", config).start()
    try:
        # From an IPv4 address to the IPv4 side of the :: listener.
        with smtplib.SMTP(CLIENT, port, local_hostname="client.test",
                          source_address=(CLIENT, 0), timeout=30) as client:
            client.ehlo("client.test")
            client.mail("alice@org.test")
            # networks: [127.0.0.0/8] takes it: no "Relay access denied".
            code, text = client.rcpt("bob@dest.test")
            assert (code, text) == (250, b"2.1.5 Ok")
            code, text = client.data(b"Subject: dual stack\r\n\r\nHi.\r\n")
            assert code == 250, text

        [message] = peer.wait_for(1, timeout=15)
        accepted = relay.wait_for_log(": accepted from=<alice@org.test>")
    finally:
        relay.stop()
        peer.stop()

    assert f"client=unknown[{CLIENT}]" in accepted, accepted
    assert "::ffff:" not in relay.log()
    received = message.content.split(b"\r\n", 1)[0].decode()
    assert f"(unknown [{CLIENT}])" in received, received
