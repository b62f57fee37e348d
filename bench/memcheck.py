"""Memory with a big queue: the relay's resident memory with N messages
queued for a destination that refuses every connection, and how long
`mta queue list` takes over them.

    .venv/bin/python bench/memcheck.py [--counts 1000,100000] [--keep]

For each count N, in a temporary folder of its own:

1. a configuration with one listener on a free loopback port, every
   domain routed to a loopback port nothing listens on (each attempt ends
   in "Connection refused") and a retry schedule of one hour, so that a
   message tried once stays deferred for the rest of the run;
2. N messages written straight into the spool in its on-disk format (one
   queue file each: the message, then the envelope as
   `mta.envelope.to_json` writes it, as `MessageWriter.commit` lays them
   out) but without fsync: SMTP would take
   far too long for 100,000, and durability is not what is measured.  All
   are due at once;
3. the relay (`twistd -n mta`) started on that spool and left to work
   until it has tried N deliveries or `--attempts` (default 5,000: one
   spool scan's worth), or for `--seconds` (default 60), whichever comes
   first.  Its VmRSS and VmHWM are read from /proc every 0.5 s, and
   attempts are counted as `status=deferred` lines in its log (those with
   `relay=none` were deferred without a connection: the destination was
   suspended after its first refusals);
4. `mta queue list` and `mta queue list --json` timed (wall clock, best
   of `--repeat`, output to /dev/null; their CPU time and peak RSS beside
   it) while the relay goes on working, and again after it was stopped
   (SIGTERM, by pid).  The spool is in the page cache both times: these
   are warm figures.

"Final" RSS is the last sample before the SIGTERM.  A relay that tried
nothing for two scan intervals before it, while messages were still due,
is reported as STALLED.

The relay's log does not say how long a spool scan takes, so the scan is
timed here, in this process, with the relay's own code
(`Spool.earliest_due` for as many messages as the queue runner asks).
`--profile` adds a cProfile of `queue list` over the largest count.
Nothing here is timed in the test suite.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

# Run as a script, this file's folder is on sys.path, not the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.options import parse_counts
from bench.postfix import wait_for_greeting
from bench.procstat import CLOCK_TICKS, parse_stat
from bench.subjects import free_port, terminate
from mta.envelope import Client, Envelope, Recipient, due_time, to_json
from mta.queue import ACTIVE_LIMIT, SCAN_INTERVAL
from mta.received import received_header
from mta.spool import Spool

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADDRESS = "127.0.0.1"
HOSTNAME = "relay.memcheck.test"
SAMPLE_EVERY = 0.5
# `mta queue list` over 100,000 messages should answer within this (the
# performance issue's target); a slower one is flagged in the output.
LIST_TARGET = 2.0


@dataclass(frozen=True, slots=True)
class Options:
    counts: tuple[int, ...]
    attempts: int
    seconds: float
    repeat: int
    keep: bool
    profile: bool


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=_counts, default=(1000, 100_000),
                        help="messages queued, one run each (default 1000,100000)")
    parser.add_argument("--attempts", type=int, default=ACTIVE_LIMIT // 2,
                        help="stop watching the relay after this many delivery "
                        "attempts (default %(default)s: one spool scan's worth)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="or after this long (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each queue list; the best is shown")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folders (configuration, spool, log)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile `queue list` over the largest count")
    args = parser.parse_args(argv)
    return Options(args.counts, args.attempts, args.seconds, max(1, args.repeat),
                   args.keep, args.profile)


def _counts(text: str) -> tuple[int, ...]:
    # "100_000" reads as Python writes it.
    return parse_counts(text.replace("_", ""))


# --- the set-up ----------------------------------------------------------------


def write_config(folder: Path) -> Path:
    """The configuration file, with a self-signed certificate made by the
    relay's own `make-cert`."""
    dead_port = free_port(ADDRESS)  # bound and closed: nothing listens there
    config = {
        "hostname": HOSTNAME,
        "spool": str(folder / "spool"),
        "tls": {"certificate": str(folder / "tls" / "relay.crt"),
                "private_key": str(folder / "tls" / "relay.key")},
        "listeners": [{"name": "submission", "address": ADDRESS,
                       "port": free_port(ADDRESS), "role": "outbound",
                       "networks": ["127.0.0.0/8"]}],
        "domains": {},
        # Brackets: no MX lookup, straight to the refusing port.
        "routes": {"*": f"[{ADDRESS}]:{dead_port}"},
        # One try each within the run; after that a message waits an hour,
        # as deferred mail for a dead destination does.
        "delivery": {"retry_schedule": ["1h"]},
    }
    path = folder / "mta.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([str(BIN / "mta"), "--config", str(path), "make-cert"],
                   check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return path


def listener_of(config_path: Path) -> tuple[str, int]:
    listener = yaml.safe_load(config_path.read_text())["listeners"][0]
    return listener["address"], int(listener["port"])


def message_bytes(queue_id: str, recipient: str, when: float) -> bytes:
    """A small message as the relay would have stored it: its Received
    header first, then a few header lines and a short body."""
    received = received_header(
        helo="client.memcheck.test", client_host="localhost",
        client_address=ADDRESS, hostname=HOSTNAME, queue_id=queue_id,
        esmtp=True, tls=None, recipients=[recipient], when=when,
    )
    rest = (f"From: <sender@memcheck.test>\r\nTo: <{recipient}>\r\n"
            f"Subject: memcheck {queue_id}\r\n"
            f"Message-ID: <{queue_id}@memcheck.test>\r\n\r\n"
            + "A line of body text for the memory check.\r\n" * 8)
    return received + rest.encode("ascii")


def fill_spool(spool: Spool, count: int) -> float:
    """Write ``count`` messages, all due now, the way `MessageWriter.commit`
    lays them out (one queue file: the message, then its envelope), but
    without fsync.  Seconds taken."""
    spool.create()
    started = time.monotonic()
    now = time.time()
    first = time.time_ns() // 1000 - count  # microseconds, as new_queue_id
    client = Client(helo="client.memcheck.test", host="localhost",
                    address=ADDRESS, listener="submission")
    for number in range(count):
        # Ids sort by arrival like the relay's: microseconds, then 4 digits
        # that would be random there and only need to differ here.
        queue_id = f"{first + number:013X}{number % 0x10000:04X}"
        arrival = now - (count - number) * 1e-6
        recipient = f"user{number}@dest.memcheck.test"
        body = message_bytes(queue_id, recipient, arrival)
        envelope = Envelope(
            queue_id=queue_id, sender="sender@memcheck.test", arrival=arrival,
            size=len(body), client=client, recipients=(Recipient(recipient),),
        )
        temporary = spool.tmp / f"{queue_id}.msg"
        _write(temporary, body + b"\n" + to_json(envelope), due_time(envelope))
        os.replace(temporary, spool.message_path(queue_id))
    return time.monotonic() - started


def _write(path: Path, data: bytes, mtime: float | None = None) -> None:
    # Private like the relay's files (mta.spool._create); no fsync.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(descriptor, data)
        if mtime is not None:
            os.utime(descriptor, (mtime, mtime))
    finally:
        os.close(descriptor)


def scan_seconds(spool: Spool, repeat: int) -> float:
    """The queue runner's scan (`Spool.earliest_due` for half its limit,
    as `QueueRunner.scan` asks), best of ``repeat``."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        spool.earliest_due(ACTIVE_LIMIT // 2)
        best = min(best, time.perf_counter() - started)
    return best


# --- the relay under watch ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The relay as the sampler last saw it."""

    at: float = 0.0  # time.monotonic() of the sample
    first_rss_kib: int = 0  # VmRSS at the first sample, once listening
    rss_kib: int = 0  # VmRSS
    hwm_kib: int = 0  # VmHWM: the peak so far
    cpu_seconds: float = 0.0
    attempts: int = 0  # status=deferred lines in the log
    not_connected: int = 0  # of those, relay=none: deferred without a try
    last_attempt_at: float = 0.0  # when `attempts` last grew


class Watch:
    """The sampler's latest `Snapshot`, shared with the main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest = Snapshot()
        self.log_offset = 0  # the sampler's own

    def latest(self) -> Snapshot:
        with self._lock:
            return self._latest

    def update(self, sample: Snapshot) -> None:
        with self._lock:
            self._latest = sample


class RunningRelay:
    """`twistd -n mta` on the filled spool, sampled from another thread."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.watch = Watch()
        self._stop_sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, daemon=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> float:
        """Start and wait for the listener's 220; seconds that took."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "mta",
                 "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )
        self.started = time.monotonic()
        address, port = listener_of(self.config_path)
        try:
            wait_for_greeting(address, port, 120.0, self.log)
        except TimeoutError:
            self.stop()
            raise
        self._sampler.start()
        return time.monotonic() - self.started

    def wait_for_attempts(self, attempts: int, seconds: float) -> Snapshot:
        """Wait until the relay has tried ``attempts`` deliveries, or
        ``seconds`` after its start; what the sampler saw then."""
        deadline = self.started + seconds
        while time.monotonic() < deadline:
            if self.watch.latest().attempts >= attempts:
                break
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"the relay exited:\n{self.log()[-4000:]}")
            time.sleep(SAMPLE_EVERY)
        return self.watch.latest()

    def stop(self) -> Snapshot:
        """Stop sampling, then the relay (SIGTERM, by pid); the last
        sample, taken while it was still at work."""
        self._stop_sampling.set()
        if self._sampler.is_alive():
            self._sampler.join()
        last = self.watch.latest()
        terminate(self.process)
        return last

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _sample_loop(self) -> None:
        # Sampling stops before SIGTERM, so "final" is the relay at work,
        # not one shutting down.
        while not self._stop_sampling.is_set():
            self._sample()
            self._stop_sampling.wait(SAMPLE_EVERY)
        self._sample()

    def _sample(self) -> None:
        assert self.process is not None
        pid = self.process.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            ticks = parse_stat(Path(f"/proc/{pid}/stat").read_text())[1]
        except (FileNotFoundError, ProcessLookupError):
            return  # it exited: the last sample stands
        memory = _status_fields(status)
        new, not_connected, self.watch.log_offset = _count_attempts(
            self.log_path, self.watch.log_offset)
        before = self.watch.latest()
        now = time.monotonic()
        self.watch.update(Snapshot(
            at=now,
            first_rss_kib=before.first_rss_kib or memory.get("VmRSS", 0),
            rss_kib=memory.get("VmRSS", 0),
            hwm_kib=memory.get("VmHWM", 0),
            cpu_seconds=ticks / CLOCK_TICKS,
            attempts=before.attempts + new,
            not_connected=before.not_connected + not_connected,
            last_attempt_at=now if new else before.last_attempt_at,
        ))


def _status_fields(text: str) -> dict[str, int]:
    """The kB figures of /proc/PID/status, by name."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return fields


def _count_attempts(log_path: Path, offset: int) -> tuple[int, int, int]:
    """Deferred-delivery lines written since ``offset``, how many of them
    name no relay (the destination was suspended: deferred without a
    connection), and the offset after the last whole line (a line being
    written is counted next time)."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        data = log.read()
    end = data.rfind(b"\n") + 1
    lines = [line for line in data[:end].splitlines() if b"status=deferred" in line]
    not_connected = sum(1 for line in lines if b" relay=none " in line)
    return len(lines), not_connected, offset + end


# --- mta queue list ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: float  # the best wall clock
    cpu_seconds: float  # user and system time of that run (steadier on a busy machine)
    peak_rss_mib: float  # the command's own peak memory, in that run


def time_command(argv: list[str], repeat: int, errors: Path) -> Timing:
    """Run ``argv`` with its output thrown away, ``repeat`` times; the
    fastest run.  A failure is an error: an empty answer is fast too."""
    best: Timing | None = None
    for _ in range(repeat):
        with open(errors, "wb") as stderr:
            started = time.perf_counter()
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                       stderr=stderr, cwd=REPO)
            # wait4, not wait: the rusage is this child's alone.
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}:\n"
                               f"{errors.read_text(errors='replace')}")
        if best is None or seconds < best.seconds:
            best = Timing(seconds, usage.ru_utime + usage.ru_stime,
                          usage.ru_maxrss / 1024)
    assert best is not None
    return best


def list_commands(config_path: Path) -> dict[str, list[str]]:
    base = [str(BIN / "mta"), "--config", str(config_path), "queue", "list"]
    return {"list": base, "json": [*base, "--json"]}


def profile_list(config_path: Path, folder: Path, top: int = 15) -> list[str]:
    """`queue list` under cProfile, in a process of its own: the functions
    that took the most time of their own, then the most in all."""
    output = folder / "queue-list.prof"
    subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(output), "-m", "mta",
         "--config", str(config_path), "queue", "list"],
        check=True, stdout=subprocess.DEVNULL, cwd=REPO,
    )
    lines = []
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        stats = pstats.Stats(str(output), stream=text).strip_dirs()
        stats.sort_stats(order).print_stats(top)
        # pstats' own header (file, date, restriction) says nothing here.
        table = text.getvalue().partition("   ncalls")[2].splitlines()
        lines += [f"by {order}:", "   ncalls" + table[0],
                  *(line for line in table[1:] if line.strip())]
    return lines


# --- one count, and the whole run ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    count: int
    fill_seconds: float
    scan_seconds: float
    started: float  # time.monotonic() when twistd was started
    start_seconds: float  # until its first 220
    watched: Snapshot  # when the watch ended (attempts or time reached)
    final: Snapshot  # the last sample before SIGTERM
    running: dict[str, Timing]
    stopped: dict[str, Timing]

    @property
    def still_due(self) -> int:
        # One recipient a message, and an hour before any is due again:
        # every message not tried yet is due.
        return self.count - self.final.attempts

    @property
    def idle_at_stop(self) -> float:
        """Seconds without a new attempt before the last sample."""
        last = self.final.last_attempt_at or self.started
        return self.final.at - last


def measure(count: int, options: Options, folder: Path) -> Result:
    config_path = write_config(folder)
    spool = Spool(folder / "spool")
    print(f"[{count}] writing {count} messages into {spool.root} "
          "(no fsync: preparation only)", flush=True)
    fill = fill_spool(spool, count)
    scan = scan_seconds(spool, options.repeat)
    commands = list_commands(config_path)
    errors = folder / "queue-list.stderr"

    relay = RunningRelay(config_path, folder / "mta.log")
    print(f"[{count}] {fill:.1f}s to write; starting the relay", flush=True)
    start = relay.start()
    try:
        watched = relay.wait_for_attempts(min(count, options.attempts),
                                          options.seconds)
        # The relay goes on working meanwhile: these runs meet it as an
        # operator's would.
        print(f"[{count}] timing queue list with the relay running", flush=True)
        running = {name: time_command(argv, options.repeat, errors)
                   for name, argv in commands.items()}
    finally:
        final = relay.stop()
    print(f"[{count}] timing queue list with the relay stopped", flush=True)
    stopped = {name: time_command(argv, options.repeat, errors)
               for name, argv in commands.items()}
    return Result(count, fill, scan, relay.started, start, watched, final,
                  running, stopped)


def details(result: Result) -> list[str]:
    watched, final = result.watched, result.final
    watched_for = watched.at - result.started
    rate = watched.attempts / watched_for if watched_for > 0 else 0.0
    lines = [
        f"{result.count} messages queued:",
        (f"  spool written in {result.fill_seconds:.1f}s; one spool scan "
         f"(earliest_due of {ACTIVE_LIMIT // 2}, timed here) "
         f"{result.scan_seconds * 1000:.0f} ms"),
        (f"  relay: 220 after {result.start_seconds:.1f}s; {watched.attempts} "
         f"deliveries tried in its first {watched_for:.1f}s ({rate:.0f}/s)"),
        (f"  at stop, {final.at - result.started:.0f}s after start: "
         f"{final.attempts} tried ({final.attempts - final.not_connected} "
         f"connected and were refused, {final.not_connected} deferred at once, "
         f"the destination suspended), {result.still_due} still due, "
         f"{final.cpu_seconds:.1f}s CPU"),
        (f"  relay RSS MiB: first sample {final.first_rss_kib / 1024:.1f}, "
         f"peak (VmHWM) {final.hwm_kib / 1024:.1f}, "
         f"final {final.rss_kib / 1024:.1f}"),
    ]
    if result.still_due and result.idle_at_stop >= 2 * SCAN_INTERVAL:
        lines.append(f"  STALLED: no delivery tried in the last "
                     f"{result.idle_at_stop:.0f}s before the stop, though "
                     f"{result.still_due} messages were due")
    for name, label in (("list", "queue list"), ("json", "queue list --json")):
        stopped, running = result.stopped[name], result.running[name]
        lines.append(f"  {label}: {stopped.seconds:.2f}s stopped "
                     f"({stopped.cpu_seconds:.2f}s CPU), {running.seconds:.2f}s "
                     f"running; the command's own peak RSS "
                     f"{stopped.peak_rss_mib:.0f} MiB")
    return lines


def table(results: list[Result]) -> list[str]:
    """The summary: queue list times as "relay stopped / running"."""
    header = (f"{'count':>8} | {'peak RSS MiB':>12} | {'final RSS MiB':>13} | "
              f"{'deliveries tried':>16} | {'queue list s':>13} | "
              f"{'queue list --json s':>19}")
    lines = [header, "-" * len(header)]
    for r in results:
        listing = f"{r.stopped['list'].seconds:.2f} / {r.running['list'].seconds:.2f}"
        as_json = f"{r.stopped['json'].seconds:.2f} / {r.running['json'].seconds:.2f}"
        lines.append(f"{r.count:>8} | {r.final.hwm_kib / 1024:>12.1f} | "
                     f"{r.final.rss_kib / 1024:>13.1f} | {r.final.attempts:>16} | "
                     f"{listing:>13} | {as_json:>19}")
    lines.append("RSS: the relay's one process (VmHWM, VmRSS); deliveries: "
                 "status=deferred lines by the stop; queue list: relay stopped "
                 "/ running, best wall clock of the runs, output to /dev/null, "
                 "spool in the page cache")
    return lines


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    results = []
    for count in options.counts:
        folder = Path(tempfile.mkdtemp(prefix=f"mta-memcheck-{count}-"))
        try:
            result = measure(count, options, folder)
            results.append(result)
            if options.profile and count == max(options.counts):
                print(f"[{count}] cProfile of queue list:")
                for line in profile_list(folder / "mta.yaml", folder):
                    print(f"  {line}")
        finally:
            if options.keep:
                print(f"[{count}] work folder kept: {folder}")
            else:
                shutil.rmtree(folder, ignore_errors=True)
    print()
    for result in results:
        print("\n".join(details(result)))
    print()
    print("\n".join(table(results)))
    slow = [r.count for r in results if r.count >= 100_000
            and r.stopped["list"].seconds > LIST_TARGET]
    if slow:
        print(f"queue list takes over {LIST_TARGET:g}s for "
              + ", ".join(map(str, slow)) + " messages (target: under "
              f"{LIST_TARGET:g}s for 100,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
