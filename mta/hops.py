"""Counting a message's hops, to stop mail loops (RFC 5321 6.3).

Every relay adds a Received header; a message that carries more of them
than ``limits.hops`` is going round in circles, and is refused at the end of
DATA with 554 5.4.6 rather than sent round once more.  Only the header
section is looked at, kept up to a bound, and only until its blank line.
"""

from __future__ import annotations

import re

from mta.reply import Reply

# A header section larger than this is not read further for hops.
HEAD_LIMIT = 256 * 1024

_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def too_many_hops(count: int) -> Reply:
    return Reply(554, "5.4.6",
                 f"Too many hops: {count} Received headers; mail loop?")


class HopCounter:
    """Fed the message bytes as they are stored; `count` is the number of
    Received headers in the header section."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._done = False

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if self._head.startswith(b"\r\n"):
            end = 0
        if end >= 0:
            del self._head[end + 2 :]
            self._done = True
        elif len(self._head) >= HEAD_LIMIT:
            self._done = True

    @property
    def count(self) -> int:
        return len(_RECEIVED.findall(self._head))
