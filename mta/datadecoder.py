"""The DATA stream decoded: the bytes after 354 in, the message out.

Pure: no transport, no spool.  The listener feeds it each read and stores
what it gives back; see `DataDecoder` for the rules it keeps.
"""

from __future__ import annotations

from mta.relaycontrol import TOO_BIG
from mta.reply import Reply
from mta.serverreplies import BARE_NEWLINE_IN_DATA

_LINE_START, _DOT, _DOT_CR, _IN_LINE = range(4)
_CR, _LF, _PERIOD = 13, 10, 46


def _only_crlf(data: bytes) -> bool:
    """Every CR is followed by LF and every LF preceded by CR."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") == pairs and data.count(b"\n") == pairs


class DataDecoder:
    """Turns the bytes after 354 into the message, one read at a time.

    It removes the dot-stuffing (RFC 5321 4.5.2) and finds the end, which is
    CRLF.CRLF and nothing else (the CRLF of the DATA command counts as the
    first).  It keeps only the state it needs across reads: where in a line
    it is, and whether the last byte was a CR; never a whole line.

    Lines of any length are taken and kept as they came, even past the 998
    octets of RFC 5322: we relay them unchanged, as Postfix does, rather than
    fold or refuse mail the sender's own server accepted.  A bare CR or LF
    anywhere, or a size past ``limit``, marks the message failed: from then
    on nothing is given back to store, but the stream is still read to its
    end, so the failure is answered in its place, after CRLF.CRLF.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0  # message bytes after unstuffing
        self.failure: Reply | None = None
        self._state = _LINE_START
        self._after_cr = False  # in a line, and the last byte was CR

    def fail(self, reply: Reply) -> None:
        if self.failure is None:
            self.failure = reply

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """The bytes to store, and what follows CRLF.CRLF (None while the
        message goes on)."""
        pieces: list[bytes] = []
        position = 0
        while position < len(data):
            byte = data[position]
            if self._state == _LINE_START and byte == _PERIOD:
                self._state = _DOT  # the dot itself is never stored
                position += 1
            elif self._state == _DOT and byte == _CR:
                self._state = _DOT_CR
                position += 1
            elif self._state == _DOT_CR and byte == _LF:
                self._state = _LINE_START
                return self._store(pieces), data[position + 1 :]
            else:
                if self._state == _DOT_CR:
                    self.fail(BARE_NEWLINE_IN_DATA)  # ".", CR, not LF
                self._state = _IN_LINE
                position = self._in_line(data, position, pieces)
        return self._store(pieces), None

    def _in_line(self, data: bytes, position: int, pieces: list[bytes]) -> int:
        """Take bytes up to the next line that starts with a dot (which
        needs a look), or to the end of the read; return where it stopped."""
        if self._after_cr:
            self._after_cr = False
            if data[position] == _LF:  # the CR ended the previous read
                pieces.append(b"\n")
                self._state = _LINE_START
                return position + 1
            self.fail(BARE_NEWLINE_IN_DATA)

        found = data.find(b"\r\n.", position)
        stop = len(data) if found < 0 else found + 2
        span = data[position:stop]
        if span.endswith(b"\r\n"):
            self._state = _LINE_START
        elif span.endswith(b"\r"):
            self._after_cr = True  # its LF may come in the next read
            span = span[:-1]
            pieces.append(span)
            pieces.append(b"\r")
            if not _only_crlf(span):
                self.fail(BARE_NEWLINE_IN_DATA)
            return stop
        if not _only_crlf(span):
            self.fail(BARE_NEWLINE_IN_DATA)
        pieces.append(span)
        return stop

    def _store(self, pieces: list[bytes]) -> bytes:
        if self.failure is not None:
            return b""
        stored = b"".join(pieces)
        self.size += len(stored)
        if self.size > self.limit:
            self.fail(TOO_BIG)
            return b""
        return stored
