"""A receiving SMTP server that throws mail away: the benchmark's sink.

Postfix's smtp-sink speaks no TLS, so this one stands in for it where the
sink must offer STARTTLS (and for plaintext too when Postfix is missing).
It runs as a process of its own, so that its CPU never competes with the
load client's for one interpreter lock:

    python -m bench.smtpsink ADDRESS PORT --messages N [--cert F --key F]

It prints "listening" once the socket is bound, "tls PROTOCOL CIPHER" after
the first handshake, and "done T" when the N-th message has ended, T being
time.monotonic() (CLOCK_MONOTONIC: the same clock in every process).  It
keeps serving until it is terminated, so the last reply is not lost.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
import time

END_OF_DATA = b"\r\n.\r\n"
HOSTNAME = "sink.bench.test"


class Counter:
    def __init__(self, target: int) -> None:
        self.target = target
        self.received = 0
        self.tls_reported = False

    def message(self) -> None:
        self.received += 1
        if self.received == self.target:
            say(f"done {time.monotonic():.6f}")

    def handshake(self, ssl_object: ssl.SSLObject | None) -> None:
        if self.tls_reported or ssl_object is None:
            return
        self.tls_reported = True
        cipher = ssl_object.cipher()
        say(f"tls {ssl_object.version()} {cipher[0] if cipher else '?'}")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class SinkSession(asyncio.Protocol):
    """One client connection: commands by line, DATA until CRLF.CRLF."""

    def __init__(self, counter: Counter, tls: ssl.SSLContext | None) -> None:
        self.counter = counter
        self.tls = tls
        self.buffer = bytearray()
        self.in_data = False
        self.upgrading = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(f"220 {HOSTNAME} ESMTP sink\r\n".encode())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer and not self.upgrading:
            if self.in_data:
                if not self._end_of_data():
                    return
            elif not self._command():
                return

    def _end_of_data(self) -> bool:
        found = self.buffer.find(END_OF_DATA)
        if found < 0:
            # Keep the tail that may be the start of a terminator.
            if len(self.buffer) > 4:
                del self.buffer[: len(self.buffer) - 4]
            return False
        del self.buffer[: found + len(END_OF_DATA)]
        self.in_data = False
        self.counter.message()
        self._reply("250 2.0.0 Ok: queued")
        return True

    def _command(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        verb = line[:4].upper()

        if verb == b"EHLO":
            self._reply(self._ehlo())
        elif verb == b"DATA":
            self.in_data = True
            # The CRLF that ended DATA, so that a terminator at the very
            # start of the body (an empty message) is found too.
            self.buffer[0:0] = b"\r\n"
            self._reply("354 End data with <CR><LF>.<CR><LF>")
        elif verb == b"STAR" and self.tls is not None:
            self._reply("220 2.0.0 Ready to start TLS")
            self.upgrading = True
            asyncio.ensure_future(self._start_tls())
        elif verb == b"QUIT":
            self._reply("221 2.0.0 Bye")
            assert self.transport is not None
            self.transport.close()
        else:  # HELO, MAIL, RCPT, RSET, NOOP: all fine
            self._reply("250 2.0.0 Ok")
        return True

    def _ehlo(self) -> str:
        lines = [HOSTNAME, "PIPELINING", "SIZE 104857600", "8BITMIME"]
        if self.tls is not None:
            lines.append("STARTTLS")
        return "\r\n".join(
            f"250{'-' if n < len(lines) - 1 else ' '}{text}"
            for n, text in enumerate(lines)
        )

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.tls is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport, self, self.tls, server_side=True
            )
        except (OSError, ssl.SSLError):
            self.transport.close()
            return
        assert transport is not None
        self.transport = transport
        self.tls = None  # STARTTLS only once per session
        self.upgrading = False
        self.counter.handshake(transport.get_extra_info("ssl_object"))
        if self.buffer:
            self.data_received(b"")

    def _reply(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(text.encode() + b"\r\n")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No tickets at all (TLS 1.2 or 1.3): no MTA under test resumes, so
    # issuing them is work for nothing, and every handshake is a full one.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    return context


async def serve(args: argparse.Namespace) -> None:
    tls = server_context(args.cert, args.key) if args.cert else None
    counter = Counter(args.messages)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkSession(counter, tls), args.address, args.port, backlog=1024
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    say("listening")
    await stop.wait()
    server.close()
    say(f"received {counter.received}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("address")
    parser.add_argument("port", type=int)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
