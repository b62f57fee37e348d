"""`mta policy explain RECIPIENT [--probe]` against real peers and a DNS
responder on loopback, run as an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.peers import certs, smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.stop()


def write_config(tmp_path: Path, relay_cert: Any, dns: DNSServer,
                 mx_port: int) -> Path:
    trust = certs.write_ca_file(certs.trusted_ca(), tmp_path / "ca.pem")
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump({
        "hostname": "relay.test",
        "spool": str(tmp_path / "spool"),
        "tls": {"certificate": str(relay_cert.chain),
                "private_key": str(relay_cert.key), "trust": str(trust)},
        "listeners": [{"name": "mx", "address": "127.0.0.1", "port": 2525,
                       "role": "inbound"}],
        "dns": {"nameservers": [f"127.0.0.1:{dns.port}"]},
        "delivery": {"port": mx_port},
        "policies": [{"name": "partner", "direction": "outbound",
                      "recipient_domain": "secure.test",
                      "tls": "enforce-secure"}],
    }))
    return path


def explain(path: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mta", "--config", str(path), "policy",
         "explain", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_explain_names_the_rule_and_what_a_certificate_must_name(
    tmp_path: Path, relay_cert: Any, dns: DNSServer, mx_port: int
) -> None:
    path = write_config(tmp_path, relay_cert, dns, mx_port)

    text = explain(path, "bob@secure.test")
    other = explain(path, "bob@elsewhere.test")

    assert "policy:     enforce-secure (from rule partner)" in text
    assert "certificate must name one of: secure.test" in text
    assert "policy:     opportunistic (from defaults.outbound)" in other


@pytest.mark.parametrize("written", ["<bob@secure.test>", "bob@SECURE.test.",
                                     '"bob"@secure.test', " <bob@Secure.Test> "])
def test_the_recipient_as_the_log_writes_it_gets_the_same_answer(
    tmp_path: Path, relay_cert: Any, dns: DNSServer, mx_port: int, written: str
) -> None:
    # Pasted from a log line (<...>), or in any form the listener takes
    # for the same mailbox: the rule for secure.test, never the default.
    path = write_config(tmp_path, relay_cert, dns, mx_port)

    text = explain(path, written)

    assert "policy:     enforce-secure (from rule partner)" in text


@pytest.mark.parametrize("written", ["bob", "<bob@a> <c@d>", "bob @secure.test"])
def test_what_is_no_address_is_refused(
    tmp_path: Path, relay_cert: Any, dns: DNSServer, mx_port: int, written: str
) -> None:
    path = write_config(tmp_path, relay_cert, dns, mx_port)
    done = subprocess.run(
        [sys.executable, "-m", "mta", "--config", str(path), "policy",
         "explain", written], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "is not an address (local@domain)" in done.stderr


@pytest.mark.parametrize(("level", "expected"), [
    ("none", "certificate: not checked at this level (none: TLS is never "
     "tried)"),
    ("opportunistic", "certificate: not checked at this level "
     "(opportunistic: any certificate will do; its facts are recorded)"),
    ("enforce-tls", "certificate: not checked at this level (enforce-tls: "
     "TLS is required, any certificate will do; its facts are recorded)"),
    ("enforce-secure", "certificate must name one of: secure.test, the "
     "server's own name if it is under secure.test"),
])
def test_only_enforce_secure_names_what_a_certificate_must_carry(
    tmp_path: Path, relay_cert: Any, dns: DNSServer, mx_port: int,
    level: str, expected: str,
) -> None:
    path = write_config(tmp_path, relay_cert, dns, mx_port)
    raw = yaml.safe_load(path.read_text())
    raw["policies"][0]["tls"] = level
    path.write_text(yaml.safe_dump(raw))

    lines = explain(path, "bob@secure.test").splitlines()

    assert f"policy:     {level} (from rule partner)" in lines
    [certificate] = [line for line in lines if line.startswith("certificate")]
    assert certificate == expected


def test_probe_reports_what_each_server_offers_and_each_level(
    tmp_path: Path, relay_cert: Any, dns: DNSServer, mx_port: int,
    peers: list[Peer],
) -> None:
    leaf = certs.issue_server_cert("mx.secure.test")
    peers.append(smtppeer.tls13("127.0.0.31", mx_port, leaf=leaf))
    peers.append(smtppeer.plain("127.0.0.32", mx_port))
    dns.set("secure.test", "MX", ["10 mx.secure.test.", "20 mx2.secure.test."])
    dns.set("mx.secure.test", "A", ["127.0.0.31"])
    dns.set("mx2.secure.test", "A", ["127.0.0.32"])
    path = write_config(tmp_path, relay_cert, dns, mx_port)

    text = explain(path, "bob@secure.test", "--probe")

    first, second = text.split("mx2.secure.test[127.0.0.32]")
    assert "mx.secure.test[127.0.0.31]" in first
    assert "tls: TLSv1.3/" in first
    assert "certificate names: mx.secure.test" in first
    assert "trust: Verified; matched mx.secure.test" in first
    assert ("would deliver: none=yes, opportunistic=yes, enforce-tls=yes, "
            "enforce-secure=yes") in first
    assert "not-offered (STARTTLS not offered)" in second
    assert ("would deliver: none=yes, opportunistic=yes, enforce-tls=no, "
            "enforce-secure=no") in second
    # A probe sends no mail.
    assert all(not p.messages for p in peers)
