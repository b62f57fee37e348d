"""The load client of ours: N messages over C concurrent SMTP sessions.

Postfix's smtp-source is the standard load generator, but it speaks no
TLS; this client does what it does (one message per session, no
pipelining, a body of SIZE octets after four header lines) with or
without STARTTLS, and never resumes a TLS session: every session makes a
full handshake, as the first contact with a server does.

    python -m bench.loadclient ADDRESS PORT --messages N --sessions C
                               --size OCTETS [--tls]

It prints one JSON object: start and end (time.monotonic() of the first
connection and of the last 250 after DATA), accepted, failed, the first
few errors, and the TLS protocol and cipher of the first session.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

SENDER = "bench@client.bench.test"
RECIPIENT = "sink@sink.bench.test"
EHLO = "client.bench.test"
LINE = 78  # body line length before CRLF, as smtp-source writes them


class SMTPError(Exception):
    """A reply the client did not expect; its text is the reply."""


def message_body(size: int) -> bytes:
    """`size` octets (at least 2) of numbered lines of X, CRLF-ended, as
    smtp-source sends them (no line starts with a dot)."""
    full, rest = divmod(size, LINE + 2)
    lines = [f"{n % 10}".encode() + b"X" * (LINE - 1) for n in range(1, full + 1)]
    if rest == 1 and lines:
        lines[-1] += b"X"  # one octet left: too few for a line of its own
    elif rest >= 2:
        lines.append(b"X" * (rest - 2))
    return b"".join(line + b"\r\n" for line in lines)


def message(serial: int, body: bytes) -> bytes:
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nDate: {date}\r\n"
        f"Message-Id: <{serial}.{time.time_ns()}@{EHLO}>\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Tally:
    remaining: int
    accepted: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    last_accept: float = 0.0
    tls: str | None = None

    def take(self) -> int | None:
        """The serial of the next message to send, or None when done."""
        if self.remaining == 0:
            return None
        self.remaining -= 1
        return self.remaining


async def read_reply(reader: asyncio.StreamReader, expected: str) -> str:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError(f"connection closed, expected {expected}")
        lines.append(line.decode(errors="replace").rstrip("\r\n"))
        if line[3:4] != b"-":
            break
    if not lines[-1].startswith(expected):
        raise SMTPError(" / ".join(lines))
    return lines[-1]


async def command(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    line: bytes,
    expected: str,
) -> str:
    writer.write(line)
    return await read_reply(reader, expected)


async def one_session(
    address: str,
    port: int,
    data: bytes,
    tls: ssl.SSLContext | None,
    tally: Tally,
) -> None:
    reader, writer = await asyncio.open_connection(address, port)
    try:
        await read_reply(reader, "220")
        await command(reader, writer, f"EHLO {EHLO}\r\n".encode(), "250")
        if tls is not None:
            await command(reader, writer, b"STARTTLS\r\n", "220")
            await writer.start_tls(tls)
            if tally.tls is None:
                ssl_object = writer.get_extra_info("ssl_object")
                tally.tls = f"{ssl_object.version()} {ssl_object.cipher()[0]}"
            await command(reader, writer, f"EHLO {EHLO}\r\n".encode(), "250")
        await command(reader, writer, f"MAIL FROM:<{SENDER}>\r\n".encode(), "250")
        await command(reader, writer, f"RCPT TO:<{RECIPIENT}>\r\n".encode(), "250")
        await command(reader, writer, b"DATA\r\n", "354")
        await command(reader, writer, data + b".\r\n", "250")
        tally.accepted += 1
        tally.last_accept = time.monotonic()
        await command(reader, writer, b"QUIT\r\n", "221")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass  # the peer closed first: nothing left to say


async def session_loop(
    address: str,
    port: int,
    body: bytes,
    tls: ssl.SSLContext | None,
    tally: Tally,
) -> None:
    while (serial := tally.take()) is not None:
        try:
            await one_session(address, port, message(serial, body), tls, tally)
        except (OSError, ssl.SSLError, SMTPError) as error:
            tally.failed += 1
            if len(tally.errors) < 5:
                tally.errors.append(f"{type(error).__name__}: {error}")


def client_context() -> ssl.SSLContext:
    # Like Postfix's smtp client at "encrypt": no certificate check.  A new
    # SSLObject per session and no `session=` argument: no resumption.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = message_body(args.size)
    tls = client_context() if args.tls else None
    tally = Tally(remaining=args.messages)

    start = time.monotonic()
    await asyncio.gather(
        *(
            session_loop(args.address, args.port, body, tls, tally)
            for _ in range(args.sessions)
        )
    )
    return {
        "start": start,
        "end": tally.last_accept,
        "accepted": tally.accepted,
        "failed": tally.failed,
        "errors": tally.errors,
        "tls": tally.tls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("address")
    parser.add_argument("port", type=int)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--tls", action="store_true")
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
