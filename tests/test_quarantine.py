"""Unreadable spool files meet the running relay (issue 4, item 5).

A truncated envelope (a disk that lost its tail) and one of random bytes
are put into the queue of a relay that is delivering: each is moved, with
its message file, to ``spool/corrupt/`` with exactly one log line, and
mail queued before and after goes on being delivered.
"""

from __future__ import annotations

import os
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
