"""The message body on its way out: a Twisted pull producer that reads the
message from its queue file (its first ``size`` octets: the envelope comes
after them) and writes it through `BodyEncoder` (dot-stuffing, CRLF line
ends), the end-of-data marker with the last bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from mta.bodyencoder import BodyEncoder
from mta.sendnow import write_now

CHUNK_SIZE = 64 * 1024


@implementer(IPullProducer)
class BodyProducer:
    """Reads the body file in chunks as the transport asks for more, so a
    large message takes two chunks of memory; writes the terminator with
    the last body bytes, so Nagle never holds it back on its own."""

    def __init__(
        self,
        body: BinaryIO,
        size: int,
        transport: Any,
        sent: Callable[[], None],
        failed: Callable[[OSError], None],
        progress: Callable[[], None],
    ) -> None:
        self._body = body
        self._left = size  # octets of the message not read yet
        self._transport = transport
        self._sent = sent
        self._failed = failed
        self._progress = progress
        self._encoder = BodyEncoder()
        self._next: bytes | None = None
        self._stopped = False
        self._registered = False

    def start(self) -> None:
        """Send the body: at once when it fits one chunk (most mail), else
        as the transport asks for it, a chunk at a time."""
        if self._left > CHUNK_SIZE:
            self._registered = True
            self._transport.registerProducer(self, False)
            return
        # One read, one write: no producer to register and unregister.
        self.resumeProducing()

    def resumeProducing(self) -> None:
        if self._stopped:
            return  # never a terminator after a body cut short
        try:
            chunk = self._next if self._next is not None else self._read()
            self._next = self._read()
        except OSError as error:
            self._stop()
            self._failed(error)
            return

        data = self._encoder.encode(chunk)
        if self._next:
            # Through Twisted's buffer: its draining is what asks a pull
            # producer for the next chunk.
            self._transport.write(data)
            self._progress()
            return
        data += self._encoder.finish()
        if self._registered:
            self._transport.write(data)
        else:
            write_now(self._transport, data)
        self._stop()
        self._sent()

    def _read(self) -> bytes:
        if self._left <= 0:
            return b""
        chunk = self._body.read(min(CHUNK_SIZE, self._left))
        if not chunk:
            # Never a terminator after a body cut short: the file is
            # shorter than its envelope says.
            raise OSError(f"the message file ends {self._left} octets early")
        self._left -= len(chunk)
        return chunk

    def _stop(self) -> None:
        self._stopped = True
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()
        self._body.close()

    def stopProducing(self) -> None:
        self._stopped = True
        self._body.close()
