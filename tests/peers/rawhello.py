"""A TLS 1.2 ClientHello built by hand, for what no client library offers.

OpenSSL 3 as Debian builds it cannot offer TLS compression at all (sslscan
says "OpenSSL version does not support compression"), so a scanner cannot
ask a server whether it would compress.  This client writes the bytes of
RFC 5246 7.4.1.2 itself, offering DEFLATE (RFC 3749) before null, and reads
what the server chose from its ServerHello.  It never completes the
handshake: the answer is in the first record.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import BinaryIO

NULL_COMPRESSION = 0
DEFLATE = 1

# ECDHE suites for either key type, then the renegotiation SCSV (RFC 5746).
_CIPHER_SUITES = (0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0x00FF)
_GROUPS = (0x001D, 0x0017)  # x25519, secp256r1
# ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
_SIGNATURE_ALGORITHMS = (0x0403, 0x0804, 0x0401)


@dataclass(frozen=True, slots=True)
class ServerHello:
    version: int  # 0x0303 for TLS 1.2
    cipher_suite: int
    compression_method: int


class Refused(Exception):
    """The server answered with an alert (``description``) or hung up."""

    def __init__(self, description: int | None) -> None:
        super().__init__(f"alert {description}" if description is not None
                         else "connection closed")
        self.description = description


def _vector(data: bytes, length_bytes: int) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def _u16s(values: tuple[int, ...]) -> bytes:
    return b"".join(struct.pack("!H", value) for value in values)


def _extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!H", kind) + _vector(body, 2)


def client_hello(compression_methods: tuple[int, ...]) -> bytes:
    """One handshake record holding a TLS 1.2 ClientHello."""
    extensions = b"".join((
        _extension(0x000A, _vector(_u16s(_GROUPS), 2)),
        _extension(0x000B, _vector(b"\x00", 1)),  # uncompressed points
        _extension(0x000D, _vector(_u16s(_SIGNATURE_ALGORITHMS), 2)),
    ))
    body = b"".join((
        b"\x03\x03",  # client_version: TLS 1.2, and no supported_versions
        os.urandom(32),
        _vector(b"", 1),  # no session to resume
        _vector(_u16s(_CIPHER_SUITES), 2),
        _vector(bytes(compression_methods), 1),
        _vector(extensions, 2),
    ))
    handshake = b"\x01" + _vector(body, 3)
    return b"\x16\x03\x01" + _vector(handshake, 2)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise Refused(None)
        data += chunk
    return data


def read_server_hello(sock: socket.socket) -> ServerHello:
    """The ServerHello from the server's first record; `Refused` for an
    alert."""
    kind, _version, length = struct.unpack("!BHH", _read_exactly(sock, 5))
    record = _read_exactly(sock, length)
    if kind == 0x15:
        raise Refused(record[1])
    if kind != 0x16 or record[0] != 0x02:
        raise AssertionError(f"not a ServerHello: record {kind}, {record[:8]!r}")

    version = struct.unpack("!H", record[4:6])[0]
    session_id_length = record[38]
    at = 39 + session_id_length
    cipher_suite = struct.unpack("!H", record[at:at + 2])[0]
    return ServerHello(version, cipher_suite, record[at + 2])


def smtp_starttls(sock: socket.socket) -> None:
    """Greeting, EHLO, STARTTLS: the socket is ready for a ClientHello."""
    stream: BinaryIO = sock.makefile("rb")
    _read_reply(stream, b"220")
    sock.sendall(b"EHLO scanner.test\r\n")
    _read_reply(stream, b"250")
    sock.sendall(b"STARTTLS\r\n")
    _read_reply(stream, b"220")
    stream.close()  # the socket stays open; nothing more is buffered


def _read_reply(stream: BinaryIO, code: bytes) -> None:
    while True:
        line = stream.readline()
        if not line.startswith(code):
            raise AssertionError(f"expected {code!r}, got {line!r}")
        if line[3:4] != b"-":
            return
