"""Tables of input and expected answer for `mta.relaycontrol`: which
recipients a listener takes, and the MAIL and RCPT syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import Config, Listener, load_config
from mta.relaycontrol import (
    Mailbox,
    MailRequest,
    canonical_address,
    parse_mail,
    parse_rcpt,
    postmaster_domain,
    recipient_limit,
    recipient_verdict,
)
from mta.reply import Reply
from tests.relaytricks import ROUTE_TO_US, TRICKS, Trick

CONFIG = """
hostname: relay.test
spool: spool
tls: {certificate: none.crt, private_key: none.key}
listeners:
  - {name: mx, address: 127.0.0.1, port: 2525, role: inbound}
  - {name: submission, address: 127.0.0.1, port: 2587, role: outbound,
     networks: [192.0.2.0/24, "2001:db8::/32"]}
limits: {message_size: 1000, recipients: 2}
domains:
  example.com: {relay_to: ["mail.example.com"]}
  listed.example:
    relay_to: ["mail.listed.example"]
    recipients: [alice@listed.example, Bob@Listed.Example]
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = Path(tmp_path_factory.mktemp("config")) / "mta.yaml"
    path.write_text(CONFIG)
    return load_config(path, check_tls=False)


def listener(config: Config, name: str) -> Listener:
    return next(item for item in config.listeners if item.name == name)


def outcome(reply: Reply | None) -> str | None:
    return None if reply is None else f"{reply.code} {reply.dsn}"


class TestRecipientVerdict:
    @pytest.mark.parametrize(
        ("listener_name", "client", "recipient", "expected"),
        [
            # inbound: our domains only, whoever the client
            ("mx", "203.0.113.9", "user@example.com", None),
            ("mx", "203.0.113.9", "User@EXAMPLE.COM", None),
            ("mx", "203.0.113.9", "user@other.example", "550 5.7.1"),
            ("mx", "203.0.113.9", "user@sub.example.com", "550 5.7.1"),
            ("mx", "203.0.113.9", "user@example.com.evil", "550 5.7.1"),
            ("mx", "192.0.2.10", "user@other.example", "550 5.7.1"),
            ("mx", "203.0.113.9", "user@[192.0.2.1]", "550 5.7.1"),
            # inbound with a recipient list: listed addresses and postmaster
            ("mx", "203.0.113.9", "alice@listed.example", None),
            ("mx", "203.0.113.9", "ALICE@Listed.Example", None),
            ("mx", "203.0.113.9", "bob@listed.example", None),
            ("mx", "203.0.113.9", '"alice"@listed.example', None),
            ("mx", "203.0.113.9", "carol@listed.example", "550 5.1.1"),
            ("mx", "203.0.113.9", '"alice x"@listed.example', "550 5.1.1"),
            ("mx", "203.0.113.9", "postmaster@listed.example", None),
            ("mx", "203.0.113.9", "PostMaster@LISTED.example", None),
            ("mx", "203.0.113.9", "postmaster@other.example", "550 5.7.1"),
            # inbound: no sender-specified routing through our domains, as
            # Postfix's allow_untrusted_routing = no
            ("mx", "203.0.113.9", "user+tag@example.com", None),
            ("mx", "203.0.113.9", "user%other.test@example.com", "550 5.7.1"),
            ("mx", "203.0.113.9", "other.test!user@example.com", "550 5.7.1"),
            ("mx", "203.0.113.9", '"user@other.test"@example.com', "550 5.7.1"),
            ("mx", "203.0.113.9", '"user\\@other.test"@example.com', "550 5.7.1"),
            ("mx", "203.0.113.9", '"user%other.test"@example.com', "550 5.7.1"),
            ("mx", "192.0.2.10", "user%other.test@example.com", "550 5.7.1"),
            ("mx", "203.0.113.9", "alice%x@listed.example", "550 5.7.1"),
            ("mx", "203.0.113.9", "postmaster%x@listed.example", "550 5.7.1"),
            # outbound: clients in networks, to anywhere
            ("submission", "192.0.2.10", "user@far.example", None),
            ("submission", "2001:db8::5", "user@far.example", None),
            ("submission", "192.0.2.10", "user@example.com", None),
            ("submission", "198.51.100.1", "user@far.example", "554 5.7.1"),
            ("submission", "198.51.100.1", "user@example.com", "554 5.7.1"),
            ("submission", "2001:db9::5", "user@far.example", "554 5.7.1"),
            ("submission", "unknown", "user@far.example", "554 5.7.1"),
            # outbound to one of our listed domains: the list still applies
            ("submission", "192.0.2.10", "carol@listed.example", "550 5.1.1"),
            ("submission", "192.0.2.10", "alice@listed.example", None),
            # outbound: trusted clients may route as they like
            ("submission", "192.0.2.10", "user%other.test@example.com", None),
            ("submission", "192.0.2.10", "other.test!user@far.example", None),
            ("submission", "198.51.100.1", "user%other.test@example.com", "554 5.7.1"),
        ],
    )
    def test_table(
        self,
        config: Config,
        listener_name: str,
        client: str,
        recipient: str,
        expected: str | None,
    ) -> None:
        reply = recipient_verdict(
            config, listener(config, listener_name), client, recipient
        )
        assert outcome(reply) == expected

    def test_texts_name_the_recipient(self, config: Config) -> None:
        inbound = recipient_verdict(
            config, listener(config, "mx"), "203.0.113.9", "X@other.example"
        )
        outbound = recipient_verdict(
            config, listener(config, "submission"), "198.51.100.1", "x@y.example"
        )
        assert inbound is not None and outbound is not None
        assert inbound.line() == (
            "550 5.7.1 <X@other.example>: Recipient address rejected: "
            "not a domain we accept mail for"
        )
        assert outbound.line() == "554 5.7.1 <x@y.example>: Relay access denied"

    def test_routing_text_says_why(self, config: Config) -> None:
        reply = recipient_verdict(
            config, listener(config, "mx"), "203.0.113.9", "u%o.test@example.com"
        )
        assert reply is not None
        assert reply.line() == (
            "550 5.7.1 <u%o.test@example.com>: Relay access denied: "
            "sender-specified routing is not accepted"
        )


def rcpt_outcome(config: Config, name: str, client: str, path: str) -> str | None:
    """What a listener answers ``RCPT TO:path``: the parse, then the
    verdict, as `mta.smtpserver` runs them."""
    recipient = parse_rcpt(f"TO:{path}", postmaster_domain(config))
    if isinstance(recipient, Reply):
        return outcome(recipient)
    return outcome(
        recipient_verdict(config, listener(config, name), client, str(recipient))
    )


class TestRelayTricks:
    """Every row of tests/relaytricks.py, on both kinds of listener."""

    @pytest.mark.parametrize("trick", TRICKS, ids=lambda trick: trick.why)
    def test_inbound_refuses(self, config: Config, trick: Trick) -> None:
        path = trick.on("127.0.0.1")
        assert rcpt_outcome(config, "mx", "203.0.113.9", path) == trick.inbound

    @pytest.mark.parametrize("trick", TRICKS, ids=lambda trick: trick.why)
    def test_outbound_refuses_strangers(self, config: Config, trick: Trick) -> None:
        path = trick.on("127.0.0.1")
        got = rcpt_outcome(config, "submission", "198.51.100.1", path)
        assert got == trick.from_stranger

    @pytest.mark.parametrize(
        "trick",
        [trick for trick in TRICKS if trick.inbound.startswith(("501", "555"))],
        ids=lambda trick: trick.why,
    )
    def test_syntax_is_refused_for_trusted_clients_too(
        self, config: Config, trick: Trick
    ) -> None:
        path = trick.on("127.0.0.1")
        got = rcpt_outcome(config, "submission", "192.0.2.10", path)
        assert got == trick.inbound

    def test_a_route_that_ends_at_us_is_ours(self, config: Config) -> None:
        # RFC 5321 appendix C: the route is dropped; the mailbox is ours.
        assert parse_rcpt(f"TO:{ROUTE_TO_US}") == Mailbox("u", "example.com")
        assert rcpt_outcome(config, "mx", "203.0.113.9", ROUTE_TO_US) is None


class TestCanonicalAddress:
    """RFC 5321 4.1.2: ``"ceo"`` and ``ceo`` are the same mailbox; domains
    are case-insensitive (2.4) and a trailing dot names the same domain."""

    @pytest.mark.parametrize(
        ("address", "expected"),
        [
            ("ceo@example.com", "ceo@example.com"),
            ("CEO@Example.COM", "CEO@example.com"),
            ("ceo@example.com.", "ceo@example.com"),
            ('"ceo"@example.com', "ceo@example.com"),
            ('"c\\eo"@example.com', "ceo@example.com"),
            ('"c.e.o"@example.com', "c.e.o@example.com"),
            ('"user%x"@example.com', "user%x@example.com"),
            ('"ceo "@Example.com', '"ceo "@example.com'),
            ('"c..eo"@example.com', '"c..eo"@example.com'),
            ('".ceo"@example.com', '".ceo"@example.com'),
            ('""@example.com', '""@example.com'),
            ('"a\\"b"@example.com', '"a\\"b"@example.com'),
            ('"a@b"@example.com', '"a@b"@example.com'),
            ("a@[IPv6:2001:DB8::1]", "a@[IPv6:2001:DB8::1]"),
        ],
    )
    def test_table(self, address: str, expected: str) -> None:
        assert canonical_address(address) == expected


class TestRecipientLimit:
    @pytest.mark.parametrize(
        ("accepted", "expected"), [(0, None), (1, None), (2, "452 4.5.3")]
    )
    def test_table(self, config: Config, accepted: int, expected: str | None) -> None:
        assert outcome(recipient_limit(config.limits, accepted)) == expected


def mail(
    sender: str | None, size: int | None = None, body: str = "7BIT"
) -> MailRequest:
    if sender is None:
        return MailRequest(None, size, body)
    local, _, domain = sender.rpartition("@")
    return MailRequest(Mailbox(local, domain), size, body)


class TestParseMail:
    @pytest.mark.parametrize(
        ("argument", "expected"),
        [
            ("FROM:<a@b.example>", mail("a@b.example")),
            ("from:<a@b.example>", mail("a@b.example")),
            ("FROM: <a@b.example>", mail("a@b.example")),
            ("FROM:<A.B+tag@B.Example>", mail("A.B+tag@b.example")),
            ('FROM:<"x"@Org.Test>', mail("x@org.test")),
            ('FROM:<"x\\.y"@org.test>', mail("x.y@org.test")),
            ("FROM:<>", mail(None)),
            ("FROM:<> SIZE=100", mail(None, size=100)),
            ("FROM:<a@b.example> SIZE=1000", mail("a@b.example", size=1000)),
            (
                "FROM:<a@b.example> size=10 body=8bitmime",
                mail("a@b.example", size=10, body="8BITMIME"),
            ),
            ("FROM:<a@b.example> BODY=7BIT", mail("a@b.example")),
            ('FROM:<"a b"@b.example>', mail('"a b"@b.example')),
            ("FROM:<@r1.example,@r2.example:a@b.example>", mail("a@b.example")),
            ("FROM:<a@[192.0.2.1]>", mail("a@[192.0.2.1]")),
            ("FROM:<a@[IPv6:2001:db8::1]>", mail("a@[IPv6:2001:db8::1]")),
        ],
    )
    def test_accepted(
        self, config: Config, argument: str, expected: MailRequest
    ) -> None:
        assert parse_mail(argument, config.limits) == expected

    @pytest.mark.parametrize(
        ("argument", "expected"),
        [
            ("", "501 5.5.4"),
            ("TO:<a@b.example>", "501 5.5.4"),
            ("FROM<a@b.example>", "501 5.5.4"),
            ("FROM:a@b.example", "501 5.1.7"),
            ("FROM:<a@b.example", "501 5.1.7"),
            ("FROM:<a@b.example>SIZE=1", "501 5.1.7"),
            ("FROM:<a b@b.example>", "501 5.1.7"),
            ("FROM:<a@>", "501 5.1.7"),
            ("FROM:<@b.example>", "501 5.1.7"),
            ("FROM:<a>", "501 5.1.7"),
            ("FROM:<a@-b.example>", "501 5.1.7"),
            ("FROM:<a@b.example.>", "501 5.1.7"),
            ("FROM:<a..b@b.example>", "501 5.1.7"),
            ("FROM:<jö@b.example>", "501 5.1.7"),
            # valid quoted strings that mta.smtpclient could never send on
            ('FROM:<"x>y"@org.test>', "501 5.1.7"),
            ('FROM:<"x<y"@org.test>', "501 5.1.7"),
            ('FROM:<"x\\>y"@org.test>', "501 5.1.7"),
            ('FROM:<"a\x00b"@b.example>', "501 5.1.7"),
            ('FROM:<"a\tb"@b.example>', "501 5.1.7"),
            ('FROM:<"a\x7fb"@b.example>', "501 5.1.7"),
            ('FROM:<"jö"@b.example>', "501 5.1.7"),
            ("FROM:<a@[999.1.1.1]>", "501 5.1.7"),
            ("FROM:<a@[tag:whatever]>", "501 5.1.7"),
            ("FROM:<" + "a" * 65 + "@b.example>", "501 5.1.7"),
            ("FROM:<a@" + "b" * 64 + ".example>", "501 5.1.7"),
            ("FROM:<a@b.example> SIZE=1001", "552 5.3.4"),
            ("FROM:<a@b.example> SIZE=" + "9" * 21, "501 5.5.4"),
            ("FROM:<a@b.example> SIZE=abc", "501 5.5.4"),
            ("FROM:<a@b.example> SIZE", "501 5.5.4"),
            ("FROM:<a@b.example> BODY=BINARYMIME", "501 5.5.4"),
            ("FROM:<a@b.example> SIZE=1 SIZE=2", "501 5.5.4"),
            ("FROM:<a@b.example> SMTPUTF8", "555 5.5.4"),
            ("FROM:<a@b.example> AUTH=<>", "555 5.5.4"),
            ("FROM:<a@b.example> RET=HDRS", "555 5.5.4"),
            ("FROM:<a@b.example> =x", "555 5.5.4"),
        ],
    )
    def test_refused(self, config: Config, argument: str, expected: str) -> None:
        reply = parse_mail(argument, config.limits)
        assert isinstance(reply, Reply)
        assert outcome(reply) == expected

    def test_unknown_parameter_is_echoed_as_ascii(self, config: Config) -> None:
        reply = parse_mail("FROM:<a@b.example> X\u00e9\x01=1", config.limits)
        assert reply == Reply(555, "5.5.4", "Unsupported option: X??=1")

    def test_unrelayable_text(self, config: Config) -> None:
        reply = parse_mail('FROM:<"x>y"@org.test>', config.limits)
        assert isinstance(reply, Reply)
        assert reply.line() == (
            "501 5.1.7 Bad sender address: <, >, control and non-ASCII "
            "characters cannot be relayed"
        )

    def test_size_text(self, config: Config) -> None:
        reply = parse_mail("FROM:<a@b.example> SIZE=5000", config.limits)
        assert isinstance(reply, Reply)
        assert reply.line() == "552 5.3.4 Message size exceeds fixed limit"


class TestParseRcpt:
    @pytest.mark.parametrize(
        ("argument", "expected"),
        [
            ("TO:<a@b.example>", Mailbox("a", "b.example")),
            ("to:<Alice@B.Example>", Mailbox("Alice", "b.example")),
            ("TO: <a@b.example>", Mailbox("a", "b.example")),
            ("TO:<@relay.example:a@b.example>", Mailbox("a", "b.example")),
            ('TO:<"x\\"y"@b.example>', Mailbox('"x\\"y"', "b.example")),
            # one canonical form (RFC 5321 4.1.2): quotes that are not
            # needed are dropped, the domain is lower-cased
            ('TO:<"ceo"@example.com>', Mailbox("ceo", "example.com")),
            ('TO:<"c\\eo"@Example.COM>', Mailbox("ceo", "example.com")),
            ('TO:<"Ceo.X"@example.com>', Mailbox("Ceo.X", "example.com")),
            ('TO:<"a b"@example.com>', Mailbox('"a b"', "example.com")),
            ('TO:<"a."@example.com>', Mailbox('"a."', "example.com")),
            ("TO:<a@[IPv6:2001:db8::1]>", Mailbox("a", "[IPv6:2001:db8::1]")),
        ],
    )
    def test_accepted(self, argument: str, expected: Mailbox) -> None:
        assert parse_rcpt(argument) == expected

    @pytest.mark.parametrize(
        ("argument", "expected"),
        [
            ("", "501 5.5.4"),
            ("FROM:<a@b.example>", "501 5.5.4"),
            ("TO:<>", "501 5.1.3"),
            ("TO:a@b.example", "501 5.1.3"),
            ("TO:<a@b.example", "501 5.1.3"),
            # Unqualified, even postmaster: we have no domain of our own.
            ("TO:<postmaster>", "501 5.1.3"),
            ("TO:<a@b.example> NOTIFY=NEVER", "555 5.5.4"),
            ('TO:<"a>b"@example.com>', "501 5.1.3"),
            ('TO:<"<a"@example.com>', "501 5.1.3"),
            ('TO:<"a\x00b"@example.com>', "501 5.1.3"),
            ('TO:<"a\rb"@example.com>', "501 5.1.3"),
            ('TO:<"a\tb"@example.com>', "501 5.1.3"),
            ("TO:<jö@example.com>", "501 5.1.3"),
            ("TO:<j\ufffd@example.com>", "501 5.1.3"),
            ("TO:<a@b.example> ORCPT=rfc822;a@b.example", "555 5.5.4"),
        ],
    )
    def test_refused(self, argument: str, expected: str) -> None:
        reply = parse_rcpt(argument)
        assert isinstance(reply, Reply)
        assert outcome(reply) == expected

    def test_mailbox_text_keeps_local_case_and_needed_quotes(self) -> None:
        assert str(parse_rcpt('TO:<"A b"@Example.COM>')) == '"A b"@example.com'

    def test_unrelayable_text(self) -> None:
        reply = parse_rcpt('TO:<"a>b"@example.com>')
        assert isinstance(reply, Reply)
        assert reply.line() == (
            "501 5.1.3 Bad recipient address: <, >, control and non-ASCII "
            "characters cannot be relayed"
        )

    @pytest.mark.parametrize(
        ("argument", "expected"),
        [
            # RFC 5321 4.1.1.3 and 4.5.1: <Postmaster> without a domain,
            # whatever its case, is our postmaster
            ("TO:<postmaster>", Mailbox("postmaster", "example.com")),
            ("TO:<PostMaster>", Mailbox("postmaster", "example.com")),
            ("TO: <Postmaster>", Mailbox("postmaster", "example.com")),
            ("TO:<postmaster> NOTIFY=NEVER", "555 5.5.4"),
            ("TO:<postmaster>x", "501 5.1.3"),
            ("TO:<postmasters>", "501 5.1.3"),
            ("TO:<abuse>", "501 5.1.3"),
            ('TO:<"postmaster">', "501 5.1.3"),
        ],
    )
    def test_bare_postmaster(self, argument: str, expected: Mailbox | str) -> None:
        reply = parse_rcpt(argument, "example.com")
        if isinstance(expected, Mailbox):
            assert reply == expected
        else:
            assert isinstance(reply, Reply)
            assert outcome(reply) == expected

    def test_postmaster_domain_is_the_first_of_domains(self, config: Config) -> None:
        assert postmaster_domain(config) == "example.com"
