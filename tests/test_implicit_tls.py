"""Implicit TLS listeners (RFC 8314, port 465 style; issue 5, item 2):
``tls: implicit`` makes a listener speak TLS from the first byte.

In memory: the handshake is started before the greeting, STARTTLS is
neither offered nor taken, MAIL needs no STARTTLS; without a TLS context
the client is told nothing in the clear.  On loopback, the real relay:
Python's `SMTP_SSL` sends a message; a plaintext client gets no SMTP
reply; a reload serves a renewed certificate to the next client; a change
of the mode waits for a restart.  The TLS audit of such a listener is in
tests/test_tls_audit.py.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from cryptography import x509
from twisted.internet import task
from twisted.logger import globalLogPublisher

from mta.config import load_config
from mta.reload import needs_restart
from mta.smtpserver import RelayServerFactory
from mta.spool import Spool
from tests.peers import certs
from tests.relay import RelayProcess, base_config, free_port
from tests.serverharness import Session, TLSStringTransport, commit_at_once

CONFIG = """
hostname: relay.test
spool: spool
tls: {certificate: none.crt, private_key: none.key}
listeners:
  - {name: smtps, address: 127.0.0.1, port: 2465, role: outbound,
     tls: implicit, networks: [192.0.2.0/24]}
  - {name: submission, address: 127.0.0.1, port: 2587, role: outbound,
     networks: [192.0.2.0/24]}
"""


class OrderedTransport(TLSStringTransport):
    """Records whether TLS was started before each write."""

    def __init__(self, peer: str) -> None:
        super().__init__(peer)
        self.order: list[str] = []

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.order.append("startTLS")
        super().startTLS(contextFactory, normal)

    def write(self, data: bytes) -> None:
        self.order.append(data.decode("ascii", "replace").split(" ")[0])
        super().write(data)


class ImplicitSession(Session):
    def __init__(self, factory: RelayServerFactory, peer: str) -> None:
        self.transport = OrderedTransport(peer)
        protocol = factory.buildProtocol(self.transport.getPeer())
        assert protocol is not None
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        self.greeting = self.take()


class Server:
    def __init__(self, folder: Path) -> None:
        (folder / "mta.yaml").write_text(CONFIG)
        self.config = load_config(folder / "mta.yaml", check_tls=False)
        self.spool = Spool(folder / "spool")
        self.spool.create()
        self.creator: object | None = object()

    def connect(self, listener: str = "smtps",
                tls_mode: str | None = None) -> ImplicitSession:
        factory = RelayServerFactory(
            listener, lambda: self.config, self.spool, self._creator,
            lambda envelope: None, reactor=task.Clock(), tls_mode=tls_mode,
        )
        factory.commit = commit_at_once
        return ImplicitSession(factory, "192.0.2.7")

    def _creator(self) -> Any:
        if self.creator is None:
            raise OSError("no certificate")
        return self.creator


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path)


def test_tls_starts_before_the_greeting(server: Server) -> None:
    session = server.connect()
    assert session.transport.order == ["startTLS"]
    assert session.transport.tls_creator is server.creator
    # The greeting waits for the handshake: written before it, it would sit
    # in the TLS layer's buffer, which pauses the server as its producer.
    assert session.greeting == []
    session.protocol.handshakeCompleted()
    assert session.transport.order == ["startTLS", "220"]
    assert session.take() == ["220 relay.test ESMTP"]


def test_no_starttls_inside_implicit_tls(server: Server) -> None:
    session = server.connect()
    session.protocol.handshakeCompleted()
    ehlo = session.send("EHLO client.example\r\n")
    assert ehlo[-1] == "250 ENHANCEDSTATUSCODES"
    assert not any("STARTTLS" in line for line in ehlo)
    assert session.send("STARTTLS\r\n") == ["503 5.5.1 Error: TLS already active"]
    # require_tls is implied, and met.
    assert session.send("MAIL FROM:<a@client.example>\r\n") == ["250 2.1.0 Ok"]
    assert session.protocol.tls is not None


def test_a_starttls_listener_is_unchanged(server: Server) -> None:
    session = server.connect("submission")
    assert session.transport.order == ["220"]
    assert session.send("EHLO client.example\r\n")[-1] == "250 STARTTLS"


def test_without_a_tls_context_nothing_is_said_in_clear(server: Server) -> None:
    server.creator = None
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    try:
        session = server.connect()
    finally:
        globalLogPublisher.removeObserver(captured.append)
    assert session.greeting == []
    assert session.transport.disconnecting
    assert session.transport.order == []
    assert any(
        event.get("mta_line") == "listener smtps: no TLS for unknown[192.0.2.7] "
        "on this implicit-TLS listener; connection closed"
        for event in captured
    )


def test_the_mode_bound_at_start_wins_over_a_reload(server: Server) -> None:
    # The service gives each factory its listener's mode when it binds the
    # port; a reloaded file saying otherwise waits for a restart.
    session = server.connect("smtps", tls_mode="starttls")
    assert session.transport.order == ["220"]
    session = server.connect("submission", tls_mode="implicit")
    assert session.transport.order == ["startTLS"]  # the greeting after it


def test_a_change_of_mode_needs_a_restart(tmp_path: Path) -> None:
    (tmp_path / "mta.yaml").write_text(CONFIG)
    old = load_config(tmp_path / "mta.yaml", check_tls=False)
    (tmp_path / "mta.yaml").write_text(
        CONFIG.replace("tls: implicit, ", "").replace(
            "port: 2587, role: outbound,", "port: 2587, role: outbound, "
            "tls: implicit,"))
    new = load_config(tmp_path / "mta.yaml", check_tls=False)
    assert needs_restart(old, new) == [
        "listener smtps changes from tls: implicit to tls: starttls",
        "listener submission changes from tls: starttls to tls: implicit",
    ]


# --- the real relay -------------------------------------------------------------


def implicit_config(folder: Path, files: certs.CertFiles) -> dict[str, Any]:
    return base_config(
        folder, files.chain, files.key,
        listeners=[
            {"name": "smtps", "address": "127.0.0.1", "port": free_port(),
             "role": "outbound", "tls": "implicit",
             "networks": ["127.0.0.0/8"]},
        ],
    )


@pytest.fixture
def relay(tmp_path: Path, relay_cert: certs.CertFiles) -> Iterator[RelayProcess]:
    process = RelayProcess(tmp_path / "relay",
                           implicit_config(tmp_path / "relay", relay_cert))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def permissive() -> ssl.SSLContext:
    return certs.permissive_client_context(minimum=ssl.TLSVersion.TLSv1_2)


def presented_certificate(relay: RelayProcess) -> x509.Certificate:
    with smtplib.SMTP_SSL(*relay.listener("smtps"), context=permissive(),
                          timeout=10) as client:
        client.noop()
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_smtp_ssl_sends_a_message(relay: RelayProcess) -> None:
    with smtplib.SMTP_SSL(*relay.listener("smtps"), context=permissive(),
                          timeout=10) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() == "TLSv1.3"
        code, _ = client.ehlo("client.test")
        assert code == 250
        assert not client.has_extn("starttls")
        client.sendmail("a@client.test", ["b@far.test"],
                        b"Subject: 465\r\n\r\nover implicit TLS\r\n")

    line = relay.wait_for_log("accepted from=<a@client.test>")
    assert line.endswith("listener=smtps tls=TLSv1.3/TLS_AES_128_GCM_SHA256")
    (envelope,) = relay.envelopes()
    message = relay.spool.read_message(envelope)
    assert f"with ESMTPS id {envelope.queue_id}\r\n".encode() in message


def test_a_plaintext_client_gets_no_smtp(relay: RelayProcess) -> None:
    with socket.create_connection(relay.listener("smtps"), timeout=10) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    # Whatever the TLS layer answers (an alert), never an SMTP line.
    assert b"220" not in received and b"250" not in received
    line = relay.wait_for_log("TLS handshake failed with unknown[127.0.0.1]")
    assert "[mta#info]" in line
    assert line.endswith("connection closed")
    assert "Traceback" not in relay.log()
    presented_certificate(relay)  # the next client is served


def test_a_failed_starttls_handshake_is_logged_too(
    tmp_path: Path, relay_cert: certs.CertFiles
) -> None:
    relay = RelayProcess(tmp_path / "plain", base_config(
        tmp_path / "plain", relay_cert.chain, relay_cert.key)).start()
    try:
        with socket.create_connection(relay.listener("mx"), timeout=10) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
            while not reader.readline().startswith(b"220 "):
                pass
            sock.sendall(b"this is not a ClientHello\r\n")
            while sock.recv(4096):
                pass
        line = relay.wait_for_log("TLS handshake failed with unknown[127.0.0.1]")
    finally:
        relay.stop()
    assert "on listener mx: " in line
    assert "Traceback" not in relay.log()


def test_a_reload_serves_the_renewed_certificate(
    tmp_path: Path, relay: RelayProcess, relay_cert: certs.CertFiles
) -> None:
    old = presented_certificate(relay)
    renewed = certs.issue_server_cert("relay.test")
    certs.write_cert_files(renewed, relay_cert.chain.parent, stem="relay")
    send_sighup_and_wait(relay)
    new = presented_certificate(relay)
    assert new.serial_number != old.serial_number
    assert new.serial_number == x509.load_pem_x509_certificate(
        renewed.cert_chain_pems[0].bytes()).serial_number


def send_sighup_and_wait(relay: RelayProcess) -> None:
    before = relay.log().count("reload: ")
    assert relay.process is not None
    os.kill(relay.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while relay.log().count("reload: ") == before:
        assert time.monotonic() < deadline, relay.log()
        time.sleep(0.05)
    assert "reload: refused" not in relay.log(), relay.log()


def test_a_reloaded_mode_waits_for_a_restart(relay: RelayProcess) -> None:
    changed = dict(relay.config)
    changed["listeners"] = [dict(relay.config["listeners"][0], tls="starttls")]
    relay.config_path.write_text(yaml.safe_dump(changed))
    send_sighup_and_wait(relay)
    line = relay.wait_for_log("needs a restart")
    assert ("reload: listener smtps changes from tls: implicit to tls: "
            "starttls: this needs a restart" in line)
    # The port still speaks TLS first.
    presented_certificate(relay)
