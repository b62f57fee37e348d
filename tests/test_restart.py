"""SIGKILL and restart of the real relay (`twistd -n mta`): the promises of
SPEC.md section 6 that only a crash can test.

- No accepted message is lost: every message that got ``250 2.0.0 Ok:
  queued as ID`` reaches its peers after the relay is killed and started
  again on the same spool.
- A recipient whose remote 250 was recorded is never sent again.  The
  window between a peer's 250 and the spool write that records it is the
  one place a copy may go out twice (RFC 5321 6.1 prefers a duplicate to a
  loss); such copies are counted and printed, not failed.
- The spool a crash leaves is readable: every envelope parses and has its
  message file; a message cut off in DATA is nowhere a reader looks.

The spool is read as another process (the CLI) would read it, right after
the kill and before the restart, so it is exactly what the crash left.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from mta.envelope import DELIVERED, Envelope
from mta.spool import Spool, SpoolError
from tests.peers import smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer, ReceivedMessage, Replies
from tests.relay import RelayProcess, base_config

MTA = Path(sys.executable).parent / "mta"

# Our Received header names the queue id: "by relay.test (mta) with ESMTP
# id 0123456789ABCDEF0".
QUEUE_ID_IN_RECEIVED = re.compile(rb"\(mta\) with \w+ id ([0-9A-F]+)")
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r$", re.MULTILINE | re.IGNORECASE)
SPOOL_NAME = re.compile(r"^[0-9A-F]+\.(msg|env)$")

SUBMITTED = 100
CLIENT_THREADS = 6


# --- the world: DNS, peers, the relay --------------------------------------


class Site:
    """A DNS responder, peers that are the MX hosts of their domains, and
    one relay that can be killed and started again on the same spool."""

    def __init__(self, tmp_path: Path, relay_cert: Any, dns: DNSServer,
                 mx_port: int) -> None:
        self.tmp_path = tmp_path
        self.relay_cert = relay_cert
        self.dns = dns
        self.mx_port = mx_port
        self.peers: list[Peer] = []
        self.relay: RelayProcess | None = None

    def peer(self, domain: str, address: str, **options: Any) -> Peer:
        """A plain peer (no STARTTLS) as the only MX host of ``domain``."""
        peer = smtppeer.plain(address, self.mx_port, **options)
        self.peers.append(peer)
        host = f"mx.{domain}"
        self.dns.set(domain, "MX", [f"10 {host}."])
        self.dns.set(host, "A", [address])
        return peer

    def start(self, **delivery: Any) -> RelayProcess:
        config = base_config(
            self.tmp_path, self.relay_cert.chain, self.relay_cert.key,
            dns={"nameservers": [f"127.0.0.1:{self.dns.port}"]},
            delivery={
                "retry_schedule": ["1s"],
                "plaintext_fallback_delay": "0s",
                "port": self.mx_port,
                "timeouts": {"connect": "5s", "command": "10s", "data": "20s"},
                **delivery,
            },
        )
        self.relay = RelayProcess(self.tmp_path / "relay", config).start()
        return self.relay

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        for peer in self.peers:
            peer.stop()


@pytest.fixture
def site(tmp_path: Path, relay_cert: Any, dns: DNSServer,
         mx_port: int) -> Iterator[Site]:
    site = Site(tmp_path, relay_cert, dns, mx_port)
    yield site
    site.close()


# --- reading what the crash left ---------------------------------------------


@dataclass
class SpoolSnapshot:
    envelopes: dict[str, Envelope]
    orphans: set[str]  # ID.env without ID.msg: a removal cut short
    leftovers: list[str]  # files in tmp/

    def delivered(self) -> set[tuple[str, str]]:
        return {(queue_id, recipient.address)
                for queue_id, envelope in self.envelopes.items()
                for recipient in envelope.recipients
                if recipient.state == DELIVERED}


def read_spool(spool: Spool) -> SpoolSnapshot:
    """Check the spool is readable, as the promise says, and read it.

    In queue/ only ID.msg and ID.env; every queue file's envelope parses
    (its own, or its ID.env); nothing moved to corrupt/.  An envelope file
    without queue file is an orphan: it does not exist for anyone, and the
    queue runner removes it once it is an hour old.
    """
    names = sorted(os.listdir(spool.queue))
    strangers = [name for name in names if not SPOOL_NAME.match(name)]
    assert strangers == [], f"unexpected files in {spool.queue}: {strangers}"

    envelopes = {}
    for name in names:
        if name.endswith(".msg"):
            queue_id = name[:-4]
            try:
                envelopes[queue_id] = spool.load(queue_id)
                spool.check_message(envelopes[queue_id])
            except SpoolError as error:
                raise AssertionError(f"unreadable envelope: {error}") from None

    orphans = {name[:-4] for name in names
               if name.endswith(".env") and name[:-4] not in envelopes}
    assert os.listdir(spool.corrupt) == []
    return SpoolSnapshot(envelopes, orphans, sorted(os.listdir(spool.tmp)))


def queue_id_of(message: ReceivedMessage) -> str:
    found = QUEUE_ID_IN_RECEIVED.search(message.content[:1000])
    assert found is not None, message.content[:300]
    return found.group(1).decode()


def message_id_of(message: ReceivedMessage) -> str:
    found = MESSAGE_ID.search(message.content)
    assert found is not None, message.content[:300]
    return found.group(1).decode()


def copies(peers: list[Peer]) -> list[tuple[str, str, str]]:
    """(queue id, recipient, Message-ID) for every copy the peers took, in
    the order each peer took them."""
    return [(queue_id_of(message), recipient, message_id_of(message))
            for peer in peers for message in peer.messages
            for recipient in message.rcpt_tos]


def wait_until(done: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def spool_is_empty(spool: Spool) -> bool:
    return not any(name.endswith(".msg") for name in os.listdir(spool.queue))


def queue_list(relay: RelayProcess) -> list[dict[str, Any]]:
    """What `mta queue list --json` shows, run as the operator would."""
    result = subprocess.run(
        [str(MTA), "--config", str(relay.config_path), "queue", "list", "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    listed: list[dict[str, Any]] = json.loads(result.stdout)
    return listed


def mail(message_id: str, recipients: list[str], body: bytes = b"") -> bytes:
    return (
        f"From: <alice@org.test>\r\nTo: {', '.join(recipients)}\r\n"
        f"Message-ID: <{message_id}>\r\nSubject: restart test\r\n\r\n"
    ).encode() + (body or b"Hello.\r\n.A line that starts with a dot.\r\n")


# --- 1. killed while receiving and delivering ----------------------------------


@dataclass
class Submissions:
    """What the clients saw, shared by their threads."""

    kill_after: int
    accepted: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # no 250: not ours to keep
    refused: list[str] = field(default_factory=list)  # an SMTP error reply
    changed: threading.Condition = field(default_factory=threading.Condition)
    restarted: threading.Event = field(default_factory=threading.Event)

    def note_accepted(self, queue_id: str, message_id: str,
                      recipients: list[str]) -> None:
        with self.changed:
            self.accepted[queue_id] = (message_id, tuple(recipients))
            self.changed.notify_all()

    def wait_for_kill_point(self, timeout: float) -> None:
        with self.changed:
            reached = self.changed.wait_for(
                lambda: len(self.accepted) >= self.kill_after, timeout)
        assert reached, f"only {len(self.accepted)} accepted in {timeout}s"


def recipients_of(number: int) -> list[str]:
    """Every other message also has a recipient at a second domain, so a
    second transaction, recorded in the spool after the first."""
    recipients = [f"user{number}@dest.test"]
    if number % 2 == 0:
        recipients.append(f"user{number}@other.test")
    return recipients


def client(relay: RelayProcess, numbers: list[int], seen: Submissions) -> None:
    for number in numbers:
        message_id = f"restart-{number}@client.test"
        recipients = recipients_of(number)
        try:
            queue_id = relay.submit("alice@org.test", recipients,
                                    mail(message_id, recipients),
                                    starttls=False)
        except AssertionError as error:  # a 4xx or 5xx reply
            seen.refused.append(f"{message_id}: {error}")
        except (OSError, EOFError) as error:  # smtplib's errors included
            seen.failed.append(f"{message_id}: {type(error).__name__}")
            # The relay is down: the client comes back once it is up.
            seen.restarted.wait(timeout=30)
        else:
            seen.note_accepted(queue_id, message_id, recipients)


def test_kill_while_receiving_and_delivering_loses_nothing(site: Site) -> None:
    seed = int(os.environ.get("MTA_RESTART_SEED") or random.randrange(10**6))
    chance = random.Random(seed)
    kill_after = chance.randint(20, 60)
    print(f"\nseed={seed} (MTA_RESTART_SEED to repeat): kill after "
          f"{kill_after} acceptances")

    dest = site.peer("dest.test", "127.0.0.31")
    other = site.peer("other.test", "127.0.0.32")
    peers = [dest, other]
    relay = site.start()
    spool = relay.spool

    numbers = list(range(SUBMITTED))
    chance.shuffle(numbers)
    seen = Submissions(kill_after)
    threads = [
        threading.Thread(target=client,
                         args=(relay, numbers[i::CLIENT_THREADS], seen))
        for i in range(CLIENT_THREADS)
    ]
    for thread in threads:
        thread.start()

    # The kill, and what it left: the spool and what the peers had.
    seen.wait_for_kill_point(timeout=30)
    relay.kill()
    with seen.changed:
        accepted_at_kill = len(seen.accepted)
    left = read_spool(spool)
    time.sleep(0.5)  # let the peers finish reading what was already sent
    before_restart = Counter((q, r) for q, r, _ in copies(peers))

    # Promise: no accepted message is lost, even before the restart: each
    # is in the spool or was fully delivered and removed.
    with seen.changed:
        accepted = dict(seen.accepted)
    for queue_id, (_, recipients) in accepted.items():
        if queue_id not in left.envelopes:
            missing = [r for r in recipients if (queue_id, r) not in before_restart]
            assert missing == [], f"{queue_id}: gone from the spool, not sent"
    recorded = left.delivered()
    removed = {q for q, _ in before_restart if q not in left.envelopes}
    assert recorded <= set(before_restart), "recorded as sent, not at the peer"

    relay.start()
    seen.restarted.set()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert seen.refused == []

    # Every accepted recipient arrives; then the spool empties.
    wanted = {(queue_id, recipient)
              for queue_id, (_, recipients) in seen.accepted.items()
              for recipient in recipients}
    wait_until(lambda: wanted <= {(q, r) for q, r, _ in copies(peers)},
               timeout=30, what="every accepted message at the peers")
    wait_until(lambda: spool_is_empty(spool), timeout=15, what="an empty spool")

    # Each copy is the message the client was told was queued under that id.
    every_copy = copies(peers)
    for queue_id, recipient, message_id in every_copy:
        if queue_id in seen.accepted:
            sent_as, recipients = seen.accepted[queue_id]
            assert (message_id, recipient in recipients) == (sent_as, True)

    # Promise: what was recorded as sent (or removed as done) is never sent
    # again.  A second copy is only allowed for a recipient the relay was
    # sending when it died: the peer had it, the spool did not say so.
    counts = Counter((q, r) for q, r, _ in every_copy)
    twice = {key: n for key, n in counts.items() if n > 1}
    resent = sorted(key for key in twice
                    if key in recorded or key[0] in removed)
    assert resent == [], f"sent again after their 250 was recorded: {resent}"
    unexplained = sorted(key for key in twice if key not in before_restart)
    assert unexplained == [], f"sent twice, not mid-delivery at the kill: {twice}"
    assert all(n == 2 for n in twice.values()), twice

    unacknowledged = {q for q, _ in counts} - set(seen.accepted)
    partial = [q for q, e in left.envelopes.items()
               if any(r.state == DELIVERED for r in e.recipients)
               and not e.is_done]
    unremoved = [q for q, e in left.envelopes.items() if e.is_done]
    print(f"accepted {len(seen.accepted)} ({accepted_at_kill} before the "
          f"kill), no 250 for {len(seen.failed)}; at the kill the spool held "
          f"{len(left.envelopes)} messages ({len(partial)} partly delivered, "
          f"{len(unremoved)} delivered but not yet removed, "
          f"{len(recorded)} recipients recorded as sent), {len(left.orphans)} "
          f"orphan envelope files, {len(left.leftovers)} files in tmp/; "
          f"{len(unacknowledged)} committed without the client seeing 250; "
          f"{len(twice)} recipients sent twice (mid-delivery at the kill): "
          f"{sorted(twice)}")


# --- 2. killed while a peer is slow to answer the final dot --------------------


class SlowDataReplies(Replies):
    """Holds the reply to the final dot until `release` is set: the peer
    has the whole message, the relay waits for its verdict."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = threading.Event()
        self.release = threading.Event()

    def for_data(self, recipients: tuple[str, ...]) -> str | None:
        self.reached.set()
        # This blocks the peer's own event loop, which is what a peer
        # stuck in its content filter looks like from outside.
        self.release.wait(timeout=20)
        return super().for_data(recipients)


def test_kill_while_the_peer_is_slow_to_answer_the_final_dot(site: Site) -> None:
    replies = SlowDataReplies()
    peer = site.peer("slow.test", "127.0.0.41", replies=replies)
    relay = site.start()

    queue_id = relay.submit("alice@org.test", ["bob@slow.test"],
                            mail("slow@client.test", ["bob@slow.test"]),
                            starttls=False)
    assert replies.reached.wait(timeout=15), "the relay never sent the dot"
    relay.kill()
    replies.release.set()

    # The relay died waiting: its spool still has the recipient to send.
    left = read_spool(relay.spool)
    assert set(left.envelopes) == {queue_id}
    assert left.envelopes[queue_id].recipients[0].state != DELIVERED

    relay.start()
    wait_until(lambda: spool_is_empty(relay.spool), timeout=20,
               what="the message delivered after the restart")
    taken = [m for m in peer.messages if queue_id_of(m) == queue_id]
    assert taken, "never delivered"
    assert all(m.content == taken[0].content for m in taken)
    assert os.listdir(relay.spool.queue) == []
    assert queue_list(relay) == []
    print(f"\nthe peer took {len(taken)} copies (the first was answered "
          "after the kill, so the relay sent it again)")


# --- 3. killed while a client is in the middle of DATA -------------------------


def command(connection: socket.socket, line: bytes, expected: bytes) -> None:
    connection.sendall(line + b"\r\n")
    reply = read_reply(connection)
    assert reply.startswith(expected), (line, reply)


def read_reply(connection: socket.socket) -> bytes:
    """One whole reply, multi-line ones included (RFC 5321 4.2.1)."""
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = connection.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def test_kill_in_the_middle_of_data_leaves_nothing_half_written(
    site: Site,
) -> None:
    # One message stays in the spool on purpose (its recipient is
    # deferred for an hour), to show the kill leaves it alone.
    peer = site.peer("dest.test", "127.0.0.51",
                     replies=Replies(rcpt={"later@dest.test": "450 4.2.0 busy"}))
    relay = site.start(retry_schedule=["1h"])
    spool = relay.spool
    kept = relay.submit("alice@org.test", ["later@dest.test"],
                        mail("kept@client.test", ["later@dest.test"]),
                        starttls=False)
    relay.wait_for_envelope(lambda e: e.recipients[0].state == "deferred")

    # Half a message: headers and 64 KiB of body, and no end.
    connection = socket.create_connection(relay.listener("submission"),
                                          timeout=10)
    assert read_reply(connection).startswith(b"220")
    command(connection, b"EHLO client.test", b"250")
    command(connection, b"MAIL FROM:<alice@org.test>", b"250")
    command(connection, b"RCPT TO:<bob@dest.test>", b"250")
    command(connection, b"DATA", b"354")
    half = mail("half@client.test", ["bob@dest.test"],
                b"half of a message\r\n" * 3500)
    connection.sendall(half)
    wait_until(lambda: any(path.stat().st_size > 32 * 1024
                           for path in spool.tmp.glob("*.msg")),
               timeout=10, what="the half message in tmp/")
    half_id = next(spool.tmp.glob("*.msg")).name[:-4]
    relay.kill()
    connection.close()

    left = read_spool(spool)
    assert set(left.envelopes) == {kept}
    assert half_id not in left.orphans
    assert f"{half_id}.msg" in left.leftovers  # where only the relay looks
    assert [entry["queue_id"] for entry in queue_list(relay)] == [kept]

    relay.start()
    assert [entry["queue_id"] for entry in queue_list(relay)] == [kept]
    after = read_spool(spool)
    assert set(after.envelopes) == {kept}
    assert after.envelopes[kept].recipients[0].state == "deferred"

    # A new client is served and its message delivered; the half one never.
    fresh = relay.submit("alice@org.test", ["bob@dest.test"],
                         mail("fresh@client.test", ["bob@dest.test"]),
                         starttls=False)
    wait_until(lambda: any(queue_id_of(m) == fresh for m in peer.messages),
               timeout=15, what="the new message at the peer")
    assert all(queue_id_of(m) != half_id for m in peer.messages)
    assert [entry["queue_id"] for entry in queue_list(relay)] == [kept]
