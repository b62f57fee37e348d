"""Fixtures shared by the tests: the relay's certificate, the port MX peers
listen on, a DNS responder on loopback, and the listener harness of
tests/serverharness.py (in memory and on loopback)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from tests.peers import certs
from tests.peers.dnsserver import DNSServer
from tests.relay import free_port
from tests.serverharness import HOSTNAME, Listening, Server


@pytest.fixture
def relay_cert(tmp_path: Path) -> certs.CertFiles:
    leaf = certs.issue_server_cert("relay.test")
    return certs.write_cert_files(leaf, tmp_path / "relay-tls", stem="relay")


@pytest.fixture(scope="session")
def mx_port() -> int:
    """Port 25 when we may bind it (each peer has a loopback address of its
    own), else one free high port shared by every peer."""
    return 25 if os.geteuid() == 0 else free_port("127.0.0.1")


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer({}) as server:
        yield server


# --- the listener harness ----------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return Server(tmp_path)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every log event while the test runs."""
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> certs.CertFiles:
    leaf = certs.issue_server_cert(HOSTNAME)  # ECDSA
    return certs.write_cert_files(leaf, tmp_path_factory.mktemp("tls"))


@pytest.fixture
def listening(tmp_path: Path, tls_files: certs.CertFiles) -> Iterator[Listening]:
    server = Listening(tmp_path, tls_files)
    yield server
    pytest_twisted.blockon(server.port.stopListening())
