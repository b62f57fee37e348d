"""Smoke tests for the loopback peers in tests/peers.

Each peer is started for real and talked to with a standard client
(dnspython's resolver, smtplib, swaks), so that a relay test failing against
one of them points at the relay, not at the peer.
"""

from __future__ import annotations

import datetime
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.resolver
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.peers import certs, postfix, smtppeer
from tests.peers.dnsserver import DNSServer

MESSAGE = (
    b"From: Alice <alice@src.test>\r\n"
    b"To: Bob <bob@peer.test>\r\n"
    b"Subject: smoke\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"\r\n"
    b"last line\r\n"
)


def resolver_for(server: DNSServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.address]
    resolver.port = server.port
    resolver.timeout = 1.0
    resolver.lifetime = 2.0
    return resolver


def send(
    peer: smtppeer.Peer,
    context: ssl.SSLContext | None = None,
    message: bytes = MESSAGE,
    mail_from: str = "alice@src.test",
    to: tuple[str, ...] = ("bob@peer.test",),
) -> dict[str, tuple[int, bytes]]:
    """Send one message with smtplib, with STARTTLS when `context` is given."""
    with smtplib.SMTP(peer.address, peer.port, local_hostname="relay.test") as client:
        if context is not None:
            client.starttls(context=context)
        return client.sendmail(mail_from, list(to), message)


def verifying_context() -> ssl.SSLContext:
    # smtplib checks the certificate against the address it connected to;
    # the peers' certificates name a host, so check the chain only.
    context = certs.client_context()
    context.check_hostname = False
    return context


ZONE = {
    "example.test": {"MX": ["10 mx1.example.test.", "20 mx2.example.test."]},
    "mx1.example.test": {"A": ["127.0.0.11"], "AAAA": ["::1"]},
    "mx2.example.test.": {"A": ["127.0.0.12"]},
    "nullmx.test": {"MX": ["0 ."]},
    "big.test": {"TXT": [f'"record {i:02} {"x" * 60}"' for i in range(20)]},
}


class TestDNSServer:
    @pytest.fixture
    def server(self) -> Iterator[DNSServer]:
        with DNSServer(ZONE, servfail=["broken.test"]) as server:
            yield server

    def test_mx_and_addresses(self, server: DNSServer) -> None:
        resolver = resolver_for(server)

        mx = sorted(
            (r.preference, r.exchange.to_text())
            for r in resolver.resolve("example.test", "MX")
        )
        assert mx == [(10, "mx1.example.test."), (20, "mx2.example.test.")]
        assert [r.address for r in resolver.resolve("MX1.Example.TEST.", "A")] == [
            "127.0.0.11"
        ]
        assert [r.address for r in resolver.resolve("mx1.example.test", "AAAA")] == [
            "::1"
        ]

    def test_null_mx(self, server: DNSServer) -> None:
        answer = list(resolver_for(server).resolve("nullmx.test", "MX"))

        assert len(answer) == 1
        assert answer[0].preference == 0
        assert answer[0].exchange.to_text() == "."

    def test_negative_answers(self, server: DNSServer) -> None:
        resolver = resolver_for(server)

        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve("nowhere.test", "MX")
        with pytest.raises(dns.resolver.NoAnswer):
            resolver.resolve("example.test", "A")
        # An ancestor of a name in the zone exists (RFC 8020).
        with pytest.raises(dns.resolver.NoAnswer):
            resolver.resolve("test", "MX")
        with pytest.raises(dns.resolver.NoNameservers):
            resolver.resolve("broken.test", "MX")

    def test_zone_changes_at_runtime(self, server: DNSServer) -> None:
        resolver = resolver_for(server)

        server.set("late.test", "A", ["127.0.0.13"])
        assert [r.address for r in resolver.resolve("late.test", "A")] == ["127.0.0.13"]

        server.zone["Direct.Test."] = {"a": ["127.0.0.14"]}
        assert [r.address for r in resolver.resolve("direct.test", "A")] == [
            "127.0.0.14"
        ]

        server.remove("late.test")
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve("late.test", "A")

    def test_tcp_and_truncation(self, server: DNSServer) -> None:
        query = dns.message.make_query("example.test", "MX")
        response = dns.query.tcp(query, server.address, port=server.port, timeout=2)
        assert len(response.answer[0]) == 2

        # 20 TXT records do not fit in 512 octets: TC over UDP, then TCP.
        answer = resolver_for(server).resolve("big.test", "TXT")
        assert len(answer) == 20
        transports = [q.transport for q in server.queries if q.name == "big.test"]
        assert transports == ["udp", "tcp"]

        server.truncate.add("example.test")
        assert len(resolver_for(server).resolve("example.test", "MX")) == 2
        transports = [q.transport for q in server.queries if q.name == "example.test"]
        assert transports == ["tcp", "udp", "tcp"]

    def test_dropped_query_times_out(self, server: DNSServer) -> None:
        server.drop.add("silent.test")
        query = dns.message.make_query("silent.test", "MX")

        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(query, server.address, port=server.port, timeout=0.3)


class TestCerts:
    def test_expired(self) -> None:
        leaf = certs.issue_expired_cert("old.test")
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())

        assert cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC)

    def test_wildcard_and_rsa(self) -> None:
        leaf = certs.issue_wildcard_cert("example.test", key_type=certs.RSA)
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)

        assert names.value.get_values_for_type(x509.DNSName) == ["*.example.test"]
        assert cert.public_key().key_size == 2048  # type: ignore[union-attr]

    def test_cn_only(self) -> None:
        leaf = certs.issue_cn_only_cert("legacy.test")
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())

        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [attribute.value for attribute in common_names] == ["legacy.test"]

    def test_files_and_trust(self, tmp_path: Path) -> None:
        files = certs.write_cert_files(
            certs.issue_cn_only_cert("legacy.test"), tmp_path / "tls"
        )
        context = certs.server_context(files)
        ca_file = certs.write_ca_file(certs.trusted_ca(), tmp_path / "ca.pem")
        trusting = ssl.create_default_context(cafile=str(ca_file))
        trusting.check_hostname = False
        with smtppeer.Peer(tls_context=context) as peer:
            send(peer, trusting)

            untrusting = certs.client_context(certs.untrusted_ca())
            untrusting.check_hostname = False
            with pytest.raises(ssl.SSLCertVerificationError):
                send(peer, untrusting)

        assert files.key.stat().st_mode & 0o777 == 0o600
        assert len(peer.messages) == 1


class TestSMTPPeer:
    def test_plain_records_the_exact_message(self) -> None:
        with smtppeer.plain() as peer:
            with smtplib.SMTP(peer.address, peer.port) as client:
                client.ehlo("relay.test")
                assert not client.has_extn("starttls")
                client.sendmail(
                    "alice@src.test",
                    ["bob@peer.test", "carol@peer.test"],
                    MESSAGE,
                    mail_options=["BODY=8BITMIME"],
                )
            (message,) = peer.wait_for(1)

        assert message.mail_from == "alice@src.test"
        assert message.rcpt_tos == ("bob@peer.test", "carol@peer.test")
        assert message.rcpt_options == ((), ())
        assert "BODY=8BITMIME" in message.mail_options
        # Dot-unstuffed, CRLF kept: byte for byte what the client meant.
        assert message.content == MESSAGE
        assert message.ehlo_name == "relay.test"
        assert message.tls is None
        assert message.reply.startswith("250")

    def test_null_sender(self) -> None:
        with smtppeer.plain() as peer:
            send(peer, mail_from="")
            (message,) = peer.wait_for(1)

        assert message.mail_from == ""

    def test_tls13(self) -> None:
        with smtppeer.tls13() as peer:
            send(peer, verifying_context())
            (message,) = peer.wait_for(1)
            (connection,) = peer.wait_for_connections(1)

        assert message.tls is not None
        assert message.tls.protocol == "TLSv1.3"
        assert message.content == MESSAGE
        assert connection.commands[:2] == ["EHLO relay.test", "STARTTLS"]
        assert connection.tls == message.tls

    def test_tls12_only_rsa(self) -> None:
        with smtppeer.tls12_only(rsa=True) as peer:
            send(peer, verifying_context())
            (message,) = peer.wait_for(1)

        assert message.tls is not None
        assert message.tls.protocol == "TLSv1.2"
        assert message.tls.cipher.startswith("ECDHE-RSA-")

    @pytest.mark.parametrize(
        ("make_peer", "protocol"),
        [(smtppeer.tls10_only, "TLSv1"), (smtppeer.tls11_only, "TLSv1.1")],
    )
    def test_old_tls(
        self, make_peer: Callable[[], smtppeer.Peer], protocol: str
    ) -> None:
        with make_peer() as peer:
            send(peer, certs.permissive_client_context())
            (message,) = peer.wait_for(1)

            # A client with OpenSSL 3's defaults (TLS 1.2+) cannot connect.
            with pytest.raises(ssl.SSLError):
                send(peer, verifying_context())

        assert message.tls is not None
        assert message.tls.protocol == protocol

    def test_no_shared_cipher(self) -> None:
        aead_only = certs.permissive_client_context(ciphers="ECDHE+AESGCM")
        with smtppeer.no_shared_cipher() as peer:
            with pytest.raises(ssl.SSLError):
                send(peer, aead_only)
            (connection,) = peer.wait_for_connections(1)

            # The same peer completes with a client that has its CBC suite.
            send(
                peer, certs.permissive_client_context(ciphers="ECDHE-ECDSA-AES128-SHA")
            )
            (message,) = peer.wait_for(1)

        assert connection.tls is None
        assert connection.tls_error is not None
        assert "NO_SHARED_CIPHER" in connection.tls_error
        assert message.tls is not None
        assert message.tls.cipher == "ECDHE-ECDSA-AES128-SHA"

    def test_client_order(self) -> None:
        first = "ECDHE-ECDSA-AES128-GCM-SHA256"
        second = "ECDHE-ECDSA-CHACHA20-POLY1305"
        with smtppeer.client_order() as peer:
            for order in ((first, second), (second, first)):
                context = certs.permissive_client_context(ciphers=":".join(order))
                send(peer, context)
            messages = peer.wait_for(2)

        assert [m.tls.cipher for m in messages if m.tls] == [first, second]

    def test_starttls_454(self) -> None:
        with smtppeer.starttls_454() as peer:
            with smtplib.SMTP(peer.address, peer.port) as client:
                client.ehlo("relay.test")
                assert client.has_extn("starttls")
                with pytest.raises(smtplib.SMTPResponseException) as refused:
                    client.starttls(context=verifying_context())
                assert refused.value.smtp_code == 454
                # The session goes on in plaintext.
                client.sendmail("alice@src.test", ["bob@peer.test"], MESSAGE)
            (message,) = peer.wait_for(1)

        assert message.tls is None

    def test_starttls_lowercase(self) -> None:
        with smtppeer.starttls_lowercase() as peer:
            with smtplib.SMTP(peer.address, peer.port) as client:
                _, features = client.ehlo("relay.test")
                assert b"\nstarttls\n" in features
                assert b"STARTTLS" not in features
                client.starttls(context=verifying_context())
                client.sendmail("alice@src.test", ["bob@peer.test"], MESSAGE)
            (message,) = peer.wait_for(1)

        assert message.tls is not None

    def test_chosen_replies(self) -> None:
        replies = smtppeer.Replies(
            mail={"spammer@src.test": "550 5.7.1 not you"},
            rcpt={
                "Later@Peer.test": "450 4.2.1 try later",
                "gone@peer.test": "550 5.1.1 no such user",
            },
            data_for={"bob@peer.test": "452 4.3.1 out of storage"},
        )
        with smtppeer.plain(replies=replies) as peer:
            with pytest.raises(smtplib.SMTPSenderRefused) as sender:
                send(peer, mail_from="spammer@src.test")
            assert sender.value.smtp_code == 550

            refused = send(
                peer, to=("later@peer.test", "gone@peer.test", "carol@peer.test")
            )
            assert {address: code for address, (code, _) in refused.items()} == {
                "later@peer.test": 450,
                "gone@peer.test": 550,
            }

            with pytest.raises(smtplib.SMTPDataError) as data:
                send(peer, to=("bob@peer.test",))
            assert data.value.smtp_code == 452

            messages = peer.wait_for(2)

        assert messages[0].rcpt_tos == ("carol@peer.test",)
        assert messages[1].reply.startswith("452")

    @pytest.mark.parametrize("greeting", ["554 5.7.1 no service", "421 4.3.2 busy"])
    def test_greeting(self, greeting: str) -> None:
        replies = smtppeer.Replies(greeting=greeting)
        with smtppeer.plain(replies=replies) as peer:
            client = smtplib.SMTP()
            try:
                code, text = client.connect(peer.address, peer.port)
                assert f"{code} {text.decode()}" == greeting
                if greeting.startswith("554"):
                    assert client.ehlo("relay.test")[0] == 503
            finally:
                client.close()
            (connection,) = peer.wait_for_connections(1)

        assert connection.transcript[0] == "S: " + greeting

    def test_disconnect(self) -> None:
        replies = smtppeer.Replies(data=smtppeer.DISCONNECT)
        with smtppeer.plain(replies=replies) as peer:
            with pytest.raises(smtplib.SMTPServerDisconnected):
                send(peer)
            (connection,) = peer.wait_for_connections(1)

        assert connection.transcript[-1] == "S: " + smtppeer.DISCONNECT


# Postfix and swaks: these must run wherever the suite runs, so a missing
# program is a failure that names the Debian package, never a skip.


@pytest.fixture(scope="module")
def postfix_certs() -> Iterator[tuple[Path, certs.CertFiles]]:
    with postfix.reachable_tmpdir() as folder:
        leaf = certs.issue_server_cert("postfix.test")
        yield folder, certs.write_cert_files(leaf, folder / "tls")


@pytest.fixture(scope="module")
def postfix_mx(
    postfix_certs: tuple[Path, certs.CertFiles],
) -> Iterator[postfix.PostfixInstance]:
    folder, files = postfix_certs
    address = "127.0.0.25"
    instance = postfix.PostfixInstance(
        folder / "mx",
        address,
        postfix.free_port(address),
        tls_cert=files.chain,
        tls_key=files.key,
        tls_level="encrypt",
        domains=["dest.test"],
    )
    with instance:
        yield instance


def test_programs_are_installed() -> None:
    postfix.require_program("postfix", postfix.POSTFIX_PACKAGE)
    postfix.require_program("swaks", postfix.SWAKS_PACKAGE)

    with pytest.raises(postfix.MissingProgram, match="Debian package 'no-such-pkg'"):
        postfix.require_program("no-such-program", "no-such-pkg")


def test_postfix_receives_over_tls(postfix_mx: postfix.PostfixInstance) -> None:
    result = postfix.swaks(
        postfix_mx.address, postfix_mx.port, "alice@src.test", "bob@dest.test",
        data=MESSAGE,
    )  # fmt: skip

    assert result.returncode == 0, result.output
    assert result.tls is not None and result.tls[0] == "TLSv1.3"
    (stored,) = postfix_mx.wait_for_messages(1, recipient="bob@dest.test")
    assert postfix.strip_postfix_headers(stored) == postfix.as_stored(MESSAGE)
    assert postfix_mx.tls_log()[-1].protocol == "TLSv1.3"


def test_postfix_logs_the_protocol(postfix_mx: postfix.PostfixInstance) -> None:
    result = postfix.swaks(
        postfix_mx.address, postfix_mx.port, "alice@src.test", "carol@dest.test",
        data=MESSAGE, tls_protocol="tlsv1_2",
    )  # fmt: skip

    assert result.returncode == 0, result.output
    postfix_mx.wait_for_messages(1, recipient="carol@dest.test")
    entry = postfix_mx.tls_log()[-1]
    assert (entry.daemon, entry.protocol) == ("smtpd", "TLSv1.2")
    assert result.tls is not None
    assert entry.cipher == result.tls[1]


def test_postfix_demands_tls(postfix_mx: postfix.PostfixInstance) -> None:
    result = postfix.swaks(
        postfix_mx.address, postfix_mx.port, "alice@src.test", "dave@dest.test",
        data=MESSAGE, tls=False,
    )  # fmt: skip

    assert result.returncode != 0
    assert "530 5.7.0 Must issue a STARTTLS command first" in result.output


def test_strip_postfix_headers_is_exact() -> None:
    stored = (
        b"Return-Path: <a@src.test>\n"
        b"Delivered-To: b@dest.test\n"
        b"Received: from x (unknown [127.0.0.1])\n"
        b"\tby postfix.test (Postfix) with ESMTPS id 1\n"
        b"Received: from earlier.test\n"
        b"Subject: s\n\nbody\n"
    )
    assert postfix.strip_postfix_headers(stored) == (
        b"Received: from earlier.test\nSubject: s\n\nbody\n"
    )
    with pytest.raises(ValueError, match="return-path"):
        postfix.strip_postfix_headers(b"Subject: s\n\nbody\n")


def test_postfix_relays_to_a_peer(
    postfix_certs: tuple[Path, certs.CertFiles],
) -> None:
    folder, _ = postfix_certs
    address = "127.0.0.26"
    with smtppeer.tls13(hostname="relay.peer.test") as peer:
        instance = postfix.PostfixInstance(
            folder / "client",
            address,
            postfix.free_port(address),
            relayhost=f"[{peer.address}]:{peer.port}",
            smtp_tls_level="encrypt",
            hostname="client.postfix.test",
        )
        with instance:
            result = postfix.swaks(
                address, instance.port, "alice@src.test", "bob@elsewhere.test",
                data=MESSAGE, tls=False,
            )  # fmt: skip
            assert result.returncode == 0, result.output
            (message,) = peer.wait_for(1, timeout=10)
            instance.wait_for_log(r"status=sent")
            tls = [e for e in instance.tls_log() if e.daemon == "smtp"]

    assert message.ehlo_name == "client.postfix.test"
    assert message.rcpt_tos == ("bob@elsewhere.test",)
    assert message.tls is not None and message.tls.protocol == "TLSv1.3"
    assert message.content.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])
    assert tls and tls[0].protocol == "TLSv1.3"


def test_loopback_only() -> None:
    # Every peer binds where it is told, and only there.
    with smtppeer.plain("127.0.0.27") as peer, DNSServer({}, "127.0.0.27") as server:
        assert peer.address == server.address == "127.0.0.27"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", peer.port), timeout=1).close()
