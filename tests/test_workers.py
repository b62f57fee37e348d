"""Worker processes (``workers: N``, mta.workers): several relays on the
same listening sockets and the same spool.

The promise that matters: however the processes race for the same queue,
a message is delivered once.  The rest: both processes really serve, a
worker that dies comes back, one whose first process vanishes goes too,
SIGHUP and SIGTERM reach every process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mta import cpuaffinity
from mta.config import ConfigError, load_config
from mta.envelope import PENDING, Client, Envelope, Recipient
from mta.reload import needs_restart
from mta.spool import Spool
from mta.workers import (
    FIRST_RESTART_DELAY,
    MAX_RESTART_DELAY,
    InheritedSocket,
    parse_listen,
    restart_delay,
    worker_command,
)
from tests.peers import certs
from tests.peers.smtppeer import Peer
from tests.relay import RelayProcess, base_config, free_port

# --- pure parts ------------------------------------------------------------


def test_the_listen_argument_round_trips() -> None:
    sockets = [InheritedSocket("mx", 3, 2), InheritedSocket("sub=mission", 4, 10)]
    command = worker_command(Path("/etc/mta.yaml"), 2, sockets)
    values = [command[i + 1] for i, word in enumerate(command) if word == "--listen"]
    assert [parse_listen(value) for value in values] == sockets
    assert command[command.index("--number") + 1] == "2"


@pytest.mark.parametrize("value", ["mx", "mx=3", "mx=x/2", "=3/2", "mx=3/"])
def test_a_malformed_listen_argument_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="NAME=FD/FAMILY"):
        parse_listen(value)


@pytest.mark.parametrize(
    ("previous", "ran_for", "expected"),
    [
        (0.0, 0.5, FIRST_RESTART_DELAY),  # the first exit
        (1.0, 0.5, 2.0),  # exits in a row double the wait
        (32.0, 5.0, MAX_RESTART_DELAY),  # up to a bound
        (MAX_RESTART_DELAY, 5.0, MAX_RESTART_DELAY),
        (32.0, 600.0, FIRST_RESTART_DELAY),  # a long healthy run starts over
    ],
)
def test_restart_delay(previous: float, ran_for: float, expected: float) -> None:
    assert restart_delay(previous, ran_for) == expected


def _config_file(tmp_path: Path, text: str) -> Path:
    files = certs.write_cert_files(
        certs.issue_server_cert("relay.test"), tmp_path / "tls", stem="relay"
    )
    path = tmp_path / "mta.yaml"
    path.write_text(
        f"spool: spool\ntls: {{certificate: {files.chain}, private_key: "
        f"{files.key}}}\nlisteners: [{{name: mx, address: 127.0.0.1, port: "
        f"2525, role: inbound}}]\n" + text
    )
    return path


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("workers: 0\n", "workers: expected a whole number above zero (got 0)"),
        ("workers: two\n", "workers: expected a whole number above zero"),
        ("workers: 65\n", "workers: is more than 64"),
        ("workers: 2\nmetrics: {port: 9100}\n",
         "workers: above 1 cannot be combined with metrics"),
        ("cpu_affinity: all\n",
         "cpu_affinity: expected one of none, spread (got 'all')"),
    ],
)
def test_bad_workers_settings_are_refused(
    tmp_path: Path, text: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(_config_file(tmp_path, text))
    assert problem in str(raised.value)


def test_a_change_of_workers_waits_for_a_restart(tmp_path: Path) -> None:
    one = load_config(_config_file(tmp_path, ""))
    three = load_config(_config_file(tmp_path, "workers: 3\ncpu_affinity: spread\n"))
    assert one.workers == 1 and three.workers == 3
    assert one.cpu_affinity == "none" and three.cpu_affinity == "spread"
    assert needs_restart(one, three) == [
        "workers changes from 1 to 3", "cpu_affinity changes from none to spread"]
    assert needs_restart(three, three) == []


def test_workers_take_the_cpus_in_turn() -> None:
    assert [cpuaffinity.cpu_for(n, (0, 1)) for n in (1, 2, 3, 4)] == [0, 1, 0, 1]
    assert [cpuaffinity.cpu_for(n, (2, 5, 7)) for n in (1, 2, 3)] == [2, 5, 7]
    assert cpuaffinity.parse_cpus(cpuaffinity.format_cpus((0, 3))) == (0, 3)
    with pytest.raises(ValueError):
        cpuaffinity.parse_cpus("-1")


# --- the real relay with two processes -----------------------------------


@pytest.fixture
def peer() -> Any:
    with Peer("127.0.0.1", free_port()) as peer:
        yield peer


def _relay(tmp_path: Path, peer: Peer, **overrides: Any) -> RelayProcess:
    files = certs.write_cert_files(
        certs.issue_server_cert("relay.test"), tmp_path / "tls", stem="relay"
    )
    config = base_config(
        tmp_path, files.chain, files.key, workers=2,
        routes={"*": f"[127.0.0.1]:{peer.port}"}, **overrides,
    )
    # JSON lines: each event says which process wrote it (mta_worker).
    return RelayProcess(tmp_path, config,
                        twistd_options=("--logger", "mta.logs.json_observer"))


def _events(relay: RelayProcess) -> list[dict[str, Any]]:
    events = []
    for line in relay.log().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def _texts(relay: RelayProcess) -> list[str]:
    return [event.get("mta_line", "") for event in _events(relay)]


def _wait_for_text(relay: RelayProcess, pattern: str, count: int = 1,
                   timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [text for text in _texts(relay) if re.search(pattern, text)]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} lines match {pattern!r}:\n"
                         + "\n".join(_texts(relay)))


def _worker_pid(relay: RelayProcess, number: int, count: int = 1) -> int:
    line = _wait_for_text(relay, rf"^worker {number} \(pid \d+\) started", count)
    return int(re.search(r"pid (\d+)", line[-1]).group(1))  # type: ignore[union-attr]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent was killed).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _fill(spool: Spool, count: int) -> list[str]:
    """Messages committed while no relay runs, all due at once."""
    spool.create()
    ids = []
    for number in range(count):
        writer = spool.new_message()
        message_id = f"<race-{number}@client.test>"
        writer.write(f"Message-ID: {message_id}\r\nSubject: race {number}\r\n"
                     "\r\nbody\r\n".encode())
        envelope = Envelope(
            writer.queue_id, "alice@org.test", time.time(), writer.size,
            Client("client.test", "unknown", "127.0.0.1", "submission", None),
            (Recipient("bob@dest.test", PENDING),),
        )
        writer.commit(envelope)
        ids.append(message_id)
    return ids


def test_two_workers_racing_for_one_queue_deliver_each_message_once(
    tmp_path: Path,
) -> None:
    # A slow server: the first process is still at it when the second
    # starts and scans the same queue.
    with Peer("127.0.0.1", free_port(), data_delay=0.2) as peer:
        _race(tmp_path, peer)


def _race(tmp_path: Path, peer: Peer) -> None:
    relay = _relay(tmp_path, peer)
    sent = _fill(Spool(Path(relay.config["spool"])), 300)

    relay.start()
    try:
        peer.wait_for(300, timeout=60)
        deadline = time.monotonic() + 20
        while relay.envelopes() and time.monotonic() < deadline:
            time.sleep(0.1)
        # Anything delivered twice would show up here, a moment later.
        time.sleep(1.0)
    finally:
        relay.stop()

    received = Counter(
        re.search(rb"Message-ID: (<[^>]+>)", message.content).group(1).decode()  # type: ignore[union-attr]
        for message in peer.messages
    )
    assert sorted(received) == sorted(sent)
    assert [mid for mid, n in received.items() if n > 1] == []
    assert relay.envelopes() == []
    # Both processes delivered: the race was real.
    senders = Counter(event.get("mta_worker", 1) for event in _events(relay)
                      if event.get("mta_event") == "delivery")
    assert set(senders) == {1, 2}, senders
    assert sum(senders.values()) == 300


def test_a_worker_s_last_lines_reach_the_log_when_it_stops(
    tmp_path: Path, peer: Peer
) -> None:
    # The lines of a worker's graceful stop, the last it writes to its
    # pipe, are logged by the first process before it ends too.
    relay = _relay(tmp_path, peer).start()
    try:
        _worker_pid(relay, 2)
    finally:
        relay.stop()

    stops = [event["mta_line"] for event in _events(relay)
             if event.get("mta_worker") == 2 and event.get("mta_event") == "stop"]
    assert stops[0] == "worker 2 stopping"
    assert stops[-1] == "stop: done, nothing left under way"


def test_both_processes_take_connections_on_the_shared_listener(
    tmp_path: Path, peer: Peer
) -> None:
    relay = _relay(tmp_path, peer).start()

    def accepted() -> Counter[int]:
        return Counter(event.get("mta_worker", 1) for event in _events(relay)
                       if event.get("mta_event") == "accepted")

    # Which process takes a connection is the kernel's choice: the one
    # that calls accept first.  Each must get some within a few hundred.
    sent = 0
    try:
        _worker_pid(relay, 2)
        while sent < 400 and (sent < 40 or len(accepted()) < 2):
            for _ in range(20):
                relay.submit("alice@org.test", [f"bob{sent}@dest.test"],
                             b"Subject: hi\r\n\r\nhello\r\n", starttls=False)
                sent += 1
        peer.wait_for(sent, timeout=60)
    finally:
        relay.stop()

    assert sum(accepted().values()) == sent
    assert set(accepted()) == {1, 2}, accepted()


def _cpus_allowed(pid: int) -> set[str]:
    """The CPU lists of every thread of ``pid``, as /proc shows them."""
    return {
        line.split(":", 1)[1].strip()
        for status in Path(f"/proc/{pid}/task").glob("*/status")
        for line in status.read_text().splitlines()
        if line.startswith("Cpus_allowed_list:")
    }


def test_spread_workers_each_run_on_a_cpu_of_their_own(
    tmp_path: Path, peer: Peer
) -> None:
    cpus = cpuaffinity.usable_cpus()
    relay = _relay(tmp_path, peer, cpu_affinity="spread").start()
    try:
        second = _worker_pid(relay, 2)
        # A message through each process: their threads are all started.
        for number in range(20):
            relay.submit("alice@org.test", [f"bob{number}@dest.test"],
                         b"Subject: hi\r\n\r\nhello\r\n", starttls=False)
        peer.wait_for(20, timeout=30)
        first = relay.process.pid  # type: ignore[union-attr]
        pinned = {first: _cpus_allowed(first), second: _cpus_allowed(second)}
    finally:
        relay.stop()

    assert pinned == {first: {str(cpuaffinity.cpu_for(1, cpus))},
                      second: {str(cpuaffinity.cpu_for(2, cpus))}}
    started = [text for text in _texts(relay) if " started: " in text]
    assert any(text.startswith("mta ") and text.endswith(
        f" cpu={cpuaffinity.cpu_for(1, cpus)}") for text in started), started
    assert any(text.startswith("worker 2 ") and text.endswith(
        f" cpu={cpuaffinity.cpu_for(2, cpus)}") for text in started), started


def test_a_killed_worker_is_started_again(tmp_path: Path, peer: Peer) -> None:
    relay = _relay(tmp_path, peer).start()
    try:
        first = _worker_pid(relay, 2)
        os.kill(first, signal.SIGKILL)
        _wait_for_text(relay, r"^worker 2 exited: killed by signal 9; "
                       r"starting it again in 1s")
        second = _worker_pid(relay, 2, count=2)
        assert second != first and _alive(second)
        relay.submit("alice@org.test", ["bob@dest.test"],
                     b"Subject: hi\r\n\r\nafter the restart\r\n", starttls=False)
        peer.wait_for(1, timeout=15)
    finally:
        relay.stop()
    assert not _alive(second)


def test_a_worker_whose_first_process_is_killed_stops_by_itself(
    tmp_path: Path, peer: Peer
) -> None:
    relay = _relay(tmp_path, peer).start()
    worker = _worker_pid(relay, 2)
    relay.kill()  # SIGKILL to the first process: no chance to stop the others

    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)
    # The port is free again: nothing kept it open.
    address, port = relay.listener("submission")
    import socket

    with pytest.raises(OSError):
        socket.create_connection((address, port), timeout=1).close()


def test_sighup_and_sigterm_reach_every_process(
    tmp_path: Path, peer: Peer
) -> None:
    relay = _relay(tmp_path, peer).start()
    worker = _worker_pid(relay, 2)
    assert relay.process is not None

    relay.process.send_signal(signal.SIGHUP)
    reloads = [event for event in _events(relay)
               if event.get("mta_line", "").startswith("reload: ok")]
    deadline = time.monotonic() + 15
    while len(reloads) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        reloads = [event for event in _events(relay)
                   if event.get("mta_line", "").startswith("reload: ok")]
    assert sorted(event.get("mta_worker", 1) for event in reloads) == [1, 2]

    relay.process.send_signal(signal.SIGTERM)
    # twistd ends with the signal that stopped it, as it does with one process.
    assert relay.process.wait(timeout=20) == -signal.SIGTERM
    assert not _alive(worker)
    _wait_for_text(relay, r"^worker 2 stopped: exit status 0")
