"""The users file of authenticated submission: user names and their
password hashes (`mta.passwords`), named by a listener's ``auth:`` key.

    # Users of authenticated submission (SMTP AUTH), written by `mta users`.
    users:
      alice@example.com: $scrypt$ln=15,r=8,p=1$SALT$HASH

It is read with the configuration (at start, by ``check-config`` and at
each reload), so a problem in it is a configuration problem naming this
file, the key and what is wrong; a hash is never shown, since what stands
there may be a password typed by hand.  `mta users` rewrites it whole
(`update_users`): a temporary file of mode 0600, fsync, rename, folder
fsync, under a lock on the folder, so two commands never lose each other's
change and the relay never reads half a file.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from mta.configfiles import read_regular_text
from mta.configreader import Reader, load_yaml, yaml_problem
from mta.passwords import DEFAULT_PARAMETERS, PasswordHash, decoy, parse_hash

# An address or a plain login: what people type, and safe in a log line.
_NAME = re.compile(r"^[A-Za-z0-9._%+@-]{1,255}$")

HEADER = (
    "# Users of authenticated submission (SMTP AUTH), written by `mta users`.\n"
    "# Passwords are kept as salted scrypt hashes.  After a change, reload\n"
    "# the relay (SIGHUP) for it to take effect.\n"
)


class UsersFileError(Exception):
    """The users file cannot be used; `problems` lists every reason, each
    starting with the file's path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class Users:
    path: Path
    hashes: Mapping[str, PasswordHash]
    # Checked for a name that is not here, with the parameters of the
    # others: the same work, so timing does not tell who exists.
    decoy: PasswordHash = field(compare=False, repr=False)

    def lookup(self, name: str) -> tuple[PasswordHash, bool]:
        """The hash to check ``name``'s password against, and whether the
        name exists (the decoy otherwise)."""
        stored = self.hashes.get(name)
        return (stored, True) if stored is not None else (self.decoy, False)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            "a user name is 1 to 255 letters, digits and . _ % + @ - "
            "(an address or a login name)"
        )
    return name


def make_users(path: Path, hashes: Mapping[str, PasswordHash]) -> Users:
    parameters = next(iter(hashes.values())).parameters if hashes else None
    return Users(
        path=path,
        hashes=MappingProxyType(dict(hashes)),
        decoy=decoy(parameters or DEFAULT_PARAMETERS),
    )


def load_users(path: Path) -> Users:
    """Read and check the file; `UsersFileError` with every problem."""
    return make_users(path, read_hashes(path, missing_ok=False))


def read_hashes(path: Path, missing_ok: bool) -> dict[str, PasswordHash]:
    try:
        # Never blocks: a FIFO or a device is refused, not waited on.
        text = read_regular_text(path)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise UsersFileError([f"{path}: cannot read: no such file; create it "
                              "with `mta users add NAME`"]) from None
    except OSError as error:
        raise UsersFileError([f"{path}: cannot read: {error.strerror}"]) from None
    except UnicodeDecodeError:
        raise UsersFileError([f"{path}: is not UTF-8 text"]) from None
    try:
        raw, duplicates = load_yaml(text, path)
    except yaml.YAMLError as error:
        raise UsersFileError([f"{path}: {yaml_problem(error)}"]) from None
    reader = Reader(path)
    for key, what in duplicates:
        reader.problem(key, what)
    hashes = _parse(reader, raw)
    if reader.problems:
        raise UsersFileError(reader.problems)
    return hashes


def _parse(reader: Reader, raw: Any) -> dict[str, PasswordHash]:
    top = reader.mapping(raw, "", ("users",))
    entries = top.get("users")
    if raw is None or entries is None:
        return {}
    if not isinstance(entries, dict):
        reader.problem("users", "expected a mapping of user name: hash", entries)
        return {}
    hashes = {}
    for name, text in entries.items():
        key = f"users.{name}"
        try:
            check_name(str(name))
            hashes[str(name)] = parse_hash(text)
        except ValueError as error:
            # No value shown: it may be a password (see parse_hash).
            reader.problem(key, str(error))
    return hashes


def users_text(hashes: Mapping[str, PasswordHash]) -> str:
    body = {"users": {name: str(hashes[name]) for name in sorted(hashes)}}
    return HEADER + str(yaml.safe_dump(body, default_flow_style=False))


# --- changing the file ----------------------------------------------------


def update_users(
    path: Path, change: Callable[[dict[str, PasswordHash]], None]
) -> None:
    """Read the file (none yet: no users), let ``change`` edit the names
    and hashes in place, and write the result durably.  The folder is
    locked meanwhile; ``change`` may raise to leave the file as it was."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        hashes = read_hashes(path, missing_ok=True)
        change(hashes)
        _write_atomically(path, users_text(hashes).encode("utf-8"), folder)
    finally:
        os.close(folder)


def _write_atomically(path: Path, data: bytes, folder: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # The umask may take bits away, never add them; be exact anyway.
        os.fchmod(descriptor, 0o600)
        _keep_owner(path, descriptor)
        with os.fdopen(descriptor, "wb", closefd=False) as stream:
            stream.write(data)
            stream.flush()
            os.fsync(descriptor)
        os.rename(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    finally:
        os.close(descriptor)
    os.fsync(folder)


def _keep_owner(path: Path, descriptor: int) -> None:
    """Root rewriting the relay's users file must leave it to the relay's
    user (``twistd -u``), who reads it again at each reload."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return
    if (status.st_uid, status.st_gid) != (os.getuid(), os.getgid()):
        os.fchown(descriptor, status.st_uid, status.st_gid)
