"""The running relay between real mail software from Debian.

swaks, the client operators use, submits to the relay over STARTTLS; Debian's
Postfix 3.7 receives what the relay delivers, both as the MX of an outbound
domain and as the organisation's own server an inbound domain is relayed to.
Every verdict comes from the far end's own records: Postfix's TLS log line
for the session that brought the message, and the Maildir file it wrote,
compared by SHA-256 with what was submitted.  The only differences allowed
are the headers added on the way: our Received header on top of the message,
and Postfix's Return-Path, Delivered-To and Received on top of that.

One relay, one DNS responder and four Postfix instances serve the module:

    dest.test     MX mx.dest.test     127.0.0.91  Postfix, ECDSA, TLS 1.2-1.3
    tls12.test    MX mx.tls12.test    127.0.0.92  Postfix, RSA, TLS 1.2 only
    example.test  relay_to mail.example.test (A) 127.0.0.93  Postfix
    mail.org.test relayhost = our submission listener 127.0.0.94  Postfix

The first three demand TLS (smtpd_tls_security_level=encrypt), so a message
that reached one came over TLS; the tests still check which TLS.

Postfix's master must be started by root, and swaks and Postfix must be
installed (Debian packages "swaks" and "postfix"): without them these tests
fail, naming what is missing; they are never skipped.
"""

from __future__ import annotations

import hashlib
import re
import smtplib
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from mta.config import DEFAULT_CIPHERS, DEFAULT_CIPHERSUITES
from tests import corpus
from tests.corpus import Sample
from tests.peers import certs
from tests.peers.dnsserver import DNSServer
from tests.peers.postfix import (
    PostfixInstance,
    TLSLogEntry,
    as_stored,
    free_port,
    parse_tls_log,
    reachable_tmpdir,
    strip_postfix_headers,
    swaks,
)
from tests.relay import RelayProcess, base_config

SENDER = "alice@org.test"
MIB = 1024 * 1024

# Postfix takes 10 240 000 octets by default: less than the 10 MiB message.
# virtual(8) refuses to run with a mailbox limit below the message limit.
POSTFIX_LIMITS = {
    "message_size_limit": str(64 * MIB),
    "virtual_mailbox_limit": str(128 * MIB),
}
TLS12_ONLY = "!SSLv2, !SSLv3, !TLSv1, !TLSv1.1, !TLSv1.3"


@dataclass(frozen=True, slots=True)
class Destination:
    """A Postfix instance, and the name the relay knows it by."""

    domain: str
    host: str
    postfix: PostfixInstance


@dataclass
class Interop:
    relay: RelayProcess
    dns: DNSServer
    dest: Destination  # dest.test: TLS 1.2 or 1.3, the relay and Postfix choose
    tls12: Destination  # tls12.test: TLS 1.2 only, RSA certificate
    org: Destination  # example.test, an inbound domain's relay_to server
    client: PostfixInstance  # the organisation's Postfix, relayhost = us


# --- the module's world ---------------------------------------------------------


@pytest.fixture(scope="module")
def interop(
    tmp_path_factory: pytest.TempPathFactory, mx_port: int
) -> Iterator[Interop]:
    with reachable_tmpdir("interop-") as folder, DNSServer({}) as dns:
        destinations = [
            _postfix(folder, "dest.test", "mx.dest.test", "127.0.0.91", mx_port),
            _postfix(folder, "tls12.test", "mx.tls12.test", "127.0.0.92", mx_port,
                     rsa=True, config={"smtpd_tls_protocols": TLS12_ONLY,
                                       "smtpd_tls_mandatory_protocols": TLS12_ONLY}),
            _postfix(folder, "example.test", "mail.example.test", "127.0.0.93",
                     mx_port),
        ]
        started: list[PostfixInstance] = []
        relay: RelayProcess | None = None
        try:
            for destination in destinations:
                started.append(destination.postfix.start())
            dest, tls12, org = destinations
            for destination in (dest, tls12):
                dns.set(destination.domain, "MX", [f"10 {destination.host}."])
            for destination in destinations:
                dns.set(destination.host, "A", [destination.postfix.address])
            # relay_to is looked up by A only: an MX for the domain must not
            # be followed.
            dns.set("example.test", "MX", ["10 nowhere.example.test."])

            relay = _relay(tmp_path_factory.mktemp("interop"), dns, mx_port,
                           org.host)
            client = _client_postfix(folder, relay)
            started.append(client.start())
            yield Interop(relay, dns, dest, tls12, org, client)
        finally:
            if relay is not None:
                relay.stop()
            for instance in started:
                instance.stop()


def _postfix(
    folder: Path,
    domain: str,
    host: str,
    address: str,
    port: int,
    rsa: bool = False,
    config: dict[str, str] | None = None,
) -> Destination:
    key_type = certs.RSA if rsa else certs.ECDSA
    leaf = certs.issue_server_cert(host, key_type=key_type)
    files = certs.write_cert_files(leaf, folder / "tls", stem=host)
    instance = PostfixInstance(
        folder / domain,
        address,
        port,
        tls_cert=files.chain,
        tls_key=files.key,
        tls_level="encrypt",
        domains=[domain],
        hostname=host,
        config={**POSTFIX_LIMITS, **(config or {})},
    )
    return Destination(domain, host, instance)


def _client_postfix(folder: Path, relay: RelayProcess) -> PostfixInstance:
    """The organisation's own Postfix, sending everything through the
    relay's submission listener over TLS, as a smarthost."""
    address, port = relay.listener("submission")
    return PostfixInstance(
        folder / "client",
        "127.0.0.94",
        free_port("127.0.0.94"),
        hostname="mail.org.test",
        domains=["client.test"],
        relayhost=f"[{address}]:{port}",
        smtp_tls_level="encrypt",
        # Keep sessions open for the next message, as a busy Postfix does
        # with its smarthost: several transactions per TLS session (TLS
        # sessions are reused only through tlsproxy).
        config={**POSTFIX_LIMITS,
                "smtp_connection_cache_destinations": f"[{address}]:{port}",
                "smtp_tls_connection_reuse": "yes"},
    )


def _relay(folder: Path, dns: DNSServer, mx_port: int, org_host: str) -> RelayProcess:
    leaf = certs.issue_server_cert("relay.test")
    relay_cert = certs.write_cert_files(leaf, folder / "relay-tls", stem="relay")
    config = base_config(
        folder,
        relay_cert.chain,
        relay_cert.key,
        dns={"nameservers": [f"127.0.0.1:{dns.port}"]},
        domains={"example.test": {"relay_to": [f"{org_host}:{mx_port}"]}},
        delivery={
            "retry_schedule": ["1s"],
            "plaintext_fallback_delay": "0s",
            "port": mx_port,
            "timeouts": {"connect": "5s", "command": "30s", "data": "60s"},
        },
    )
    # Submission as it is run for real: STARTTLS before MAIL.
    for listener in config["listeners"]:
        if listener["role"] == "outbound":
            listener["require_tls"] = True
    return RelayProcess(folder / "relay", config).start()


# --- what Postfix recorded ---------------------------------------------------------


_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*<([^>\r\n]+)>")
_QUEUED_AS = re.compile(r"queued as ([0-9A-Z]+)")


class Inbox:
    """A Postfix instance's Maildir, read by Message-ID."""

    def __init__(self, postfix: PostfixInstance) -> None:
        self.postfix = postfix
        self._ids: dict[Path, str | None] = {}

    def files(self, message_id: str) -> list[Path]:
        for path in self.postfix.message_files():
            if path not in self._ids:
                self._ids[path] = _message_id(path.read_bytes())
        return [path for path, known in self._ids.items() if known == message_id]

    def wait_for(
        self, wanted: dict[str, int], timeout: float
    ) -> dict[str, list[Path]]:
        """The files of each Message-ID in `wanted` once it has as many as
        wanted (one per recipient)."""
        deadline = time.monotonic() + timeout
        while True:
            found = {mid: self.files(mid) for mid in wanted}
            missing = {mid: n for mid, n in wanted.items() if len(found[mid]) < n}
            if not missing:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Postfix at {self.postfix.address} has not received "
                    f"{len(missing)} of {len(wanted)} message(s) after "
                    f"{timeout}s: {sorted(missing)[:10]}\n"
                    f"--- maillog (tail):\n{self.postfix.log()[-4000:]}"
                )
            time.sleep(0.1)


def _message_id(stored: bytes) -> str | None:
    head = stored.split(b"\n\n", 1)[0]
    match = _MESSAGE_ID.search(head)
    return match[1].decode("ascii", "replace") if match else None


def tls_of_delivery(postfix: PostfixInstance, message_id: str) -> TLSLogEntry:
    """The handshake of the smtpd session that received `message_id`.

    Postfix logs, for one session: "smtpd[PID]: ... TLS connection
    established from ...", then "smtpd[PID]: QID: client=...", then
    "cleanup[...]: QID: message-id=<...>".  An smtpd process serves many
    sessions in turn, so the handshake is the last one that process
    logged before the QID line.
    """
    lines = postfix.log().splitlines()
    cleanup = re.compile(rf": ([0-9A-F]+): message-id=<{re.escape(message_id)}>")
    queue_ids = [m[1] for line in lines if (m := cleanup.search(line))]
    assert queue_ids, f"no message-id=<{message_id}> in the maillog:\n" + "\n".join(
        lines[-40:]
    )
    client_line = re.compile(rf"postfix/smtpd\[(\d+)\]: {queue_ids[0]}: client=")
    for index, line in enumerate(lines):
        if match := client_line.search(line):
            smtpd = f"postfix/smtpd[{match[1]}]: "
            for earlier in reversed(lines[:index]):
                if smtpd in earlier and "TLS connection established" in earlier:
                    (entry,) = parse_tls_log(earlier)
                    assert entry in postfix.tls_log()
                    return entry
            raise AssertionError(
                f"{smtpd}received {message_id} without a TLS handshake:\n"
                + "\n".join(lines[max(0, index - 20) : index + 1])
            )
    raise AssertionError(f"no smtpd client line for {queue_ids[0]}")


def assert_tls_12_or_newer(entry: TLSLogEntry) -> None:
    """A protocol of TLS 1.2 or 1.3 and a cipher we configured for it."""
    assert entry.daemon == "smtpd", entry
    if entry.protocol == "TLSv1.3":
        assert entry.cipher in DEFAULT_CIPHERSUITES, entry
    else:
        assert entry.protocol == "TLSv1.2", entry
        assert entry.cipher in DEFAULT_CIPHERS, entry


# --- comparing what arrived with what left ---------------------------------


def first_header(data: bytes) -> tuple[bytes, bytes]:
    """(the first header with its continuation lines, the rest)."""
    end = re.search(rb"\n(?![ \t])", data)
    assert end is not None, data[:200]
    return data[: end.end()], data[end.end() :]


def split_received(stored: bytes, queue_id: str | None) -> bytes:
    """A delivered file without Postfix's headers and our Received header
    (checked to be ours, for `queue_id` if known); the rest is the message
    as submitted to us, in Postfix's LF form."""
    ours, rest = first_header(strip_postfix_headers(stored))
    assert ours.startswith(b"Received: from "), ours
    by = f"by relay.test (mta) with ESMTPS id {queue_id or ''}".encode()
    assert by in ours, ours
    return rest


def difference(name: str, got: bytes, expected: bytes) -> str:
    """Where `got` first parts from `expected`, readably."""
    offset = next(
        (i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
        min(len(got), len(expected)),
    )
    return (
        f"{name}: {len(got)} octets arrived, {len(expected)} expected; first "
        f"difference at {offset}: got {got[max(0, offset - 40) : offset + 40]!r}, "
        f"expected {expected[max(0, offset - 40) : offset + 40]!r}"
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- submitting ---------------------------------------------------------------


def dot_stuffed(message: bytes) -> bytes:
    """RFC 5321 4.5.2: one more dot on every line that starts with one."""
    assert message.endswith(b"\r\n")
    return re.sub(rb"(?m)^\.", b"..", message)


def open_session(address: str, port: int, starttls: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP(address, port, local_hostname="client.test", timeout=60)
    if starttls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.starttls(context=context)
        client.ehlo("client.test")
    return client


def send_raw(client: smtplib.SMTP, sample: Sample) -> str:
    """One transaction, the body written as is after our own dot-stuffing
    (smtplib would also rewrite line ends); the queue id from the 250."""
    code, text = client.mail(SENDER, list(sample.mail_options))
    assert code == 250, (sample.name, "MAIL", code, text)
    for recipient in sample.recipients:
        code, text = client.rcpt(recipient)
        assert code == 250, (sample.name, "RCPT", code, text)
    client.putcmd("data")
    code, text = client.getreply()
    assert code == 354, (sample.name, "DATA", code, text)
    client.send(dot_stuffed(sample.message) + b".\r\n")
    code, text = client.getreply()
    assert code == 250, (sample.name, "end of data", code, text)
    match = _QUEUED_AS.search(text.decode())
    assert match is not None, text
    return match[1]


def submit_all(
    address: tuple[str, int],
    samples: list[Sample],
    sessions: int,
    starttls: bool = True,
) -> dict[str, str]:
    """Submit `samples` over `sessions` concurrent SMTP sessions, several
    transactions each; Message-ID -> queue id."""
    shares = [samples[index::sessions] for index in range(sessions)]

    def run(share: list[Sample]) -> dict[str, str]:
        client = open_session(*address, starttls=starttls)
        try:
            return {sample.message_id: send_raw(client, sample) for sample in share}
        finally:
            client.quit()

    queued: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=sessions) as pool:
        for result in pool.map(run, shares):
            queued.update(result)
    return queued


def wait_for_sent(relay: RelayProcess, queue_id: str, recipient: str) -> str:
    """The relay's log line for the delivery, which must be status=sent."""
    line = relay.wait_for_log(f"{queue_id}: to=<{recipient}>", timeout=30)
    assert "status=sent" in line, line
    return line


def swaks_message(message_id: str, recipient: str) -> bytes:
    # What swaks itself rewrites stays out: no "%" tokens, no "\n" text,
    # no "From " first line, no final "." line, no dot on the first line.
    return (
        b"From: Alice <alice@org.test>\r\n"
        b"To: <" + recipient.encode() + b">\r\n"
        b"Subject: sent with swaks through the relay\r\n"
        b"Message-ID: <" + message_id.encode() + b">\r\n"
        b"\r\n"
        b"Hello from swaks.\r\n"
        b".A line that starts with a dot.\r\n"
        b"..\r\n"
        b"The end.\r\n"
    )


# --- 1. real client, real destination, TLS on every hop ---------------------


def first_configured(protocol: str, key: str) -> str:
    """Our first TLS 1.3 suite, or our first TLS 1.2 cipher for a `key`
    ("ECDSA" or "RSA") certificate: what a handshake must settle on when
    our order decides, as server (we prefer) or as client (the peer,
    Postfix by default, follows the client's order)."""
    if protocol == "TLSv1.3":
        return DEFAULT_CIPHERSUITES[0]
    return next(c for c in DEFAULT_CIPHERS if c.startswith(f"ECDHE-{key}-"))


@pytest.mark.parametrize(
    ("which", "swaks_protocol"),
    [("dest", None), ("tls12", "tlsv1_2")],
    ids=["dest-any-tls", "tls12-only"],
)
def test_swaks_submission_reaches_postfix_mx_over_tls(
    interop: Interop, which: str, swaks_protocol: str | None
) -> None:
    """swaks submits over STARTTLS; Postfix, the MX found through DNS,
    receives the message over TLS 1.2 or 1.3 with the cipher our order
    gives, and stores it unchanged; our log says status=sent with the TLS
    Postfix logged."""
    destination: Destination = getattr(interop, which)
    recipient = f"bob@{destination.domain}"
    message_id = f"swaks-{which}@org.test"
    message = swaks_message(message_id, recipient)
    address, port = interop.relay.listener("submission")

    result = swaks(address, port, SENDER, recipient, data=message,
                   tls_protocol=swaks_protocol)

    # swaks to us: the client offers OpenSSL's order (AES-256 first); as
    # the server we pick by ours, with our ECDSA certificate.
    assert result.returncode == 0, result.output
    assert result.tls is not None, result.output
    protocol, cipher = result.tls
    assert protocol == ("TLSv1.2" if swaks_protocol else "TLSv1.3")
    assert cipher == first_configured(protocol, "ECDSA"), result.tls
    queued = _QUEUED_AS.search(result.output)
    assert queued is not None, result.output
    queue_id = queued[1]
    accepted = interop.relay.wait_for_log(f"{queue_id}: accepted")
    assert f" listener=submission tls={protocol}/{cipher}" in accepted, accepted

    # Us to Postfix: what Postfix stored, and what it logged of the
    # handshake of the session that brought it.
    inbox = Inbox(destination.postfix)
    (path,) = inbox.wait_for({message_id: 1}, timeout=30)[message_id]
    assert split_received(path.read_bytes(), queue_id) == as_stored(message)
    entry = tls_of_delivery(destination.postfix, message_id)
    assert_tls_12_or_newer(entry)
    if which == "tls12":
        assert entry.protocol == "TLSv1.2", entry
        assert entry.cipher == first_configured("TLSv1.2", "RSA"), entry
    else:
        assert entry.cipher == first_configured(entry.protocol, "ECDSA"), entry

    # Both ends tell the same story.
    line = wait_for_sent(interop.relay, queue_id, recipient)
    assert f" tls={entry.protocol}/{entry.cipher} " in line, line
    assert f" relay={destination.host}[{destination.postfix.address}]:" in line


def test_swaks_inbound_reaches_relay_to_server_over_tls(interop: Interop) -> None:
    """Mail for an inbound domain, taken on the mx listener, goes to its
    relay_to server (by A record, not MX) over TLS, unchanged."""
    org = interop.org
    recipient = "carol@example.test"
    message_id = "swaks-inbound@org.test"
    message = swaks_message(message_id, recipient)
    address, port = interop.relay.listener("mx")

    result = swaks(address, port, "someone@internet.test", recipient, data=message)

    assert result.returncode == 0, result.output
    assert result.tls is not None, result.output
    queued = _QUEUED_AS.search(result.output)
    assert queued is not None, result.output
    queue_id = queued[1]
    accepted = interop.relay.wait_for_log(f"{queue_id}: accepted")
    assert " listener=mx tls=TLSv1." in accepted, accepted

    (path,) = Inbox(org.postfix).wait_for({message_id: 1}, timeout=30)[message_id]
    assert split_received(path.read_bytes(), queue_id) == as_stored(message)
    entry = tls_of_delivery(org.postfix, message_id)
    assert_tls_12_or_newer(entry)

    # relay_to named a host: its A record, never the domain's MX.
    line = wait_for_sent(interop.relay, queue_id, recipient)
    assert f" relay={org.host}[{org.postfix.address}]:" in line, line
    assert f" tls={entry.protocol}/{entry.cipher} " in line, line


# --- 2. a corpus of real-world messages, byte for byte -------------------------


def test_corpus_arrives_byte_for_byte(interop: Interop) -> None:
    """Sixty-odd messages of the kinds real mail has, submitted over six
    concurrent sessions, each arrive at Postfix with the same SHA-256 as
    what was submitted, once our Received header is taken off."""
    samples = corpus.corpus()
    assert len(samples) >= 50
    # Deterministic: the same seed gives the same bytes.
    assert [sha256(s.message) for s in corpus.corpus()] == [
        sha256(s.message) for s in samples
    ]

    queued = submit_all(interop.relay.listener("submission"), samples, sessions=6)

    inbox = Inbox(interop.dest.postfix)
    try:
        delivered = inbox.wait_for(
            {s.message_id: len(s.recipients) for s in samples}, timeout=60
        )
    except AssertionError as error:
        # What the relay said about the ones that did not come.
        lines = [line for line in interop.relay.log().splitlines()
                 if "status=" in line and "status=sent" not in line]
        raise AssertionError(f"{error}\n--- relay (not sent):\n"
                             + "\n".join(lines[-40:])) from None
    problems = []
    for sample in samples:
        expected = as_stored(sample.message)
        for path in delivered[sample.message_id]:
            got = split_received(path.read_bytes(), queued[sample.message_id])
            if sha256(got) != sha256(expected):
                problems.append(difference(sample.name, got, expected))
    assert not problems, "\n".join(problems)

    for sample in samples:
        for recipient in sample.recipients:
            line = wait_for_sent(interop.relay, queued[sample.message_id], recipient)
            assert re.search(r" tls=TLSv1\.[23]/\S+ ", line), line


# --- 3. ten mebibytes --------------------------------------------------------------


def test_ten_mib_message_arrives_intact(interop: Interop) -> None:
    """A 10 MiB message arrives whole (SHA-256), over TLS."""
    sample = corpus.big_message()
    assert len(sample.message) == corpus.TEN_MIB

    queued = submit_all(interop.relay.listener("submission"), [sample], sessions=1)

    inbox = Inbox(interop.dest.postfix)
    (path,) = inbox.wait_for({sample.message_id: 1}, timeout=60)[sample.message_id]
    got = split_received(path.read_bytes(), queued[sample.message_id])
    expected = as_stored(sample.message)
    assert sha256(got) == sha256(expected), difference(sample.name, got, expected)
    queue_id = queued[sample.message_id]
    line = wait_for_sent(interop.relay, queue_id, sample.recipients[0])
    entry = tls_of_delivery(interop.dest.postfix, sample.message_id)
    assert_tls_12_or_newer(entry)
    assert f"tls={entry.protocol}/{entry.cipher} " in line, line


# --- 4. real software as the client: Postfix with the relay as smarthost --


def test_postfix_client_relays_through_us_over_tls(interop: Interop) -> None:
    """The organisation's Postfix uses the relay as its smarthost, and its
    SMTP client (pipelining, several transactions per TLS session) hands
    over the corpus.  Postfix's client breaks lines longer than 998 octets
    (smtp_line_length_limit), so the samples here are those without."""
    samples = [
        s for s in corpus.corpus(tag="pf") if corpus.longest_line(s.message) <= 998
    ]
    assert len(samples) >= 40

    client = interop.client
    submit_all((client.address, client.port), samples, sessions=4, starttls=False)

    inbox = Inbox(interop.dest.postfix)
    try:
        delivered = inbox.wait_for(
            {s.message_id: len(s.recipients) for s in samples}, timeout=60
        )
    except AssertionError as error:
        # What the relay said about the ones that did not come.
        lines = [line for line in interop.relay.log().splitlines()
                 if "status=" in line and "status=sent" not in line]
        raise AssertionError(f"{error}\n--- relay (not sent):\n"
                             + "\n".join(lines[-40:])) from None
    problems = []
    for sample in samples:
        expected = as_stored(sample.message)
        for path in delivered[sample.message_id]:
            # Under ours, the Received header of the client Postfix.
            theirs, got = first_header(split_received(path.read_bytes(), None))
            assert b"by mail.org.test (Postfix)" in theirs, theirs
            if sha256(got) != sha256(expected):
                problems.append(difference(sample.name, got, expected))
    assert not problems, "\n".join(problems)

    # Postfix's client side of each session (logged by smtp, or by
    # tlsproxy for a reused session): TLS, in our order, as we are the
    # server and prefer ours.
    address, port = interop.relay.listener("submission")
    handshakes = [
        e for e in client.tls_log() if e.peer.endswith(f"[{address}]:{port}")
    ]
    assert handshakes, client.log()[-3000:]
    for entry in handshakes:
        assert entry.protocol == "TLSv1.3", entry
        assert entry.cipher == DEFAULT_CIPHERSUITES[0], entry
    # Postfix logs conn_use=N for the Nth transaction of a reused session.
    assert "conn_use=" in client.log(), "no session carried two transactions"
