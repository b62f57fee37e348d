"""The delivery decision in memory: for each level, fallback setting, age
of the message and sequence of host behaviours, which sessions are made
(with or without STARTTLS) and what becomes of the recipient.

Sessions here are scripted values (`SessionResult`), not sockets: the
socket-level behaviour of each kind of host is tested against real peers in
test_smtpclient.py and test_relay_e2e.py.  This file pins down the rules of
SPEC.md section 2 that sit on top of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed

from mta.clientsession import (
    ClientSettings,
    SessionFailure,
    SessionResult,
    Target,
    TLSSession,
    Transaction,
)
from mta.config import load_config
from mta.delivery import Deliverer, GroupResult, group_recipients
from mta.envelope import Client, Envelope, Recipient
from mta.reply import Reply

NOW = 1_000_000.0
RCPT = "bob@dest.test"

OK = Reply(250, "2.0.0", "Ok")
TLS = TLSSession("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128, None, None, None)


def host_session(kind: str, target: Target, settings: ClientSettings) -> (
    SessionResult
):
    """What a host of ``kind`` does with a session made with ``settings``,
    as the real client reports it."""
    def delivered(tls: TLSSession | None) -> SessionResult:
        return SessionResult(target, starttls_offered=tls is not None, tls=tls,
                             rcpt_replies={RCPT: OK}, data_reply=OK)

    def failed(stage: str, reply: Reply | None, tls_failure: str | None = None,
               offered: bool = True) -> SessionResult:
        return SessionResult(
            target, failure=SessionFailure(stage, reply, f"{stage} failed"),
            starttls_offered=offered, tls_failure=tls_failure)

    if kind == "refused":
        return failed("connect", None, offered=False)
    if kind == "554":
        return failed("greeting", Reply(554, "5.7.1", "go away"), offered=False)
    if kind == "no-starttls":
        if settings.require_tls:
            return failed("STARTTLS", None, offered=False)
        return delivered(None)
    if not settings.starttls:  # every other kind speaks plaintext fine
        return delivered(None)
    if kind == "tls-ok":
        refusal = settings.check_tls(TLS) if settings.check_tls else None
        if refusal is not None:  # as the client does, in the handshake
            return SessionResult(
                target, failure=SessionFailure("TLS policy", None, refusal),
                starttls_offered=True, tls=TLS)
        return delivered(TLS)
    if kind == "handshake-fails":
        return failed("TLS handshake", None, "lost connection in handshake")
    if kind == "starttls-454":
        return failed("STARTTLS", Reply(454, "4.7.0", "no TLS"), "454 refused")
    raise AssertionError(kind)


class Scripted:
    """The hosts of one next hop, in MX order, each of a kind; records the
    sessions made as (host, starttls?)."""

    def __init__(self, kinds: list[str]) -> None:
        self.targets = [Target(f"mx{n}.dest.test", f"127.0.0.{n}", 25)
                        for n in range(1, len(kinds) + 1)]
        self.kinds = {t.address: kind for t, kind in zip(self.targets, kinds)}
        self.calls: list[tuple[str, bool]] = []

    def resolve(self, next_hop: Any) -> Deferred[list[Target]]:
        return succeed(self.targets)

    def session(self, target: Target, transaction: Transaction,
                settings: ClientSettings) -> Deferred[SessionResult]:
        self.calls.append((target.name, settings.starttls))
        return succeed(host_session(self.kinds[target.address], target,
                                    settings))


def make_config(tmp_path: Path, level: str, mode: str, delay: str) -> Any:
    path = tmp_path / "mta.yaml"
    path.write_text(f"""
spool: spool
tls: {{certificate: relay.crt, private_key: relay.key}}
listeners: [{{name: mx, address: 127.0.0.1, port: 2525, role: inbound}}]
delivery: {{opportunistic_fallback: {mode}, plaintext_fallback_delay: {delay}}}
defaults: {{outbound: {level}, inbound: {level}}}
""")
    return load_config(path, check_tls=False)


def deliver(tmp_path: Path, kinds: list[str], level: str = "opportunistic",
            mode: str = "plaintext", delay: str = "0s", age: float = 0.0) -> (
    tuple[GroupResult, list[tuple[str, bool]]]
):
    config = make_config(tmp_path, level, mode, delay)
    hosts = Scripted(kinds)
    deliverer = Deliverer(config, SSL.Context(SSL.TLS_METHOD), hosts.resolve,
                          hosts.session, clock=lambda: NOW)
    body = tmp_path / "body.msg"
    body.write_bytes(b"Subject: x\r\n\r\nhi\r\n")
    envelope = Envelope("Q1", "alice@org.test", NOW - age, 20,
                        Client("c", "c", "127.0.0.1", "mx"),
                        (Recipient(RCPT),))
    [group] = group_recipients(config, [RCPT])
    results: list[GroupResult] = []
    Deferred.fromCoroutine(deliverer.deliver(envelope, group, body,
                                             deliverer.admit(group))
                           ).addCallback(results.append)
    return results[0], hosts.calls


# (hosts, level, fallback mode, delay, age) ->
#   (sessions made, status, relay host, TLS?, fallback, dsn)
CASES = [
    # opportunistic: no STARTTLS offered -> plaintext at once
    (["no-starttls"], "opportunistic", "plaintext", "10m", 0,
     [("mx1", True)], "sent", "mx1", False, None, "2.0.0"),
    (["tls-ok"], "opportunistic", "plaintext", "10m", 0,
     [("mx1", True)], "sent", "mx1", True, None, "2.0.0"),
    # TLS fails, old enough (or delay 0): the same host again in plaintext
    (["handshake-fails"], "opportunistic", "plaintext", "0s", 0,
     [("mx1", True), ("mx1", False)], "sent", "mx1", False,
     "tls-handshake-failed", "2.0.0"),
    (["starttls-454"], "opportunistic", "plaintext", "0s", 0,
     [("mx1", True), ("mx1", False)], "sent", "mx1", False,
     "starttls-refused", "2.0.0"),
    (["handshake-fails"], "opportunistic", "plaintext", "10m", 601,
     [("mx1", True), ("mx1", False)], "sent", "mx1", False,
     "tls-handshake-failed", "2.0.0"),
    # ... too young: deferred, no plaintext yet
    (["handshake-fails"], "opportunistic", "plaintext", "10m", 599,
     [("mx1", True)], "deferred", "mx1", False, None, "4.7.5"),
    # fallback turned off
    (["handshake-fails"], "opportunistic", "defer", "0s", 9999,
     [("mx1", True)], "deferred", "mx1", False, None, "4.7.5"),
    # the next host is tried with TLS before any fallback
    (["handshake-fails", "tls-ok"], "opportunistic", "plaintext", "0s", 0,
     [("mx1", True), ("mx2", True)], "sent", "mx2", True, None, "2.0.0"),
    (["starttls-454", "no-starttls"], "opportunistic", "plaintext", "0s", 0,
     [("mx1", True), ("mx2", True)], "sent", "mx2", False, None, "2.0.0"),
    # the fallback goes to the first host passed over
    (["refused", "handshake-fails", "starttls-454"], "opportunistic",
     "plaintext", "0s", 0,
     [("mx1", True), ("mx2", True), ("mx3", True), ("mx2", False)],
     "sent", "mx2", False, "tls-handshake-failed", "2.0.0"),
    # none never tries STARTTLS
    (["tls-ok"], "none", "plaintext", "10m", 0,
     [("mx1", False)], "sent", "mx1", False, None, "2.0.0"),
    # enforce-tls: never plaintext, whatever the age
    (["no-starttls"], "enforce-tls", "plaintext", "0s", 9999,
     [("mx1", True)], "deferred", "mx1", False, None, "4.7.4"),
    (["handshake-fails"], "enforce-tls", "plaintext", "0s", 9999,
     [("mx1", True)], "deferred", "mx1", False, None, "4.7.5"),
    (["no-starttls", "tls-ok"], "enforce-tls", "plaintext", "0s", 0,
     [("mx1", True), ("mx2", True)], "sent", "mx2", True, None, "2.0.0"),
    # enforce-secure: a session without a certificate is refused in the
    # handshake (real certificates: test_policy_matrix.py)
    (["tls-ok"], "enforce-secure", "plaintext", "0s", 9999,
     [("mx1", True)], "deferred", "mx1", True, None, "4.7.5"),
    (["no-starttls"], "enforce-secure", "plaintext", "0s", 9999,
     [("mx1", True)], "deferred", "mx1", False, None, "4.7.4"),
    # only the last host's outcome decides
    (["554", "refused"], "opportunistic", "plaintext", "0s", 0,
     [("mx1", True), ("mx2", True)], "deferred", "mx2", False, None, "4.4.1"),
    (["refused", "554"], "opportunistic", "plaintext", "0s", 0,
     [("mx1", True), ("mx2", True)], "bounced", "mx2", False, None, "5.7.1"),
]


@pytest.mark.parametrize(
    "kinds, level, mode, delay, age, calls, status, relay, tls, fallback, dsn",
    CASES,
    ids=[f"{c[1]}-{'+'.join(c[0])}-{c[2]}-{c[3]}-age{c[4]}" for c in CASES],
)
def test_delivery_decision(
    tmp_path: Path, kinds: list[str], level: str, mode: str, delay: str,
    age: float, calls: list[tuple[str, bool]], status: str, relay: str,
    tls: bool, fallback: str | None, dsn: str,
) -> None:
    result, made = deliver(tmp_path, kinds, level, mode, delay, age)

    attempt = result.attempts[RCPT]
    assert [(name.split(".")[0], tls_tried) for name, tls_tried in made] == calls
    assert attempt.status == status
    assert attempt.relay is not None and attempt.relay.startswith(relay + ".")
    assert (attempt.tls is not None) == tls
    assert attempt.fallback == fallback
    assert attempt.dsn == dsn
    assert attempt.policy == level


def test_young_message_is_due_again_when_the_fallback_is_allowed(
    tmp_path: Path,
) -> None:
    result, _ = deliver(tmp_path, ["handshake-fails"], delay="10m", age=120)

    assert result.not_after == NOW - 120 + 600
    assert "plaintext fallback allowed from" in result.attempts[RCPT].reply


def test_fallback_delivery_is_not_limited_in_time(tmp_path: Path) -> None:
    """Once the plaintext fallback happened, nothing is left to wait for."""
    result, _ = deliver(tmp_path, ["handshake-fails"], delay="10m", age=601)

    assert result.not_after is None


def test_an_enforcement_failure_says_which_rule_wanted_what(tmp_path: Path) -> None:
    result, _ = deliver(tmp_path, ["tls-ok"], level="enforce-secure")

    reply = result.attempts[RCPT].reply
    assert reply.startswith(
        "a verified certificate required by the default policy "
        "(enforce-secure): mx1.dest.test presented no certificate"), reply


def test_a_missing_starttls_under_enforce_tls_says_so(tmp_path: Path) -> None:
    result, _ = deliver(tmp_path, ["no-starttls"], level="enforce-tls")

    reply = result.attempts[RCPT].reply
    assert reply.startswith(
        "TLS required by the default policy (enforce-tls): "), reply


# --- an MX host that is the relay itself (mta.ownendpoints) ---------------

US = Target("relay.dest.test", "127.0.0.1", 2525, 20)  # listener mx


def deliver_to(tmp_path: Path, targets: list[Target],
               kinds: list[str]) -> tuple[GroupResult, list[tuple[str, bool]]]:
    config = make_config(tmp_path, "opportunistic", "plaintext", "0s")
    hosts = Scripted(kinds)
    hosts.targets = targets
    hosts.kinds = {t.address: kind for t, kind in zip(targets, kinds)}
    deliverer = Deliverer(config, SSL.Context(SSL.TLS_METHOD), hosts.resolve,
                          hosts.session, clock=lambda: NOW)
    body = tmp_path / "body.msg"
    body.write_bytes(b"Subject: x\r\n\r\nhi\r\n")
    envelope = Envelope("Q1", "alice@org.test", NOW, 20,
                        Client("c", "c", "127.0.0.1", "mx"),
                        (Recipient(RCPT),))
    [group] = group_recipients(config, [RCPT])
    results: list[GroupResult] = []
    Deferred.fromCoroutine(deliverer.deliver(envelope, group, body,
                                             deliverer.admit(group))
                           ).addCallback(results.append)
    return results[0], hosts.calls


def test_the_best_mx_being_ourselves_bounces_without_a_session(
    tmp_path: Path,
) -> None:
    worse = Target("mx3.dest.test", "127.0.0.3", 25, 30)
    result, made = deliver_to(tmp_path, [US, worse], ["tls-ok", "tls-ok"])

    attempt = result.attempts[RCPT]
    assert made == []
    assert (attempt.status, attempt.dsn) == ("bounced", "5.4.6")
    assert attempt.relay is None and not attempt.connected
    assert attempt.reply == (
        "mail for dest.test loops back to myself: "
        "relay.dest.test[127.0.0.1]:2525 is this relay (listener mx)")


def test_only_mx_hosts_better_than_ourselves_are_tried(tmp_path: Path) -> None:
    better = Target("mx1.dest.test", "127.0.0.9", 25, 10)
    worse = Target("mx3.dest.test", "127.0.0.3", 25, 30)
    result, made = deliver_to(tmp_path, [better, US, worse],
                              ["refused", "tls-ok", "tls-ok"])

    # RFC 5321 5.1: mx3 is behind us; mx1 failed, so the mail waits.
    assert made == [("mx1.dest.test", True)]
    assert result.attempts[RCPT].status == "deferred"
