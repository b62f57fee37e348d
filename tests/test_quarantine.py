"""Unreadable spool files meet the running relay (issue 4, item 5).

A truncated envelope (a disk that lost its tail) and one of random bytes
are put into the queue of a relay that is delivering: each is moved, with
its message file, to ``spool/corrupt/`` with exactly one log line, and
mail queued before and after goes on being delivered.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from mta.envelope import Client, Envelope, Recipient, to_json
from mta.queue import SCAN_INTERVAL
from mta.spool import Spool, new_queue_id
from tests.peers import smtppeer
from tests.peers.smtppeer import Peer
from tests.relay import RelayProcess, base_config, free_port

PEER_ADDRESS = "127.0.7.21"
MESSAGE = b"From: <alice@org.test>\r\nSubject: fine\r\n\r\nHello.\r\n"


@pytest.fixture
def peer() -> Iterator[Peer]:
    peer = smtppeer.plain(PEER_ADDRESS, free_port(PEER_ADDRESS))
    yield peer
    peer.stop()


@pytest.fixture
def relay(tmp_path: Path, relay_cert: Any, peer: Peer) -> Iterator[RelayProcess]:
    config = base_config(
        tmp_path, relay_cert.chain, relay_cert.key,
        routes={"*": f"[{PEER_ADDRESS}]:{peer.port}"},
    )
    relay = RelayProcess(tmp_path / "relay", config).start()
    yield relay
    relay.stop()


def put_in_queue(spool: Spool, envelope: bytes) -> str:
    """A message file and the given envelope bytes, renamed into queue/
    (message first, as a commit does) so the relay sees them whole."""
    queue_id = new_queue_id()
    for suffix, data in ((".msg", MESSAGE), (".env", envelope)):
        staging = spool.root / f"staging{suffix}"
        staging.write_bytes(data)
        os.rename(staging, spool.queue / f"{queue_id}{suffix}")
    return queue_id


def a_valid_envelope() -> bytes:
    return to_json(Envelope(
        queue_id=new_queue_id(), sender="alice@org.test", arrival=time.time(),
        size=len(MESSAGE), client=Client("client.test", "unknown", "127.0.0.1",
                                         "submission"),
        recipients=(Recipient("bob@dest.test"),),
    ))


def test_truncated_and_garbage_envelopes_are_moved_aside_once(
    relay: RelayProcess, peer: Peer
) -> None:
    spool = relay.spool
    before = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE,
                          starttls=False)
    relay.wait_for_log(f"{before}: removed")

    whole = a_valid_envelope()
    truncated = put_in_queue(spool, whole[: len(whole) // 2])
    garbage = put_in_queue(spool, os.urandom(256))

    # The periodic scan finds them; meanwhile mail goes on.
    during = relay.submit("alice@org.test", ["carol@dest.test"], MESSAGE,
                          starttls=False)
    relay.wait_for_log(f"{during}: removed")
    for queue_id in (truncated, garbage):
        relay.wait_for_log(f"{queue_id}: moved to {spool.corrupt}",
                           timeout=SCAN_INTERVAL + 10)
    assert sorted(os.listdir(spool.corrupt)) == sorted(
        f"{queue_id}{suffix}" for queue_id in (truncated, garbage)
        for suffix in (".env", ".msg"))
    assert (spool.corrupt / f"{truncated}.env").read_bytes() == whole[
        : len(whole) // 2]  # kept as it was, for the operator

    after = relay.submit("alice@org.test", ["dave@dest.test"], MESSAGE,
                         starttls=False)
    relay.wait_for_log(f"{after}: removed")
    assert sorted(r for m in peer.messages for r in m.rcpt_tos) == [
        "bob@dest.test", "carol@dest.test", "dave@dest.test"]

    log = relay.log()
    for queue_id in (truncated, garbage):
        lines = [line for line in log.splitlines() if queue_id in line]
        assert len(lines) == 1, lines
        assert "[mta#error]" in lines[0]
        assert "it will not be delivered until an operator repairs it" in lines[0]
    assert os.listdir(spool.queue) == []
    assert "Traceback" not in log


def envelope_bytes(queue_id: str, **fields: Any) -> bytes:
    """A valid envelope's JSON with ``fields`` replaced, as raw bytes (so
    that values the Envelope class would never hold can be written)."""
    import json

    data = json.loads(a_valid_envelope())
    data["queue_id"] = queue_id
    data.update(fields)
    return json.dumps(data).encode()


def put_named(spool: Spool, name: str, envelope: bytes) -> None:
    for suffix, data in ((".msg", MESSAGE), (".env", envelope)):
        staging = spool.root / f"staging{suffix}"
        staging.write_bytes(data)
        os.rename(staging, spool.queue / f"{name}{suffix}")


def test_whatever_is_put_in_the_queue_is_moved_aside_and_mail_goes_on(
    relay: RelayProcess, peer: Peer
) -> None:
    # Each of these once stalled or misled the relay (a hostile tester's
    # finds): none may block the reactor, stop the scan, act on another
    # message's files, or make a wrong SMTP command.
    spool = relay.spool
    fifo_envelope = new_queue_id()
    os.mkfifo(spool.queue / f"{fifo_envelope}.env")
    (spool.queue / f"{fifo_envelope}.msg").write_bytes(MESSAGE)
    fifo_message = new_queue_id()
    os.mkfifo(spool.queue / f"{fifo_message}.msg")
    (spool.queue / f"{fifo_message}.env").write_bytes(
        envelope_bytes(fifo_message))
    folder = new_queue_id()
    (spool.queue / f"{folder}.msg").mkdir()  # a queue file that is a folder
    other = new_queue_id()
    named_other = new_queue_id()
    put_named(spool, named_other, envelope_bytes(other))
    put_named(spool, "hello world", envelope_bytes("hello world"))
    crlf = new_queue_id()
    put_named(spool, crlf, envelope_bytes(crlf, sender="a@b.test>\r\nRSET"))

    # Mail goes on, and the relay answers at once, FIFOs and all.
    during = relay.submit("alice@org.test", ["carol@dest.test"], MESSAGE,
                          starttls=False)
    relay.wait_for_log(f"{during}: removed")
    for name in (fifo_envelope, fifo_message, folder, named_other, crlf,
                 "'hello world'"):
        relay.wait_for_log(f"{name}: moved to {spool.corrupt}",
                           timeout=SCAN_INTERVAL + 10)

    assert not (spool.corrupt / f"{other}.env").exists()
    assert os.listdir(spool.queue) == []
    assert [m.rcpt_tos for m in peer.messages] == [("carol@dest.test",)]
    assert "Traceback" not in relay.log()


def test_a_folder_left_in_tmp_does_not_stop_the_relay(
    tmp_path: Path, relay_cert: Any, peer: Peer
) -> None:
    config = base_config(tmp_path, relay_cert.chain, relay_cert.key,
                         routes={"*": f"[{PEER_ADDRESS}]:{peer.port}"})
    spool = Spool(Path(config["spool"]))
    spool.create()
    old = spool.tmp / "olddir"
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))

    relay = RelayProcess(tmp_path / "relay", config).start()
    try:
        queue_id = relay.submit("alice@org.test", ["bob@dest.test"], MESSAGE,
                                starttls=False)
        relay.wait_for_log(f"{queue_id}: removed")
        assert old.is_dir()  # not ours to remove
        assert "Traceback" not in relay.log()
    finally:
        relay.stop()


def test_an_envelope_the_relay_cannot_read_waits_and_is_not_moved(
    tmp_path: Path, relay_cert: Any, peer: Peer
) -> None:
    # Run as nobody, the relay meets an envelope only root can read (an
    # operator's copy): it says so, keeps it, and delivers it once it can.
    if os.geteuid() != 0:
        pytest.skip("needs root to run the relay as another user")
    # tmp_path's parents are root's alone: the spool goes where nobody
    # can reach it.
    reachable = Path(tempfile.mkdtemp(prefix="mta-quarantine-"))
    reachable.chmod(0o755)
    try:
        config = base_config(tmp_path, relay_cert.chain, relay_cert.key,
                             spool=str(reachable / "spool"),
                             routes={"*": f"[{PEER_ADDRESS}]:{peer.port}"})
        spool = Spool(Path(config["spool"]))
        spool.create()
        queue_id = new_queue_id()
        put_named(spool, queue_id, envelope_bytes(queue_id))
        envelope_file = spool.queue / f"{queue_id}.env"
        envelope_file.chmod(0o600)
        for path in (spool.root, spool.tmp, spool.queue, spool.corrupt,
                     spool.queue / f"{queue_id}.msg"):
            os.chown(path, 65534, 65534)
        run_as_nobody(config, tmp_path, queue_id, envelope_file, spool, peer)
    finally:
        shutil.rmtree(reachable, ignore_errors=True)


def run_as_nobody(config: dict[str, Any], tmp_path: Path, queue_id: str,
                  envelope_file: Path, spool: Spool, peer: Peer) -> None:
    relay = RelayProcess(tmp_path / "relay", config,
                         twistd_options=("-u", "65534", "-g", "65534")).start()
    try:
        line = relay.wait_for_log(f"{queue_id}: cannot read its spool files now",
                                  timeout=SCAN_INTERVAL + 10)
        assert "Permission denied" in line
        assert envelope_file.exists() and os.listdir(spool.corrupt) == []

        os.chown(envelope_file, 65534, 65534)
        relay.wait_for_log(f"{queue_id}: removed", timeout=60)
        assert [m.rcpt_tos for m in peer.messages] == [("bob@dest.test",)]
    finally:
        relay.stop()
