"""No open relay (SPEC.md section 6, issue 5 item 1), end to end: every
trick of tests/relaytricks.py is tried against the running relay's inbound
listener, and from a client outside its networks against the outbound
listener, each in a session of its own that goes on to DATA.

What must hold: each trick is refused at RCPT with the reply the table
gives; the DNS responder the relay uses is never asked anything; neither
the outside domain's MX host nor our own domain's server sees a
connection; nothing is left in the spool.

The sender is in our own domain, whose server is an address literal: were
a trick accepted and bounced, the bounce could not cause a DNS query
either, and would show at that server.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer
from tests.relay import RelayProcess, base_config, free_port
from tests.relaytricks import TRICKS

LISTENER = "127.0.13.1"  # both of the relay's listeners
INSIDE = "127.0.13.2"  # example.com's server (relay_to)
OUTSIDE = "127.0.13.3"  # the MX host of every other domain in the table
CLIENT = "127.0.13.9"  # the client, outside the outbound listener's networks
TRUSTED = "127.0.13.100/32"
SENDER = "alice@example.com"

# Every domain the tricks name but ours: each has an MX record pointing at
# the outside peer, so that a leak would reach it, not just fail in DNS.
OUTSIDE_DOMAINS = (
    "outside.test", "example.com.outside.test", "sub.example.com",
    "localhost", "outside", "xn--exmple-cua.com", "mail.example.com",
)

MESSAGE = b"From: alice@example.com\r\nSubject: relay?\r\n\r\nspam\r\n"


@pytest.fixture
def peers(mx_port: int) -> Iterator[tuple[Peer, Peer]]:
    inside = smtppeer.plain(INSIDE, mx_port)
    outside = smtppeer.plain(OUTSIDE, mx_port)
    yield inside, outside
    inside.stop()
    outside.stop()


@pytest.fixture
def relay(tmp_path: Path, relay_cert: Any, dns: DNSServer, mx_port: int,
          peers: tuple[Peer, Peer]) -> Iterator[RelayProcess]:
    for domain in OUTSIDE_DOMAINS:
        dns.set(domain, "MX", [f"10 mx.{domain}."])
        dns.set(f"mx.{domain}", "A", [OUTSIDE])
    config = base_config(
        tmp_path, relay_cert.chain, relay_cert.key,
        listeners=[
            {"name": "mx", "address": LISTENER, "port": free_port(LISTENER),
             "role": "inbound"},
            {"name": "submission", "address": LISTENER,
             "port": free_port(LISTENER), "role": "outbound",
             "networks": [TRUSTED]},
        ],
        domains={"example.com": {"relay_to": [f"[{INSIDE}]:{mx_port}"]}},
        dns={"nameservers": [f"127.0.0.1:{dns.port}"]},
    )
    config["delivery"]["port"] = mx_port
    process = RelayProcess(tmp_path / "relay", config).start()
    yield process
    process.stop()


def attempt(relay: RelayProcess, listener: str, path: str) -> tuple[str, str]:
    """One session: MAIL, the trick at RCPT, DATA (with a body if the
    relay asks for one).  Returns the RCPT and DATA replies, as
    ``CODE TEXT``."""
    address, port = relay.listener(listener)
    with smtplib.SMTP(address, port, local_hostname="client.test",
                      source_address=(CLIENT, 0), timeout=10) as client:
        client.command_encoding = "utf-8"  # the UTF-8 rows go out as sent
        client.ehlo("client.test")
        code, _ = client.mail(SENDER)
        assert code == 250
        rcpt = client.docmd("RCPT", f"TO:{path}")
        data = client.docmd("DATA")
        if data[0] == 354:
            client.send(MESSAGE + b".\r\n")
            data = client.getreply()
    return said(rcpt), said(data)


def said(reply: tuple[int, bytes]) -> str:
    return f"{reply[0]} {reply[1].decode(errors='replace')}"


def refused_as(reply: str, expected: str) -> bool:
    """``550 5.7.1 <u@x>: ...`` is refused as ``550 5.7.1``."""
    return reply.startswith(expected + " ")


def test_no_trick_gets_through(relay: RelayProcess, dns: DNSServer,
                               peers: tuple[Peer, Peer]) -> None:
    wrong: list[str] = []
    for listener in ("mx", "submission"):
        for trick in TRICKS:
            path = trick.on(LISTENER)
            expected = trick.inbound if listener == "mx" else trick.from_stranger
            rcpt, data = attempt(relay, listener, path)
            if not refused_as(rcpt, expected):
                wrong.append(f"{listener}: RCPT TO:{path} ({trick.why}): "
                             f"want {expected}, got {rcpt}")
            if not data.startswith("554 5.5.1"):
                wrong.append(f"{listener}: DATA after RCPT TO:{path}: want "
                             f"554 5.5.1 no valid recipients, got {data}")
    assert not wrong, "\n".join(wrong)

    # Nothing was looked up, nothing was connected to, nothing was kept.
    assert dns.queries == []
    inside, outside = peers
    assert outside.connections == [] and inside.connections == []
    spool = Path(relay.config["spool"])
    assert [path for path in spool.rglob("*") if path.is_file()] == []
    assert ": accepted from=" not in relay.log()
    assert ": to=<" not in relay.log()


def test_the_table_is_all_refusals() -> None:
    """A row that expects acceptance would make the test above vacuous."""
    assert all(trick.inbound[0] == "5" for trick in TRICKS)
    assert len({trick.path for trick in TRICKS}) == len(TRICKS)


def test_a_trusted_client_is_not_refused(relay: RelayProcess,
                                         peers: tuple[Peer, Peer]) -> None:
    """The control: the same session from inside `networks` is accepted,
    so the refusals above are the relay rules' and not the harness's."""
    address, port = relay.listener("submission")
    trusted = TRUSTED.split("/")[0]
    with smtplib.SMTP(address, port, local_hostname="client.test",
                      source_address=(trusted, 0), timeout=10) as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        code, _ = client.docmd("RCPT", "TO:<bob@example.com>")
        assert code == 250
        code, _ = client.docmd("DATA")
        assert code == 354
        client.send(MESSAGE + b".\r\n")
        code, _ = client.getreply()
        assert code == 250
    inside, _ = peers
    assert inside.wait_for(1, timeout=15)[0].rcpt_tos == ("bob@example.com",)

