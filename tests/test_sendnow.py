"""`mta.sendnow.write_now` on real loopback connections: bytes go out in
the order written, whether the socket takes them at once, takes part of
them, or Twisted's buffer already holds some; and the transport
attributes it reads are still there in the installed Twisted."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.abstract import FileDescriptor
from twisted.internet.tcp import Connection
from twisted.internet.testing import StringTransport

from mta.sendnow import can_send_now, write_now


class Writer(protocol.Protocol):
    """Writes what the test says as soon as it is connected."""

    def __init__(self, plan: Any, made: defer.Deferred[Any]) -> None:
        self.plan, self.made = plan, made

    def connectionMade(self) -> None:
        self.plan(self.transport)
        self.made.callback(self.transport)


async def received(plan: Any, expected: int) -> tuple[bytes, Any]:
    """What a plain socket reads from a connection on which ``plan`` wrote,
    and the transport."""
    made: defer.Deferred[Any] = defer.Deferred()
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(
        lambda: Writer(plan, made)), interface="127.0.0.1")
    reader = socket.create_connection(("127.0.0.1", port.getHost().port))
    reader.setblocking(False)
    try:
        transport = await made
        data = b""
        for _ in range(2000):
            try:
                chunk = reader.recv(1 << 20)
            except BlockingIOError:
                await task.deferLater(reactor, 0.005, lambda: None)
                continue
            data += chunk
            if len(data) >= expected:
                break
        return data, transport
    finally:
        reader.close()
        transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_small_writes_go_out_at_once_and_in_order() -> None:
    pending: list[bool] = []

    def plan(transport: Any) -> None:
        for number in range(5):
            write_now(transport, b"%d\r\n" % number)
            pending.append(bool(transport.dataBuffer or transport._tempDataBuffer))

    data, _ = await received(plan, 15)

    assert data == b"0\r\n1\r\n2\r\n3\r\n4\r\n"
    assert pending == [False] * 5  # nothing left for the reactor to send


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_waits_in_order() -> None:
    big = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than any send buffer
    states: list[bool] = []

    def plan(transport: Any) -> None:
        write_now(transport, b"first\r\n")
        write_now(transport, big)
        states.append(can_send_now(transport))  # the rest waits in Twisted
        write_now(transport, b"last\r\n")  # so this goes behind it
        transport.write(b"and Twisted's\r\n")
        write_now(transport, b"end\r\n")

    expected = b"first\r\n" + big + b"last\r\nand Twisted's\r\nend\r\n"
    data, _ = await received(plan, len(expected))

    assert states == [False]
    assert data == expected


def test_the_transport_attributes_it_reads_are_twisteds() -> None:
    # Should Twisted rename them, write_now must not silently misjudge.
    assert Connection.TLS is False
    for name in ("dataBuffer", "_tempDataBuffer", "_writeDisconnected"):
        assert hasattr(FileDescriptor(), name), name
    assert callable(Connection.writeSomeData)


def test_other_transports_are_written_as_before() -> None:
    transport = StringTransport()
    assert not can_send_now(transport)
    write_now(transport, b"hello")
    assert transport.value() == b"hello"
