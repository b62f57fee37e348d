"""TLS policy end to end (SPEC.md sections 2 and 3): the running relay
(`twistd -n mta`), MX records from a DNS responder on loopback, and real
peers whose TLS behaviour and certificates are chosen; every assertion is
on what a peer recorded, what the log line says and what the spool keeps.

The matrix (thirteen kinds of peer, each under the four levels) runs in one
relay: each (kind, level) cell has a recipient domain of its own,
``KIND.LEVEL.test``, governed by the rule ``.LEVEL.test``, and each kind one
peer serving its four domains.  The whole table is checked at once, and
every cell that differs from the SPEC is reported in one message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.matrix import (
    DEFERRED,
    FALLBACK,
    KINDS,
    LEVELS,
    TLS,
    TRUSTED,
    VERIFIED,
    Expected,
    Loopback,
    Observed,
    Report,
    domain_for,
    expected_for,
    problems,
    rule_for,
    wait_until,
)
from tests.peers import certs, smtppeer
from tests.peers.certs import CertFiles
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer

# Matrix peers on 127.0.5.1-13 (one per kind), the others on 127.0.6.x:
# addresses no other test file uses, so port 25 is free on each.
MATRIX_NET = "127.0.5."
OTHER_NET = "127.0.6."


@pytest.fixture
def world(tmp_path: Path, relay_cert: CertFiles, dns: DNSServer,
          mx_port: int) -> Iterator[Loopback]:
    world = Loopback(tmp_path, relay_cert, dns, mx_port)
    yield world
    world.close()


def assert_agrees(report: Report) -> None:
    assert report.failures == 0, "\n" + report.table()


def test_policy_matrix(world: Loopback) -> None:
    for number, kind in enumerate(KINDS, start=1):
        domains = kind.domains()
        address = f"{MATRIX_NET}{number}"
        world.add_peer(kind.start(address, world.mx_port, domains))
        for domain in domains:
            world.mx(domain, (10, kind.mx_host(domain), address))
    world.start([rule_for(level) for level in LEVELS])

    cases = {
        (kind.letter, level): world.send(domain_for(kind.letter, level))
        for kind in KINDS for level in LEVELS
    }

    def seen(letter: str, level: str) -> Observed:
        return world.observe(cases[letter, level], domain_for(letter, level))

    wait_until(lambda: all(seen(*case).settled() for case in cases), 40)

    report = Report()
    for kind in KINDS:
        for level in LEVELS:
            report.add(f"{kind.letter} {kind.what} / {level}",
                       expected_for(kind, level), seen(kind.letter, level))
    assert_agrees(report)
    assert_probe_agrees(world)


# `mta policy explain --probe` against the same peers: what it says each
# level would do must be what the relay did.
PROBE_SAYS = {TLS: "yes", "plaintext": "yes", FALLBACK: "plaintext-fallback",
              DEFERRED: "no"}


def assert_probe_agrees(world: Loopback) -> None:
    assert world.relay is not None
    wrong = []
    for kind in KINDS:
        # The enforce-secure cell's domain: its reference names are the
        # ones the probe must check the certificate against.
        domain = domain_for(kind.letter, "enforce-secure")
        done = subprocess.run(
            [sys.executable, "-m", "mta", "--config",
             str(world.relay.config_path), "policy", "explain", "--probe",
             f"probe@{domain}"], capture_output=True, text=True, timeout=60)
        want = "would deliver: " + ", ".join(
            f"{level}={PROBE_SAYS[expected_for(kind, level).outcome]}"
            for level in LEVELS)
        if done.returncode != 0 or want not in done.stdout:
            wrong.append(f"{kind.letter} {kind.what}: want {want!r}, "
                         f"got:\n{done.stdout}{done.stderr}")
    assert not wrong, "\n".join(wrong)


# --- two MX hosts: the first fails enforcement ------------------------------

def _wrong_name_then_right(world: Loopback, domain: str) -> tuple[Peer, Peer]:
    first = smtppeer.tls13(f"{OTHER_NET}1", world.mx_port,
                           leaf=certs.issue_server_cert("other.test"))
    second = smtppeer.tls13(f"{OTHER_NET}2", world.mx_port,
                            leaf=certs.issue_server_cert(f"mx2.{domain}"))
    return first, second


def _no_starttls_then_tls(world: Loopback, domain: str) -> tuple[Peer, Peer]:
    first = smtppeer.plain(f"{OTHER_NET}1", world.mx_port)
    second = smtppeer.tls13(f"{OTHER_NET}2", world.mx_port)
    return first, second


@pytest.mark.parametrize(
    ("level", "peers", "trust"),
    [("enforce-secure", _wrong_name_then_right, VERIFIED),
     ("enforce-tls", _no_starttls_then_tls, TRUSTED)],
    ids=["enforce-secure-wrong-name", "enforce-tls-no-starttls"],
)
def test_second_mx_takes_the_mail_when_the_first_fails_enforcement(
    world: Loopback,
    level: str,
    peers: Callable[[Loopback, str], tuple[Peer, Peer]],
    trust: str,
) -> None:
    domain = "two.test"
    first, second = (world.add_peer(peer) for peer in peers(world, domain))
    world.mx(domain, (10, f"mx1.{domain}", f"{OTHER_NET}1"),
             (20, f"mx2.{domain}", f"{OTHER_NET}2"))
    world.start([{"name": "two", "direction": "outbound",
                  "recipient_domain": domain, "tls": level}])

    queue_id = world.send(domain)

    wait_until(lambda: world.observe(queue_id, domain).settled(), 15)
    matched = f"mx2.{domain}" if trust == VERIFIED else None
    expected = Expected(TLS, level, "two", f"mx2.{domain}", trust, matched)
    seen = world.observe(queue_id, domain)
    assert problems(expected, seen) == [], seen
    # The first host was tried, in the same attempt, and never got MAIL.
    assert first.connections, "the first MX host was never tried"
    assert not any(command.startswith("MAIL") for c in first.connections
                   for command in c.commands)
    assert first.messages == []
    assert len(seen.lines) == 1, seen.lines


# --- reference names the operator gives -------------------------------------

def test_match_names_the_provider_host(world: Loopback) -> None:
    domain = "hosted.test"
    world.add_peer(smtppeer.tls13(
        f"{OTHER_NET}3", world.mx_port,
        leaf=certs.issue_server_cert("mx.provider.test")))
    world.mx(domain, (10, "mx.provider.test", f"{OTHER_NET}3"))
    world.start([{"name": "provider", "direction": "outbound",
                  "recipient_domain": domain, "tls": "enforce-secure",
                  "match": ["mx.provider.test"]}])

    queue_id = world.send(domain)

    wait_until(lambda: world.observe(queue_id, domain).settled(), 15)
    expected = Expected(TLS, "enforce-secure", "provider", "mx.provider.test",
                        VERIFIED, "mx.provider.test")
    seen = world.observe(queue_id, domain)
    assert problems(expected, seen) == [], seen


def test_a_route_host_written_as_a_name_is_a_reference_name(
    world: Loopback,
) -> None:
    # Bracketed: looked up by A, no MX; the name the operator wrote is one
    # the certificate may carry (SPEC.md section 2).
    domain = "routed.test"
    world.add_peer(smtppeer.tls13(
        f"{OTHER_NET}4", world.mx_port,
        leaf=certs.issue_server_cert("relayhost.test")))
    world.dns.set("relayhost.test", "A", [f"{OTHER_NET}4"])
    world.dns.set(domain, "MX", ["10 elsewhere.test."])
    world.start(
        [{"name": "routed", "direction": "outbound", "recipient_domain": domain,
          "tls": "enforce-secure"}],
        routes={domain: f"[relayhost.test]:{world.mx_port}"},
    )

    queue_id = world.send(domain)

    wait_until(lambda: world.observe(queue_id, domain).settled(), 15)
    expected = Expected(TLS, "enforce-secure", "routed", "relayhost.test",
                        VERIFIED, "relayhost.test")
    seen = world.observe(queue_id, domain)
    assert problems(expected, seen) == [], seen


# --- a downgrade: STARTTLS refused, stripped or betrayed ---------------------
# In test_hostile_servers.py, with the other hostile servers.


# --- max_lifetime --------------------------------------------------------------

def test_enforced_deferral_fails_with_5_7_x_when_max_lifetime_runs_out(
    world: Loopback,
) -> None:
    domain = "expiry.enforce-tls.test"
    peer = world.add_peer(smtppeer.plain(f"{OTHER_NET}6", world.mx_port))
    world.mx(domain, (10, f"mx.{domain}", f"{OTHER_NET}6"))
    relay = world.start(
        [rule_for("enforce-tls")],
        delivery={"max_lifetime": "3s", "retry_schedule": ["1s"]},
    )

    queue_id = world.send(domain)

    # The log, not the spool: a failed message leaves the spool once its
    # bounce is written (tests/test_bounces.py).
    relay.wait_for_log(f"{queue_id}: removed", timeout=20)
    seen = world.observe(queue_id, domain)
    assert seen.spooled is None
    assert seen.last.get("reply"), seen.last
    # Deferred with 4.7.x on the way, never sent, never MAIL.
    statuses = [(line.get("status"), line.get("dsn", "")) for line in seen.lines]
    assert statuses[-1][0] == "bounced", statuses
    assert all(dsn.startswith("4.7.") for status, dsn in statuses[:-1]), statuses
    assert len(statuses) >= 2, statuses
    assert peer.messages == []
    assert not any(cmd.startswith("MAIL") for c in peer.connections
                   for cmd in c.commands)
    last = seen.last
    assert last.get("status") == "bounced", last
    assert last.get("dsn", "").startswith("5.7."), last
    assert last.get("policy") == "enforce-tls", last
    assert last.get("rule") == "matrix-enforce-tls", last
    assert not [line for line in seen.lines if line.get("status") == "sent"]



# --- inbound: a rule for one recipient, the default for another ------------

def test_inbound_rule_for_one_recipient_of_a_message(world: Loopback) -> None:
    """ceo@ is under an enforce-tls rule, bob@ of the same domain and the
    same message under the default: they go in separate transactions, and
    the server without STARTTLS gets only bob's."""
    peer = world.add_peer(smtppeer.plain(f"{OTHER_NET}7", world.mx_port))
    world.dns.set("mail.corp.test", "A", [f"{OTHER_NET}7"])
    relay = world.start(
        [{"name": "ceo", "direction": "inbound", "recipient": "ceo@corp.test",
          "tls": "enforce-tls"}],
        domains={"corp.test": {"relay_to": [f"mail.corp.test:{world.mx_port}"]}},
    )

    queue_id = relay.submit("alice@org.test", ["bob@corp.test", "ceo@corp.test"],
                            b"Subject: board\r\n\r\nminutes\r\n", listener="mx")

    assert peer.wait_for(1, timeout=15)[0].rcpt_tos == ("bob@corp.test",)
    envelope = relay.wait_for_envelope(
        lambda e: e.queue_id == queue_id
        and e.recipient("ceo@corp.test").state == "deferred")
    ceo = envelope.recipient("ceo@corp.test")
    assert ceo.dsn == "4.7.4"
    assert "TLS required by rule ceo (enforce-tls)" in (ceo.reason or "")
    line = relay.wait_for_log(f"{queue_id}: to=<ceo@corp.test>")
    assert "policy=enforce-tls rule=ceo" in line and "status=deferred" in line
    assert "TLS required by rule ceo" in line
    bob = relay.wait_for_log(f"{queue_id}: to=<bob@corp.test>")
    assert "policy=opportunistic" in bob and "rule=" not in bob
    assert all("ceo@corp.test" not in " ".join(c.commands)
               for c in peer.connections)
