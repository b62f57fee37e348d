"""The listener under test, shared by tests/test_smtpserver.py (the state
machine) and tests/test_hostile_clients.py (what hostile clients try).

In memory: a `Server` is a `RelayServerFactory` over a real spool (in
``tmp_path``), a fake clock and a fake TLS creator; each `Session` talks to
one `RelayServer` over a `StringTransport`, and ``send`` returns the reply
lines the server wrote for that input.  The commit runs at once unless a
test holds it with a `Deferred` of its own.

On loopback: `Listening` is the same factory on 127.0.0.1 with real TLS.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.config import Config, load_config
from mta.envelope import Envelope
from mta.smtpserver import RefusedConnection, RelayServer, RelayServerFactory
from mta.spool import MessageWriter, Spool
from mta.tlsctx import ServerCreator, server_context
from tests.peers import certs

HOSTNAME = "relay.test"
LIMIT = 2 * 1024 * 1024  # limits.message_size in these tests

CONFIG = """
hostname: relay.test
spool: spool
tls: {{certificate: {certificate}, private_key: {key}}}
listeners:
  - {{name: mx, address: 127.0.0.1, port: 2525, role: inbound}}
  - {{name: submission, address: 127.0.0.1, port: 2587, role: outbound,
     require_tls: true, networks: [192.0.2.0/24]}}
  - {{name: internal, address: 127.0.0.1, port: 2588, role: outbound,
     networks: [192.0.2.0/24, 127.0.0.0/8]}}
limits: {{message_size: {limit}, recipients: 3, idle_timeout: 60s}}
domains:
  example.com: {{relay_to: ["mail.example.com"]}}
"""


def write_config(folder: Path, files: certs.CertFiles | None = None) -> Config:
    path = folder / "mta.yaml"
    path.write_text(
        CONFIG.format(
            certificate=files.chain if files else "none.crt",
            key=files.key if files else "none.key",
            limit=LIMIT,
        )
    )
    return load_config(path, check_tls=files is not None)


# --- in memory -------------------------------------------------------------


class FakeHandle:
    """What `getHandle()` gives after a TLS handshake."""

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_128_GCM_SHA256"

    def get_cipher_bits(self) -> int:
        return 128


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A `StringTransport` that records `startTLS` instead of doing it."""

    def __init__(self, peer: str) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", peer, 40000))
        self.tls_creator: object = None

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_creator = contextFactory

    def getHandle(self) -> FakeHandle:
        return FakeHandle()


def commit_at_once(writer: MessageWriter, envelope: Envelope) -> defer.Deferred[None]:
    return defer.maybeDeferred(writer.commit, envelope)


class HeldCommits:
    """Commits that wait for `finish` (`Server.hold_commits`): what a
    session does while its message is being committed."""

    def __init__(self) -> None:
        self.held: list[tuple[MessageWriter, Envelope]] = []
        self.pending: defer.Deferred[None] = defer.Deferred()

    def __call__(self, writer: MessageWriter, envelope: Envelope) -> defer.Deferred[None]:
        self.held.append((writer, envelope))
        return self.pending

    def finish(self) -> Envelope:
        """Commit every held message; the envelope of the first."""
        for writer, envelope in self.held:
            writer.commit(envelope)
        self.pending.callback(None)
        return self.held[0][1]


class Server:
    """A factory over a real spool, a fake clock and a fake TLS creator."""

    def __init__(self, folder: Path) -> None:
        self.config = write_config(folder)
        self.spool = Spool(folder / "spool")
        self.spool.create()
        self.clock = task.Clock()
        self.queued: list[Envelope] = []
        self.creator = object()
        self.factory = RelayServerFactory(
            "mx",
            lambda: self.config,
            self.spool,
            lambda: self.creator,  # type: ignore[arg-type,return-value]
            lambda envelope, lock: self.queued.append(envelope),
            reactor=self.clock,
        )
        self.factory.commit = commit_at_once

    def connect(self, listener: str = "mx", peer: str = "192.0.2.1") -> Session:
        self.factory.listener_name = listener
        return Session(self.factory, peer)

    def refused(self, listener: str = "mx", peer: str = "192.0.2.1") -> list[str]:
        """What a connection over a limit is told; it must be refused."""
        self.factory.listener_name = listener
        transport = TLSStringTransport(peer)
        protocol = self.factory.buildProtocol(transport.getPeer())
        assert isinstance(protocol, RefusedConnection), protocol
        protocol.makeConnection(transport)
        assert transport.disconnecting
        return transport.value().decode("ascii").split("\r\n")[:-1]

    def hold_commits(self) -> HeldCommits:
        """From now on commits wait until the returned `HeldCommits`
        finishes them."""
        held = HeldCommits()
        self.factory.commit = held
        return held

    def set_limits(self, **limits: Any) -> None:
        """Change ``limits`` for the connections made from now on."""
        self.config = replace(self.config, limits=replace(self.config.limits, **limits))

    def message(self, queue_id: str) -> bytes:
        return self.spool.read_message(self.spool.load(queue_id))

    def is_empty(self) -> bool:
        """Nothing queued, nothing half-written."""
        return not any(self.spool.queue.iterdir()) and not any(self.spool.tmp.iterdir())


class Session:
    def __init__(self, factory: RelayServerFactory, peer: str) -> None:
        self.transport = TLSStringTransport(peer)
        protocol = factory.buildProtocol(self.transport.getPeer())
        assert isinstance(protocol, RelayServer)
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> list[str]:
        lines = self.transport.value().decode("ascii").split("\r\n")
        self.transport.clear()
        assert lines[-1] == ""
        return lines[:-1]

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode("ascii")
        self.protocol.dataReceived(data)
        return self.take()

    def close(self) -> None:
        """The connection ends (as the reactor would tell the protocol)."""
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def hello(self) -> None:
        assert self.send("EHLO client.example\r\n")[-1].startswith("250 ")

    def start_transaction(self, *recipients: str) -> None:
        self.hello()
        commands = "MAIL FROM:<sender@client.example>\r\n" + "".join(
            f"RCPT TO:<{rcpt}>\r\n" for rcpt in recipients or ["a@example.com"]
        )
        for reply in self.send(commands):
            assert reply.startswith("250 "), reply

    def start_data(self, *recipients: str) -> None:
        self.start_transaction(*recipients)
        assert self.send("DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]


def codes(lines: list[str]) -> list[str]:
    """The final line of each reply, as "CODE X.Y.Z" (or "CODE")."""
    return [" ".join(line.split()[:2]) for line in lines if line[3] == " "]


def queued_id(line: str) -> str:
    assert line.startswith("250 2.0.0 Ok: queued as "), line
    return line.rsplit(" ", 1)[1]


def body_of(message: bytes) -> bytes:
    """The message without our Received header (its first 4 or 5 lines)."""
    assert message.startswith(b"Received: from ")
    header_end = message.index(b"\r\n", message.index(b"; ")) + 2
    return message[header_end:]


def lines_of(events: list[dict[str, Any]]) -> list[str]:
    return [event["mta_line"] for event in events if "mta_line" in event]


# --- on loopback, with real TLS ---------------------------------------------


class Listening:
    """A `RelayServerFactory` on 127.0.0.1, port chosen by the system."""

    def __init__(self, folder: Path, files: certs.CertFiles) -> None:
        from twisted.internet import reactor

        self.config = write_config(folder, files)
        self.spool = Spool(folder / "spool")
        self.spool.create()
        creator = ServerCreator(server_context(self.config.tls))
        self.queued: list[Envelope] = []
        factory = RelayServerFactory(
            "mx",
            lambda: self.config,
            self.spool,
            lambda: creator,
            lambda envelope, lock: self.queued.append(envelope),
        )
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)

    def client(self) -> smtplib.SMTP:
        return smtplib.SMTP(*self.address, local_hostname="client.example", timeout=10)


def in_thread(function: Callable[[], Any]) -> defer.Deferred[Any]:
    return threads.deferToThread(function)


def client_context(
    maximum: ssl.TLSVersion | None = None, ciphers: str | None = None
) -> ssl.SSLContext:
    context = certs.permissive_client_context(
        minimum=ssl.TLSVersion.TLSv1_2, maximum=maximum
    )
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def raw_exchange(address: tuple[str, int], data: bytes) -> list[str]:
    """Send ``data`` in one packet; every reply line until the server closes."""
    with socket.create_connection(address, timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        sock.sendall(data)
        return [line.decode().rstrip("\r\n") for line in reader]
