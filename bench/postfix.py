"""A private Postfix instance that relays everything to the sink.

Only Debian's programs are used: the configuration, queue, data and log of
the instance live in a folder of its own, and the system's Postfix is never
touched.  Postfix's master must be started by root; every folder above the
instance must be searchable by the "postfix" user, who reads the queue and
the certificates.  Only 127.0.0.1 is on an interface here, so the smtpd
service names its own loopback address in master.cf.

What is set is what the relay's benchmark configuration also does: a
bracketed relayhost (no DNS), STARTTLS offered with an ECDSA certificate,
TLS to the sink opportunistic in the plaintext run and mandatory in the
TLS run, and one log line per handshake.  Everything else is Postfix's
default, its queue file fsync and its connection cache included.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.certs import CertFiles

POSTFIX = "/usr/sbin/postfix"
SERVICES = (
    "pickup unix n - n 60 1 pickup",
    "cleanup unix n - n - 0 cleanup",
    "qmgr unix n - n 300 1 qmgr",
    "tlsmgr unix - - n 1000? 1 tlsmgr",
    "rewrite unix - - n - - trivial-rewrite",
    "bounce unix - - n - 0 bounce",
    "defer unix - - n - 0 bounce",
    "trace unix - - n - 0 bounce",
    "verify unix - - n - 1 verify",
    "flush unix n - n 1000? 0 flush",
    "proxymap unix - - n - - proxymap",
    "smtp unix - - n - - smtp",
    "relay unix - - n - - smtp",
    "showq unix n - n - - showq",
    "error unix - - n - - error",
    "retry unix - - n - - error",
    "discard unix - - n - - discard",
    "anvil unix - - n - 1 anvil",
    "scache unix - - n - 1 scache",
    "postlog unix-dgram n - n - 1 postlogd",
)


def why_not_available() -> str | None:
    """None when a private Postfix can run here, else the reason."""
    if not os.path.exists(POSTFIX):
        return (
            "postfix is not installed (apt-get install postfix,"
            " or `make debian-packages`)"
        )
    if os.geteuid() != 0:
        return "Postfix's master must be started by root"
    return None


def main_cf(root: Path, sink: str, cert: CertFiles, tls: bool) -> dict[str, str]:
    """main.cf of an instance in `root` relaying to `sink` ("[addr]:port")."""
    owner = pwd.getpwnam("postfix")
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "mail_owner": owner.pw_name,
        "setgid_group": "postdrop",
        "myhostname": "postfix.bench.test",
        "mydestination": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "maillog_file": str(root / "log" / "maillog"),
        "maillog_file_prefixes": str(root / "log"),
        "alias_maps": "",
        "alias_database": "",
        "smtpd_peername_lookup": "no",
        "biff": "no",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "relayhost": sink,
        "smtpd_tls_cert_file": str(cert.chain),
        "smtpd_tls_key_file": str(cert.key),
        "smtpd_tls_security_level": "may",
        "smtp_tls_security_level": "encrypt" if tls else "may",
        "smtpd_tls_loglevel": "1",
        "smtp_tls_loglevel": "1",
    }


class PrivatePostfix:
    """Postfix from `root`, smtpd on (address, port), relaying to `sink`."""

    def __init__(
        self,
        root: Path,
        address: str,
        port: int,
        sink: str,
        cert: CertFiles,
        tls: bool,
    ) -> None:
        self.root = root
        self.address = address
        self.port = port
        self.config_dir = root / "conf"
        self.main = main_cf(root, sink, cert, tls)
        self.master_pid: int | None = None

    def start(self, timeout: float = 20.0) -> None:
        self._make_folders()
        (self.config_dir / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in self.main.items())
        )
        smtpd = f"{self.address}:{self.port} inet n - n - - smtpd"
        (self.config_dir / "master.cf").write_text("\n".join((smtpd, *SERVICES)) + "\n")

        result = self._postfix("start")
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stdout}\n{self.log()}")
        pid_file = self.root / "queue" / "pid" / "master.pid"
        self.master_pid = int(pid_file.read_text().strip())
        wait_for_greeting(self.address, self.port, timeout, self.log)

    def stop(self, timeout: float = 15.0) -> None:
        if self.master_pid is None:
            return
        self._postfix("stop")

        # The master leads its own process group, and every daemon is in it.
        deadline = time.monotonic() + timeout
        while group_members(self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for member in group_members(self.master_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        self.master_pid = None

    def log(self) -> str:
        try:
            return (self.root / "log" / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _make_folders(self) -> None:
        owner = pwd.getpwnam("postfix")
        for folder in (
            self.root,
            self.config_dir,
            self.root / "queue",
            self.root / "log",
        ):
            folder.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        os.chown(data, owner.pw_uid, owner.pw_gid)

    def _postfix(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )


def wait_for_greeting(
    address: str, port: int, timeout: float, log: Callable[[], str]
) -> None:
    """Wait until a server on (address, port) says 220; else TimeoutError
    with what `log` returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=1) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no 220 from {address}:{port} in {timeout}s\n{log()}")


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members
