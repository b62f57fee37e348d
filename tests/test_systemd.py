"""The example systemd unit, etc/mta.service: with the key set up as the
README says (owned by the relay's user, mode 0600), the relay starts
under the unit's capability bounding set and reloads a renewed
certificate.

systemd is not PID 1 here, so the unit is not run by systemd: the test
reads its ``CapabilityBoundingSet=`` and ``NoNewPrivileges=`` and runs
``ExecStartPre`` (check-config) and ``ExecStart`` (twistd, started as
root, ``-u/-g`` to the user) under util-linux's ``setpriv`` with the same
bounding set: root keeps only those capabilities, as under systemd.
``nobody``/``nogroup`` stand for the unit's ``mta`` user.

Needs root (the CI runs as root).  The listener is 127.0.12.20:25, an
address no other test file uses.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509

from tests.peers import certs
from tests.relay import REPO, RelayProcess, base_config

UNIT = REPO / "etc" / "mta.service"
ADDRESS = "127.0.12.20"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="starting as root and dropping to a user needs root and setpriv",
)


def unit_settings() -> dict[str, str]:
    """``Key=value`` lines of the unit's [Service] section."""
    settings: dict[str, str] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def setpriv() -> tuple[str, ...]:
    """setpriv with the unit's bounding set (and no_new_privs if set)."""
    settings = unit_settings()
    names = settings["CapabilityBoundingSet"].split()
    bounding = ",".join(["-all", *(f"+{name.lower().removeprefix('cap_')}"
                                   for name in names)])
    command = ["setpriv", f"--bounding-set={bounding}"]
    if settings.get("NoNewPrivileges") == "yes":
        command.append("--no-new-privs")
    return tuple(command)


@pytest.fixture
def user() -> tuple[int, int]:
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


@pytest.fixture
def etc() -> Iterator[Path]:
    """A folder the user can reach (tmp_path's parents are root's alone),
    for the configuration, the certificate and the spool."""
    folder = Path(tempfile.mkdtemp(prefix="mta-systemd-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def key_pair(
    folder: Path, owner: tuple[int, int], mode: int = 0o600
) -> certs.CertFiles:
    files = certs.write_cert_files(certs.issue_server_cert("relay.test"),
                                   folder, stem="relay")
    for path in (files.chain, files.key):
        os.chown(path, *owner)
    files.key.chmod(mode)
    return files


def relay_under_the_unit(
    etc: Path, files: certs.CertFiles, user: tuple[int, int]
) -> RelayProcess:
    spool = etc / "spool"
    spool.mkdir(mode=0o700)
    os.chown(spool, *user)  # install -d -o mta -g mta -m 700 /var/spool/mta
    config = base_config(
        etc, files.chain, files.key, spool=str(spool),
        listeners=[{"name": "mx", "address": ADDRESS, "port": 25,
                    "role": "inbound"}],
    )
    uid, gid = user
    return RelayProcess(etc, config, ("-u", str(uid), "-g", str(gid)),
                        wrapper=setpriv())


def check_config(relay: RelayProcess) -> subprocess.CompletedProcess[str]:
    """The unit's ExecStartPre, as root under the bounding set."""
    relay.folder.mkdir(parents=True, exist_ok=True)
    relay.config_path.write_text(__import__("yaml").safe_dump(relay.config))
    return subprocess.run(
        [*setpriv(), sys.executable, "-m", "mta", "--config",
         str(relay.config_path), "check-config"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )


def served_serial(address: str) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(address, 25, timeout=10) as client:
        client.starttls(context=context)
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def leaf_serial(files: certs.CertFiles) -> int:
    return x509.load_pem_x509_certificates(files.chain.read_bytes())[0].serial_number


def reload(relay: RelayProcess) -> str:
    assert relay.process is not None
    before = relay.log().count("reload: ")
    os.kill(relay.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = [line for line in relay.log().splitlines()
                 if "reload: ok" in line or "reload: refused" in line]
        if len(lines) > before:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"no reload line:\n{relay.log()}")


def test_the_unit_bounds_root_to_what_the_relay_needs() -> None:
    # Reading a file of another user as root, without the right to
    # override every permission (CAP_DAC_OVERRIDE stays out).
    assert setpriv() == (
        "setpriv",
        "--bounding-set=-all,+net_bind_service,+setuid,+setgid,"
        "+dac_read_search",
        "--no-new-privs",
    )


@pytest.mark.parametrize("group_readable", [False, True],
                         ids=["user-0600", "root-group-0640"])
def test_a_key_the_user_can_read_works_at_start_and_at_reload(
    etc: Path, user: tuple[int, int], group_readable: bool
) -> None:
    # chown mta: key.pem; chmod 600 -- or chown root:mta; chmod 640
    owner, mode = ((0, user[1]), 0o640) if group_readable else (user, 0o600)
    files = key_pair(etc / "tls", owner, mode)
    (etc / "tls").chmod(0o755)
    relay = relay_under_the_unit(etc, files, user)

    checked = check_config(relay)
    assert (checked.returncode, checked.stdout) == (0, "ok\n"), checked

    relay.start()
    try:
        relay.wait_for_log("started: config=")
        assert served_serial(ADDRESS) == leaf_serial(files)

        # Renewed in place, as certbot's deploy hook would before
        # `systemctl reload mta`; the files stay the user's.
        renewed = key_pair(etc / "tls", owner, mode)
        assert "reload: ok" in reload(relay)
        assert served_serial(ADDRESS) == leaf_serial(renewed)
    finally:
        relay.stop()
    assert "Permission denied" not in relay.log()
    assert ("is readable by group nogroup" in relay.log()) == group_readable


def test_a_key_only_root_can_read_fails_at_reload(
    etc: Path, user: tuple[int, int]
) -> None:
    # What the README warns of: root reads it at the start, the relay
    # (already the user) cannot at a reload.
    files = key_pair(etc / "tls", (0, 0))
    (etc / "tls").chmod(0o755)
    relay = relay_under_the_unit(etc, files, user)
    assert check_config(relay).returncode == 0

    relay.start()
    try:
        relay.wait_for_log("started: config=")
        line = reload(relay)
    finally:
        relay.stop()

    assert "reload: refused" in line, line
    assert f"tls.private_key: cannot read {files.key}: Permission denied" in line
