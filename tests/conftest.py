"""Fixtures shared by the integration tests: the relay's certificate, the
port MX peers listen on, a DNS responder on loopback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from tests.peers import certs
from tests.peers.dnsserver import DNSServer
from tests.relay import free_port


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
