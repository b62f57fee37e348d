"""Message bytes to SMTP DATA wire bytes, chunk by chunk.

The body is read from disk in chunks of whatever size suits the reader, and
a chunk boundary may fall anywhere: inside a CRLF, just before a line's
leading dot.  The encoder therefore carries two facts from one chunk to the
next: whether the next byte starts a line, and whether the last byte was a
CR whose LF may come first in the next chunk.

What goes out (RFC 5321 2.3.8 and 4.5.2):

- every line ends in exactly CRLF: a bare LF or a bare CR becomes CRLF, and
  a CRLF split across chunks stays one line end (never "\\r\\r\\n");
- every line that starts with "." gets one more, the body's first line and a
  line that starts a chunk included, so a "." line can never end the
  message early and leave the rest to be read as commands;
- `finish` returns the end-of-data marker, so that the wire form always
  ends in CRLF.CRLF.

Twisted's own client (`SMTPClient.transformChunk`) does all of this per
chunk with no memory, which is the fault this module exists to avoid.
"""

from __future__ import annotations

CR = b"\r"
LF = b"\n"
CRLF = b"\r\n"


class BodyEncoder:
    """Encode one message body; make a new encoder for each message."""

    __slots__ = ("_at_line_start", "_skip_lf")

    def __init__(self) -> None:
        # The body begins at a line start: its first line is stuffed too.
        self._at_line_start = True
        # The previous chunk ended in CR, already sent as CRLF; an LF that
        # opens the next chunk is the rest of that line end.
        self._skip_lf = False

    @property
    def at_line_start(self) -> bool:
        return self._at_line_start

    def encode(self, chunk: bytes) -> bytes:
        """The wire bytes for ``chunk``, given everything encoded before."""
        if not chunk:
            return b""
        if self._skip_lf and chunk[:1] == LF:
            chunk = chunk[1:]
        self._skip_lf = chunk[-1:] == CR
        if not chunk:
            return b""

        # Every line end as LF first, so that the three kinds of line end
        # are one kind, and CR never meets the LF of another line end.
        text = chunk.replace(CRLF, LF).replace(CR, LF)
        text = text.replace(b"\n.", b"\n..")
        if self._at_line_start and text[:1] == b".":
            text = b"." + text

        self._at_line_start = text[-1:] == LF
        return text.replace(LF, CRLF)

    def finish(self) -> bytes:
        """The end-of-data marker; a body that does not end at a line end
        gets one first, as SMTP cannot carry an unterminated last line."""
        if self._at_line_start:
            return b".\r\n"
        return b"\r\n.\r\n"


def encode_body(body: bytes) -> bytes:
    """The whole wire form of ``body``, terminator included."""
    encoder = BodyEncoder()
    return encoder.encode(body) + encoder.finish()
