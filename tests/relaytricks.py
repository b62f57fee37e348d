"""The old ways of making a mail server relay, as data: each a RCPT TO path
and what a listener must answer it.

`tests/test_relaycontrol.py` runs the table through the pure functions;
`tests/test_open_relay.py` tries every row against the running relay.  The
relay's domain is ``example.com``; ``outside.test`` is a domain it must
never send to for a client that is not trusted.  ``{listener}`` stands for
the address of the listener the trick is tried on.

Two kinds of refusal (README, "Relay control"):

- ``550 5.7.1`` (``554 5.7.1`` on an outbound listener, for a client
  outside its ``networks``): a valid address the relay will not take from
  that client, because its domain is not one of ``domains``, or because
  it asks one of our domains to route it on (``%``, ``!``, ``@`` in the
  local part: Postfix's ``allow_untrusted_routing = no``);
- ``501 5.1.3`` (or ``555 5.5.4`` for text after the path): what is not an
  RFC 5321 address at all, on every listener and for every client, before
  any relay rule is looked at.

Sources for the rows: RFC 5321 (3.6.1 source routes, 4.1.2 syntax, 4.1.3
literals, appendix C), the warnings of Postfix's
``allow_untrusted_routing``, ``resolve_dequoted_address``,
``resolve_numeric_domain`` and ``reject_unauth_destination``, and the
classic open-relay test lists (user%host, host!user, "user@host"@us).
"""

from __future__ import annotations

from dataclasses import dataclass

NOT_OURS = "550 5.7.1"  # inbound: not a domain we accept mail for
ROUTING = "550 5.7.1"  # inbound: sender-specified routing through us
SYNTAX = "501 5.1.3"  # not an address (RFC 5321 4.1.2)
PARAMETER = "555 5.5.4"  # text after the path is read as a parameter
STRANGER = "554 5.7.1"  # outbound listener, client outside `networks`


@dataclass(frozen=True, slots=True)
class Trick:
    path: str  # what follows "RCPT TO:", with {listener} to fill in
    inbound: str  # the code and enhanced code an inbound listener answers
    why: str

    def on(self, listener: str) -> str:
        return self.path.replace("{listener}", listener)

    @property
    def from_stranger(self) -> str:
        """What an outbound listener answers a client outside its
        networks: syntax first, then "Relay access denied"."""
        return self.inbound if self.inbound in (SYNTAX, PARAMETER) else STRANGER


TRICKS = (
    # The plain case every other row dresses up.
    Trick("<u@outside.test>", NOT_OURS, "a domain that is not ours"),
    Trick("<postmaster@outside.test>", NOT_OURS, "postmaster of another domain"),
    # Source routes (RFC 5321 3.6.1, C): the route is dropped, and what is
    # left is an address at outside.test.
    Trick("<@example.com:u@outside.test>", NOT_OURS, "source route via us"),
    Trick("<@example.com,@mail.example.com:u@outside.test>", NOT_OURS,
          "source route of two hops via us"),
    Trick("<@example.com:postmaster@outside.test>", NOT_OURS,
          "source route to another postmaster"),
    # Sender-specified routing in the local part of one of our addresses.
    Trick("<u%outside.test@example.com>", ROUTING, "the % hack"),
    Trick("<u%outside.test%example.com@example.com>", ROUTING, "two % hops"),
    Trick("<U%OUTSIDE.TEST@EXAMPLE.COM>", ROUTING, "the % hack in capitals"),
    Trick("<u%40outside.test@example.com>", ROUTING, "%40, a percent-encoded @"),
    Trick("<outside.test!u@example.com>", ROUTING, "a UUCP ! path"),
    Trick("<example.com!outside.test!u@example.com>", ROUTING, "two ! hops"),
    Trick('<"u@outside.test"@example.com>', ROUTING, "@ in a quoted local part"),
    Trick('<"u\\@outside.test"@example.com>', ROUTING, "an escaped @, quoted"),
    Trick('<"u%outside.test"@example.com>', ROUTING, "% in a quoted local part"),
    Trick('<"u\\%outside.test"@example.com>', ROUTING, "an escaped %, quoted"),
    Trick('<"outside.test!u"@example.com>', ROUTING, "! in a quoted local part"),
    Trick('<"@outside.test:u"@example.com>', ROUTING,
          "a source route inside a quoted local part"),
    Trick("<@example.com:u%outside.test@example.com>", ROUTING,
          "a source route and the % hack"),
    # More than one @ outside quotes: not an address.
    Trick("<u@example.com@outside.test>", SYNTAX, "two @, ours first"),
    Trick("<u@outside.test@example.com>", SYNTAX, "two @, ours last"),
    Trick("<u\\@outside.test@example.com>", SYNTAX, "an escaped @ unquoted"),
    Trick('<"u@outside.test">', SYNTAX, "a quoted address with no domain"),
    # Trailing and stray dots: the RFC 5321 Domain has none.
    Trick("<u@outside.test.>", SYNTAX, "a trailing dot, outside"),
    Trick("<u@example.com.>", SYNTAX, "a trailing dot, ours"),
    Trick("<u@example.com..>", SYNTAX, "two trailing dots"),
    Trick("<u@.example.com>", SYNTAX, "a leading dot"),
    # Address literals (RFC 5321 4.1.3): never one of our domains.
    Trick("<u@[{listener}]>", NOT_OURS, "the listener's own address"),
    Trick("<postmaster@[{listener}]>", NOT_OURS, "postmaster at our address"),
    Trick("<u@[IPv6:::ffff:{listener}]>", NOT_OURS,
          "our address, IPv4-mapped IPv6"),
    Trick("<u@[IPv6:::1]>", NOT_OURS, "IPv6 loopback"),
    Trick("<u@[ipv6:::1]>", NOT_OURS, "IPv6 loopback, tag in lower case"),
    Trick("<u@[192.0.2.1]>", NOT_OURS, "another address"),
    Trick("<u@[IPv6:fe80::1%lo]>", SYNTAX, "an IPv6 zone: not in the grammar"),
    Trick("<u@[::1]>", SYNTAX, "IPv6 without its IPv6: tag"),
    Trick("<u@[example.com]>", SYNTAX, "a name in brackets"),
    Trick("<u@[0177.0.0.1]>", SYNTAX, "octal digits in a literal"),
    Trick("<u@[tag:outside.test]>", SYNTAX, "a general literal"),
    Trick("<u@[{listener}]:25>", SYNTAX, "a port after the literal"),
    Trick("<u@{listener}>", SYNTAX, "an address without brackets"),
    Trick("<u@2130706433>", SYNTAX, "an address as one number"),
    # Case, look-alikes and encodings.
    Trick("<u@OUTSIDE.TEST>", NOT_OURS, "capitals"),
    Trick("<u@Example.Com.Outside.Test>", NOT_OURS, "our name as a subdomain"),
    Trick("<u@example.com.outside.test>", NOT_OURS, "our name as a prefix"),
    Trick("<u@sub.example.com>", NOT_OURS, "a subdomain of ours"),
    Trick("<u@localhost>", NOT_OURS, "localhost"),
    Trick("<u@outside>", NOT_OURS, "a dotless name"),
    Trick("<u@xn--exmple-cua.com>", NOT_OURS, "an IDN's A-label"),
    Trick("<u@example%2ecom>", SYNTAX, "a percent-encoded dot"),
    Trick("<u@outside%2etest>", SYNTAX, "a percent-encoded dot, outside"),
    Trick("<u@ex\u00e4mple.com>", SYNTAX, "a UTF-8 domain (no SMTPUTF8)"),
    Trick("<\u00fc@example.com>", SYNTAX, "a UTF-8 local part (no SMTPUTF8)"),
    Trick("<u@example.com:25>", SYNTAX, "a port after the domain"),
    Trick("<u(comment)@example.com>", SYNTAX, "an RFC 822 comment"),
    Trick("<u@example.com (outside.test)>", SYNTAX, "a comment after the name"),
    # One RCPT, two addresses.
    Trick("<u@example.com>,<v@outside.test>", SYNTAX, "a list of two"),
    Trick("<u@example.com> <v@outside.test>", PARAMETER,
          "a second path as a parameter"),
    Trick("<u@example.com> ORCPT=rfc822;v@outside.test", PARAMETER,
          "the outside address as ORCPT (no DSN offered)"),
    Trick("u@outside.test", SYNTAX, "no angle brackets"),
    Trick("<<u@outside.test>>", SYNTAX, "two pairs of brackets"),
)

# Not a trick: a source route towards outside.test that ends in one of our
# domains is delivered to our address; RFC 5321 (C) says the route is
# dropped, and nothing goes to outside.test.
ROUTE_TO_US = "<@outside.test:u@example.com>"
