"""``mta policy explain RECIPIENT [--probe]``: which rule and level govern a
recipient, what a certificate must name, and, with ``--probe``, what each of
its servers offers right now and whether each level would deliver to it.

The probe is a diagnostic run from the command line, so it uses blocking
sockets and pyOpenSSL directly (no reactor): connect, EHLO, STARTTLS, the
handshake with the relay's own client settings, QUIT.  It never sends MAIL.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Iterator

from cryptography import x509
from OpenSSL import SSL

from mta.clientsession import Target
from mta.config import LEVELS, Config
from mta.nexthop import MX, domain_of, next_hop
from mta.policy import choose_policy
from mta.resolver import LookupFailed, make_resolver, targets_for
from mta.tlsctx import VERIFY_ERRORS, client_context
from mta.tlsverdict import (
    ESTABLISHED,
    HANDSHAKE_FAILED,
    NOT_OFFERED,
    REFUSED,
    judge_trust,
    reference_names,
    verdict,
)


def explain(config: Config, recipient: str) -> list[str]:
    domain = domain_of(recipient)
    choice = choose_policy(config, recipient)
    hop = next_hop(config, domain)
    rule = f"rule {choice.rule}" if choice.rule else f"defaults.{choice.direction}"
    lines = [
        f"recipient:  {recipient}",
        f"direction:  {choice.direction}",
        f"policy:     {choice.level} (from {rule})",
        f"next hop:   {'MX of ' if hop.kind == MX else ''}{hop} ({hop.source})",
    ]
    lines.append(certificate_line(choice.level, choice.match, domain,
                                  hop.configured_names))
    return lines


# What each level makes of the server's certificate (SPEC.md section 2).
NOT_CHECKED = {
    "none": "certificate: not checked at this level (none: TLS is never "
    "tried)",
    "opportunistic": "certificate: not checked at this level "
    "(opportunistic: any certificate will do; its facts are recorded)",
    "enforce-tls": "certificate: not checked at this level (enforce-tls: "
    "TLS is required, any certificate will do; its facts are recorded)",
}


def certificate_line(
    level: str,
    match: tuple[str, ...] | None,
    domain: str,
    configured: tuple[str, ...],
) -> str:
    """What the server's certificate must name: only ``enforce-secure``
    checks it; the other levels take any certificate."""
    if level != "enforce-secure":
        return NOT_CHECKED[level]
    if match is not None:
        return (f"certificate must name one of: {', '.join(match)} "
                "(the rule's match)")
    return "certificate must name one of: " + ", ".join(
        (domain, f"the server's own name if it is under {domain}", *configured))


@dataclass(frozen=True, slots=True)
class Probe:
    target: Target
    outcome: str  # NOT_OFFERED, REFUSED, HANDSHAKE_FAILED, ESTABLISHED, or "unreachable"
    detail: str
    protocol: str | None = None
    cipher: str | None = None
    names: tuple[str, ...] = ()
    chain: str | None = None
    trust: str | None = None
    matched: str | None = None


def probe_lines(config: Config, recipient: str) -> list[str]:
    domain = domain_of(recipient)
    choice = choose_policy(config, recipient)
    hop = next_hop(config, domain)
    try:
        targets = targets_for(make_resolver(config.nameservers), hop)
    except LookupFailed as error:
        return [f"lookup failed: {error.reply.line()}"]

    lines = []
    for target in targets:
        names = reference_names(domain, target.name, hop.configured_names,
                                choice.match)
        found = probe(config, target, names)
        lines.extend(_describe(found))
        if found.outcome != "unreachable":
            lines.append("  would deliver: " + ", ".join(
                f"{level}={_would(level, found)}" for level in LEVELS))
    return lines


def _would(level: str, found: Probe) -> str:
    answer = verdict(level, found.outcome, found.trust)
    return {"deliver": "yes", "pass-over": "no",
            "fallback-candidate": "plaintext-fallback"}[answer]


def _describe(found: Probe) -> Iterator[str]:
    yield f"{found.target}:{found.target.port}: {found.outcome} ({found.detail})"
    if found.protocol:
        yield f"  tls: {found.protocol}/{found.cipher}"
        yield f"  certificate names: {', '.join(found.names) or '(no SAN)'}"
        yield f"  chain: {found.chain}; trust: {found.trust}" + (
            f"; matched {found.matched}" if found.matched else "")


def probe(config: Config, target: Target, names: tuple[str, ...]) -> Probe:
    timeout = config.delivery.timeouts.connect
    try:
        sock = socket.create_connection((target.address, target.port), timeout)
    except OSError as error:
        return Probe(target, "unreachable", f"connect: {error}")
    try:
        return _converse(config, target, names, _Lines(sock))
    except (OSError, EOFError) as error:
        return Probe(target, "unreachable", f"conversation failed: {error}")
    finally:
        sock.close()


class _Lines:
    """Reading SMTP replies from a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(4096)
                if not data:
                    raise EOFError("connection closed")
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    def command(self, line: str) -> tuple[int, list[str]]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()


def _converse(config: Config, target: Target, names: tuple[str, ...],
              lines: _Lines) -> Probe:
    code, text = lines.reply()
    if code != 220:
        return Probe(target, "unreachable", f"greeting {code} {' '.join(text)}")
    code, text = lines.command(f"EHLO {config.hostname}")
    keywords = {line.split()[0].upper() for line in text[1:] if line.split()}
    if code != 250 or "STARTTLS" not in keywords:
        lines.command("QUIT")
        return Probe(target, NOT_OFFERED, "STARTTLS not offered")
    code, text = lines.command("STARTTLS")
    if code != 220:
        return Probe(target, REFUSED, f"STARTTLS answered {code} {' '.join(text)}")
    return _handshake(config, target, names, lines.sock)


def _handshake(config: Config, target: Target, names: tuple[str, ...],
               sock: socket.socket) -> Probe:
    errors: list[int] = []

    def record(conn: SSL.Connection, cert: object, errno: int, depth: int,
               ok: int) -> bool:
        if not ok:
            errors.append(errno)
        return True

    connection = SSL.Connection(client_context(config.tls), sock)
    connection.set_verify(SSL.VERIFY_PEER, record)
    if not _is_address(target.name):
        connection.set_tlsext_host_name(target.name.encode("idna"))
    connection.set_connect_state()
    sock.setblocking(True)
    try:
        connection.do_handshake()
    except (SSL.Error, OSError) as error:
        return Probe(target, HANDSHAKE_FAILED, f"handshake failed: {error}")

    certificate = connection.get_peer_certificate(as_cryptography=True)
    error = errors[0] if errors else None
    trust = judge_trust(certificate, error, names)
    chain = ("verified" if error is None else
             f"not verified: {VERIFY_ERRORS.get(error, f'error {error}')}")
    return Probe(
        target, ESTABLISHED, "handshake completed",
        protocol=connection.get_protocol_version_name(),
        cipher=connection.get_cipher_name(),
        names=_san_names(certificate),
        chain=chain, trust=trust.trust, matched=trust.matched,
    )


def _san_names(certificate: x509.Certificate | None) -> tuple[str, ...]:
    if certificate is None:
        return ()
    try:
        san = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.value.get_values_for_type(x509.DNSName))


def _is_address(name: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
    except OSError:
        return False
    return True
