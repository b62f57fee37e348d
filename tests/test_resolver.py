"""MX and address lookups against a real DNS responder on loopback."""

from __future__ import annotations

import pytest

from mta.clientsession import Target
from mta.configvalues import HostPort
from mta.nexthop import HOSTS, MX, NextHop
from mta.resolver import LookupFailed, make_resolver, targets_for
from tests.peers.dnsserver import DNSServer


def mx_hop(domain: str, port: int = 25) -> NextHop:
    return NextHop(MX, (HostPort(domain, port, False),), "mx")


def lookup(dns: DNSServer, hop: NextHop) -> list[Target]:
    return targets_for(make_resolver((("127.0.0.1", dns.port),)), hop)


def test_mx_hosts_in_preference_order_with_all_addresses(dns: DNSServer) -> None:
    dns.set("dest.test", "MX", ["20 b.dest.test.", "10 a.dest.test."])
    dns.set("a.dest.test", "A", ["127.0.0.1", "127.0.0.2"])
    dns.set("a.dest.test", "AAAA", ["::1"])
    dns.set("b.dest.test", "A", ["127.0.0.3"])

    targets = lookup(dns, mx_hop("dest.test", 2525))

    # An RRset has no order, so the IPv4 addresses of one host may come
    # either way round; IPv4 comes before IPv6.
    assert [(t.name, t.port) for t in targets] == (
        [("a.dest.test", 2525)] * 3 + [("b.dest.test", 2525)])
    assert {t.address for t in targets[:2]} == {"127.0.0.1", "127.0.0.2"}
    assert [t.address for t in targets[2:]] == ["::1", "127.0.0.3"]


def test_equal_preferences_are_shuffled(dns: DNSServer) -> None:
    names = [f"mx{n}.dest.test" for n in range(6)]
    dns.set("dest.test", "MX", [f"10 {name}." for name in names] + ["5 first.dest.test."])
    for n, name in enumerate(names):
        dns.set(name, "A", [f"127.0.1.{n}"])
    dns.set("first.dest.test", "A", ["127.0.0.9"])

    orders = {tuple(t.name for t in lookup(dns, mx_hop("dest.test")))
              for _ in range(20)}

    assert all(order[0] == "first.dest.test" for order in orders)
    assert len(orders) > 1  # 20 draws of 6! orders: one order is 1 in 10^51


def test_no_mx_means_the_domain_itself(dns: DNSServer) -> None:
    dns.set("dest.test", "A", ["127.0.0.5"])

    assert lookup(dns, mx_hop("dest.test")) == [
        Target("dest.test", "127.0.0.5", 25)]


def test_null_mx_fails_for_good(dns: DNSServer) -> None:
    dns.set("dest.test", "MX", ["0 ."])

    with pytest.raises(LookupFailed) as raised:
        lookup(dns, mx_hop("dest.test"))

    assert raised.value.reply.dsn == "5.1.10"


def test_nxdomain_fails_for_good(dns: DNSServer) -> None:
    with pytest.raises(LookupFailed) as raised:
        lookup(dns, mx_hop("missing.test"))

    assert raised.value.reply.is_permanent
    assert raised.value.reply.dsn == "5.1.2"


def test_servfail_is_temporary(dns: DNSServer) -> None:
    dns.servfail.add("broken.test")

    with pytest.raises(LookupFailed) as raised:
        lookup(dns, mx_hop("broken.test"))

    assert raised.value.reply.is_temporary
    assert raised.value.reply.dsn == "4.4.3"


def test_mx_host_without_address_is_skipped(dns: DNSServer) -> None:
    dns.set("dest.test", "MX", ["10 gone.dest.test.", "20 b.dest.test."])
    dns.set("b.dest.test", "A", ["127.0.0.3"])

    assert [t.name for t in lookup(dns, mx_hop("dest.test"))] == ["b.dest.test"]


def test_relay_to_hosts_are_looked_up_by_address_never_mx(dns: DNSServer) -> None:
    dns.set("mail.example.test", "MX", ["10 elsewhere.test."])
    dns.set("mail.example.test", "A", ["127.0.0.7"])
    hop = NextHop(HOSTS, (HostPort("mail.example.test", 2526, False),
                          HostPort("127.0.0.8", 25, True)), "domain")

    assert lookup(dns, hop) == [Target("mail.example.test", "127.0.0.7", 2526),
                                Target("127.0.0.8", "127.0.0.8", 25)]


def test_at_most_five_mx_addresses_and_no_lookups_past_them(
    dns: DNSServer,
) -> None:
    # A domain with 300 MX hosts must not make one attempt into 300
    # connections: the best five addresses, as Postfix's
    # smtp_mx_address_limit, and no address lookups for the rest.
    names = [f"mx{n:03d}.evil.test" for n in range(300)]
    dns.set("evil.test", "MX", [f"{n} {name}." for n, name in enumerate(names)])
    for n, name in enumerate(names):
        dns.set(name, "A", [f"127.0.{n // 250}.{n % 250 + 1}"])
    dns.set(names[1], "A", ["127.0.9.1", "127.0.9.2"])  # two addresses

    targets = lookup(dns, mx_hop("evil.test"))

    assert [t.name for t in targets] == [names[0], names[1], names[1],
                                         names[2], names[3]]
    asked = {query.name for query in dns.queries if query.rdtype in ("A", "AAAA")}
    assert asked == set(names[:4])
