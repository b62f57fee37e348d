"""Delivery manners end to end: the running relay, real peers on loopback
(127.0.8.x) and the DNS responder.  At most `destination_concurrency`
sessions to one destination; a destination that keeps refusing
connections is suspended and its mail deferred without connecting while
other destinations are served; a 421 ends the session and defers what is
left, without trying the next MX host.  The rules themselves are tested in
memory in test_destinations.py."""

from __future__ import annotations

import smtplib
import ssl
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from mta.envelope import Envelope
from tests.peers import smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Replies
from tests.test_relay_e2e import MESSAGE, World


@pytest.fixture
def world(tmp_path: Path, relay_cert: Any, dns: DNSServer,
          mx_port: int) -> Iterator[World]:
    world = World(tmp_path, relay_cert, dns, mx_port)
    yield world
    world.close()


def deferred(queue_id: str) -> Any:
    def check(envelope: Envelope) -> bool:
        return envelope.queue_id == queue_id and all(
            r.state == "deferred" for r in envelope.recipients)

    return check


def test_no_more_sessions_at_once_than_destination_concurrency(
    world: World,
) -> None:
    # Each message takes the slow peer a second: without the limit the
    # ten would overlap (submitting them takes much less than that).
    peer = world.peer(smtppeer.plain, "127.0.8.1", data_delay=1.0)
    world.mx("dest.test", (10, "mx.dest.test", "127.0.8.1"))
    relay = world.start(delivery={"destination_concurrency": 2})

    for n in range(10):
        relay.submit("alice@org.test", [f"user{n}@dest.test"], MESSAGE)

    received = peer.wait_for(10, timeout=30)
    assert sorted(m.rcpt_tos[0] for m in received) == sorted(
        f"user{n}@dest.test" for n in range(10))
    assert peer.most_sessions == 2


def test_a_dead_destination_is_suspended_and_others_still_go_out(
    world: World,
) -> None:
    # Nothing listens at 127.0.8.2: every connection is refused.
    world.mx("dead.test", (10, "mx.dead.test", "127.0.8.2"))
    good = world.peer(smtppeer.plain, "127.0.8.3")
    world.mx("good.test", (10, "mx.good.test", "127.0.8.3"))
    relay = world.start(delivery={
        "retry_schedule": ["1h"], "destination_failure_limit": 3,
        "destination_backoff": "10m"})

    # Three deliveries, one after the other, are refused...
    tried = []
    for n in range(3):
        queue_id = relay.submit("alice@org.test", [f"u{n}@dead.test"], MESSAGE)
        tried.append(relay.wait_for_envelope(deferred(queue_id)))
    for envelope in tried:
        attempt = envelope.recipients[0].history[-1]
        assert "Connection refused" in attempt.reply
        assert attempt.relay == f"mx.dead.test[127.0.8.2]:{world.mx_port}"
    relay.wait_for_log("destination dead.test suspended for 600s")

    # ... then a burst for it is deferred without connecting, while mail
    # for another destination goes out at once.
    started = time.monotonic()
    burst = [relay.submit("alice@org.test", [f"v{n}@dead.test"], MESSAGE)
             for n in range(5)]
    other = relay.submit("alice@org.test", ["bob@good.test"], MESSAGE)

    assert good.wait_for(1, timeout=5)[0].rcpt_tos == ("bob@good.test",)
    for queue_id in burst:
        envelope = relay.wait_for_envelope(deferred(queue_id), timeout=5)
        attempt = envelope.recipients[0].history[-1]
        assert attempt.relay is None and not attempt.connected
        assert attempt.dsn == "4.4.1"
        assert attempt.reply.startswith(
            "destination dead.test is not responding (3 failures in a row; "
            "last error: connect to mx.dead.test[127.0.8.2]")
        assert "not tried, destination suspended until" in attempt.reply
        # The normal retry schedule, not the suspension, sets the next try.
        assert envelope.recipients[0].next_attempt == pytest.approx(
            attempt.time + 3600, abs=1)
    assert time.monotonic() - started < 10
    relay.wait_for_log(f"{other}: removed")


def test_mail_that_comes_during_a_probe_goes_when_the_probe_works(
    world: World,
) -> None:
    # One refused connection: the destination is failing, not suspended.
    world.mx("flaky.test", (10, "mx.flaky.test", "127.0.8.4"))
    relay = world.start(delivery={
        "retry_schedule": ["1h"], "destination_failure_limit": 3})
    first = relay.submit("alice@org.test", ["u0@flaky.test"], MESSAGE)
    relay.wait_for_envelope(deferred(first))

    # The server is back, and slow: the first of three new messages
    # probes it for a second while the other two come.
    peer = world.peer(smtppeer.plain, "127.0.8.4", data_delay=1.0)
    later = [relay.submit("alice@org.test", [f"u{n}@flaky.test"], MESSAGE)
             for n in (1, 2, 3)]

    # They waited for the probe instead of being deferred for an hour.
    received = peer.wait_for(3, timeout=15)
    assert sorted(m.rcpt_tos[0] for m in received) == [
        "u1@flaky.test", "u2@flaky.test", "u3@flaky.test"]
    for queue_id in later:
        relay.wait_for_log(f"{queue_id}: removed")
        assert f"{queue_id}: to=<" not in "".join(
            line for line in relay.log().splitlines()
            if "status=deferred" in line)


def test_421_at_rcpt_ends_the_session_and_defers_every_recipient(
    world: World,
) -> None:
    replies = Replies(rcpt={"b@dest.test": "421 4.3.2 too busy, bye"})
    peer = world.peer(smtppeer.plain, "127.0.8.4", replies=replies)
    backup = world.peer(smtppeer.plain, "127.0.8.5")
    world.mx("dest.test", (10, "mx1.dest.test", "127.0.8.4"),
             (20, "mx2.dest.test", "127.0.8.5"))
    relay = world.start(delivery={"retry_schedule": ["1s"]})

    queue_id = relay.submit(
        "alice@org.test", ["a@dest.test", "b@dest.test", "c@dest.test"],
        MESSAGE)

    envelope = relay.wait_for_envelope(deferred(queue_id))
    for recipient in envelope.recipients:
        assert recipient.dsn == "4.3.2"
        assert recipient.reason == (
            "host mx1.dest.test[127.0.8.4] said: 421 4.3.2 too busy, bye "
            "(in reply to RCPT TO command)")
    commands = peer.wait_for_connections(1)[0].commands
    # The server closes after 421 (RFC 5321 3.8): no DATA, no QUIT.
    assert commands[-2:] == ["RCPT TO:<a@dest.test>", "RCPT TO:<b@dest.test>"]
    assert backup.connections == []

    replies.rcpt.clear()
    received = peer.wait_for(1, timeout=15)[0]
    assert received.rcpt_tos == ("a@dest.test", "b@dest.test", "c@dest.test")
    relay.wait_for_log(f"{queue_id}: removed")
    assert backup.connections == [] and backup.messages == []


def test_421_after_data_defers_and_the_message_goes_later(world: World) -> None:
    replies = Replies(data="421 4.4.2 shutting down")
    peer = world.peer(smtppeer.plain, "127.0.8.6", replies=replies)
    backup = world.peer(smtppeer.plain, "127.0.8.7")
    world.mx("dest.test", (10, "mx1.dest.test", "127.0.8.6"),
             (20, "mx2.dest.test", "127.0.8.7"))
    relay = world.start(delivery={"retry_schedule": ["1s"]})

    queue_id = relay.submit("alice@org.test", ["a@dest.test", "b@dest.test"],
                            MESSAGE)

    envelope = relay.wait_for_envelope(deferred(queue_id))
    for recipient in envelope.recipients:
        assert recipient.dsn == "4.4.2"
        assert recipient.reason == (
            "host mx1.dest.test[127.0.8.6] said: 421 4.4.2 shutting down "
            "(in reply to end of DATA command)")
    assert "QUIT" not in peer.wait_for_connections(1)[0].commands
    line = relay.wait_for_log(f"{queue_id}: to=<a@dest.test>")
    assert "status=deferred" in line and "421 4.4.2 shutting down" in line

    replies.data = None
    messages = peer.wait_for(2, timeout=15)
    assert [m.reply.split()[0] for m in messages] == ["421", "250"]
    relay.wait_for_log(f"{queue_id}: removed")
    assert backup.connections == []


def test_421_at_the_greeting_moves_on_to_the_next_mx_host(world: World) -> None:
    # Before any recipient was answered a 421 is a session failure like any
    # other (SPEC.md section 2): the next host is tried at once.
    busy = world.peer(smtppeer.plain, "127.0.8.8",
                      replies=Replies(greeting="421 4.3.2 too many sessions"))
    backup = world.peer(smtppeer.plain, "127.0.8.9")
    world.mx("dest.test", (10, "mx1.dest.test", "127.0.8.8"),
             (20, "mx2.dest.test", "127.0.8.9"))
    relay = world.start(delivery={"retry_schedule": ["1h"]})

    queue_id = relay.submit("alice@org.test", ["a@dest.test"], MESSAGE)

    assert backup.wait_for(1, timeout=15)[0].rcpt_tos == ("a@dest.test",)
    assert busy.wait_for_connections(1)[0].commands == []
    line = relay.wait_for_log(f"{queue_id}: to=<a@dest.test>")
    assert "relay=mx2.dest.test[127.0.8.9]" in line and "status=sent" in line


def test_a_slow_destination_does_not_keep_mail_for_others_waiting(
    world: World,
) -> None:
    # Eight messages for a destination that takes two seconds each, two at
    # a time, then one for another: it must not wait behind them, although
    # the eight outnumber the relay's four places for deliveries.
    slow = world.peer(smtppeer.plain, "127.0.8.21", data_delay=2.0)
    world.mx("slow.test", (10, "mx.slow.test", "127.0.8.21"))
    fast = world.peer(smtppeer.plain, "127.0.8.22")
    world.mx("fast.test", (10, "mx.fast.test", "127.0.8.22"))
    relay = world.start(delivery={"concurrency": 4, "destination_concurrency": 2})

    for n in range(8):
        relay.submit("alice@org.test", [f"u{n}@slow.test"], MESSAGE)
    relay.submit("alice@org.test", ["v@fast.test"], MESSAGE)

    fast.wait_for(1, timeout=15)
    assert len(slow.messages) <= 2  # the first two were still on their way
    # The rest are taken up as turns free, two at a time.
    slow.wait_for(8, timeout=30)
    assert slow.most_sessions == 2


def unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_a_backlog_with_no_free_turn_is_delivered_without_recursion(
    world: World,
) -> None:
    # Three hundred messages due at once for one destination that takes
    # two at a time, with places for a hundred deliveries: at the first
    # scan after a restart all but two find no free turn and end before
    # they are even under way.  Each of those ends once, and the queue
    # runner goes on; none may be lost to a RecursionError.
    world.mx("backlog.test", (10, "mx.backlog.test", "127.0.8.31"))
    relay = world.start(delivery={"concurrency": 100,
                                  "destination_concurrency": 2})
    address, port = relay.listener("submission")
    with smtplib.SMTP(address, port, local_hostname="client.test",
                      timeout=30) as client:
        client.starttls(context=unverified_context())
        for n in range(300):
            client.sendmail("alice@org.test", [f"u{n}@backlog.test"], MESSAGE)
    relay.stop()

    peer = world.peer(smtppeer.plain, "127.0.8.31")
    relay.start()

    received = peer.wait_for(300, timeout=60)
    assert sorted(m.rcpt_tos[0] for m in received) == sorted(
        f"u{n}@backlog.test" for n in range(300))
    assert peer.most_sessions <= 2
    log = relay.log()
    assert "RecursionError" not in log and "Traceback" not in log
    assert list((Path(relay.config["spool"]) / "corrupt").iterdir()) == []
