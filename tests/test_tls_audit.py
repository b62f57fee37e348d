"""The listeners' TLS as a scanner on the internet sees it (issue 5, item 5).

Debian's sslscan runs against the real relay (`twistd mta`) over STARTTLS,
and directly (without ``--starttls-smtp``) on an implicit-TLS listener
(``tls: implicit``, port 465 style), and its XML verdict is asserted: only
TLS 1.2 and 1.3; exactly the configured ciphers, in the configured order
(sslscan finds the order by offering everything, recording the server's
pick, removing it and asking again); no insecure renegotiation.  The
names it prints are OpenSSL's for TLS 1.2 and the RFC's for TLS 1.3: the
two name spaces of `tls.ciphers` and `tls.ciphersuites`, so they compare
as they are.

Two things sslscan 2.0.7 on Debian cannot see, checked with other real
clients:

- renegotiation: it only tries over TLS 1.0, which the relay refuses, so a
  client renegotiation is asked for by ``openssl s_client`` ("R") at TLS 1.2;
- compression: Debian's OpenSSL cannot offer it, so a hand-made ClientHello
  (tests/peers/rawhello.py) offers DEFLATE and reads the server's choice.

sslscan must be installed (Debian package "sslscan", which `make test`
installs): without it these tests fail, naming the package.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from OpenSSL import SSL

from mta.config import DEFAULT_CIPHERS, DEFAULT_CIPHERSUITES, TLSConfig
from mta.tlsctx import server_context
from tests.peers import certs, rawhello
from tests.peers.postfix import require_program
from tests.relay import RelayProcess, base_config, free_port

# Only what is asserted: no Heartbleed probe, no key-exchange groups.
SSLSCAN_OPTIONS = (
    "--xml=-", "--no-colour", "--no-heartbleed", "--no-groups",
    "--no-check-certificate",
)


# --- the scanner ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scan:
    """sslscan's verdict on one listener."""

    protocols: dict[str, bool]  # "SSLv3", "TLSv1.2"... -> enabled
    accepted: dict[str, list[str]]  # "TLSv1.2" -> names, server's order
    preferred: dict[str, str]  # "TLSv1.2" -> the server's first choice
    renegotiation_supported: bool
    renegotiation_secure: bool
    compression: bool | None  # None: this sslscan build cannot test it


def parse_sslscan(xml: str) -> Scan:
    test = ElementTree.fromstring(xml).find("ssltest")
    assert test is not None, f"sslscan found nothing to test:\n{xml}"

    protocols = {
        ("SSLv" if item.get("type") == "ssl" else "TLSv") + item.get("version", ""):
        item.get("enabled") == "1"
        for item in test.iter("protocol")
    }
    accepted: dict[str, list[str]] = {}
    preferred: dict[str, str] = {}
    for cipher in test.iter("cipher"):
        version, name = cipher.get("sslversion", ""), cipher.get("cipher", "")
        accepted.setdefault(version, []).append(name)
        if cipher.get("status") == "preferred":
            preferred[version] = name

    renegotiation = test.find("renegotiation")
    assert renegotiation is not None, f"no renegotiation verdict:\n{xml}"
    compression = test.find("compression")
    return Scan(
        protocols=protocols,
        accepted=accepted,
        preferred=preferred,
        renegotiation_supported=renegotiation.get("supported") == "1",
        renegotiation_secure=renegotiation.get("secure") == "1",
        compression=(None if compression is None
                     else compression.get("supported") == "1"),
    )


def sslscan(address: str, port: int, starttls: bool = True) -> Scan:
    """sslscan's verdict, over STARTTLS or (an implicit-TLS listener) from
    the first byte."""
    program = require_program("sslscan", "sslscan")
    options = ("--starttls-smtp", *SSLSCAN_OPTIONS) if starttls else SSLSCAN_OPTIONS
    result = subprocess.run(
        [program, *options, f"{address}:{port}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return parse_sslscan(result.stdout)


def usable_ciphers(names: tuple[str, ...], key_type: Any) -> list[str]:
    """The TLS 1.2 suites of ``names`` a certificate of ``key_type`` can
    serve: ECDSA ones for an ECDSA key, the ECDHE-RSA and RSA ones for an
    RSA key (TLS 1.3 suites do not depend on the key)."""
    if key_type is certs.ECDSA:
        return [name for name in names if "-ECDSA-" in name]
    return [name for name in names if "-ECDSA-" not in name]


# --- relays -----------------------------------------------------------------


def start_relay(
    folder: Path, key_type: Any = certs.ECDSA, **tls: Any
) -> RelayProcess:
    """The default listeners (mx, submission over STARTTLS) and smtps,
    with implicit TLS."""
    leaf = certs.issue_server_cert("relay.test", key_type=key_type)
    files = certs.write_cert_files(leaf, folder / "tls", stem="relay")
    config = base_config(folder, files.chain, files.key)
    config["listeners"].append(
        {"name": "smtps", "address": "127.0.0.1", "port": free_port(),
         "role": "outbound", "tls": "implicit", "networks": ["127.0.0.0/8"]}
    )
    config["tls"].update(tls)
    return RelayProcess(folder, config).start()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """The default configuration with an ECDSA certificate."""
    process = start_relay(tmp_path_factory.mktemp("audit"))
    try:
        yield process
    finally:
        process.stop()


def assert_only_modern_protocols(scan: Scan) -> None:
    assert scan.protocols == {
        "SSLv2": False, "SSLv3": False, "TLSv1.0": False, "TLSv1.1": False,
        "TLSv1.2": True, "TLSv1.3": True,
    }


def assert_no_insecure_renegotiation(scan: Scan) -> None:
    # "Supported" without "secure" is CVE-2009-3555; secure renegotiation
    # (RFC 5746) is the only kind a server may offer at all.
    assert scan.renegotiation_secure or not scan.renegotiation_supported


# --- the audit --------------------------------------------------------------


@pytest.mark.parametrize("key_type", [certs.ECDSA, certs.RSA],
                         ids=["ecdsa", "rsa"])
def test_scanner_sees_the_default_lists_exactly(
    tmp_path: Path, relay: RelayProcess, key_type: Any
) -> None:
    """Default configuration: TLS 1.2 and 1.3 only, and every configured
    suite the certificate can serve, in the configured order."""
    if key_type is certs.ECDSA:
        scan = sslscan(*relay.listener("mx"))
    else:
        rsa_relay = start_relay(tmp_path, certs.RSA)
        try:
            scan = sslscan(*rsa_relay.listener("mx"))
        finally:
            rsa_relay.stop()

    assert_only_modern_protocols(scan)
    expected = usable_ciphers(DEFAULT_CIPHERS, key_type)
    assert scan.accepted == {"TLSv1.3": list(DEFAULT_CIPHERSUITES),
                             "TLSv1.2": expected}
    assert scan.preferred == {"TLSv1.3": DEFAULT_CIPHERSUITES[0],
                              "TLSv1.2": expected[0]}
    assert_no_insecure_renegotiation(scan)
    assert scan.compression in (None, False)


def test_scanner_sees_the_same_on_an_implicit_tls_listener(
    relay: RelayProcess,
) -> None:
    """RFC 8314 port: the handshake from the first byte, the same contexts
    and so the same verdict as over STARTTLS."""
    scan = sslscan(*relay.listener("smtps"), starttls=False)

    assert_only_modern_protocols(scan)
    expected = usable_ciphers(DEFAULT_CIPHERS, certs.ECDSA)
    assert scan.accepted == {"TLSv1.3": list(DEFAULT_CIPHERSUITES),
                             "TLSv1.2": expected}
    assert scan.preferred == {"TLSv1.3": DEFAULT_CIPHERSUITES[0],
                              "TLSv1.2": expected[0]}
    assert_no_insecure_renegotiation(scan)
    assert scan.compression in (None, False)


def test_scanner_sees_a_reordered_list_exactly(tmp_path: Path) -> None:
    """A shorter list, in an order OpenSSL would never choose itself: the
    scanner finds those suites, no others, and our first as preferred."""
    ciphers = ["ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305",
               "ECDHE-ECDSA-AES128-GCM-SHA256"]
    ciphersuites = ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
    relay = start_relay(tmp_path, ciphers=ciphers, ciphersuites=ciphersuites)
    try:
        scan = sslscan(*relay.listener("submission"))
    finally:
        relay.stop()

    assert_only_modern_protocols(scan)
    assert scan.accepted == {"TLSv1.3": ciphersuites, "TLSv1.2": ciphers}
    assert scan.preferred == {"TLSv1.3": ciphersuites[0],
                              "TLSv1.2": ciphers[0]}


def test_scanner_sees_no_tls_1_2_under_a_tls_1_3_floor(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, min_version="TLSv1.3")
    try:
        scan = sslscan(*relay.listener("mx"))
    finally:
        relay.stop()

    assert scan.protocols["TLSv1.2"] is False
    assert scan.protocols["TLSv1.3"] is True
    assert list(scan.accepted) == ["TLSv1.3"]


# --- what the scanner cannot see --------------------------------------------


def _read_output(
    process: subprocess.Popen[bytes],
    until: bytes | None,
    deadline: float,
    output: bytes = b"",
) -> bytes:
    """``output`` and what ``process`` prints after it, until ``until`` is
    in the whole, the process exits, or the deadline passes."""
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    while (left := deadline - time.monotonic()) > 0:
        if until is not None and until in output:
            break
        ready, _, _ = select.select([descriptor], [], [], left)
        if not ready:
            break
        chunk = os.read(descriptor, 4096)
        if not chunk:
            break
        output += chunk
    return output


def test_client_initiated_renegotiation_is_refused(relay: RelayProcess) -> None:
    """At TLS 1.2 (1.3 has no renegotiation), ``openssl s_client`` asks for
    a new handshake; the relay answers no_renegotiation and the client gives
    up.  A relay that renegotiated would leave s_client waiting for input
    without that error."""
    address, port = relay.listener("mx")
    process = subprocess.Popen(
        [require_program("openssl", "openssl"), "s_client", "-brief",
         "-starttls", "smtp", "-tls1_2", "-connect", f"{address}:{port}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdin is not None
    deadline = time.monotonic() + 10
    try:
        # -brief prints the session's summary once the handshake is done.
        output = _read_output(process, b"Ciphersuite: ", deadline)
        assert b"Protocol version: TLSv1.2" in output, output
        process.stdin.write(b"R\n")
        process.stdin.flush()
        output = _read_output(process, None, deadline, output)
    finally:
        process.kill()
        process.wait()

    assert b"RENEGOTIATING" in output, output
    assert b"no renegotiation" in output, output
    # The relay shrugs it off: no traceback, and the next client is served.
    assert "Traceback" not in relay.log()
    socket.create_connection((address, port), timeout=5).close()


def test_compression_offered_is_declined(relay: RelayProcess) -> None:
    """DEFLATE offered first (RFC 3749); the relay chooses null (CRIME)."""
    with socket.create_connection(relay.listener("mx"), timeout=10) as sock:
        rawhello.smtp_starttls(sock)
        sock.sendall(rawhello.client_hello(
            (rawhello.DEFLATE, rawhello.NULL_COMPRESSION)))
        hello = rawhello.read_server_hello(sock)

    assert hello.version == 0x0303
    assert hello.compression_method == rawhello.NULL_COMPRESSION


def test_server_context_forbids_compression_and_renegotiation(
    relay_cert: certs.CertFiles,
) -> None:
    """The options themselves, since this OpenSSL build could not compress
    even if asked to."""
    tls = TLSConfig(relay_cert.chain, relay_cert.key, "TLSv1.2",
                    DEFAULT_CIPHERS, DEFAULT_CIPHERSUITES, None)
    options = server_context(tls).set_options(0)

    for option in ("OP_NO_COMPRESSION", "OP_NO_RENEGOTIATION",
                   "OP_CIPHER_SERVER_PREFERENCE"):
        assert options & getattr(SSL, option), option
