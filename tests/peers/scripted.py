"""A server that says what a test scripts, on the test reactor, for what
aiosmtpd cannot be made to do: bytes after a 220 to STARTTLS, a reply of
several lines in one write, silence, and the DATA stream recorded raw.

A `Script` gives the replies by verb, before TLS and inside it; a reply of
several lines goes out in one write.  STARTTLS starts TLS after a 220.  The
body of each DATA is recorded as the bytes that came (dot-stuffing, line
ends and the final ".\\r\\n" as sent) up to the first CRLF.CRLF that ends a
read, and what follows that is read as commands again, as any server would:
a client that ended its data early shows its smuggled lines in `log`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import protocol, task
from twisted.internet.interfaces import IListeningPort
from twisted.protocols.basic import LineReceiver

from mta.tlsctx import ServerCreator

DEFAULT_REPLIES = {
    "MAIL": b"250 ok",
    "RCPT": b"250 ok",
    "DATA": b"354 go on",
    "QUIT": b"221 bye",
}


@dataclass
class Script:
    """Replies by verb; the end of data is answered with `end_of_data`,
    or never when it is None."""

    plain: dict[str, bytes]
    tls: dict[str, bytes] = field(default_factory=dict)
    creator: ServerCreator | None = None
    end_of_data: bytes | None = b"250 2.0.0 stored"
    log: list[str] = field(default_factory=list)  # "plain: EHLO x", "tls: ..."
    bodies: list[bytes] = field(default_factory=list)
    closed: int = 0  # connections over: `log` holds all they sent


class ScriptedServer(LineReceiver):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.tls = False

    def connectionMade(self) -> None:
        self.sendLine(b"220 fake.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        command = line.decode(errors="replace")
        self.script.log.append(("tls: " if self.tls else "plain: ") + command)
        verb = command.split(" ")[0].upper()
        table = self.script.tls if self.tls else self.script.plain
        reply = table.get(verb, DEFAULT_REPLIES.get(verb, b"502 5.5.1 no"))
        self.transport.write(reply + b"\r\n")

        if verb == "STARTTLS" and reply.startswith(b"220"):
            assert self.script.creator is not None
            self.transport.startTLS(self.script.creator)  # type: ignore[attr-defined]
            self.tls = True
        elif verb == "DATA" and reply.startswith(b"354"):
            self.script.bodies.append(b"")
            self.setRawMode()
        elif verb == "QUIT":
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.script.closed += 1

    def rawDataReceived(self, data: bytes) -> None:
        self.script.bodies[-1] += data
        if self.script.bodies[-1].endswith(b"\r\n.\r\n"):
            self.setLineMode()
            if self.script.end_of_data is not None:
                self.sendLine(self.script.end_of_data)


async def closed(reactor: Any, script: Script, timeout: float = 5.0) -> None:
    """Wait, without blocking the reactor, until a connection is over:
    a client need not wait for the reply to its QUIT."""
    waited = 0.0
    while not script.closed:
        assert waited < timeout, f"the client did not close: {script.log}"
        await task.deferLater(reactor, 0.01)
        waited += 0.01


def listen(reactor: Any, script: Script) -> IListeningPort:
    """Serve ``script`` on 127.0.0.1, a port of the kernel's choice."""
    factory = protocol.Factory.forProtocol(lambda: ScriptedServer(script))
    return reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[no-any-return]
