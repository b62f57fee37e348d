"""The sink and the load client, as processes the benchmark starts.

Postfix's smtp-sink and smtp-source are the standard tools, and are used
for plaintext when they are installed; neither speaks TLS, so the TLS runs
(and plaintext runs without Postfix) use bench.smtpsink and
bench.loadclient, which behave alike: one message per session, no
pipelining, a body of the given size.  Both subjects of a run meet the
same sink and the same client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.certs import CertFiles
from bench.loadclient import RECIPIENT, SENDER
from bench.postfix import wait_for_greeting

# `python -m bench.…` finds the package from the checkout, wherever the
# benchmark was started from.
REPO = Path(__file__).resolve().parent.parent
SMTP_SINK = shutil.which("smtp-sink", path="/usr/sbin:/usr/bin")
SMTP_SOURCE = shutil.which("smtp-source", path="/usr/sbin:/usr/bin")


def postfix_tools_available() -> bool:
    return SMTP_SINK is not None and SMTP_SOURCE is not None


@dataclass(frozen=True, slots=True)
class LoadResult:
    start: float  # time.monotonic() of the first connection
    end: float  # time.monotonic() of the last 250 after DATA
    accepted: int
    errors: tuple[str, ...]
    tls: str | None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" of the first session


class Sink:
    """A sink process that reports when the N-th message has arrived."""

    def __init__(
        self,
        address: str,
        port: int,
        messages: int,
        cert: CertFiles | None,
        use_smtp_sink: bool,
    ) -> None:
        self.address = address
        self.port = port
        self.messages = messages
        self.program = "smtp-sink" if use_smtp_sink else "bench.smtpsink"
        self.command = self._command(cert, use_smtp_sink)
        self.process: subprocess.Popen[str] | None = None
        self.done = threading.Event()
        self.done_at = 0.0
        self.tls: str | None = None
        self.output: list[str] = []

    def _command(self, cert: CertFiles | None, use_smtp_sink: bool) -> list[str]:
        if use_smtp_sink:
            assert SMTP_SINK is not None and cert is None
            # -M: exit after N messages; its exit is the moment they arrived.
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            return [
                SMTP_SINK,
                *user,
                "-M",
                str(self.messages),
                f"{self.address}:{self.port}",
                "1024",
            ]
        command = [
            sys.executable,
            "-m",
            "bench.smtpsink",
            self.address,
            str(self.port),
            "--messages",
            str(self.messages),
        ]
        if cert is not None:
            command += ["--cert", str(cert.chain), "--key", str(cert.key)]
        return command

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        watcher = self._watch_exit if self.program == "smtp-sink" else self._watch_lines
        threading.Thread(target=watcher, daemon=True).start()
        wait_for_greeting(self.address, self.port, 15.0, self.log)

    def _watch_exit(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        self.output.extend(self.process.stdout)
        self.process.wait()
        self.done_at = time.monotonic()
        self.done.set()

    def _watch_lines(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            word, _, rest = line.strip().partition(" ")
            if word == "tls" and self.tls is None:
                self.tls = rest
            elif word == "done":
                self.done_at = float(rest)
                self.done.set()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return "".join(self.output)


def run_load(
    address: str,
    port: int,
    messages: int,
    sessions: int,
    size: int,
    tls: bool,
    use_smtp_source: bool,
    timeout: float,
) -> LoadResult:
    """Send `messages` messages over `sessions` concurrent sessions."""
    if use_smtp_source:
        return _smtp_source(address, port, messages, sessions, size, timeout)

    command = [
        sys.executable,
        "-m",
        "bench.loadclient",
        address,
        str(port),
        "--messages",
        str(messages),
        "--sessions",
        str(sessions),
        "--size",
        str(size),
    ] + (["--tls"] if tls else [])
    done = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.loadclient failed: {done.stderr}")
    report = json.loads(done.stdout)
    return LoadResult(
        report["start"],
        report["end"],
        report["accepted"],
        tuple(report["errors"]),
        report["tls"],
    )


def _smtp_source(
    address: str,
    port: int,
    messages: int,
    sessions: int,
    size: int,
    timeout: float,
) -> LoadResult:
    assert SMTP_SOURCE is not None
    # One message per session is smtp-source's default (-d would reuse).
    command = [
        SMTP_SOURCE,
        "-m",
        str(messages),
        "-s",
        str(sessions),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        f"{address}:{port}",
    ]
    start = time.monotonic()
    done = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    end = time.monotonic()
    errors = tuple(line for line in done.stderr.splitlines() if line.strip())
    accepted = messages if done.returncode == 0 else 0
    return LoadResult(start, end, accepted, errors[:5], None)
