"""``mta users ...``: the users file of authenticated submission.

    mta users list
    mta users add NAME [--password-stdin]
    mta users passwd NAME [--password-stdin]
    mta users remove NAME

The file is the ``auth:`` of the configuration's listeners (``--file``
names another, or picks one when listeners name several).  A password is
asked for twice on the terminal, or read as the first line of standard
input with ``--password-stdin``; never from the command line, where every
user of the machine could read it in the process list.  The relay reads
the file again at its next reload (SIGHUP).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from mta.config import Config
from mta.passwords import PasswordHash, hash_password
from mta.users import UsersFileError, check_name, read_hashes, update_users

# RFC 4616 2: PLAIN carries at most 255 octets of password.
MAX_PASSWORD = 255


class UsersCommandError(Exception):
    """What to print on standard error before exiting 1."""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    users = commands.add_parser(
        "users", parents=parents, help="the users of authenticated submission"
    )
    users_commands = users.add_subparsers(dest="users_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--file", type=Path, default=None, metavar="USERS_FILE",
        help="the users file (default: the auth: of the configuration's "
        "listeners)",
    )
    password = argparse.ArgumentParser(add_help=False)
    password.add_argument(
        "--password-stdin", action="store_true",
        help="read the password from the first line of standard input "
        "instead of asking on the terminal",
    )
    everyone = [*parents, common]
    users_commands.add_parser("list", parents=everyone, help="list user names")
    for name, text in (("add", "add a user"),
                       ("passwd", "change a user's password"),
                       ("remove", "remove a user")):
        command = users_commands.add_parser(
            name, parents=everyone + ([password] if name != "remove" else []),
            help=text,
        )
        command.add_argument("name", help="the user name (as given to AUTH)")


def run(config: Config, args: argparse.Namespace) -> int:
    path: Path | str = "users file"
    try:
        path = users_file(config, args.file)
        if args.users_command == "list":
            return list_users(path)
        name = check_user_name(args.name)
        # Checked before the password is asked for, and again under the lock.
        _check_before(args.users_command, name, path)
        if args.users_command == "remove":
            update_users(path, lambda hashes: _remove(hashes, name, path))
            print(f"{name}: removed from {path}; {RELOAD_HINT}")
            return 0
        hashed = hash_password(_password(args.password_stdin, name))
        if args.users_command == "add":
            update_users(path, lambda hashes: _add(hashes, name, hashed, path))
            print(f"{name}: added to {path}; {RELOAD_HINT}")
        else:
            update_users(path, lambda hashes: _change(hashes, name, hashed, path))
            print(f"{name}: password changed in {path}; {RELOAD_HINT}")
        return 0
    except UsersFileError as error:
        unchanged = "" if args.users_command == "list" else "; nothing changed"
        for problem in error.problems:
            print(f"mta: {problem}{unchanged}", file=sys.stderr)
    except UsersCommandError as error:
        print(f"mta: {error}", file=sys.stderr)
    except OSError as error:
        print(f"mta: {error.filename or path}: {error.strerror}; nothing "
              "changed", file=sys.stderr)
    return 1


RELOAD_HINT = "reload the relay (SIGHUP) to apply"


def users_file(config: Config, given: Path | None) -> Path:
    """``--file``, else the one users file the listeners name."""
    if given is not None:
        return given.resolve()
    paths = sorted({listener.auth for listener in config.listeners
                    if listener.auth is not None})
    if not paths:
        raise UsersCommandError(
            f"{config.path}: no listener has auth: set; add `auth: "
            "users.yaml` to an outbound listener, or give the file with --file"
        )
    if len(paths) > 1:
        names = ", ".join(str(path) for path in paths)
        raise UsersCommandError(
            f"{config.path}: the listeners name {len(paths)} users files "
            f"({names}); say which with --file"
        )
    return paths[0]


def check_user_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as error:
        raise UsersCommandError(f"{name!r}: {error}") from None


def _check_before(command: str, name: str, path: Path) -> None:
    hashes = read_hashes(path, missing_ok=True)
    check = {"add": _add, "passwd": _change}.get(command)
    if check is not None:
        check(dict(hashes), name, _NO_HASH, path)
    else:
        _remove(dict(hashes), name, path)


# Stands in for the hash in the check before the password is asked for.
_NO_HASH: Any = None


def list_users(path: Path) -> int:
    for name, stored in sorted(read_hashes(path, missing_ok=True).items()):
        print(f"{name}  scrypt {stored.parameters}")
    return 0


def _add(hashes: dict[str, PasswordHash], name: str, hashed: PasswordHash,
         path: Path) -> None:
    if name in hashes:
        raise UsersCommandError(f"{name}: already in {path}; use `mta users "
                                "passwd` to change the password")
    hashes[name] = hashed


def _change(hashes: dict[str, PasswordHash], name: str, hashed: PasswordHash,
            path: Path) -> None:
    if name not in hashes:
        raise UsersCommandError(f"{name}: no such user in {path}; use `mta "
                                "users add`")
    hashes[name] = hashed


def _remove(hashes: dict[str, PasswordHash], name: str, path: Path) -> None:
    if name not in hashes:
        raise UsersCommandError(f"{name}: no such user in {path}")
    del hashes[name]


def _password(from_stdin: bool, name: str) -> bytes:
    if from_stdin:
        password = sys.stdin.buffer.readline().rstrip(b"\r\n")
    else:
        first = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != first:
            raise UsersCommandError("the passwords differ; nothing changed")
        password = first.encode("utf-8")
    if not password:
        raise UsersCommandError("an empty password is not allowed; nothing "
                                "changed")
    if len(password) > MAX_PASSWORD:
        raise UsersCommandError(f"a password is at most {MAX_PASSWORD} bytes "
                                "(SASL PLAIN carries no more); nothing changed")
    if b"\x00" in password:
        raise UsersCommandError("a password cannot hold a NUL byte; nothing "
                                "changed")
    return password
