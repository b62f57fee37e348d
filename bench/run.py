"""Run the benchmark: `.venv/bin/python bench/run.py [options]` or
`make bench`.  README.md, section "Benchmark", explains the figures."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder is on sys.path, not the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import postfix, report
from bench.certs import write_server_certs
from bench.options import Options, parse_options
from bench.tools import SMTP_SINK, SMTP_SOURCE, postfix_tools_available
from bench.trial import Sample, Setup, run_trial

# Loopback addresses of the benchmark's own, so that it never meets the
# test suite's peers or a relay run by hand.
RELAY_ADDRESS = "127.0.11.1"
SINK_ADDRESS = "127.0.11.2"
POSTFIX_ADDRESS = "127.0.11.3"
SERVER_NAMES = ("relay.bench.test", "postfix.bench.test", "sink.bench.test")


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    with_postfix = options.postfix
    if with_postfix and (reason := postfix.why_not_available()) is not None:
        print(f"Postfix is not run: {reason}")
        with_postfix = False

    work = Path(tempfile.mkdtemp(prefix="mta-bench-"))
    work.chmod(0o755)  # Postfix's user must reach its queue below it
    certs = write_server_certs(work / "tls", *SERVER_NAMES)
    for line in header(options, with_postfix, work):
        print(line)

    try:
        for mode in options.modes:
            for sessions in options.concurrency:
                setup = Setup(
                    options.messages,
                    sessions,
                    options.size,
                    mode == "tls",
                    postfix_tools_available(),
                    RELAY_ADDRESS,
                    POSTFIX_ADDRESS,
                    SINK_ADDRESS,
                    certs,
                    options.workers,
                    options.cpu_affinity,
                )
                measure(setup, options.repeat, with_postfix, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def measure(setup: Setup, repeat: int, with_postfix: bool, work: Path) -> None:
    kinds = ("relay", "postfix") if with_postfix else ("relay",)
    samples: dict[str, list[Sample]] = {kind: [] for kind in kinds}
    # Alternate the subjects, so that a slow moment of the machine does not
    # fall on one of them only.
    for round_ in range(repeat):
        for kind in kinds:
            folder = work / f"{kind}-{round_}"
            settle()
            samples[kind].append(run_trial(kind, setup, folder))

    mode = "STARTTLS on both legs" if setup.tls else "plaintext"
    title = f"{mode}, {setup.sessions} concurrent session(s), {setup.messages} messages"
    postfix_samples = samples.get("postfix")
    for line in report.table(title, samples["relay"], postfix_samples):
        print(line)
    for kind in kinds:
        first = samples[kind][0]
        if first.client_tls or first.sink_tls:
            print(
                f"  {kind} TLS: client->{kind} {first.client_tls},"
                f" {kind}->sink {first.sink_tls}"
            )
    print(flush=True)


def settle() -> None:
    """Write back what the last trial left in the page cache before the
    next one starts: the thousands of queue files each MTA created and
    removed leave metadata that the kernel writes back over the next
    seconds, at the cost of whichever trial runs then."""
    os.sync()
    time.sleep(1.0)


def header(options: Options, with_postfix: bool, work: Path) -> list[str]:
    plain_tools = (
        "smtp-source -> MTA -> smtp-sink"
        if postfix_tools_available()
        else "bench.loadclient -> MTA -> bench.smtpsink"
    )
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"mta bench {started}: {options.messages} messages of {options.size}"
        + f" octets, one per session; median of {options.repeat} (min-max)",
        f"machine: {os.cpu_count()} CPUs, {cpu_model()},"
        + f" Linux {platform.release()}, Python {platform.python_version()}",
        f"spool and queue in {work} ({file_system(work)}), fsync'd;"
        + f" load average before: {os.getloadavg()[0]:.2f}",
        f"checkout: {checkout()}; relay workers: {options.workers},"
        + f" cpu_affinity: {options.cpu_affinity}",
        f"plaintext: {plain_tools};"
        + " TLS: bench.loadclient -> MTA -> bench.smtpsink",
    ]
    if with_postfix:
        lines.append(
            f"postfix {postfix_version()}: a private instance,"
            f" defaults but relayhost, TLS and logging"
        )
    if SMTP_SINK is None or SMTP_SOURCE is None:
        lines.append("smtp-sink/smtp-source not installed: our tools for both")
    return lines + [""]


def checkout() -> str:
    """The commit measured, and whether mta/ differed from it."""
    repo = Path(__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode != 0:
        return "not a git checkout"
    changed = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", "mta", "twisted"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = " with uncommitted changes in mta/" if changed.stdout.strip() else ""
    return f"commit {head.stdout.strip()}{dirty}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def file_system(path: Path) -> str:
    done = subprocess.run(
        ["df", "--output=fstype", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.split()
    return lines[-1] if done.returncode == 0 and lines else "unknown"


def postfix_version() -> str:
    done = subprocess.run(
        ["/usr/sbin/postconf", "-h", "-d", "mail_version"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
