"""A full disk, for real: the spool on a 2 MiB tmpfs this test mounts.

The promises (issue 4, item 5; SPEC.md section 6): when the spool's disk
fills during DATA or at the commit, the client gets ``452 4.3.1`` and
nothing is left half-written (no file in tmp/ or queue/); the connection
goes on and the next message that fits is accepted and delivered.  When the
disk is full as the queue runner records a delivery, the old envelope stays
whole, the runner says so once and saves again later, and the recipient the
peer took is not sent a second copy.

Mounting needs root (the CI runs as root); elsewhere these tests skip.
"""

from __future__ import annotations

import errno
import os
import smtplib
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from mta.envelope import Client, Envelope, Recipient
from mta.spool import Spool
from tests.peers import smtppeer
from tests.peers.smtppeer import Peer, Replies
from tests.relay import RelayProcess, base_config, free_port

DISK_SIZE = 2 * 1024 * 1024
PAGE = 4096  # tmpfs counts whole pages
PEER_ADDRESS = "127.0.7.11"
SMALL = b"From: <alice@org.test>\r\nSubject: small\r\n\r\nIt fits.\r\n"


# --- the disk ----------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of `DISK_SIZE` bytes, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI runs as root)")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0700", "tmpfs",
         str(mountpoint)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


def free_pages(path: Path) -> int:
    return os.statvfs(path).f_bfree


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the disk with one file (not in the spool's folders) until
    ``leave`` pages are free; remove the file to free them again."""
    filler = disk / "filler"
    with open(filler, "ab") as stream:
        stream.write(b"\0" * ((free_pages(disk) - leave) * PAGE))
    assert free_pages(disk) == leave
    return filler


def spool_files(spool: Spool) -> list[str]:
    return sorted(os.listdir(spool.tmp)) + sorted(os.listdir(spool.queue))


def envelope_for(queue_id: str, size: int) -> Envelope:
    return Envelope(
        queue_id=queue_id, sender="alice@org.test", arrival=time.time(),
        size=size, client=Client("client.test", "unknown", "127.0.0.1", "mx"),
        recipients=(Recipient("bob@dest.test"),),
    )


# --- the spool alone ------------------------------------------------------------


@pytest.fixture
def spool(disk: Path) -> Spool:
    spool = Spool(disk / "spool")
    spool.create()
    return spool


def test_a_message_bigger_than_the_disk_fails_and_leaves_nothing(
    spool: Spool, disk: Path
) -> None:
    before = free_pages(disk)
    writer = spool.new_message()
    with pytest.raises(OSError) as raised:
        for _ in range(DISK_SIZE // 4096 + 10):
            writer.write(b"x" * 4096)
    assert raised.value.errno == errno.ENOSPC

    writer.abort()
    writer.abort()  # the listener may abort twice (write error, then end)
    assert spool_files(spool) == []
    assert free_pages(disk) == before


def test_a_disk_that_fills_at_the_commit_leaves_nothing(
    spool: Spool, disk: Path
) -> None:
    # The message takes every free page; the envelope finds none.
    fill(disk, leave=4)
    writer = spool.new_message()
    writer.write(b"y" * (4 * PAGE - 100))
    with pytest.raises(OSError) as raised:
        writer.commit(envelope_for(writer.queue_id, writer.size))
    assert raised.value.errno == errno.ENOSPC

    writer.abort()
    assert spool_files(spool) == []
    assert free_pages(disk) == 4


def test_a_full_disk_keeps_the_old_envelope_whole(
    spool: Spool, disk: Path
) -> None:
    writer = spool.new_message()
    writer.write(b"z" * 100)
    old = envelope_for(writer.queue_id, writer.size)
    writer.commit(old)
    filler = fill(disk)

    new = replace(old, hold=True)
    with pytest.raises(OSError) as raised:
        spool.save(new)
    assert raised.value.errno == errno.ENOSPC
    assert spool.load(old.queue_id) == old
    assert os.listdir(spool.tmp) == []  # no partial temporary file

    filler.unlink()
    spool.save(new)
    assert spool.load(old.queue_id) == new


# --- the running relay ----------------------------------------------------------


class Site:
    def __init__(self, tmp_path: Path, disk: Path, relay_cert: Any) -> None:
        self.tmp_path = tmp_path
        self.disk = disk
        self.relay_cert = relay_cert
        self.replies = Replies()
        port = free_port(PEER_ADDRESS)
        self.peer: Peer = smtppeer.plain(PEER_ADDRESS, port,
                                         replies=self.replies)
        self.relay: RelayProcess | None = None

    def start(self, **delivery: Any) -> RelayProcess:
        config = base_config(
            self.tmp_path, self.relay_cert.chain, self.relay_cert.key,
            spool=str(self.disk / "spool"),
            routes={"*": f"[{PEER_ADDRESS}]:{self.peer.port}"},
            delivery={"retry_schedule": ["1s"], "plaintext_fallback_delay": "0s",
                      **delivery},
        )
        self.relay = RelayProcess(self.tmp_path / "relay", config).start()
        return self.relay

    def connect(self) -> smtplib.SMTP:
        assert self.relay is not None
        address, port = self.relay.listener("submission")
        client = smtplib.SMTP(address, port, local_hostname="client.test",
                              timeout=30)
        client.ehlo("client.test")
        return client

    def close(self) -> None:
        # The relay first: the tmpfs is unmounted after this.
        if self.relay is not None:
            self.relay.stop()
        self.peer.stop()


@pytest.fixture
def site(tmp_path: Path, disk: Path, relay_cert: Any) -> Iterator[Site]:
    site = Site(tmp_path, disk, relay_cert)
    yield site
    site.close()


def send(client: smtplib.SMTP, message: bytes,
         recipient: str = "bob@dest.test") -> tuple[int, str]:
    code, text = client.mail("alice@org.test")
    assert code == 250, (code, text)
    code, text = client.rcpt(recipient)
    assert code == 250, (code, text)
    code, text = client.data(message)
    return code, text.decode()


def queued_id(reply: tuple[int, str]) -> str:
    code, text = reply
    assert code == 250, reply
    return text.rsplit("queued as ", 1)[1].strip()


def test_a_message_bigger_than_the_disk_gets_452_and_the_next_goes(
    site: Site,
) -> None:
    relay = site.start()
    big = SMALL + b"a line of a message too big for the disk\r\n" * 80_000

    with site.connect() as client:
        assert send(client, big) == (452, "4.3.1 Insufficient system storage")
        assert spool_files(relay.spool) == []

        # The same connection goes on, and the space is back.
        small = queued_id(send(client, SMALL))
    line = relay.wait_for_log("cannot write the queue file")
    assert "No space left on device" in line and "452 4.3.1" in line

    with site.connect() as client:
        other = queued_id(send(client, SMALL))
    site.peer.wait_for(2, timeout=15)
    relay.wait_for_log(f"{small}: removed")
    relay.wait_for_log(f"{other}: removed")


def received_header_size(content: bytes) -> int:
    """Bytes our Received header adds before the client's first header."""
    return content.index(b"From: <alice@org.test>")


def test_a_disk_that_fills_at_the_commit_gets_452_and_nothing_stays(
    site: Site,
) -> None:
    relay = site.start()

    # One message to learn how many bytes the relay adds to ours.
    with site.connect() as client:
        queued_id(send(client, SMALL))
    added = received_header_size(site.peer.wait_for(1, timeout=15)[0].content)
    relay.wait_for_log(": removed")

    # A message that takes the last free pages to the byte's page: the
    # message file is written whole, its envelope finds no room.
    filler = fill(site.disk, leave=8)
    size = 8 * PAGE - 50
    body = b"x" * (size - added - len(SMALL) - 2) + b"\r\n"
    assert 7 * PAGE < added + len(SMALL) + len(body) <= 8 * PAGE
    with site.connect() as client:
        reply = send(client, SMALL + body)
        assert reply == (452, "4.3.1 Insufficient system storage")
        assert spool_files(relay.spool) == []
        assert free_pages(site.disk) == 8

        filler.unlink()
        after = queued_id(send(client, SMALL))
    relay.wait_for_log(f"{after}: removed")
    assert len(site.peer.messages) == 2


def test_a_full_disk_at_the_runners_save_keeps_the_old_envelope(
    site: Site,
) -> None:
    # Two recipients, so that the runner must save the envelope after the
    # delivery to one of them (a message delivered to all is removed
    # instead, and removing needs no room).
    site.replies.rcpt["bob@dest.test"] = "450 4.2.0 busy, try later"
    site.replies.rcpt["carol@dest.test"] = "450 4.2.0 busy, try later"
    relay = site.start()
    with site.connect() as client:
        client.mail("alice@org.test")
        client.rcpt("bob@dest.test")
        client.rcpt("carol@dest.test")
        queue_id = queued_id(tuple_of(client.data(SMALL)))
    deferred = relay.wait_for_envelope(
        lambda e: all(r.state == "deferred" for r in e.recipients))

    # The next attempt succeeds for bob while the disk is full: the peer
    # has the message, and the spool cannot say so yet.
    filler = fill(site.disk)
    del site.replies.rcpt["bob@dest.test"]
    site.peer.wait_for(1, timeout=15)
    line = relay.wait_for_log(f"{queue_id}: cannot save the envelope")
    assert "No space left on device" in line
    assert relay.spool.load(queue_id) == deferred
    assert os.listdir(relay.spool.tmp) == []

    filler.unlink()
    relay.wait_for_log(f"{queue_id}: envelope saved after", timeout=20)
    saved = relay.spool.load(queue_id)
    assert [r.state for r in saved.recipients] == ["delivered", "deferred"]

    del site.replies.rcpt["carol@dest.test"]
    relay.wait_for_log(f"{queue_id}: removed", timeout=30)
    # Kept in memory, not sent again while the disk was full.
    delivered = [list(m.rcpt_tos) for m in site.peer.messages]
    assert sorted(delivered) == [["bob@dest.test"], ["carol@dest.test"]]
    assert relay.log().count(f"{queue_id}: cannot save the envelope") == 1


def tuple_of(reply: tuple[int, bytes]) -> tuple[int, str]:
    return reply[0], reply[1].decode()
