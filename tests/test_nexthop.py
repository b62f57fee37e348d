"""Where a recipient domain's mail goes: a table of domain -> next hop,
read from a real configuration file (SPEC.md section 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import Config, load_config
from mta.configvalues import HostPort
from mta.nexthop import HOSTS, MX, NextHop, domain_of, next_hop

COMMON = """\
hostname: relay.example.net
spool: spool
tls: {certificate: relay.crt, private_key: relay.key}
listeners: [{address: 127.0.0.1, port: 2525, role: inbound}]
delivery: {port: 2500}
domains:
  example.com:
    relay_to: ["mail.example.com", "[192.0.2.10]:2526"]
  Example.ORG.:
    relay_to: "[mail.example.org]:26"
"""

ROUTES = """\
routes:
  partner.example: "[192.0.2.7]:2525"
  named.example: "[gw.named.example]"
  bare.example: "relay.bare.example:2525"
  .parent.example: "[gw.parent.example]:2601"
  exact.parent.example: "[exact.gw.example]:2602"
  .example.com: "[sub.gw.example]"
"""

DEFAULT_ROUTE = """\
  "*": "[smarthost.example.net]:587"
"""


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mta.yaml"
    path.write_text(text)
    return load_config(path, check_tls=False)


@pytest.fixture
def routed(tmp_path: Path) -> Config:
    return load(tmp_path, COMMON + ROUTES + DEFAULT_ROUTE)


@pytest.fixture
def unrouted(tmp_path: Path) -> Config:
    """Routes, but no "*" default route."""
    return load(tmp_path, COMMON + ROUTES)


def hp(text: str) -> HostPort:
    """`HostPort` from its printed form, for readable tables."""
    bracketed = text.startswith("[")
    host, _, port = text.lstrip("[").rpartition(":")
    return HostPort(host.rstrip("]"), int(port), bracketed)


SMARTHOST = NextHop(HOSTS, (hp("[smarthost.example.net]:587"),), "route")

CASES = [
    # (domain, next hop, with the "*" route)
    # inbound domains go to relay_to, by A/AAAA, whatever the routes say
    ("example.com",
     NextHop(HOSTS, (hp("mail.example.com:25"), hp("[192.0.2.10]:2526")),
             "domain")),
    ("EXAMPLE.Com.",
     NextHop(HOSTS, (hp("mail.example.com:25"), hp("[192.0.2.10]:2526")),
             "domain")),
    ("example.org", NextHop(HOSTS, (hp("[mail.example.org]:26"),), "domain")),
    # routes: bracketed is the host itself, a bare name is looked up by MX
    ("partner.example", NextHop(HOSTS, (hp("[192.0.2.7]:2525"),), "route")),
    ("Partner.Example.", NextHop(HOSTS, (hp("[192.0.2.7]:2525"),), "route")),
    ("named.example", NextHop(HOSTS, (hp("[gw.named.example]:25"),), "route")),
    ("bare.example", NextHop(MX, (hp("relay.bare.example:2525"),), "route")),
    # a leading dot matches what lies under the domain, at any depth
    ("a.parent.example",
     NextHop(HOSTS, (hp("[gw.parent.example]:2601"),), "route")),
    ("a.b.parent.example",
     NextHop(HOSTS, (hp("[gw.parent.example]:2601"),), "route")),
    # an exact entry beats a parent one
    ("exact.parent.example",
     NextHop(HOSTS, (hp("[exact.gw.example]:2602"),), "route")),
    # ... but not the domain itself, which falls to "*"
    ("parent.example", SMARTHOST),
    ("xparent.example", SMARTHOST),
    # a subdomain of an inbound domain is outbound: routes apply to it
    ("sub.example.com", NextHop(HOSTS, (hp("[sub.gw.example]:25"),), "route")),
    ("elsewhere.example", SMARTHOST),
]


@pytest.mark.parametrize("domain, expected", CASES,
                         ids=[row[0] for row in CASES])
def test_next_hop_with_a_default_route(
    routed: Config, domain: str, expected: NextHop
) -> None:
    assert next_hop(routed, domain) == expected


WITHOUT_DEFAULT = [
    # (domain, next hop, with no "*" route)
    ("partner.example", NextHop(HOSTS, (hp("[192.0.2.7]:2525"),), "route")),
    ("parent.example", NextHop(MX, (hp("parent.example:2500"),), "mx")),
    ("elsewhere.example", NextHop(MX, (hp("elsewhere.example:2500"),), "mx")),
    ("Mixed.Case.EXAMPLE.",
     NextHop(MX, (hp("mixed.case.example:2500"),), "mx")),
    ("example.com",
     NextHop(HOSTS, (hp("mail.example.com:25"), hp("[192.0.2.10]:2526")),
             "domain")),
]


@pytest.mark.parametrize("domain, expected", WITHOUT_DEFAULT,
                         ids=[row[0] for row in WITHOUT_DEFAULT])
def test_next_hop_without_a_default_route(
    unrouted: Config, domain: str, expected: NextHop
) -> None:
    """With no route, a domain's own MX hosts on delivery.port."""
    assert next_hop(unrouted, domain) == expected


def test_a_bare_default_route_is_looked_up_by_mx(tmp_path: Path) -> None:
    config = load(tmp_path, COMMON + 'routes: {"*": "smarthost.example.net"}\n')
    assert next_hop(config, "anywhere.example") == NextHop(
        MX, (hp("smarthost.example.net:25"),), "route"
    )


CONFIGURED_NAMES = [
    # (domain, names the operator wrote, trusted as certificate names)
    ("example.com", ("mail.example.com",)),  # the literal adds nothing
    ("partner.example", ()),  # an address literal names nothing
    ("named.example", ("gw.named.example",)),
    ("bare.example", ("relay.bare.example",)),
    ("parent.example", ("smarthost.example.net",)),
]


@pytest.mark.parametrize("domain, names", CONFIGURED_NAMES,
                         ids=[row[0] for row in CONFIGURED_NAMES])
def test_configured_names_are_the_host_names_written(
    routed: Config, domain: str, names: tuple[str, ...]
) -> None:
    assert next_hop(routed, domain).configured_names == names


def test_a_domain_found_by_mx_has_no_configured_names(unrouted: Config) -> None:
    """The MX lookup's answer is not the operator's word."""
    assert next_hop(unrouted, "elsewhere.example").configured_names == ()


@pytest.mark.parametrize(
    "hop, text",
    [
        (NextHop(MX, (hp("example.net:25"),), "mx"), "example.net:25"),
        (NextHop(HOSTS, (hp("a.example:25"), hp("[192.0.2.1]:26")), "domain"),
         "a.example:25,[192.0.2.1]:26"),
    ],
)
def test_a_next_hop_prints_as_the_log_shows_it(hop: NextHop, text: str) -> None:
    assert str(hop) == text


@pytest.mark.parametrize(
    "address, domain",
    [
        ("user@Example.COM", "example.com"),
        ("user@example.com.", "example.com"),
        ('"odd@local"@example.net', "example.net"),
    ],
)
def test_domain_of_takes_what_follows_the_last_at(
    address: str, domain: str
) -> None:
    assert domain_of(address) == domain
