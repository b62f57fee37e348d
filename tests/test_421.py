"""A 421 from a server (RFC 5321 3.8: it is closing the channel), at each
stage: the delivery client against real peers on loopback (127.0.8.x), and
what the deliverer makes of it.  The relay end to end is in
test_destination_manners.py.

The rule (README "Delivery manners"): the session ends at once, without
QUIT.  Before any recipient was answered it is a session failure like any
other and the next host is tried; after, the recipients not settled by
their own reply are deferred with the 421 text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, succeed

from mta.clientsession import (
    ClientSettings,
    SessionFailure,
    SessionResult,
    Target,
    Transaction,
)
from mta.config import Timeouts, load_config
from mta.delivery import Deliverer, GroupResult, group_recipients
from mta.envelope import Client, Envelope, Recipient
from mta.reply import Reply
from mta.smtpclient import deliver
from tests.peers import smtppeer
from tests.peers.smtppeer import Replies

BYE = Reply(421, "4.3.2", "closing, bye")
NOW = 1_000_000.0


@pytest.fixture
def body(tmp_path: Path) -> Path:
    path = tmp_path / "body"
    path.write_bytes(b"Subject: test\r\n\r\nHello.\r\n")
    return path


@pytest.fixture
def peers() -> Iterator[list[smtppeer.Peer]]:
    started: list[smtppeer.Peer] = []
    yield started
    for peer in started:
        peer.stop()


def settings() -> ClientSettings:
    return ClientSettings(helo="relay.test", tls_context=None, starttls=False,
                          require_tls=False,
                          timeouts=Timeouts(connect=5.0, command=5.0, data=10.0))


def transaction(path: Path, *recipients: str) -> Transaction:
    return Transaction("sender@relay.test", recipients, path,
                       path.stat().st_size, False)


async def session(
    peers: list[smtppeer.Peer], address: str, replies: Replies, body: Path,
    *recipients: str,
) -> tuple[SessionResult, smtppeer.Peer]:
    peer = smtppeer.plain(address, replies=replies)
    peers.append(peer)
    result = await deliver(reactor, Target("mx.peer.test", address, peer.port),
                           transaction(body, *recipients), settings())

    # The peer sees the close a moment later, in its own thread.
    deadline = time.monotonic() + 5
    while not (peer.connections and all(c.closed for c in peer.connections)):
        assert time.monotonic() < deadline, "the client did not close"
        await task.deferLater(reactor, 0.01, lambda: None)
    return result, peer


# --- the client, against real peers -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_421_greeting_fails_the_session_before_recipients(
    body: Path, peers: list[smtppeer.Peer]
) -> None:
    result, peer = await session(peers, "127.0.8.30",
                                 Replies(greeting=BYE.line()), body, "a@peer.test")

    assert result.failure is not None and result.failure.stage == "greeting"
    assert result.failure.reply == BYE
    assert result.failed_before_recipients  # the next host is tried
    assert peer.connections[0].commands == []  # not even QUIT


@pytest_twisted.ensureDeferred
async def test_421_at_mail_fails_the_session_before_recipients(
    body: Path, peers: list[smtppeer.Peer]
) -> None:
    replies = Replies(mail={"sender@relay.test": BYE.line()})
    result, peer = await session(peers, "127.0.8.31", replies, body, "a@peer.test")

    assert result.failure is not None and result.failure.stage == "MAIL"
    assert result.failed_before_recipients
    assert peer.connections[0].commands[-1].startswith("MAIL FROM:")


@pytest_twisted.ensureDeferred
async def test_421_after_data_defers_every_accepted_recipient(
    body: Path, peers: list[smtppeer.Peer]
) -> None:
    replies = Replies(rcpt={"no@peer.test": "550 5.1.1 no such user"},
                      data=BYE.line())
    result, peer = await session(peers, "127.0.8.32", replies, body,
                                 "a@peer.test", "no@peer.test", "b@peer.test")

    assert result.failure is not None and result.failure.stage == "DATA"
    assert not result.failed_before_recipients
    assert result.data_reply is None  # no end-of-data verdict was given
    assert result.reply_for("a@peer.test") == BYE
    assert result.reply_for("b@peer.test") == BYE
    assert result.reason_for("b@peer.test") == (
        "host mx.peer.test[127.0.8.32] said: 421 4.3.2 closing, bye "
        "(in reply to end of DATA command)")
    # A recipient refused for good before the 421 stays refused.
    assert result.reply_for("no@peer.test") == Reply(550, "5.1.1", "no such user")
    assert "QUIT" not in peer.connections[0].commands


# --- the deliverer -------------------------------------------------------------


class Hosts:
    """Scripted hosts: each address answers with its own SessionResult."""

    def __init__(self, *results: tuple[str, Any]) -> None:
        self.targets = [Target(name, f"127.0.8.{40 + n}", 25)
                        for n, (name, _) in enumerate(results)]
        self.results = {t.address: make for t, (_, make) in
                        zip(self.targets, results)}
        self.calls: list[str] = []

    def resolve(self, next_hop: Any) -> Deferred[list[Target]]:
        return succeed(self.targets)

    def session(self, target: Target, transaction: Transaction,
                settings: ClientSettings) -> Deferred[SessionResult]:
        self.calls.append(target.name)
        return succeed(self.results[target.address](target))


def closing_at(stage: str, reason: str, **fields: Any) -> Any:
    return lambda target: SessionResult(
        target, failure=SessionFailure(stage, BYE, reason), **fields)


def accepted(target: Target) -> SessionResult:
    ok = Reply(250, "2.0.0", "ok")
    return SessionResult(target, rcpt_replies={"a@dest.test": ok,
                                               "b@dest.test": ok},
                         data_reply=ok)


def run(tmp_path: Path, hosts: Hosts, level: str) -> GroupResult:
    (tmp_path / "mta.yaml").write_text(f"""
spool: spool
tls: {{certificate: relay.crt, private_key: relay.key}}
listeners: [{{name: mx, address: 127.0.0.1, port: 2525, role: inbound}}]
defaults: {{outbound: {level}, inbound: {level}}}
""")
    config = load_config(tmp_path / "mta.yaml", check_tls=False)
    deliverer = Deliverer(config, SSL.Context(SSL.TLS_METHOD), hosts.resolve,
                          hosts.session, clock=lambda: NOW)
    body = tmp_path / "body.msg"
    body.write_bytes(b"Subject: x\r\n\r\nhi\r\n")
    rcpts = ("a@dest.test", "b@dest.test")
    envelope = Envelope("Q1", "alice@org.test", NOW, 20,
                        Client("c", "c", "127.0.0.1", "mx"),
                        tuple(Recipient(r) for r in rcpts))
    [group] = group_recipients(config, list(rcpts))
    results: list[GroupResult] = []
    Deferred.fromCoroutine(deliverer.deliver(envelope, group, body,
                                             deliverer.admit(group))
                           ).addCallback(results.append)
    return results[0]


def test_421_at_rcpt_defers_the_rest_without_the_next_host(
    tmp_path: Path,
) -> None:
    ok = Reply(250, "2.1.5", "ok")
    reason = "host mx1.dest.test said: 421 4.3.2 closing, bye"
    hosts = Hosts(("mx1.dest.test", closing_at("RCPT", reason,
                                               rcpt_replies={"a@dest.test": ok})),
                  ("mx2.dest.test", accepted))

    result = run(tmp_path, hosts, "opportunistic")

    assert hosts.calls == ["mx1.dest.test"]
    for address in ("a@dest.test", "b@dest.test"):
        attempt = result.attempts[address]
        assert (attempt.status, attempt.dsn, attempt.reply) == (
            "deferred", "4.3.2", reason)


def test_421_before_recipients_moves_on_to_the_next_host(tmp_path: Path) -> None:
    hosts = Hosts(("mx1.dest.test", closing_at("greeting", "refused")),
                  ("mx2.dest.test", accepted))

    result = run(tmp_path, hosts, "opportunistic")

    assert hosts.calls == ["mx1.dest.test", "mx2.dest.test"]
    assert result.attempts["a@dest.test"].status == "sent"


def test_421_at_starttls_is_no_tls_refusal(tmp_path: Path) -> None:
    # Under enforce-tls a STARTTLS refused with 454 is the policy's
    # deferral (4.7.4, "TLS required by ..."); a 421 is the server closing.
    reason = ("host mx1.dest.test said: 421 4.3.2 closing, bye "
              "(in reply to STARTTLS command)")
    hosts = Hosts(("mx1.dest.test", closing_at("STARTTLS", reason,
                                               starttls_offered=True)))

    result = run(tmp_path, hosts, "enforce-tls")

    attempt = result.attempts["a@dest.test"]
    assert (attempt.status, attempt.dsn, attempt.reply) == (
        "deferred", "4.3.2", reason)
