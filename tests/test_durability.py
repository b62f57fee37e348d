"""The spool's durability promise (SPEC.md section 6), seen from the system
calls the real relay makes: it runs under ``strace -f``, and the trace
shows, before the ``250 ... queued as ID`` reply is written to the
client's socket, that the queue file (the message, then its envelope) was
fsync'd, renamed into queue/, and the queue folder fsync'd after the
rename; and that the removal of a delivered message and the envelope
saved after a delivery attempt are fsync'd the same way.

A SIGKILL keeps the page cache, so no kill test can tell a missing fsync:
only the trace can.  Calls are matched by file names (``strace -yy``
prints the path behind each descriptor) and the reply by its socket (the
client's port), and a call made in another thread counts by when it
returned (``<... resumed>``), so thread interleaving does not matter.

Peer: 127.0.12.60, an address no other test file uses.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from mta.envelope import DEFERRED, DELIVERED
from tests.peers import smtppeer
from tests.peers.smtppeer import Replies
from tests.relay import RelayProcess, base_config

PEER = "127.0.12.60"
MESSAGE = b"From: alice@org.test\r\nSubject: durable\r\n\r\nKeep me.\r\n"
TRACED = ("fsync", "fdatasync", "rename", "renameat", "renameat2", "unlink",
          "unlinkat", "sendto", "sendmsg", "write", "writev")

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None,
    reason="strace (scripts/debian-packages) is not installed",
)


# --- reading an strace -f trace ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: str
    start: int  # line of the trace where the call began
    end: int  # line where it returned
    result: str

    @property
    def ok(self) -> bool:
        return not self.result.startswith("-1")


_WHOLE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(.+)$")
_UNFINISHED = re.compile(r"^(\d+)\s+(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(.+)$")


def parse_trace(text: str) -> list[Call]:
    """Every completed call, whatever thread made it; a call interrupted
    by another thread's is joined with its ``<... resumed>`` line."""
    calls: list[Call] = []
    pending: dict[str, tuple[str, str, int]] = {}
    for index, line in enumerate(text.splitlines()):
        if match := _WHOLE.match(line):
            pid, name, args, result = match.groups()
            calls.append(Call(name, args, index, index, result))
        elif match := _UNFINISHED.match(line):
            pid, name, args = match.groups()
            pending[pid] = (name, args, index)
        elif match := _RESUMED.match(line):
            pid, name, rest, result = match.groups()
            if pid in pending and pending[pid][0] == name:
                _, args, start = pending.pop(pid)
                calls.append(Call(name, args + rest, start, index, result))
    return sorted(calls, key=lambda call: call.start)


class Trace:
    def __init__(self, calls: list[Call]) -> None:
        self.calls = calls

    def find(self, what: str, test: Callable[[Call], bool]) -> list[Call]:
        found = [call for call in self.calls if call.ok and test(call)]
        assert found, f"no {what} in the trace"
        return found

    def fsyncs(self, path_part: str) -> list[Call]:
        return self.find(f"fsync of {path_part}", lambda call: call.name in (
            "fsync", "fdatasync") and f"{path_part}>" in call.args)

    def renames(self, source: str, target: str, prefix: bool = False
                ) -> list[Call]:
        """Renames of ``source`` (a path, or its beginning) to ``target``."""
        quoted = f'"{source}' if prefix else f'"{source}"'
        return self.find(f"rename {source} -> {target}", lambda call: (
            call.name.startswith("rename") and quoted in call.args
            and f'"{target}"' in call.args))

    def unlinks(self, path: str) -> list[Call]:
        return self.find(f"unlink {path}", lambda call: call.name.startswith(
            "unlink") and f'"{path}"' in call.args)


def first_before(calls: list[Call], moment: int) -> Call:
    """The first of ``calls`` that returned before line ``moment``."""
    done = [call for call in calls if call.end < moment]
    assert done, f"none returned before line {moment}: {calls}"
    return done[0]


def first_after(calls: list[Call], moment: int) -> Call:
    """The first of ``calls`` that began after line ``moment``."""
    later = [call for call in calls if call.start > moment]
    assert later, f"none began after line {moment}: {calls}"
    return later[0]


# --- the relay under strace ----------------------------------------------------


def traced_pid(strace_pid: int) -> int:
    """The relay's pid: strace's child (a signal to strace itself would be
    blocked while it writes to a file)."""
    children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = children.read_text().split()
        if pids:
            return int(pids[0])
        time.sleep(0.05)
    raise AssertionError("strace started no process")


@pytest.fixture
def traced(tmp_path: Path, relay_cert: Any, mx_port: int) -> Iterator[Any]:
    replies = Replies(rcpt={"later@dest.test": "451 4.2.0 try later"})
    peer = smtppeer.plain(PEER, mx_port, replies=replies)
    trace = tmp_path / "trace"
    config = base_config(
        tmp_path, relay_cert.chain, relay_cert.key,
        routes={"dest.test": f"[{PEER}]:{mx_port}"},
        delivery={"retry_schedule": ["1h"],
                  "timeouts": {"connect": "5s", "command": "10s",
                               "data": "20s"}},
    )
    strace = ("strace", "-f", "-qq", "-yy", "-s", "256",
              "-e", "trace=" + ",".join(TRACED), "-o", str(trace))
    relay = RelayProcess(tmp_path / "relay", config, wrapper=strace)
    relay.start(timeout=60)
    assert relay.process is not None
    relay_pid = traced_pid(relay.process.pid)
    try:
        yield relay, peer, trace, relay_pid
    finally:
        if relay.process.poll() is None:
            os.kill(relay_pid, signal.SIGTERM)
            relay.process.wait(timeout=30)
        peer.stop()


def submit(relay: RelayProcess, recipients: list[str]) -> tuple[str, int]:
    """Send a message in plaintext (the reply must be readable in the
    trace); the queue id and the client's port."""
    address, port = relay.listener("submission")
    with smtplib.SMTP(address, port, local_hostname="client.test",
                      timeout=60) as client:
        client_port = client.sock.getsockname()[1]
        client.ehlo("client.test")
        client.mail("alice@org.test")
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        code, text = client.data(MESSAGE)
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[1], client_port


def test_every_spool_change_is_fsynced_before_it_counts(traced: Any) -> None:
    relay, peer, trace_path, relay_pid = traced
    spool = str(Path(relay.config["spool"]).resolve())
    listen_port = relay.listener("submission")[1]

    delivered, delivered_port = submit(relay, ["bob@dest.test"])
    partial, partial_port = submit(relay, ["carol@dest.test",
                                           "later@dest.test"])
    relay.wait_for_log(f"{delivered}: removed", timeout=60)
    relay.wait_for_log(f"{partial}: to=<later@dest.test>", timeout=60)
    peer.wait_for(2, timeout=30)
    saved = relay.wait_for_envelope(
        lambda e: e.queue_id == partial and e.recipients[1].history,
        timeout=30)
    assert [r.state for r in saved.recipients] == [DELIVERED, DEFERRED]
    os.kill(relay_pid, signal.SIGTERM)
    relay.process.wait(timeout=30)
    trace = Trace(parse_trace(trace_path.read_text()))

    for queue_id, client_port in ((delivered, delivered_port),
                                  (partial, partial_port)):
        assert_committed_before_the_reply(trace, spool, queue_id,
                                          listen_port, client_port)
    assert_removal_is_fsynced(trace, spool, delivered)
    assert_save_is_fsynced(trace, spool, partial)


def assert_committed_before_the_reply(
    trace: Trace, spool: str, queue_id: str, listen_port: int,
    client_port: int,
) -> None:
    [reply] = trace.find(
        f"the 250 reply for {queue_id}",
        lambda call: call.name in ("sendto", "write", "sendmsg", "writev")
        and f"queued as {queue_id}" in call.args)
    # On this client's connection: TCP:[relay:port->client:port].
    assert f":{listen_port}->" in reply.args, reply
    assert f":{client_port}]>" in reply.args, reply
    before = reply.start

    tmp, queue = f"{spool}/tmp/{queue_id}", f"{spool}/queue/{queue_id}"
    message_synced = first_before(trace.fsyncs(f"{tmp}.msg"), before)
    message_moved = first_before(trace.renames(f"{tmp}.msg", f"{queue}.msg"),
                                 before)
    folder_synced = first_after(trace.fsyncs(f"{spool}/queue"),
                                message_moved.end)

    assert message_synced.end < message_moved.start
    assert folder_synced.end < before, (folder_synced, reply)
    # One file a message: its envelope is at its end, not in a file of
    # its own until it changes.
    assert not [call for call in trace.calls if call.name.startswith("rename")
                and f'"{tmp}.env' in call.args and call.end < before]


def assert_removal_is_fsynced(trace: Trace, spool: str, queue_id: str) -> None:
    queue = f"{spool}/queue/{queue_id}"
    message_gone = trace.unlinks(f"{queue}.msg")[-1]
    first_after(trace.fsyncs(f"{spool}/queue"), message_gone.end)


def assert_save_is_fsynced(trace: Trace, spool: str, queue_id: str) -> None:
    # The save after the attempt: a new file tmp/ID.env.RANDOM, renamed
    # over queue/ID.env.
    temporary = f"{spool}/tmp/{queue_id}.env."
    [saved, *_] = trace.renames(temporary, f"{spool}/queue/{queue_id}.env",
                                prefix=True)
    name = saved.args.split('"')[1]
    synced = trace.fsyncs(name)
    assert synced[0].end < saved.start, (synced, saved)
    first_after(trace.fsyncs(f"{spool}/queue"), saved.end)
