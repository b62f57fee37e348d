"""A graceful stop (mta.stopping): SIGTERM closes the listeners, lets a
message being received finish, tells idle clients 421 4.3.2, and exits
within ``limits.stop_timeout``; the spool it leaves is resumed by the next
start.

In memory, `RelayServerFactory.shut_down` against one connection at a
time; then the real relay (`twistd -n mta`) with raw SMTP clients on
loopback and a peer on 127.0.6.110 (an address no other test file uses).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from tests.peers import smtppeer
from tests.peers.certs import CertFiles
from tests.relay import RelayProcess, base_config
from tests.serverharness import Server, codes, queued_id

SHUTTING_DOWN = ("421 4.3.2 relay.test Service shutting down, closing "
                 "transmission channel")
BODY = "Subject: stop\r\n\r\nfirst half\r\n"
END = "second half\r\n.\r\n"


def fired(deferred: defer.Deferred[None]) -> bool:
    return bool(deferred.called)


class TestShutDown:
    def test_an_idle_client_is_told_421_at_once(self, server: Server) -> None:
        session = server.connect()
        session.hello()

        drained = server.factory.shut_down()

        assert session.take() == [SHUTTING_DOWN]
        assert session.transport.disconnecting
        assert not fired(drained)
        session.protocol.connectionLost(Failure(ConnectionError()))
        assert fired(drained)

    def test_a_transaction_before_data_is_closed_too(
        self, server: Server
    ) -> None:
        session = server.connect()
        session.start_transaction("a@example.com")
        server.factory.shut_down()
        assert session.take() == [SHUTTING_DOWN]
        assert server.is_empty()

    def test_a_message_in_data_finishes_then_421(self, server: Server) -> None:
        session = server.connect()
        session.start_data("a@example.com")
        assert session.send(BODY) == []

        drained = server.factory.shut_down()
        assert session.take() == []
        assert not session.transport.disconnecting

        replies = session.send(END + "QUIT\r\n")
        assert codes(replies) == ["250 2.0.0", "421 4.3.2"]
        assert server.spool.queue_ids() == [queued_id(replies[0])]
        assert session.transport.disconnecting
        session.protocol.connectionLost(Failure(ConnectionError()))
        assert fired(drained)

    def test_a_message_being_committed_gets_its_250_first(
        self, server: Server
    ) -> None:
        commits = server.hold_commits()
        session = server.connect()
        session.start_data("a@example.com")
        assert codes(session.send(BODY + END)) == []

        server.factory.shut_down()
        assert session.take() == []

        commits.finish()
        assert codes(session.take()) == ["250 2.0.0", "421 4.3.2"]

    def test_a_refused_message_is_answered_then_421(
        self, server: Server
    ) -> None:
        session = server.connect()
        session.start_data("a@example.com")
        server.factory.shut_down()
        # A bare LF: refused at the end of DATA (550 5.6.0).
        replies = session.send("bare\nline\r\n.\r\n")
        assert codes(replies) == ["550 5.6.0", "421 4.3.2"]
        assert server.is_empty()

    def test_no_new_connection_is_built(self, server: Server) -> None:
        server.factory.shut_down()
        assert server.factory.buildProtocol(None) is None

    def test_drained_at_once_without_connections(self, server: Server) -> None:
        assert fired(server.factory.shut_down())


# --- the real relay ------------------------------------------------------------

PEER = "127.0.6.110"


class Client:
    """A raw SMTP client: replies are read as they come, unsolicited ones
    included."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith("220 ")

    def reply(self) -> str:
        """The last line of the next reply; "" at the end of the stream."""
        while True:
            line = self.file.readline().decode("ascii")
            if not line or line[3:4] == " ":
                return line.rstrip("\r\n")

    def command(self, text: str) -> str:
        self.sock.sendall(text.encode("ascii") + b"\r\n")
        return self.reply()

    def start_data(self, recipient: str) -> None:
        assert self.command("EHLO client.test").startswith("250 ")
        assert self.command("MAIL FROM:<alice@org.test>").startswith("250 ")
        assert self.command(f"RCPT TO:<{recipient}>").startswith("250 ")
        assert self.command("DATA").startswith("354 ")
        self.sock.sendall(BODY.encode("ascii"))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def stop_config(tmp_path: Path, relay_cert: CertFiles, mx_port: int,
                stop_timeout: str) -> RelayProcess:
    config = base_config(
        tmp_path, relay_cert.chain, relay_cert.key,
        domains={"stop.test": {"relay_to": [f"{PEER}:{mx_port}"]}},
        limits={"stop_timeout": stop_timeout},
    )
    return RelayProcess(tmp_path / "relay", config)


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def test_sigterm_lets_a_message_in_data_finish(
    tmp_path: Path, relay_cert: CertFiles, mx_port: int, clients: list[Client]
) -> None:
    relay = stop_config(tmp_path, relay_cert, mx_port, "20s").start()
    assert relay.process is not None
    address = relay.listener("mx")
    idle = Client(address)
    clients.append(idle)
    assert idle.command("EHLO client.test").startswith("250 ")
    busy = Client(address)
    clients.append(busy)
    busy.start_data("bob@stop.test")

    started = time.monotonic()
    os.kill(relay.process.pid, signal.SIGTERM)

    assert idle.reply().startswith("421 4.3.2 "), relay.log()
    assert idle.reply() == ""  # and closed
    relay.wait_for_log("stop: listeners closed")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()

    busy.sock.sendall(END.encode("ascii"))
    accepted = busy.reply()
    assert accepted.startswith("250 2.0.0 Ok: queued as "), relay.log()
    assert busy.reply().startswith("421 4.3.2 ")
    relay.process.wait(timeout=20)
    assert time.monotonic() - started < 10, relay.log()
    assert "stop: done, nothing left under way" in relay.log()

    # On disk, whole; and the next start delivers it.
    queue_id = accepted.rsplit(" ", 1)[1]
    assert [envelope.queue_id for envelope in relay.envelopes()] == [queue_id]
    with smtppeer.plain(PEER, mx_port) as peer:
        relay.start()
        try:
            received = peer.wait_for(1, timeout=15)
        finally:
            relay.stop()
    assert b"first half\r\nsecond half\r\n" in received[0].content
    assert received[0].rcpt_tos == ("bob@stop.test",)


def test_stop_is_bounded_by_stop_timeout(
    tmp_path: Path, relay_cert: CertFiles, mx_port: int, clients: list[Client]
) -> None:
    relay = stop_config(tmp_path, relay_cert, mx_port, "1s").start()
    assert relay.process is not None
    stuck = Client(relay.listener("mx"))
    clients.append(stuck)
    stuck.start_data("bob@stop.test")

    started = time.monotonic()
    os.kill(relay.process.pid, signal.SIGTERM)
    relay.wait_for_log("stop: listeners closed")
    # An impatient second SIGTERM: one line, and the stop goes on.
    os.kill(relay.process.pid, signal.SIGTERM)
    relay.process.wait(timeout=15)
    elapsed = time.monotonic() - started

    assert 1 <= elapsed < 4, relay.log()
    try:
        assert stuck.reply() == ""  # closed without a reply: no 250
    except ConnectionResetError:
        pass
    assert "stop: already stopping" in relay.log()
    assert "Traceback" not in relay.log()
    line = relay.wait_for_log("stop: after 1s")
    assert "[mta#warn]" in line and "closed 1 client connection(s)" in line
    # Nothing of the cut message is left anywhere in the spool.
    spool = relay.spool
    assert spool.queue_ids() == []
    assert list(spool.tmp.iterdir()) == []
