"""A private Postfix instance on loopback, and the swaks client.

`PostfixInstance` runs Debian's Postfix (3.7) from a folder of its own:
configuration, queue, data, log and delivered mail all live under the folder
given to it, and nothing of the system's Postfix is used but its programs.
It receives mail for its `domains` with smtpd on (address, port) and
delivers every recipient into one Maildir; with `relayhost` it also relays
everything else to that host, which makes it a real client for the relay.

Facts about Postfix that shape this module:

- Its master process must be started by root (it drops to `mail_owner`,
  the Debian "postfix" user, for everything else).  The master opens its
  lock file and the virtual(8) agent writes mail as that user, through
  absolute paths: every folder above the instance's folder must be
  searchable by it.  pytest's tmp_path is not (its base is mode 0700), so
  use `reachable_tmpdir()`.
- `inet_interfaces` accepts only addresses configured on an interface, and
  here that is 127.0.0.1 alone; other loopback addresses are bound by
  naming them in the master.cf service ("127.0.0.45:2525 inet ...").
- With `maillog_file` set (there is no syslog here), `postfix` commands
  print nothing unless standard error is a terminal: on failure read the
  log.  `postfix check` needs `maillog_file_prefixes` to cover the log.
- virtual(8) refuses uid 0 (virtual_minimum_uid must be at least 1) and
  regular-expression substitutions in virtual_mailbox_maps, hence one
  static Maildir for all recipients.
- What Postfix changes in a message, and `strip_postfix_headers` undoes:
  CRLF becomes LF, and Return-Path, X-Original-To, Delivered-To and one
  Received header are put on top.  Headers the client left out (Date,
  Message-ID) are not added, because local_header_rewrite_clients is empty.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

POSTFIX_PACKAGE = "postfix"
SWAKS_PACKAGE = "swaks"


class MissingProgram(RuntimeError):
    """A program the tests need is not installed."""


def require_program(name: str, package: str) -> str:
    """The path of program `name`, or MissingProgram naming its package."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise MissingProgram(
            f"{name} not found in PATH or /usr/sbin: install the Debian package"
            f" {package!r} (apt-get install -y {package})"
        )
    return found


@dataclass(frozen=True, slots=True)
class TLSLogEntry:
    """One "TLS connection established" line of the Postfix log."""

    daemon: str  # "smtpd" (someone connected) or "smtp" (Postfix connected)
    trust: str  # "Anonymous", "Untrusted", "Trusted" or "Verified"
    peer: str  # "unknown[127.0.0.1]" or "[127.0.0.1]:2525"
    protocol: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    bits: int


_TLS_LINE = re.compile(
    r"postfix/(?P<daemon>\w+)\[\d+\]: (?P<trust>\w+) TLS connection established"
    r" (?:from|to) (?P<peer>\S+): (?P<protocol>\S+) with cipher (?P<cipher>\S+)"
    r" \((?P<bits>\d+)/\d+ bits\)"
)


def parse_tls_log(log: str) -> list[TLSLogEntry]:
    """Every TLS handshake Postfix logged (smtpd/smtp_tls_loglevel >= 1)."""
    return [
        TLSLogEntry(
            daemon=match["daemon"],
            trust=match["trust"],
            peer=match["peer"],
            protocol=match["protocol"],
            cipher=match["cipher"],
            bits=int(match["bits"]),
        )
        for match in _TLS_LINE.finditer(log)
    ]


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on `address` right now, for servers that cannot
    take port 0 (Postfix).  Another process may take it before it is used;
    on loopback addresses of their own, tests rarely race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def reachable_tmpdir(prefix: str = "postfix-test-") -> Iterator[Path]:
    """A fresh folder in the system temp folder that Postfix can reach.

    Removed, with everything in it, on leaving the block.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class PostfixInstance:
    """Postfix receiving on (address, port) for `domains`, from `tmpdir`.

    `tls_level` is smtpd_tls_security_level: "may" offers STARTTLS,
    "encrypt" demands it before MAIL; both need `tls_cert` (a PEM chain,
    leaf first) and `tls_key`.  Without a certificate TLS is off.
    `relayhost` ("[127.0.0.1]:2525") sends mail for other domains there,
    with `smtp_tls_level` and `smtp_tls_ca_file`.  `config` adds or
    overrides main.cf parameters.
    """

    def __init__(
        self,
        tmpdir: Path | str,
        address: str = "127.0.0.1",
        port: int = 25,
        *,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        tls_level: str = "may",
        domains: Sequence[str] = ("postfix.test",),
        hostname: str = "postfix.test",
        relayhost: str | None = None,
        smtp_tls_level: str = "may",
        smtp_tls_ca_file: Path | str | None = None,
        config: Mapping[str, str] | None = None,
    ) -> None:
        if tls_level not in ("none", "may", "encrypt"):
            raise ValueError(f"tls_level {tls_level!r}: use none, may or encrypt")
        if tls_level != "none" and (tls_cert is None) != (tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if tls_level == "encrypt" and tls_cert is None:
            raise ValueError("tls_level 'encrypt' needs tls_cert and tls_key")

        self.root = Path(tmpdir).resolve()
        self.address = address
        self.port = port
        self.tls_cert = Path(tls_cert).resolve() if tls_cert else None
        self.tls_key = Path(tls_key).resolve() if tls_key else None
        self.tls_level = tls_level if tls_cert else "none"
        self.domains = tuple(domains)
        self.hostname = hostname
        self.relayhost = relayhost
        self.smtp_tls_level = smtp_tls_level
        self.smtp_tls_ca_file = smtp_tls_ca_file
        self.config = dict(config or {})

        self.config_dir = self.root / "conf"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_file = self.root / "log" / "maillog"
        self.mail_dir = self.root / "mail"
        self.maildir = self.mail_dir / "maildir"

        # The Debian package creates the "postfix" user: check for the
        # program first, so that its absence names the package.
        self._program = require_program("postfix", POSTFIX_PACKAGE)
        self._owner = pwd.getpwnam("postfix")
        self._master_pid: int | None = None

    # Life cycle.

    def start(self, timeout: float = 15.0) -> PostfixInstance:
        """Write the configuration, start Postfix, wait for its smtpd."""
        if os.geteuid() != 0:
            raise PermissionError(
                "Postfix's master daemon must be started by root; these tests"
                " run Postfix only when run as root"
            )
        self._make_folders()
        self._write_config()

        result = self._postfix("start")
        if result.returncode != 0:
            raise RuntimeError(
                f"postfix -c {self.config_dir} start failed"
                f" (exit {result.returncode}): {result.stdout}\n"
                f"maillog:\n{self.log()}"
            )
        self._master_pid = self._read_master_pid()
        try:
            self._wait_for_smtpd(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Postfix and make sure none of its processes is left."""
        pid = self._master_pid or self._read_master_pid()
        if pid is None:
            return

        self._postfix("stop")

        # The master is the leader of its own process group, and every
        # daemon it runs is in that group.
        deadline = time.monotonic() + timeout
        while _group_members(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for member in _group_members(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        self._master_pid = None

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def master_pid(self) -> int | None:
        return self._master_pid

    # What it received and logged.

    def message_files(self, recipient: str | None = None) -> list[Path]:
        """Delivered message files, oldest first; only `recipient`'s if given."""
        files = [
            path
            for sub in ("new", "cur")
            if (self.maildir / sub).is_dir()
            for path in (self.maildir / sub).iterdir()
        ]
        files.sort(key=lambda path: (path.stat().st_mtime_ns, path.name))
        if recipient is None:
            return files
        wanted = f"Delivered-To: {recipient}\n".lower().encode()
        return [path for path in files if wanted in _top_lines(path).lower()]

    def messages(self, recipient: str | None = None) -> list[bytes]:
        """The bytes of every delivered message, as `message_files` lists them."""
        return [path.read_bytes() for path in self.message_files(recipient)]

    def wait_for_messages(
        self, n: int = 1, timeout: float = 10.0, recipient: str | None = None
    ) -> list[bytes]:
        """Wait until `n` messages have been delivered; return them all."""
        deadline = time.monotonic() + timeout
        while len(self.message_files(recipient)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Postfix delivered {len(self.message_files(recipient))}"
                    f" of {n} message(s) in {timeout}s; maillog:\n{self.log()}"
                )
            time.sleep(0.05)
        return self.messages(recipient)

    def log(self) -> str:
        """The maillog so far."""
        if not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")

    def tls_log(self) -> list[TLSLogEntry]:
        """The TLS handshakes logged so far, oldest first."""
        return parse_tls_log(self.log())

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for a log line matching the regular expression `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while (match := regex.search(self.log())) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no maillog line matched {pattern!r} in {timeout}s:\n{self.log()}"
                )
            time.sleep(0.05)
        return match

    # Setting up.

    def _make_folders(self) -> None:
        for folder in (
            self.root,
            self.config_dir,
            self.queue_dir,
            self.log_file.parent,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for folder in (self.data_dir, self.maildir):
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, self._owner.pw_uid, self._owner.pw_gid)
        os.chown(self.mail_dir, self._owner.pw_uid, self._owner.pw_gid)

        blocked = _first_unsearchable(self.root, self._owner)
        if blocked is not None:
            raise PermissionError(
                f"Postfix's user {self._owner.pw_name!r} cannot reach {self.root}:"
                f" {blocked} is mode {blocked.stat().st_mode & 0o777:o}; put the"
                " instance under a searchable folder, e.g. reachable_tmpdir()"
            )

    def _write_config(self) -> None:
        main = self._main_cf()
        main.update(self.config)
        text = "".join(f"{name} = {value}\n" for name, value in main.items())
        (self.config_dir / "main.cf").write_text(text)
        (self.config_dir / "master.cf").write_text(self._master_cf())

    def _main_cf(self) -> dict[str, str]:
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": self._owner.pw_name,
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            # Only 127.0.0.1 is on an interface; master.cf names the
            # address smtpd really listens on.
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.log_file.parent),
            # No NIS, no /etc/aliases, no DNS for client names.
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "smtpd_peername_lookup": "no",
            "biff": "no",
            # Do not add Date, Message-ID or rewrite headers of mail from
            # loopback clients: tests compare what arrives with what left.
            "local_header_rewrite_clients": "",
            "append_dot_mydomain": "no",
            "virtual_mailbox_domains": ", ".join(self.domains),
            "virtual_mailbox_base": str(self.mail_dir),
            "virtual_mailbox_maps": "static:maildir/",
            "virtual_uid_maps": f"static:{self._owner.pw_uid}",
            "virtual_gid_maps": f"static:{self._owner.pw_gid}",
            "virtual_minimum_uid": "1",
            "smtpd_tls_security_level": self.tls_level,
            "smtpd_tls_loglevel": "1",
            "smtp_tls_loglevel": "1",
            "smtpd_banner": "$myhostname ESMTP Postfix",
        }
        if self.tls_cert is not None and self.tls_key is not None:
            main["smtpd_tls_cert_file"] = str(self.tls_cert)
            main["smtpd_tls_key_file"] = str(self.tls_key)

        if self.relayhost is None:
            main["mynetworks"] = ""
            main["smtpd_relay_restrictions"] = "reject_unauth_destination"
            main["default_transport"] = "error:5.7.1 no outbound mail from this test"
        else:
            main["mynetworks"] = "127.0.0.0/8"
            main["smtpd_relay_restrictions"] = (
                "permit_mynetworks, reject_unauth_destination"
            )
            main["relayhost"] = self.relayhost
            main["default_transport"] = "smtp"
            main["smtp_tls_security_level"] = self.smtp_tls_level
            if self.smtp_tls_ca_file is not None:
                main["smtp_tls_CAfile"] = str(self.smtp_tls_ca_file)

        return main

    def _master_cf(self) -> str:
        # No chroot (column 5 "n"): the private queue holds no copy of the
        # files a chroot jail would need.
        services = [
            f"{self.address}:{self.port} inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "tlsproxy unix - - n - 0 tlsproxy",
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
            "virtual unix - n n - - virtual",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return "".join(line + "\n" for line in services)

    def _postfix(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self._program, "-c", str(self.config_dir), command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )

    def _read_master_pid(self) -> int | None:
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text()
        except FileNotFoundError:
            return None
        pid = int(text.strip() or 0)
        return pid if pid and _alive(pid) else None

    def _wait_for_smtpd(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.address, self.port), 1) as sock:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    if sock.recv(512).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Postfix smtpd on {self.address}:{self.port} gave no 220"
                    f" greeting in {timeout}s; maillog:\n{self.log()}"
                )
            time.sleep(0.05)


def _first_unsearchable(path: Path, user: pwd.struct_passwd) -> Path | None:
    for folder in (path, *path.parents):
        mode = folder.stat()
        if mode.st_uid == user.pw_uid:
            allowed = mode.st_mode & 0o100
        elif mode.st_gid == user.pw_gid:
            allowed = mode.st_mode & 0o010
        else:
            allowed = mode.st_mode & 0o001
        if not allowed:
            return folder
    return None


def _alive(pid: int) -> bool:
    # A zombie has exited: it only waits for init to reap it.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _group_members(pgid: int) -> list[int]:
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


def _top_lines(path: Path, size: int = 4096) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


# What Postfix puts on top of a delivered message, in this order.
_ADDED_HEADERS = (
    (b"return-path:", True),
    (b"x-original-to:", False),
    (b"delivered-to:", True),
    (b"received:", True),
)


def strip_postfix_headers(data: bytes) -> bytes:
    """Remove what Postfix put on top of a delivered message.

    That is exactly Return-Path, X-Original-To (if present), Delivered-To
    and the first Received header with its continuation lines.  Compare
    the result with `as_stored(original)`.  ValueError if they are not
    there in that order.
    """
    lines = data.splitlines(keepends=True)
    position = 0
    for name, required in _ADDED_HEADERS:
        if position < len(lines) and lines[position].lower().startswith(name):
            position += 1
            while position < len(lines) and lines[position][:1] in (b" ", b"\t"):
                position += 1
        elif required:
            found = lines[position][:60] if position < len(lines) else b"end"
            raise ValueError(f"expected a {name.decode()} header, found {found!r}")
    return b"".join(lines[position:])


def as_stored(original: bytes) -> bytes:
    """`original` as Postfix stores it in a Maildir: CRLF becomes LF."""
    return original.replace(b"\r\n", b"\n")


@dataclass(frozen=True, slots=True)
class SwaksResult:
    """What a swaks run printed, and its exit status (0: message accepted)."""

    returncode: int
    output: str

    @property
    def tls(self) -> tuple[str, str] | None:
        """(protocol, cipher) if swaks started TLS, else None."""
        match = re.search(r"=== TLS started with cipher ([^:\s]+):(\S+?):", self.output)
        return (match[1], match[2]) if match else None


def swaks(
    server: str,
    port: int,
    mail_from: str,
    to: str | Sequence[str],
    *,
    tls: bool = True,
    data: bytes | Path | None = None,
    body: str | None = None,
    tls_protocol: str | None = None,
    tls_cipher: str | None = None,
    ehlo: str = "swaks.test",
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> SwaksResult:
    """Send one message with swaks; return its output and exit status.

    `tls=True` demands STARTTLS (swaks fails if it is not offered or the
    handshake fails).  `data` is the whole message: bytes, sent so that
    exactly those bytes (with bare LFs turned into CRLF) arrive, or a file,
    to which swaks adds a final CRLF.  `body` instead sends swaks' own
    headers with that body.  `tls_protocol` is swaks' --tls-protocol
    ("tlsv1_2", "no_tlsv1_3"...), `tls_cipher` an OpenSSL cipher string.
    """
    program = require_program("swaks", SWAKS_PACKAGE)
    recipients = to if isinstance(to, str) else ",".join(to)
    args = [
        program,
        "--server", server,
        "--port", str(port),
        "--from", mail_from,
        "--to", recipients,
        "--helo", ehlo,
        "--timeout", str(int(timeout)),
    ]  # fmt: skip
    if tls:
        args.append("--tls")
    if tls_protocol is not None:
        args += ["--tls-protocol", tls_protocol]
    if tls_cipher is not None:
        args += ["--tls-cipher", tls_cipher]
    if body is not None:
        args += ["--body", body]

    with tempfile.TemporaryDirectory(prefix="swaks-") as scratch:
        if isinstance(data, bytes):
            # swaks ends the data with CRLF before the final dot whether or
            # not it already ends with one: take one line ending off.
            path = Path(scratch) / "message.eml"
            path.write_bytes(_without_final_newline(data))
            args += ["--data", str(path)]
        elif data is not None:
            args += ["--data", str(data)]
        args += list(extra_args)

        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout + 10,
            check=False,
        )
    return SwaksResult(result.returncode, result.stdout)


def _without_final_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data
