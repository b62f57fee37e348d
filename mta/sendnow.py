"""Writing to a plain TCP connection at once, when nothing waits before it.

Twisted's transports never send in `write`: they keep the bytes, ask the
reactor to watch the socket for room (an ``epoll_ctl`` call), send them
at the next turn of the reactor, and stop watching (another call).  For a
reply of a few dozen octets on a connection with an empty send buffer,
that is two system calls and a turn of the reactor for nothing: the
socket would have taken the bytes at once.  A relay session writes some
ten times per message, so this is a sizeable share of its cost.

`write_now` offers the bytes to the socket itself when the transport is a
plain TCP connection (no TLS layer: that has its own buffer and records)
holding nothing unsent, so the order of the bytes is kept; whatever the
socket does not take, and any error, goes to `transport.write` as before,
and Twisted's flow control and error handling take over from there.  It
reads three of the transport's attributes that Twisted documents in
`twisted.internet.abstract.FileDescriptor` but does not promise to keep
(``dataBuffer``, ``_tempDataBuffer``, ``TLS``); tests/test_sendnow.py checks
them against the installed Twisted.
"""

from __future__ import annotations

from typing import Any


def can_send_now(transport: Any) -> bool:
    """Whether ``transport`` is a plain TCP connection with nothing unsent:
    then bytes given to its socket now go out in order."""
    return (
        getattr(transport, "TLS", True) is False
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnected", True)
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    )


def write_now(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, sent at once when it can be (see above)."""
    if data and can_send_now(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # Else the connection is lost: the transport finds out itself.
    transport.write(data)
