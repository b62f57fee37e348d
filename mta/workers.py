"""Worker processes: more relays of the same configuration on every core.

With ``workers: N`` above 1, the process that twistd starts (the first
worker) binds the listening sockets, then starts N-1 more processes
(``python -m mta.workermain``) that inherit those sockets and open the same
spool.  Each process accepts connections, writes what it accepts to the
spool and delivers it, as Postfix's daemons share only the queue.  What
keeps them apart is the spool's per-message lock: a process delivers only
a message whose lock it holds, and reads its envelope again once it does,
so a message is never delivered by two of them (`mta.queue`).

The first process supervises the others:

- their log events come to it as JSON lines on a pipe and are logged there
  (so ``--logfile``, syslog and the JSON logger see every process);
- SIGHUP is passed on, and each process reloads the file itself;
- one that exits while the relay runs is started again, after 1s, then
  twice as long after each exit in a row, up to a minute;
- on stop each gets SIGTERM and does the graceful stop of `mta.stopping`;
  one still running ``limits.stop_timeout`` and a moment later is killed;
- a worker whose first process vanishes (SIGKILL) sees its pipe close and
  stops by itself, so no orphan keeps the ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import error as netError
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from mta.cpuaffinity import format_cpus
from mta.logs import line_from_json, log_event

FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
# A worker that ran this long before it exited was healthy: its next
# restart starts from the first delay again.
HEALTHY_RUN = 60.0
# After limits.stop_timeout, a worker still running gets SIGKILL this much
# later (its own stop aborts what is left within a couple of seconds).
KILL_GRACE = 5.0
# A log line from a worker longer than this is cut (a runaway worker must
# not fill the first one's memory).
MAX_EVENT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A listening socket as a worker receives it: the listener's name,
    the descriptor number in the worker, and its address family."""

    name: str
    descriptor: int
    family: int


def socket_family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def worker_command(
    config_path: Path, number: int, sockets: Iterable[InheritedSocket],
    cpus: Sequence[int] | None = None,
) -> list[str]:
    """The command line of worker ``number`` (pure); ``cpus``: the CPUs
    the first process started with, when workers are pinned."""
    command = [sys.executable, "-m", "mta.workermain", "--config", str(config_path),
               "--number", str(number)]
    for inherited in sockets:
        value = f"{inherited.name}={inherited.descriptor}/{inherited.family}"
        command += ["--listen", value]
    if cpus:
        command += ["--cpus", format_cpus(cpus)]
    return command


def parse_listen(value: str) -> InheritedSocket:
    """The inverse of the ``--listen`` argument above."""
    name, _, rest = value.rpartition("=")
    descriptor, _, family = rest.partition("/")
    if not name or not descriptor.isdigit() or not family.isdigit():
        raise ValueError(f"--listen {value!r}: expected NAME=FD/FAMILY")
    return InheritedSocket(name, int(descriptor), int(family))


def restart_delay(previous: float, ran_for: float) -> float:
    """How long to wait before starting an exited worker again (pure)."""
    if ran_for >= HEALTHY_RUN or previous <= 0:
        return FIRST_RESTART_DELAY
    return min(previous * 2, MAX_RESTART_DELAY)


class WorkerProtocol(ProcessProtocol):
    """One worker, seen from the first process: its log events in, its
    end out."""

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.buffer = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self._log(line)
        if len(self.buffer) > MAX_EVENT_BYTES:
            self._log(self.buffer)
            self.buffer = b""

    def _log(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            event = _event(line.decode("utf-8", "replace"))
        except ValueError:
            # Not one of our events: a worker that printed something
            # itself.  Shown as it is rather than lost.
            log_event("warn", f"worker {self.number}: "
                      f"{line.decode('utf-8', 'replace')[:2000]}", "worker")
            return
        globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        if self.buffer:
            self._log(self.buffer)
        self.pool.ended(self, reason)
        self.ended.callback(None)


def _event(text: str) -> dict[str, Any]:
    """A worker's event from its JSON line (`mta.logs.line_as_json`, or
    Twisted's form); ValueError when it is neither."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not an event")
    line = line_from_json(data)
    if line is not None:
        return line
    return eventFromJSON(text)


class WorkerPool:
    """The other worker processes, kept running by the first one."""

    def __init__(
        self,
        reactor: Any,
        config_path: Path,
        count: int,
        ports: list[tuple[str, str, Any]],
        cpus: Sequence[int] | None = None,
    ) -> None:
        # ports: (listener name, address, IListeningPort) of the first
        # process; their descriptors are what the workers inherit.
        self.reactor = reactor
        self.config_path = config_path
        self.count = count
        self.ports = ports
        self.cpus = cpus  # pin the workers (mta.cpuaffinity) to these
        # The workers running now, by number; each one's transport is its
        # process.
        self.protocols: dict[int, WorkerProtocol] = {}
        self.started_at: dict[int, float] = {}
        self.delays: dict[int, float] = {}
        self.pending: dict[int, Any] = {}
        self.stopping = False

    def start(self) -> None:
        for number in range(2, self.count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        self.pending.pop(number, None)
        if self.stopping:
            return
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: 2}
        sockets = []
        for index, (name, address, port) in enumerate(self.ports):
            descriptor = 3 + index
            child_fds[descriptor] = port.fileno()
            sockets.append(InheritedSocket(name, descriptor,
                                           socket_family(address)))
        command = worker_command(self.config_path, number, sockets, self.cpus)
        protocol = WorkerProtocol(self, number)
        self.reactor.spawnProcess(
            protocol, command[0], command, env=os.environ.copy(),
            childFDs=child_fds,
        )
        self.protocols[number] = protocol
        self.started_at[number] = self.reactor.seconds()

    def ended(self, protocol: WorkerProtocol, reason: Failure) -> None:
        number = protocol.number
        self.protocols.pop(number, None)
        status = _exit_words(reason)
        if self.stopping:
            log_event("info", f"worker {number} stopped: {status}", "worker")
            return
        ran_for = self.reactor.seconds() - self.started_at.get(number, 0.0)
        delay = restart_delay(self.delays.get(number, 0.0), ran_for)
        self.delays[number] = delay
        log_event("error", f"worker {number} exited: {status}; starting it "
                  f"again in {delay:g}s", "worker")
        self.pending[number] = self.reactor.callLater(delay, self._spawn, number)

    def signal_all(self, signum: int) -> None:
        for protocol in list(self.protocols.values()):
            try:
                protocol.transport.signalProcess(signum)
            except netError.ProcessExitedAlready:
                pass

    def stop(self, timeout: float) -> Deferred[Any]:
        """SIGTERM to every worker; fires once all have exited (SIGKILL to
        those still running after ``timeout`` and a moment)."""
        self.stopping = True
        for call in self.pending.values():
            call.cancel()
        self.pending.clear()
        ended = [protocol.ended for protocol in self.protocols.values()]
        self.signal_all(signal.SIGTERM)
        kill = self.reactor.callLater(timeout + KILL_GRACE, self.signal_all,
                                      signal.SIGKILL)

        def done(result: Any) -> Any:
            if kill.active():
                kill.cancel()
            return result

        return DeferredList(ended).addBoth(done)


def _exit_words(reason: Failure) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        return f"killed by signal {signal_number}"
    return f"exit status {getattr(value, 'exitCode', None)}"
