"""Reading the files a configuration names (certificate, key, trust
bundle, users file, recipient lists) without ever blocking.

Opening a FIFO for reading waits for a writer, and reading a device may
never end: a FIFO put where a certificate belongs would hang
``check-config``, the start and, worse, a reload, in a thread, for good.
So a file is looked at first (`os.stat`: it follows symbolic links, as
certbot's ``live/`` folder needs, and never blocks), refused unless it is a
regular file, and only then opened, with ``O_NONBLOCK`` so that a FIFO
swapped in meanwhile is not waited for either; what was opened is checked
again before a byte is read.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotARegularFile(OSError):
    """The path names a FIFO, a device, a socket or a folder.  Its
    ``strerror`` says which, in words that follow "cannot read PATH: "."""


def _kind(mode: int) -> str | None:
    """What a file that is not a regular one is, in words; None for a
    regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "not a regular file but a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "not a regular file but a character device"
    if stat.S_ISBLK(mode):
        return "not a regular file but a block device"
    if stat.S_ISSOCK(mode):
        return "not a regular file but a socket"
    return "not a regular file"


def _refuse(path: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        # The words the operating system uses, as reading one gives.
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR),
                                str(path))
    kind = _kind(mode)
    if kind is not None:
        raise NotARegularFile(errno.EINVAL, kind, str(path))


def check_regular(path: Path) -> None:
    """`OSError` unless ``path`` is (or links to) a regular file: missing,
    unreadable folder, a FIFO, a device, a socket or a folder.  Never
    opens it."""
    _refuse(path, os.stat(path).st_mode)


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file at ``path`` (symbolic links followed);
    `OSError` otherwise, `NotARegularFile` or `IsADirectoryError` for what
    is not one.  Never blocks on a FIFO or a device."""
    check_regular(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(path, flags)
    try:
        _refuse(path, os.fstat(descriptor).st_mode)  # swapped meanwhile?
        chunks: list[bytes] = []
        while True:
            chunk = os.read(descriptor, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(descriptor)


def read_regular_text(path: Path) -> str:
    """`read_regular` as UTF-8 text; `UnicodeDecodeError` when it is not."""
    return read_regular(path).decode("utf-8")
