"""The kill test (issue 4, item 5): clients send mail over several
connections while the relay is killed with SIGKILL at random moments and
started again; in the end every message that got 250 must have arrived.

Used by `bench/killtest.py` (500 messages and more, figures printed) and by
`tests/test_killload.py` (a smaller run in the suite).

What is measured, and what may repeat.  Messages are told apart by their
Message-ID.  A copy may arrive twice only for a message in flight at a
kill, which happens two ways:

- *unanswered*: the client sent the whole message and the connection died
  before the reply.  The relay may have committed it; the client, not told,
  sends it again (RFC 5321 6.1 prefers a duplicate to a loss).
- *mid-delivery*: the peer had taken the message and the relay died before
  its spool recorded that.  Measured after each kill as the messages the
  peer has whose envelope is still in the spool, not marked delivered.

`run` raises `AssertionError` when a message that got 250 never arrives,
when the spool a kill left is unreadable, or when a message that was not
in flight at a kill arrived twice.
"""

from __future__ import annotations

import os
import queue
import random
import re
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mta.envelope import DELIVERED
from mta.spool import Spool
from tests.peers import smtppeer
from tests.peers.certs import issue_server_cert, write_cert_files
from tests.peers.smtppeer import Peer
from tests.relay import RelayProcess, base_config, free_port

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r?$", re.MULTILINE | re.IGNORECASE)
SENDER = "alice@org.test"
RETRY_PAUSE = 0.05  # a client's pause before it tries a message again
GIVE_UP = 60.0  # a client that cannot send one message for this long fails


# --- what the clients saw ----------------------------------------------------


@dataclass
class Seen:
    """Shared by the client threads; every field under ``lock``."""

    accepted: dict[str, str] = field(default_factory=dict)  # Message-ID -> id
    unanswered: Counter[str] = field(default_factory=Counter)
    broken: int = 0  # connections that died or were refused
    retried: int = 0  # messages tried again after a 4xx or a broken one
    refused: list[str] = field(default_factory=list)  # 5xx: a fault here
    lock: threading.Condition = field(default_factory=threading.Condition)

    def count_accepted(self) -> int:
        with self.lock:
            return len(self.accepted)


def message_for(number: int) -> tuple[str, str, bytes]:
    message_id = f"kill-{number}@client.test"
    recipient = f"user{number}@dest.test"
    body = (
        f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nMessage-ID: <{message_id}>\r\n"
        f"Subject: kill test {number}\r\n\r\n"
    ).encode() + b"A line of the body.\r\n" * (number % 40 + 1)
    return message_id, recipient, body


class Unsent(Exception):
    """The relay did not take the message this time; try again."""


class Client(threading.Thread):
    """Sends messages from ``work`` over one connection it keeps, opening a
    new one whenever the old one breaks, until ``work`` is empty."""

    def __init__(self, address: tuple[str, int], work: queue.Queue[int],
                 seen: Seen) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.work = work
        self.seen = seen
        self.connection: smtplib.SMTP | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                try:
                    number = self.work.get_nowait()
                except queue.Empty:
                    break
                self._send_until_taken(number)
        except BaseException as error:  # reported by the caller
            self.error = error
        finally:
            self._drop()

    def _send_until_taken(self, number: int) -> None:
        message_id, recipient, body = message_for(number)
        deadline = time.monotonic() + GIVE_UP
        while True:
            try:
                self._send(message_id, recipient, body)
                return
            except Unsent:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{message_id}: not taken in {GIVE_UP}s")
            with self.seen.lock:
                self.seen.retried += 1
            time.sleep(RETRY_PAUSE)

    def _send(self, message_id: str, recipient: str, body: bytes) -> None:
        data_sent = False
        try:
            connection = self._connected()
            code, text = connection.mail(SENDER)
            if code == 250:
                code, text = connection.rcpt(recipient)
            if code == 250:
                data_sent = True
                code, text = connection.data(body)
        except (OSError, smtplib.SMTPException):
            self._broken(message_id if data_sent else None)
            raise Unsent from None
        self._answered(message_id, code, text.decode("ascii", "replace"))

    def _answered(self, message_id: str, code: int, text: str) -> None:
        if code == 250:
            with self.seen.lock:
                self.seen.accepted[message_id] = text.rsplit(" ", 1)[-1]
                self.seen.lock.notify_all()
            return
        self._drop()  # start the next try on a clean connection
        if code >= 500:
            with self.seen.lock:
                self.seen.refused.append(f"{message_id}: {code} {text}")
            return
        raise Unsent

    def _connected(self) -> smtplib.SMTP:
        if self.connection is None:
            host, port = self.address
            self.connection = smtplib.SMTP(host, port, timeout=20,
                                           local_hostname="client.test")
            self.connection.ehlo("client.test")
        return self.connection

    def _broken(self, unanswered: str | None) -> None:
        with self.seen.lock:
            self.seen.broken += 1
            if unanswered is not None:
                self.seen.unanswered[unanswered] += 1
        self._drop()

    def _drop(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except OSError:
                pass
            self.connection = None


# --- what a kill left ------------------------------------------------------------


def message_ids_at(peer: Peer) -> list[str]:
    found = []
    for message in peer.messages:
        match = MESSAGE_ID.search(message.content)
        assert match is not None, message.content[:300]
        found.append(match.group(1).decode())
    return found


def mid_delivery(spool: Spool, at_peer: set[str]) -> set[str]:
    """Message-IDs the peer has whose envelope the kill left in the spool
    without the recipient marked delivered: these may go again.  Also
    checks that the spool is readable, as the promise says."""
    envelopes, bad = spool.scan()
    assert bad == [], f"unreadable spool after a kill: {bad}"
    assert os.listdir(spool.corrupt) == []
    pending = set()
    for envelope in envelopes:
        if all(r.state == DELIVERED for r in envelope.recipients):
            continue
        head = spool.message_path(envelope.queue_id).read_bytes()[:4096]
        match = MESSAGE_ID.search(head)
        assert match is not None, envelope.queue_id
        pending.add(match.group(1).decode())
    return pending & at_peer


# --- the run -----------------------------------------------------------------------


@dataclass
class Report:
    messages: int
    clients: int
    kills: int
    seed: int
    seconds: float = 0.0
    accepted: int = 0
    broken: int = 0
    retried: int = 0
    unanswered: int = 0  # messages sent whole whose reply never came
    mid_delivery: int = 0  # summed over the kills
    copies: int = 0
    duplicates: int = 0  # copies beyond the first, over all messages
    lost: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"seed={self.seed} messages={self.messages} clients={self.clients} "
            f"kills={self.kills} seconds={self.seconds:.1f}",
            f"accepted (250)={self.accepted} lost={len(self.lost)} "
            f"copies at the peer={self.copies} duplicates={self.duplicates}",
            f"in flight at the kills: unanswered by the relay="
            f"{self.unanswered}, mid-delivery={self.mid_delivery} "
            f"(the bound for duplicates: {self.unanswered + self.mid_delivery})",
            f"client connections broken or refused={self.broken}, "
            f"messages tried again={self.retried}",
        ]


def run(
    folder: Path,
    messages: int = 500,
    clients: int = 6,
    kills: int = 3,
    seed: int | None = None,
    peer_address: str = "127.0.7.31",
    say: Callable[[str], None] = print,
) -> Report:
    """Send ``messages`` through a relay in ``folder`` that is killed
    ``kills`` times; check nothing accepted is lost; return the figures."""
    seed = random.randrange(10**6) if seed is None else seed
    chance = random.Random(seed)
    report = Report(messages, clients, kills, seed)
    started = time.monotonic()

    peer = smtppeer.plain(peer_address, free_port(peer_address))
    relay = _relay(folder, peer)
    try:
        seen = _load_with_kills(relay, peer, chance, report, say)
        _check(relay, peer, seen, report)
    finally:
        relay.stop()
        peer.stop()
    report.seconds = time.monotonic() - started
    return report


def _relay(folder: Path, peer: Peer) -> RelayProcess:
    certificate = write_cert_files(issue_server_cert("relay.test"),
                                   folder / "relay-tls", stem="relay")
    config = base_config(
        folder, certificate.chain, certificate.key,
        routes={"*": f"[{peer.address}]:{peer.port}"},
    )
    return RelayProcess(folder / "relay", config).start()


def _load_with_kills(relay: RelayProcess, peer: Peer, chance: random.Random,
                     report: Report, say: Callable[[str], None]) -> Seen:
    work: queue.Queue[int] = queue.Queue()
    for number in range(report.messages):
        work.put(number)
    seen = Seen()
    threads = [Client(relay.listener("submission"), work, seen)
               for _ in range(report.clients)]
    for thread in threads:
        thread.start()

    # Kill points spread over the run: after so many acceptances, then a
    # random few milliseconds, so the kill falls anywhere in a transaction.
    points = sorted(chance.sample(
        range(report.messages // 10, report.messages * 8 // 10), report.kills))
    for number, point in enumerate(points, 1):
        with seen.lock:
            reached = seen.lock.wait_for(
                lambda: len(seen.accepted) >= point, timeout=GIVE_UP)
        assert reached, f"only {seen.count_accepted()} accepted before kill {number}"
        time.sleep(chance.uniform(0, 0.05))
        relay.kill()
        time.sleep(0.3)  # the peer finishes reading what was sent
        in_flight = mid_delivery(relay.spool, set(message_ids_at(peer)))
        report.mid_delivery += len(in_flight)
        say(f"kill {number}: after {seen.count_accepted()} accepted; "
            f"{len(in_flight)} mid-delivery")
        time.sleep(chance.uniform(0, 0.5))
        relay.start()

    for thread in threads:
        thread.join(timeout=GIVE_UP * 2)
        assert not thread.is_alive(), "a client hangs"
        if thread.error is not None:
            raise thread.error
    return seen


def _check(relay: RelayProcess, peer: Peer, seen: Seen, report: Report) -> None:
    assert seen.refused == [], seen.refused[:5]
    wanted = set(seen.accepted)
    spool = relay.spool
    deadline = time.monotonic() + GIVE_UP
    while time.monotonic() < deadline:
        arrived = set(message_ids_at(peer))
        drained = not any(n.endswith(".msg") for n in os.listdir(spool.queue))
        if wanted <= arrived and drained:
            break
        time.sleep(0.1)

    copies = Counter(message_ids_at(peer))
    report.accepted = len(wanted)
    report.broken, report.retried = seen.broken, seen.retried
    report.unanswered = sum(seen.unanswered.values())
    report.copies = sum(copies.values())
    report.duplicates = report.copies - len(copies)
    report.lost = sorted(wanted - set(copies))
    assert report.lost == [], f"accepted, never delivered: {report.lost[:10]}"
    assert not any(n.endswith(".msg") for n in os.listdir(spool.queue)), (
        "the spool did not drain")

    bound = report.unanswered + report.mid_delivery
    assert report.duplicates <= bound, report.lines()
    unexplained = [m for m, n in copies.items()
                   if n > 1 and m not in seen.unanswered]
    assert len(unexplained) <= report.mid_delivery, (unexplained, report.lines())
