"""One measured repetition: a fresh sink and a fresh MTA, N messages.

The clock starts when the load client makes its first connection.  Two
moments end it: the last 250 the client got (acceptance) and the N-th
message at the sink (end to end).  The MTA's CPU is read from /proc just
before the load starts and once the sink has everything; its peak memory
is read then too, and its proportional set size is sampled meanwhile.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from bench import procstat
from bench.certs import CertFiles
from bench.subjects import Postfix, Relay, Subject, free_port
from bench.tools import LoadResult, Sink, run_load


@dataclass(frozen=True, slots=True)
class Setup:
    """What stays the same across the repetitions of one measurement."""

    messages: int
    sessions: int
    size: int
    tls: bool
    use_postfix_tools: bool  # smtp-sink and smtp-source for plaintext
    relay_address: str
    postfix_address: str
    sink_address: str
    certs: dict[str, CertFiles]
    workers: int = 1  # the relay's worker processes
    cpu_affinity: str = "none"  # the relay's cpu_affinity setting


@dataclass(frozen=True, slots=True)
class Sample:
    """The figures of one repetition."""

    end_to_end: float  # messages/s
    acceptance: float  # messages/s
    cpu_ms: float  # per message
    peak_rss_mib: float  # the sum of the members' VmHWM
    peak_pss_mib: float  # the largest sampled sum of the members' Pss
    client_tls: str | None
    sink_tls: str | None


class TrialFailed(RuntimeError):
    pass


def run_trial(kind: str, setup: Setup, folder: Path) -> Sample:
    """Measure `kind` ("relay" or "postfix") once, in `folder`."""
    tls = setup.tls
    plain_tools = setup.use_postfix_tools and not tls
    sink = Sink(
        setup.sink_address,
        free_port(setup.sink_address),
        setup.messages,
        setup.certs["sink.bench.test"] if tls else None,
        use_smtp_sink=plain_tools,
    )
    sink_at = f"[{sink.address}]:{sink.port}"
    subject: Subject
    if kind == "relay":
        subject = Relay(
            folder,
            setup.relay_address,
            sink_at,
            setup.certs["relay.bench.test"],
            tls,
            setup.workers,
            setup.cpu_affinity,
        )
    else:
        subject = Postfix(
            folder,
            setup.postfix_address,
            sink_at,
            setup.certs["postfix.bench.test"],
            tls,
        )

    timeout = 60.0 + setup.messages * 0.1
    sink.start()
    try:
        subject.start()
        try:
            return _measure(subject, sink, setup, plain_tools, timeout)
        finally:
            subject.stop()
    finally:
        sink.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _measure(
    subject: Subject,
    sink: Sink,
    setup: Setup,
    plain_tools: bool,
    timeout: float,
) -> Sample:
    root = subject.root_pid()
    cpu_before = procstat.cpu_seconds(procstat.read_tree(root))
    memory = PssSampler(root)
    memory.start()

    try:
        load = run_load(
            subject.address,
            subject.port,
            setup.messages,
            setup.sessions,
            setup.size,
            setup.tls,
            plain_tools,
            timeout,
        )
        _check_load(subject, load, setup.messages)
        arrived = sink.done.wait(timeout)
    finally:
        memory.stop()
    if not arrived:
        raise TrialFailed(
            f"{subject.name}: the sink did not get all {setup.messages}"
            f" messages in {timeout:.0f}s\n--- sink:\n{sink.log()[-2000:]}"
            f"\n--- {subject.name} log (tail):\n{subject.log()[-4000:]}"
        )

    tree = procstat.read_tree(root)
    cpu = procstat.cpu_seconds(tree) - cpu_before
    return Sample(
        end_to_end=setup.messages / (sink.done_at - load.start),
        acceptance=setup.messages / (load.end - load.start),
        cpu_ms=cpu * 1000 / setup.messages,
        peak_rss_mib=procstat.peak_rss_mib(tree),
        peak_pss_mib=memory.peak,
        client_tls=load.tls,
        sink_tls=sink.tls,
    )


def _check_load(subject: Subject, load: LoadResult, messages: int) -> None:
    if load.accepted == messages:
        return
    raise TrialFailed(
        f"{subject.name} accepted {load.accepted} of {messages} messages: "
        + "; ".join(load.errors)
        + f"\n--- {subject.name} log (tail):\n{subject.log()[-4000:]}"
    )


class PssSampler:
    """The largest proportional set size of a process tree, sampled
    every `interval` seconds in a thread until stopped."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0.0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._sample()  # the state at the end counts too

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        self.peak = max(self.peak, procstat.tree_pss_mib(self.root))
