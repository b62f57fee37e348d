"""The two MTAs put through the benchmark: the relay and a private Postfix.

Each is started fresh for every repetition (so that its peak memory is
that repetition's), listens on a loopback address of its own, relays all
mail to the sink, and is known by the pid at the root of its process tree.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from bench.certs import CertFiles
from bench.postfix import PrivatePostfix, wait_for_greeting

REPO = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).parent / "twistd"


class Subject(Protocol):
    name: str
    address: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def root_pid(self) -> int: ...
    def log(self) -> str: ...


def terminate(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, by pid, and wait for the graceful stop; SIGKILL after 30s."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def relay_config(
    folder: Path,
    address: str,
    port: int,
    sink: str,
    cert: CertFiles,
    tls: bool,
    workers: int = 1,
    cpu_affinity: str = "none",
) -> dict[str, Any]:
    """The benchmark configuration: one submission listener, every domain
    routed to the sink (brackets: no MX lookup), the spool fsync'd as
    always.  TLS to the sink is required in the TLS run, as Postfix's
    smtp_tls_security_level=encrypt is."""
    return {
        "hostname": "relay.bench.test",
        "spool": str(folder / "spool"),
        "tls": {"certificate": str(cert.chain), "private_key": str(cert.key)},
        "listeners": [
            {
                "name": "submission",
                "address": address,
                "port": port,
                "role": "outbound",
                "networks": ["127.0.0.0/8"],
            },
        ],
        "domains": {},
        "routes": {"*": sink},
        "defaults": {
            "outbound": "enforce-tls" if tls else "opportunistic",
            "inbound": "opportunistic",
        },
        # A hiccup is retried at once rather than stalling the run.
        "delivery": {"retry_schedule": ["1s"]},
        "workers": workers,
        "cpu_affinity": cpu_affinity,
    }


class Relay:
    """`twistd -n mta` with the benchmark configuration, as a user runs it."""

    name = "relay"

    def __init__(
        self,
        folder: Path,
        address: str,
        sink: str,
        cert: CertFiles,
        tls: bool,
        workers: int = 1,
        cpu_affinity: str = "none",
    ) -> None:
        self.folder = folder
        self.address = address
        self.workers = workers
        self.port = free_port(address)
        self.config = relay_config(
            folder, address, self.port, sink, cert, tls, workers, cpu_affinity
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "mta.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        with open(self.folder / "mta.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(TWISTD),
                    "--nodaemon",
                    "--pidfile=",
                    "mta",
                    "--config",
                    str(config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        wait_for_greeting(self.address, self.port, 30.0, self.log)
        self._wait_for_workers(30.0)

    def _wait_for_workers(self, timeout: float) -> None:
        """Until every worker process has logged its start: the load must
        not begin while one is still importing, with its start-up CPU
        counted as the mail's and its share of connections taken by the
        others (Postfix's master is likewise up before its load)."""
        deadline = time.monotonic() + timeout
        waiting = [f"] worker {n} (pid " for n in range(2, self.workers + 1)]
        while waiting:
            text = self.log()
            waiting = [w for w in waiting if w not in text]
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every worker started in {timeout}s\n{text}")
            time.sleep(0.05)

    def stop(self) -> None:
        terminate(self.process)

    def root_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        try:
            return (self.folder / "mta.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Postfix:
    name = "postfix"

    def __init__(
        self, folder: Path, address: str, sink: str, cert: CertFiles, tls: bool
    ) -> None:
        self.address = address
        self.port = free_port(address)
        self.instance = PrivatePostfix(folder, address, self.port, sink, cert, tls)

    def start(self) -> None:
        self.instance.start()

    def stop(self) -> None:
        self.instance.stop()

    def root_pid(self) -> int:
        assert self.instance.master_pid is not None
        return self.instance.master_pid

    def log(self) -> str:
        return self.instance.log()
