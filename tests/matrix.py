"""The TLS policy matrix as data, and the loopback world it runs in.

SPEC.md section 2 gives, for each policy level, what becomes of a delivery
hop by what the server does: no STARTTLS, an old protocol or no shared
cipher, and each kind of certificate.  Here that table is written down as
`KINDS` (one kind of peer per row, one outcome per level), with what each
outcome must look like at the peer, in the log line and in the spool.

Every test case sends one message from a sender of its own
(`sender_for`), so that a peer serving several recipient domains can tell
whose MAIL it saw: a case that must not be delivered must leave no MAIL
command from its sender at any peer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mta.config import DEFAULT_CIPHERS, DEFAULT_CIPHERSUITES
from mta.envelope import Recipient
from tests.peers import certs, smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Connection, Peer, ReceivedMessage
from tests.relay import RelayProcess, base_config

LEVELS = ("none", "opportunistic", "enforce-tls", "enforce-secure")
CONFIGURED_CIPHERS = frozenset(DEFAULT_CIPHERS) | frozenset(DEFAULT_CIPHERSUITES)
MODERN_PROTOCOLS = ("TLSv1.2", "TLSv1.3")

# What becomes of a recipient.
TLS = "tls"
PLAINTEXT = "plaintext"
FALLBACK = "plaintext after fallback"
DEFERRED = "deferred"

# The trust words of SPEC.md section 5 (Postfix's).
UNTRUSTED = "Untrusted"
TRUSTED = "Trusted"
VERIFIED = "Verified"

MESSAGE = (
    b"From: Alice <alice@org.test>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: policy matrix\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def domain_for(letter: str, level: str) -> str:
    """The recipient domain of one matrix cell: ``j.enforce-secure.test``,
    so that the rule ``.enforce-secure.test`` governs it."""
    return f"{letter}.{level}.test"


def rule_for(level: str) -> dict[str, Any]:
    """The outbound rule giving every ``*.LEVEL.test`` domain ``level``."""
    return {"name": f"matrix-{level}", "direction": "outbound",
            "recipient_domain": f".{level}.test", "tls": level}


def sender_for(domain: str) -> str:
    return f"from.{domain}@org.test"


def recipient_for(domain: str) -> str:
    return f"bob@{domain}"


# --- the kinds of peer ------------------------------------------------------

StartPeer = Callable[[str, int, tuple[str, ...]], Peer]


@dataclass(frozen=True, slots=True)
class Kind:
    """One row of the matrix: a peer, where its MX records point, and what
    SPEC.md section 2 says each level makes of it.

    ``start(address, port, domains)`` starts one peer serving the four
    domains of the row; ``mx_host(domain)`` is the MX host name of one of
    them.  ``trust`` and ``matched`` are what the log line must show when
    the mail went over TLS (``matched`` of the domain and its MX host).
    """

    letter: str
    what: str
    start: StartPeer
    outcomes: tuple[str, str, str, str]  # in the order of LEVELS
    mx_host: Callable[[str], str] = lambda domain: f"mx.{domain}"
    trust: str | None = None
    matched: Callable[[str, str], str] | None = None
    protocol: str | None = None  # when only one is possible

    def outcome(self, level: str) -> str:
        return self.outcomes[LEVELS.index(level)]

    def domains(self) -> tuple[str, ...]:
        return tuple(domain_for(self.letter, level) for level in LEVELS)


def _right_names(domains: Iterable[str]) -> list[str]:
    """Every name a certificate could rightly carry for these domains: the
    domain and its MX host."""
    return [name for domain in domains for name in (domain, f"mx.{domain}")]


def _tls13(leaf: Callable[[tuple[str, ...]], Any]) -> StartPeer:
    def start(address: str, port: int, domains: tuple[str, ...]) -> Peer:
        return smtppeer.tls13(address, port, leaf=leaf(domains))

    return start


def _with_right_names(factory: Callable[..., Peer]) -> StartPeer:
    def start(address: str, port: int, domains: tuple[str, ...]) -> Peer:
        leaf = certs.issue_server_cert(*_right_names(domains))
        return factory(address, port, leaf=leaf)

    return start


def _plain(address: str, port: int, domains: tuple[str, ...]) -> Peer:
    return smtppeer.plain(address, port)


def _wildcards(domains: tuple[str, ...]) -> Any:
    return certs.issue_server_cert(*(f"*.{domain}" for domain in domains))


_NEVER = (PLAINTEXT, PLAINTEXT, DEFERRED, DEFERRED)
_OLD = (PLAINTEXT, FALLBACK, DEFERRED, DEFERRED)
_ANY_CERT = (PLAINTEXT, TLS, TLS, DEFERRED)
_SECURE = (PLAINTEXT, TLS, TLS, TLS)

KINDS = (
    Kind("a", "no STARTTLS offered", _plain, _NEVER),
    Kind("b", "TLS 1.0 only", _with_right_names(smtppeer.tls10_only), _OLD),
    Kind("c", "TLS 1.1 only", _with_right_names(smtppeer.tls11_only), _OLD),
    Kind("d", "TLS 1.2, no cipher of ours",
         _with_right_names(smtppeer.no_shared_cipher), _OLD),
    Kind("e", "certificate from an untrusted CA",
         _tls13(lambda domains: certs.issue_server_cert(
             *_right_names(domains), ca=certs.untrusted_ca())),
         _ANY_CERT, trust=UNTRUSTED),
    Kind("f", "expired certificate",
         _tls13(lambda domains: certs.issue_expired_cert(*_right_names(domains))),
         _ANY_CERT, trust=UNTRUSTED),
    Kind("g", "certificate for another name",
         _tls13(lambda domains: certs.issue_server_cert(
             "other.test", "mx.other.test")),
         _ANY_CERT, trust=TRUSTED),
    Kind("h", "wildcard one label above the MX host (*.D for mx.D)",
         _tls13(_wildcards), _SECURE, trust=VERIFIED,
         matched=lambda domain, host: host),
    Kind("i", "wildcard two labels above the MX host (*.D for a.b.D)",
         _tls13(_wildcards), _ANY_CERT, mx_host=lambda domain: f"a.b.{domain}",
         trust=TRUSTED),
    Kind("j", "the exact domain, TLS 1.3",
         _tls13(lambda domains: certs.issue_server_cert(*domains)), _SECURE,
         trust=VERIFIED, matched=lambda domain, host: domain,
         protocol="TLSv1.3"),
    Kind("k", "the exact domain, TLS 1.2 only",
         lambda address, port, domains: smtppeer.tls12_only(
             address, port, leaf=certs.issue_server_cert(*domains)),
         _SECURE, trust=VERIFIED, matched=lambda domain, host: domain,
         protocol="TLSv1.2"),
    # The one name that would count, were the CN read: the enforce-secure
    # domain itself.
    Kind("l", "the name only in the subject CN, no SAN",
         _tls13(lambda domains: certs.issue_cn_only_cert(
             domain_for("l", "enforce-secure"))),
         _ANY_CERT, trust=TRUSTED),
    Kind("m", "MX host outside the domain, certificate for that host",
         _tls13(lambda domains: certs.issue_server_cert("mx.provider.test")),
         _ANY_CERT, mx_host=lambda domain: "mx.provider.test", trust=TRUSTED),
)


# --- what was seen -----------------------------------------------------------

_DELIVERY_LINE = re.compile(
    r"(?P<queue_id>[0-9A-F]+): to=<(?P<to>[^>]*)> (?P<fields>.*?) "
    r"\((?P<reply>.*)\)$"
)


def delivery_lines(log: str, recipient: str) -> list[dict[str, str]]:
    """The fields of every delivery log line for ``recipient``, in order;
    the text in parentheses is the field ``reply``."""
    lines = []
    for text in log.splitlines():
        found = _DELIVERY_LINE.search(text)
        if found is None or found["to"] != recipient:
            continue
        fields = dict(item.split("=", 1) for item in found["fields"].split()
                      if "=" in item)
        fields["reply"] = found["reply"]
        fields["queue_id"] = found["queue_id"]
        lines.append(fields)
    return lines


@dataclass(slots=True)
class Observed:
    """Everything the world shows about one recipient."""

    received: list[ReceivedMessage]  # at the peer, from this case's sender
    mail_sessions: list[Connection]  # where this case's MAIL was sent
    lines: list[dict[str, str]]  # its delivery log lines
    spooled: Recipient | None  # None once the message left the spool

    @property
    def last(self) -> dict[str, str]:
        return self.lines[-1] if self.lines else {}

    def settled(self) -> bool:
        """Its attempt is over, and the spool says so if it stayed."""
        status = self.last.get("status")
        if status == "sent":
            return True
        return (status in ("deferred", "bounced") and self.spooled is not None
                and self.spooled.state in ("deferred", "failed"))

    def summary(self) -> str:
        """What became of it, in the words of the expectation."""
        fields = self.last
        if self.received:
            tls = self.received[0].tls
            got = f"tls {tls.protocol}/{tls.cipher}" if tls else "plaintext"
            if "fallback" in fields:
                got += f" fallback={fields['fallback']}"
        elif self.spooled is not None and self.spooled.state != "pending":
            got = f"{self.spooled.state} {self.spooled.dsn}"
        elif fields:
            got = f"status={fields.get('status')} (not in the spool)"
        else:
            got = "no attempt logged"
        for key in ("trust", "matched"):
            if key in fields:
                got += f" {key}={fields[key]}"
        return got


def observe(relay: RelayProcess, peers: Iterable[Peer], queue_id: str,
            sender: str, recipient: str) -> Observed:
    peers = list(peers)
    received = [message for peer in peers for message in peer.messages
                if message.mail_from == sender]
    mail = f"MAIL FROM:<{sender}>".lower()
    sessions = [connection for peer in peers for connection in peer.connections
                if any(command.lower().startswith(mail)
                       for command in connection.commands)]
    spooled = None
    try:
        spooled = relay.spool.load(queue_id).recipient(recipient)
    except (FileNotFoundError, KeyError):
        pass
    return Observed(received, sessions,
                    delivery_lines(relay.log(), recipient), spooled)


# --- what was expected --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Expected:
    """What one recipient must come to, by SPEC.md sections 2 and 5."""

    outcome: str
    level: str
    rule: str | None
    host: str  # the MX host the attempt is made with
    trust: str | None = None  # for TLS deliveries
    matched: str | None = None
    protocol: str | None = None

    def summary(self) -> str:
        text = self.outcome
        if self.outcome == TLS:
            text += f" {self.protocol or 'TLSv1.2+'}"
            text += f" trust={self.trust}" if self.trust else ""
            text += f" matched={self.matched}" if self.matched else ""
        elif self.outcome == DEFERRED:
            text += " 4.7.x"
        return text


def expected_for(kind: Kind, level: str) -> Expected:
    domain = domain_for(kind.letter, level)
    host = kind.mx_host(domain)
    outcome = kind.outcome(level)
    if outcome != TLS:
        return Expected(outcome, level, f"matrix-{level}", host)
    matched = kind.matched(domain, host) if kind.matched else None
    return Expected(outcome, level, f"matrix-{level}", host, kind.trust,
                    matched, kind.protocol)


def problems(expected: Expected, seen: Observed) -> list[str]:
    """Every way ``seen`` differs from ``expected``; empty when it agrees."""
    found: list[str] = []
    fields = seen.last
    if not seen.lines:
        return ["no delivery log line for the recipient"]

    if fields.get("policy") != expected.level:
        found.append(f"log policy={fields.get('policy')}, want {expected.level}")
    if fields.get("rule") != expected.rule:
        found.append(f"log rule={fields.get('rule')}, want {expected.rule}")
    if expected.host not in fields.get("relay", ""):
        found.append(f"log relay={fields.get('relay')}, want {expected.host}")

    if expected.outcome == DEFERRED:
        found.extend(_deferral_problems(expected, seen))
    else:
        found.extend(_delivery_problems(expected, seen))
    return found


def _delivery_problems(expected: Expected, seen: Observed) -> list[str]:
    found: list[str] = []
    fields = seen.last
    if len(seen.received) != 1:
        return [f"{len(seen.received)} message(s) at the peer, want 1; "
                f"log status={fields.get('status')} dsn={fields.get('dsn')} "
                f"({fields.get('reply')})"]
    tls = seen.received[0].tls
    if fields.get("status") != "sent":
        found.append(f"log status={fields.get('status')}, want sent")

    if expected.outcome == TLS:
        if tls is None:
            return [*found, "delivered in plaintext, want TLS"]
        if tls.protocol not in MODERN_PROTOCOLS:
            found.append(f"protocol {tls.protocol}, below TLS 1.2")
        if expected.protocol and tls.protocol != expected.protocol:
            found.append(f"protocol {tls.protocol}, want {expected.protocol}")
        if tls.cipher not in CONFIGURED_CIPHERS:
            found.append(f"cipher {tls.cipher} is not one we configured")
        if fields.get("tls") != f"{tls.protocol}/{tls.cipher}":
            found.append(f"log tls={fields.get('tls')}, the peer saw "
                         f"{tls.protocol}/{tls.cipher}")
        if fields.get("trust") != expected.trust:
            found.append(f"log trust={fields.get('trust')}, want {expected.trust}")
        if fields.get("matched") != expected.matched:
            found.append(f"log matched={fields.get('matched')}, "
                         f"want {expected.matched}")
        if "fallback" in fields:
            found.append(f"log fallback={fields['fallback']} on a TLS delivery")
        return found

    if tls is not None:
        found.append(f"delivered over {tls.protocol}, want plaintext")
    if fields.get("tls") != "none":
        found.append(f"log tls={fields.get('tls')}, want none")
    if any("STARTTLS" in c.commands for c in seen.mail_sessions):
        found.append("STARTTLS was sent in the session that carried the mail")
    if expected.outcome == FALLBACK and "fallback" not in fields:
        found.append("log has no fallback= for a plaintext fallback")
    if expected.outcome == PLAINTEXT and "fallback" in fields:
        found.append(f"log fallback={fields['fallback']}, want none")
    return found


def _deferral_problems(expected: Expected, seen: Observed) -> list[str]:
    found: list[str] = []
    fields = seen.last
    if seen.received:
        tls = seen.received[0].tls
        found.append("delivered " + (f"over {tls.protocol}" if tls
                                     else "IN PLAINTEXT") + ", want deferred")
    if seen.mail_sessions:
        found.append(f"the peer got MAIL in {len(seen.mail_sessions)} session(s)")
    if fields.get("status") != "deferred":
        found.append(f"log status={fields.get('status')}, want deferred")
    if not fields.get("dsn", "").startswith("4.7."):
        found.append(f"log dsn={fields.get('dsn')}, want 4.7.x")

    recipient = seen.spooled
    if recipient is None:
        return [*found, "not in the spool"]
    if recipient.state != "deferred":
        found.append(f"spool state {recipient.state}, want deferred")
    if not (recipient.dsn or "").startswith("4.7."):
        found.append(f"spool dsn {recipient.dsn}, want 4.7.x")
    if expected.host not in (recipient.reason or ""):
        found.append(f"spool reason {recipient.reason!r} does not name "
                     f"{expected.host}")
    return found


# --- the report --------------------------------------------------------------

@dataclass(slots=True)
class Report:
    """Rows of case, expected, got and problems, shown as one table."""

    rows: list[tuple[str, str, str, list[str]]] = field(default_factory=list)

    def add(self, case: str, expected: Expected, seen: Observed) -> None:
        self.rows.append(
            (case, expected.summary(), seen.summary(), problems(expected, seen)))

    @property
    def failures(self) -> int:
        return sum(1 for row in self.rows if row[3])

    def table(self) -> str:
        width = [max(len(row[i]) for row in self.rows) for i in range(3)]
        lines = [f"{self.failures} of {len(self.rows)} cases differ from "
                 "SPEC.md section 2:", ""]
        for case, expected, got, found in self.rows:
            mark = "FAIL" if found else "ok  "
            lines.append(f"{mark} {case:<{width[0]}}  {expected:<{width[1]}}  "
                         f"{got}")
            lines.extend(f"       - {problem}" for problem in found)
        return "\n".join(lines)


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.1)
    return done()


# --- the world ----------------------------------------------------------------

class Loopback:
    """The relay (trusting the trusted test CA), the DNS responder and the
    peers of one test, all on loopback; `close` stops what was started."""

    def __init__(self, tmp_path: Path, relay_cert: certs.CertFiles,
                 dns: DNSServer, mx_port: int) -> None:
        self.tmp_path = tmp_path
        self.relay_cert = relay_cert
        self.dns = dns
        self.mx_port = mx_port
        self.peers: list[Peer] = []
        self.relay: RelayProcess | None = None

    def add_peer(self, peer: Peer) -> Peer:
        self.peers.append(peer)
        return peer

    def mx(self, domain: str, *hosts: tuple[int, str, str]) -> None:
        """MX records for ``domain``: (preference, host name, address)."""
        self.dns.set(domain, "MX", [f"{pref} {name}." for pref, name, _ in hosts])
        for _, name, address in hosts:
            self.dns.set(name, "A", [address])

    def start(self, policies: list[dict[str, Any]], **overrides: Any
              ) -> RelayProcess:
        trust = certs.write_ca_file(certs.trusted_ca(),
                                    self.tmp_path / "trust" / "trusted-ca.pem")
        delivery = {
            "retry_schedule": ["1h"],
            "plaintext_fallback_delay": "0s",
            "port": self.mx_port,
            "concurrency": 64,
            "timeouts": {"connect": "5s", "command": "10s", "data": "20s"},
            **overrides.pop("delivery", {}),
        }
        config = base_config(
            self.tmp_path, self.relay_cert.chain, self.relay_cert.key,
            tls={"certificate": str(self.relay_cert.chain),
                 "private_key": str(self.relay_cert.key), "trust": str(trust)},
            dns={"nameservers": [f"127.0.0.1:{self.dns.port}"]},
            delivery=delivery, policies=policies, **overrides,
        )
        self.relay = RelayProcess(self.tmp_path / "relay", config).start()
        return self.relay

    def send(self, domain: str) -> str:
        """One message from ``domain``'s own sender to bob@``domain``."""
        assert self.relay is not None
        return self.relay.submit(sender_for(domain), [recipient_for(domain)],
                                 MESSAGE)

    def observe(self, queue_id: str, domain: str) -> Observed:
        assert self.relay is not None
        return observe(self.relay, self.peers, queue_id, sender_for(domain),
                       recipient_for(domain))

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        for peer in self.peers:
            peer.stop()
