"""The real relay as a subprocess (`twistd -n mta`), for integration tests.

A test describes the configuration as a dict; `RelayProcess` writes it with
a certificate into a folder of its own, starts twistd, waits until every
listener accepts connections, and stops it by pid.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mta.envelope import Envelope
from mta.spool import Spool

REPO = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).parent / "twistd"


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def base_config(
    folder: Path, certificate: Path, key: Path, **overrides: Any
) -> dict[str, Any]:
    """A loopback configuration: an inbound and an outbound listener on
    free ports, fast retries; ``overrides`` replace top-level keys."""
    config: dict[str, Any] = {
        "hostname": "relay.test",
        "spool": str(folder / "spool"),
        "tls": {"certificate": str(certificate), "private_key": str(key)},
        "listeners": [
            {"name": "mx", "address": "127.0.0.1", "port": free_port(),
             "role": "inbound"},
            {"name": "submission", "address": "127.0.0.1", "port": free_port(),
             "role": "outbound", "networks": ["127.0.0.0/8"]},
        ],
        "domains": {},
        "delivery": {
            "retry_schedule": ["1s"],
            "plaintext_fallback_delay": "0s",
            "timeouts": {"connect": "5s", "command": "10s", "data": "20s"},
        },
    }
    config.update(overrides)
    return config


class RelayProcess:
    def __init__(
        self,
        folder: Path,
        config: dict[str, Any],
        twistd_options: tuple[str, ...] = (),
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.folder = folder
        self.config = config
        self.twistd_options = twistd_options  # ("-u", "65534") and the like
        # A command twistd runs under: ("strace", "-f", ...), ("setpriv", ...)
        self.wrapper = wrapper
        self.config_path = folder / "mta.yaml"
        self.log_path = folder / "mta.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> RelayProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*self.wrapper, str(TWISTD), "--nodaemon", "--pidfile=",
             *self.twistd_options,
             "mta", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        log.close()
        deadline = time.monotonic() + timeout
        for listener in self.config["listeners"]:
            self._wait_for(listener["address"], listener["port"], deadline)
        return self

    def _wait_for(self, address: str, port: int, deadline: float) -> None:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"relay exited:\n{self.log()}")
            try:
                socket.create_connection((address, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"relay did not listen on {address}:{port}\n"
                             f"{self.log()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        """The first log line containing ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line with {text!r}:\n{self.log()}")

    # --- the spool, read as another process would ------------------------

    @property
    def spool(self) -> Spool:
        return Spool(Path(self.config["spool"]))

    def envelopes(self) -> list[Envelope]:
        return list(self.spool.envelopes())

    def wait_for_envelope(
        self, predicate: Any, timeout: float = 15.0
    ) -> Envelope:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for envelope in self.envelopes():
                if predicate(envelope):
                    return envelope
            time.sleep(0.05)
        raise AssertionError(
            f"no envelope matched; spool has {self.envelopes()}\n{self.log()}"
        )

    # --- clients ------------------------------------------------------------

    def listener(self, name: str) -> tuple[str, int]:
        for listener in self.config["listeners"]:
            if listener["name"] == name:
                return listener["address"], listener["port"]
        raise KeyError(name)

    def submit(
        self,
        sender: str,
        recipients: list[str],
        message: bytes,
        listener: str = "submission",
        starttls: bool = True,
        mail_options: tuple[str, ...] = (),
    ) -> str:
        """Send one message; returns the queue id from the 250 reply."""
        address, port = self.listener(listener)
        with smtplib.SMTP(address, port, local_hostname="client.test",
                          timeout=30) as client:
            if starttls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                client.starttls(context=context)
            client.ehlo("client.test")
            client.mail(sender, list(mail_options))
            for recipient in recipients:
                code, text = client.rcpt(recipient)
                assert code == 250, (code, text)
            code, text = client.data(message)
            assert code == 250, (code, text)
        reply = text.decode()
        assert "queued as " in reply, reply
        return reply.rsplit("queued as ", 1)[1].strip()
