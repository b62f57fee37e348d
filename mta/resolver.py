"""Turning a next hop into the servers to try, in order.

dnspython is blocking, so every query runs in a thread
(`threads.deferToThread`), never on the reactor.  MX records are sorted by
preference with equal preferences shuffled (RFC 5321 5.1); a domain without
MX records is its own mail host (the implicit MX); a null MX (RFC 7505)
means the domain takes no mail.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Iterable

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet import threads
from twisted.internet.defer import Deferred, maybeDeferred

from mta.clientsession import Target
from mta.configvalues import HostPort
from mta.nexthop import MX, NextHop
from mta.reply import Reply


class LookupFailed(Exception):
    """No server could be found; ``reply`` says whether that is for good."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.line())
        self.reply = reply


# At most this many MX addresses are tried per attempt, best first, as
# Postfix's smtp_mx_address_limit (default 5): a domain that publishes
# hundreds of MX hosts must not make one attempt into hundreds of lookups
# and connections (to a third party, perhaps), each with its time-out.
MX_ADDRESS_LIMIT = 5


def make_resolver(nameservers: tuple[tuple[str, int], ...] | None) -> (
    dns.resolver.Resolver
):
    if nameservers is None:
        return dns.resolver.Resolver()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [
        dns.nameserver.Do53Nameserver(address, port)
        for address, port in nameservers
    ]
    resolver.timeout = 5.0
    resolver.lifetime = 15.0
    return resolver


def resolve_targets(
    resolver: dns.resolver.Resolver, next_hop: NextHop
) -> Deferred[list[Target]]:
    if next_hop.kind != MX and all(host.is_literal for host in next_hop.hosts):
        # Addresses only ("[192.0.2.7]:2525"): no lookup, so no thread.
        return maybeDeferred(targets_for, resolver, next_hop)
    return threads.deferToThread(targets_for, resolver, next_hop)


def targets_for(resolver: dns.resolver.Resolver, next_hop: NextHop) -> list[Target]:
    """Blocking: the servers to try for ``next_hop``, best first; raises
    `LookupFailed`."""
    if next_hop.kind == MX:
        hosts = _mx_hosts(resolver, next_hop.hosts[0])
        return _addresses(resolver, hosts, MX_ADDRESS_LIMIT)
    hosts = [(host, None) for host in next_hop.hosts]
    return _addresses(resolver, hosts)


def _mx_hosts(
    resolver: dns.resolver.Resolver, domain: HostPort
) -> list[tuple[HostPort, int | None]]:
    """The MX hosts, best first, each with its preference (which
    `mta.ownendpoints` needs to drop our own and those behind it)."""
    name = domain.host
    try:
        answer = resolver.resolve(name, "MX")
    except dns.resolver.NoAnswer:
        return [(domain, 0)]  # RFC 5321 5.1: the implicit MX, preference 0
    except dns.resolver.NXDOMAIN:
        raise LookupFailed(_not_found(name, "MX")) from None
    except dns.exception.DNSException as error:
        raise LookupFailed(_temporary(name, "MX", error)) from None

    records = [(record.preference, record.exchange.to_text().rstrip("."))
               for record in answer]
    if any(exchange in ("", ".") for _, exchange in records):
        raise LookupFailed(Reply(
            556, "5.1.10",
            f"domain {name} does not accept mail (null MX, RFC 7505)",
        ))
    random.shuffle(records)
    records.sort(key=lambda record: record[0])  # stable: ties stay shuffled
    return [(HostPort(exchange.lower(), domain.port, False), preference)
            for preference, exchange in records]


def _addresses(
    resolver: dns.resolver.Resolver,
    hosts: Iterable[tuple[HostPort, int | None]],
    limit: int | None = None,
) -> list[Target]:
    targets: list[Target] = []
    problems: list[Reply] = []
    for host, preference in hosts:
        if limit is not None and len(targets) >= limit:
            break  # no lookups for hosts that would not be tried
        if host.is_literal:
            targets.append(Target(host.host, host.host, host.port, preference))
            continue
        try:
            addresses = _lookup_addresses(resolver, host.host)
        except LookupFailed as error:
            problems.append(error.reply)
            continue
        targets.extend(Target(host.host, address, host.port, preference)
                       for address in addresses)
    if targets:
        return targets[:limit]
    # Defer when any host's lookup failed for now; fail when all are gone.
    temporary = [reply for reply in problems if not reply.is_permanent]
    raise LookupFailed(temporary[0] if temporary else problems[0])


def _lookup_addresses(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    found: list[str] = []
    missing = 0
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(name, rdtype)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            missing += 1
            continue
        except dns.exception.DNSException as error:
            raise LookupFailed(_temporary(name, rdtype, error)) from None
        found.extend(str(ipaddress.ip_address(record.address))
                     for record in answer)
    if not found:
        raise LookupFailed(_not_found(name, "A/AAAA"))
    return found


def _not_found(name: str, rdtype: str) -> Reply:
    return Reply(550, "5.1.2", f"Host or domain name not found. Name service "
                 f"error for name={name} type={rdtype}: Host not found")


def _temporary(name: str, rdtype: str, error: Exception) -> Reply:
    kind = type(error).__name__
    return Reply(451, "4.4.3", f"Host or domain name not found. Name service "
                 f"error for name={name} type={rdtype}: {kind}, try again")
