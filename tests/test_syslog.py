"""Logging to syslog for real: the relay runs under
``twistd --logger mta.syslogobserver.observer`` and what reaches /dev/log
is read from a socket.

The relay runs in a mount namespace of its own (``unshare``, root only)
whose /dev is a fresh tmpfs with /dev/log pointing at the test's socket:
nothing of the machine's /dev is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from mta.syslogobserver import event_lines
from tests.peers.certs import CertFiles
from tests.relay import REPO, TWISTD, base_config

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private /dev/log",
)

# mail.info, mail.warning, mail.err (RFC 5424 6.2.1: facility * 8 + severity)
MAIL_INFO, MAIL_WARNING, MAIL_ERR = 2 * 8 + 6, 2 * 8 + 4, 2 * 8 + 3

PRIVATE_DEV = """\
set -e
mount --bind /dev "$REAL_DEV"
mount -t tmpfs tmpfs /dev
for name in null zero random urandom; do
    touch /dev/$name
    mount --bind "$REAL_DEV/$name" /dev/$name
done
ln -s "$LOG_SOCKET" /dev/log
exec "$@"
"""


class Syslog:
    """A datagram socket standing in for /dev/log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                if text in message:
                    return message
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except socket.timeout:
                pass
        raise AssertionError(f"no syslog message with {text!r}: "
                             f"{self.messages}")


@pytest.fixture
def syslog_socket(tmp_path: Path) -> Iterator[Syslog]:
    server = Syslog(tmp_path / "log.sock")
    yield server
    server.sock.close()


def test_lines_go_to_the_mail_facility_with_their_level(
    tmp_path: Path, relay_cert: CertFiles, syslog_socket: Syslog
) -> None:
    config = base_config(tmp_path, relay_cert.chain, relay_cert.key)
    config_path = tmp_path / "mta.yaml"
    config_path.write_text(yaml.safe_dump(config))
    script = tmp_path / "private-dev.sh"
    script.write_text(PRIVATE_DEV)
    (tmp_path / "real-dev").mkdir()
    environment = dict(os.environ, REAL_DEV=str(tmp_path / "real-dev"),
                       LOG_SOCKET=str(syslog_socket.path))
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", str(script),
         str(TWISTD), "--nodaemon", "--pidfile=",
         "--logger", "mta.syslogobserver.observer",
         "mta", "--config", str(config_path)],
        cwd=REPO, env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        started = syslog_socket.wait_for("started: config=")
        assert started.startswith(f"<{MAIL_INFO}>"), started
        assert f" mta[{process.pid}]: mta " in started, started

        config_path.write_text(yaml.safe_dump(dict(config, hostname="bad host")))
        os.kill(process.pid, signal.SIGHUP)
        refused = syslog_socket.wait_for("reload: refused")
        assert refused.startswith(f"<{MAIL_ERR}>"), refused
        assert "hostname: expected a host name" in refused

        process.send_signal(signal.SIGTERM)
        # twistd ends itself with the signal that stopped it, as systemd
        # expects of a clean stop.
        assert process.wait(timeout=15) == -signal.SIGTERM
        syslog_socket.wait_for("stop: done")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        output = process.stdout.read() if process.stdout else b""
    # Everything went to syslog, nothing to standard output.
    assert output == b"", output


def test_a_traceback_is_one_message_per_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        from twisted.python.failure import Failure

        failure = Failure()
    lines = event_lines({"log_format": "delivery of {queue_id} failed",
                         "queue_id": "ABC", "log_namespace": "mta.queue",
                         "log_failure": failure})
    assert lines[0] == "[mta.queue] delivery of ABC failed"
    assert all(line.startswith("\t") for line in lines[1:])
    assert any("ValueError: boom" in line for line in lines)
    assert event_lines({"mta_line": "ID: removed"}) == ["ID: removed"]
