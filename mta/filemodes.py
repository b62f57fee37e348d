"""Who may read the relay's secrets: the check of a file's mode at start.

The spool makes its own files private (folders 0700, files 0600: see
`mta.spool`), and so does `mta users` for the users file.  Files the
operator provides are only checked: a TLS private key or a users file that
group or others can read is worth a warning, not a refusal to start, since
taking mail matters more and the fix is one chmod.  The users file is
checked again at each reload, since it is the file most often edited.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

from mta.config import Config
from mta.logs import log_event


def readers(mode: int) -> str | None:
    """Who besides the owner may read a file of ``mode``: "group",
    "others", "group and others", or None."""
    group = bool(mode & stat.S_IRGRP)
    others = bool(mode & stat.S_IROTH)
    if group and others:
        return "group and others"
    if others:
        return "others"
    if group:
        return "group"
    return None


def private_key_warning(path: Path, mode: int, group: str) -> str | None:
    """The warning for a private key of ``mode`` owned by ``group``, or
    None when only its owner can read it."""
    return exposed_warning("tls: private key", "tls.private_key", path, mode,
                           group)


def users_file_warning(
    listener: str, path: Path, mode: int, group: str
) -> str | None:
    """The same for the users file of ``listener``: its hashes are what a
    guesser wants."""
    return exposed_warning("auth: users file", f"auth of listener {listener}",
                           path, mode, group)


def exposed_warning(
    what: str, key: str, path: Path, mode: int, group: str
) -> str | None:
    who = readers(mode)
    if who is None:
        return None
    if who == "group":
        who = f"group {group}"
    return (
        f"{what} {path} is readable by {who} "
        f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it ({key}; "
        "the relay runs with it anyway)"
    )


def check_private_key(path: Path) -> str | None:
    """`private_key_warning` for the file at ``path``.  A file this process
    cannot stat is no one's business here: loading the key already failed
    or succeeded on its own, and a folder we cannot search hides the key
    from others too."""
    status = _stat(path)
    if status is None:
        return None
    return private_key_warning(path, status.st_mode, _group_name(status.st_gid))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def warn_if_key_exposed(path: Path) -> None:
    """Log `check_private_key`'s warning, if any (one line, at warn)."""
    warning = check_private_key(path)
    if warning is not None:
        log_event("warn", warning, "tls", file=str(path))


def warn_if_users_exposed(config: Config) -> None:
    """One warning for each users file that others than its owner can
    read (a file named by two listeners is named once)."""
    seen: set[Path] = set()
    for listener in config.listeners:
        path = listener.auth
        if path is None or path in seen:
            continue
        seen.add(path)
        status = _stat(path)
        if status is None:
            continue
        warning = users_file_warning(listener.name, path, status.st_mode,
                                     _group_name(status.st_gid))
        if warning is not None:
            log_event("warn", warning, "auth", file=str(path))
