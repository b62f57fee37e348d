"""Privileges and files (issue 5, item 6).

- Port 25 is bound as root, then ``twistd -u UID -g GID`` drops to an
  unprivileged user: the real relay runs as ``nobody``/``nogroup`` (its
  /proc status says so), takes a message on 127.0.10.1:25, and every spool
  file and folder belongs to that user, files 0600 and folders 0700.  These
  need root (the CI runs as root); elsewhere they skip.
- A spool the user cannot write stops the relay, naming the uid.
- The spool is private whatever the umask.
- A private key that group or others can read gives one warning line at
  start, naming the file and its mode.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from mta.envelope import Client, Envelope, Recipient
from mta.filemodes import private_key_warning, readers
from mta.spool import Spool
from tests.peers import certs
from tests.relay import RelayProcess, base_config

ADDRESS = "127.0.10.1"  # this module's loopback address
NOWHERE = "127.0.10.2:2526"  # where example.test's mail goes: nothing listens

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="binding port 25 and switching users need root (the CI runs as root)",
)


# --- an unprivileged relay --------------------------------------------------


@pytest.fixture
def nobody() -> tuple[int, int]:
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


@pytest.fixture
def spool_folder() -> Iterator[Path]:
    """A folder the unprivileged user can reach (tmp_path's parents are
    root's alone), for the spool."""
    folder = Path(tempfile.mkdtemp(prefix="mta-privileges-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def relay_as(
    user: tuple[int, int], folder: Path, spool: Path, cert: certs.CertFiles
) -> RelayProcess:
    uid, gid = user
    config = base_config(
        folder, cert.chain, cert.key,
        spool=str(spool),
        listeners=[{"name": "mx", "address": ADDRESS, "port": 25,
                    "role": "inbound"}],
        domains={"example.test": {"relay_to": [NOWHERE]}},
    )
    return RelayProcess(folder, config, ("-u", str(uid), "-g", str(gid)))


def process_ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/PID/status."""
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, values = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(value) for value in values.split()]
    return ids


def assert_private(path: Path, user: tuple[int, int], mode: int) -> None:
    status = path.stat()
    assert (status.st_uid, status.st_gid) == user, path
    assert stat.S_IMODE(status.st_mode) == mode, f"{path}: {status.st_mode:o}"


@needs_root
def test_binds_port_25_then_runs_and_spools_as_the_user(
    tmp_path: Path,
    spool_folder: Path,
    relay_cert: certs.CertFiles,
    nobody: tuple[int, int],
) -> None:
    spool = spool_folder / "spool"
    spool.mkdir(mode=0o700)
    os.chown(spool, *nobody)  # install -d -o nobody -g nogroup -m 700
    relay = relay_as(nobody, tmp_path, spool, relay_cert).start()
    try:
        # Port 25 answers before the switch: "started" is logged after it.
        relay.wait_for_log("started: config=")
        assert relay.process is not None
        ids = process_ids(relay.process.pid)
        assert ids["Uid"] == [nobody[0]] * 4  # real, effective, saved, fs
        assert ids["Gid"] == [nobody[1]] * 4
        assert 0 not in ids["Groups"]

        queue_id = relay.submit("alice@example.org", ["bob@example.test"],
                                b"Subject: hello\r\n\r\nHi.\r\n", listener="mx")
        # The queue runner has rewritten the envelope since (as the user).
        relay.wait_for_log(f"{queue_id}: to=<bob@example.test>")
    finally:
        relay.stop()

    for folder in ("tmp", "queue", "corrupt"):
        assert_private(spool / folder, nobody, 0o700)
    files = list((spool / "queue").iterdir())
    assert sorted(path.name for path in files) == [f"{queue_id}.env",
                                                   f"{queue_id}.msg"]
    for path in files:
        assert_private(path, nobody, 0o600)
    assert "tls: private key" not in relay.log()  # relay_cert's key is 0600


@needs_root
def test_a_spool_the_user_cannot_write_stops_the_relay(
    tmp_path: Path,
    spool_folder: Path,
    relay_cert: certs.CertFiles,
    nobody: tuple[int, int],
) -> None:
    spool = spool_folder / "spool"
    spool.mkdir(mode=0o700)  # root's, as an operator forgot to chown it
    relay = relay_as(nobody, tmp_path, spool, relay_cert)

    # Port 25 is bound before the switch, so whether the port answers before
    # the process exits is a race: only the exit is asserted.
    with contextlib.suppress(AssertionError):
        relay.start()
    assert relay.process is not None
    assert relay.process.wait(timeout=20) == 1
    assert (f"spool: cannot use {spool} as uid {nobody[0]}: Permission denied"
            in relay.log())


# --- the spool's modes ------------------------------------------------------


def test_spool_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    previous = os.umask(0)
    try:
        spool.create()
        writer = spool.new_message()
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        envelope = Envelope(
            queue_id=writer.queue_id, sender="a@example.org", arrival=0.0,
            size=writer.size,
            client=Client("client.test", "unknown", "127.0.0.1", "mx"),
            recipients=(Recipient("b@example.test"),),
        )
        writer.commit(envelope)
        spool.save(envelope)  # an envelope rewrite, as after an attempt
    finally:
        os.umask(previous)

    for folder in (spool.root, spool.tmp, spool.queue, spool.corrupt):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for path in (spool.message_path(writer.queue_id),
                 spool.envelope_path(writer.queue_id)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# --- the private key --------------------------------------------------------


@pytest.mark.parametrize("mode, expected", [
    (0o600, None),
    (0o400, None),
    (0o700, None),
    (0o640, "group"),
    (0o604, "others"),
    (0o644, "group and others"),
    (0o666, "group and others"),
])  # fmt: skip
def test_who_else_may_read(mode: int, expected: str | None) -> None:
    assert readers(stat.S_IFREG | mode) == expected


def test_the_warning_names_file_group_and_mode() -> None:
    key = Path("/etc/mta/key.pem")

    assert private_key_warning(key, stat.S_IFREG | 0o600, "ssl-cert") is None
    assert private_key_warning(key, stat.S_IFREG | 0o640, "ssl-cert") == (
        "tls: private key /etc/mta/key.pem is readable by group ssl-cert "
        "(mode 0640); chmod 600 it (tls.private_key; the relay runs with it "
        "anyway)"
    )
    assert "readable by others (mode 0604)" in str(
        private_key_warning(key, stat.S_IFREG | 0o604, "root"))


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_a_key_others_can_read_is_warned_about_at_start(
    tmp_path: Path, relay_cert: certs.CertFiles, mode: int
) -> None:
    relay_cert.key.chmod(mode)
    relay = RelayProcess(
        tmp_path, base_config(tmp_path, relay_cert.chain, relay_cert.key)
    ).start()
    try:
        started = relay.wait_for_log("started: config=")
    finally:
        relay.stop()

    warnings = [line for line in relay.log().splitlines()
                if "tls: private key" in line]
    if mode == 0o600:
        assert warnings == [], started
    else:
        (line,) = warnings
        assert "[mta#warn]" in line
        assert (f"tls: private key {relay_cert.key} is readable by group and "
                "others (mode 0644)") in line
