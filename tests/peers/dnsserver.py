"""A small authoritative DNS responder on loopback, answering from a dict.

    zone = {
        "example.test": {"MX": ["10 mx1.example.test.", "20 mx2.example.test."]},
        "mx1.example.test": {"A": ["127.0.0.11"]},
        "nullmx.test": {"MX": ["0 ."]},
    }
    with DNSServer(zone) as dns_server:
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = dns_server.port

Each record type maps to a list of rdata in zone-file text, so any type
dnspython knows (TLSA, TXT, CNAME...) can be served.  Names are matched
without regard to case or a trailing dot.  What the responder answers:

- a name in `servfail`: SERVFAIL;
- a name in `drop`: nothing at all (the client times out);
- a name in the zone with records of the asked type: those, authoritative;
- a name with a CNAME: the CNAME, then the target's records if in the zone;
- a name in the zone without that type, or an empty non-terminal (an
  ancestor of a name in the zone): NOERROR with no answer (RFC 8020);
- any other name: NXDOMAIN.

Over UDP, an answer larger than the client's limit (512 octets, or its EDNS
payload size) is truncated with TC set, as is every UDP answer for a name in
`truncate`, so that the client retries over TCP.

The zone, `servfail`, `drop` and `truncate` may be changed while the server
runs; each query reads them afresh.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = dict[str, dict[str, list[str]]]


@dataclass(frozen=True, slots=True)
class Query:
    """One question the server was asked."""

    name: str
    rdtype: str
    transport: str  # "udp" or "tcp"


def normalize(name: str) -> str:
    """The form names are compared in: lower case, no trailing dot."""
    return name.rstrip(".").lower()


class DNSServer:
    """Authoritative responder for a dict zone, over UDP and TCP on one port."""

    def __init__(
        self,
        zone: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
        address: str = "127.0.0.1",
        port: int = 0,
        *,
        servfail: Iterable[str] = (),
        drop: Iterable[str] = (),
        truncate: Iterable[str] = (),
        ttl: int = 300,
    ) -> None:
        self.zone: Zone = {}
        for name, records in (zone or {}).items():
            for rdtype, values in records.items():
                self.set(name, rdtype, values)
        self.servfail = {normalize(name) for name in servfail}
        self.drop = {normalize(name) for name in drop}
        self.truncate = {normalize(name) for name in truncate}
        self.ttl = ttl
        self.address = address
        self.port = port
        self.queries: list[Query] = []

        self._udp: socketserver.UDPServer | None = None
        self._tcp: socketserver.TCPServer | None = None
        self._threads: list[threading.Thread] = []

    # Zone edits, safe while the server runs.

    def set(self, name: str, rdtype: str, values: Iterable[str]) -> None:
        """Replace the `rdtype` records of `name`."""
        records = dict(self.zone.get(normalize(name), {}))
        records[rdtype.upper()] = list(values)
        self.zone[normalize(name)] = records

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove one record type of `name`, or the whole name."""
        key = normalize(name)
        if rdtype is None:
            self.zone.pop(key, None)
            return

        records = dict(self.zone.get(key, {}))
        records.pop(rdtype.upper(), None)
        self.zone[key] = records

    # Life cycle.

    def start(self) -> DNSServer:
        """Bind UDP and TCP on the same port and serve in two threads."""
        self._udp, self._tcp = self._bind()
        self.port = self._udp.server_address[1]

        for server in (self._udp, self._tcp):
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"dns-{self.address}:{self.port}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving, close both sockets and join the threads."""
        for server in (self._udp, self._tcp):
            if server is not None:
                server.shutdown()
                server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        self._udp = self._tcp = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _bind(self) -> tuple[socketserver.UDPServer, socketserver.TCPServer]:
        # With port 0 the kernel picks a free UDP port, which may be taken
        # for TCP: try again a few times.
        attempts = 1 if self.port else 20
        for attempt in range(attempts):
            udp = _UDPServer((self.address, self.port), _UDPHandler, self)
            try:
                tcp = _TCPServer(
                    (self.address, udp.server_address[1]), _TCPHandler, self
                )
            except OSError:
                udp.server_close()
                if attempt == attempts - 1:
                    raise
                continue
            return udp, tcp
        raise AssertionError("unreachable")

    # Answering.

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The wire-format response to the query `wire`, or None to drop it."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()

        question = query.question[0]
        name = normalize(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append(Query(name, rdtype, transport))

        if name in self.drop:
            return None
        if name in self.servfail:
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()

        response.set_rcode(self._resolve(question.name, rdtype, response))
        if transport == "udp":
            return self._fit_udp(query, response, name in self.truncate)
        return response.to_wire()

    def _resolve(
        self, qname: dns.name.Name, rdtype: str, response: dns.message.Message
    ) -> dns.rcode.Rcode:
        zone = self._snapshot()
        name = normalize(qname.to_text())

        # Follow in-zone CNAMEs, a few links at most.
        for _ in range(8):
            records = zone.get(name)
            if records is None:
                break
            if rdtype not in records and "CNAME" in records:
                cname = self._rrset(qname, "CNAME", records["CNAME"][:1])
                response.answer.append(cname)
                qname = cname[0].target
                name = normalize(qname.to_text())
                continue
            if records.get(rdtype):
                response.answer.append(self._rrset(qname, rdtype, records[rdtype]))
            return dns.rcode.NOERROR

        if response.answer or any(key.endswith("." + name) for key in zone):
            return dns.rcode.NOERROR
        return dns.rcode.NXDOMAIN

    def _snapshot(self) -> Zone:
        # Tests may also edit `zone` directly, in any case and with or
        # without trailing dots: normalize a copy for this one query.
        return {
            normalize(name): {
                rdtype.upper(): [values] if isinstance(values, str) else values
                for rdtype, values in records.items()
            }
            for name, records in list(self.zone.items())
        }

    def _rrset(
        self, qname: dns.name.Name, rdtype: str, values: list[str]
    ) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(
            qname, self.ttl, dns.rdataclass.IN, rdtype, values
        )

    @staticmethod
    def _fit_udp(
        query: dns.message.Message, response: dns.message.Message, truncate: bool
    ) -> bytes:
        limit = max(512, query.payload) if query.edns >= 0 else 512
        if not truncate:
            try:
                return response.to_wire(max_size=limit)
            except dns.exception.TooBig:
                pass

        # RFC 1035 4.2.1 / RFC 7766: a truncated UDP answer sends the client
        # to TCP; leave the answer section empty rather than half filled.
        response.answer.clear()
        response.authority.clear()
        response.additional.clear()
        response.flags |= dns.flags.TC
        return response.to_wire()


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, dns_server: DNSServer):
        self.dns_server = dns_server
        super().__init__(address, handler)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, dns_server: DNSServer):
        self.dns_server = dns_server
        super().__init__(address, handler)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        wire, sock = self.request
        reply = self.server.dns_server.answer(wire, "udp")
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(5)

        # RFC 7766: a client may send several length-prefixed queries on
        # one connection.
        while True:
            try:
                wire = _read_framed(sock)
            except (OSError, EOFError):
                return
            reply = self.server.dns_server.answer(wire, "tcp")
            if reply is None:
                continue
            sock.sendall(struct.pack("!H", len(reply)) + reply)


def _read_framed(sock: socket.socket) -> bytes:
    (length,) = struct.unpack("!H", _read_exactly(sock, 2))
    return _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data
