"""Where a recipient domain's mail goes: a pure decision on the
configuration.

In order (SPEC.md section 4):

1. a domain in ``domains`` (inbound) goes to its ``relay_to`` servers,
   looked up by A/AAAA only, never MX;
2. otherwise a ``routes`` entry for the domain, then for a parent written
   with a leading dot (``.example.com``), then ``*``: a bracketed host is
   used as it is, a bare name is looked up by MX like a domain, as in
   Postfix's transport maps;
3. otherwise the domain's own MX hosts, on ``delivery.port``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mta.config import Config
from mta.configvalues import HostPort

MX = "mx"  # look up the MX records of `name`
HOSTS = "hosts"  # connect to these hosts, by A/AAAA


@dataclass(frozen=True, slots=True)
class NextHop:
    kind: str
    hosts: tuple[HostPort, ...]  # for MX: one entry, the name to look up
    source: str  # "domain", "route" or "mx": which rule chose it

    @property
    def configured_names(self) -> tuple[str, ...]:
        """Host names the operator wrote (trusted as certificate names);
        an address literal names nothing."""
        if self.source == "mx":
            return ()
        return tuple(host.host for host in self.hosts if not host.is_literal)

    def __str__(self) -> str:
        if self.kind == MX:
            return f"{self.hosts[0].host}:{self.hosts[0].port}"
        return ",".join(str(host) for host in self.hosts)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def next_hop(config: Config, domain: str) -> NextHop:
    domain = domain.lower().rstrip(".")

    local = config.domains.get(domain)
    if local is not None:
        return NextHop(HOSTS, local.relay_to, "domain")

    route = route_for(config, domain)
    if route is not None:
        if route.bracketed:
            return NextHop(HOSTS, (route,), "route")
        return NextHop(MX, (route,), "route")

    return NextHop(MX, (HostPort(domain, config.delivery.port, False),), "mx")


def route_for(config: Config, domain: str) -> HostPort | None:
    routes = config.routes
    if domain in routes:
        return routes[domain]
    labels = domain.split(".")
    for index in range(1, len(labels)):
        parent = "." + ".".join(labels[index:])
        if parent in routes:
            return routes[parent]
    return routes.get("*")
