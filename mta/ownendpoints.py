"""Whether a server the relay is about to deliver to is the relay itself:
the mail loop an MX record, a route or a ``relay_to`` entry pointing back
at us would make.

RFC 5321 5.1: a client that finds itself among a domain's MX hosts must
discard every MX record of equal or worse preference than its own; when
none is left, the mail cannot go on from here.  Postfix then bounces it
"mail for DOMAIN loops back to myself" (5.4.6), and so does the relay,
without a connection, rather than sending the message round until the hop
limit (``limits.hops``) stops it.  Hosts that are not MX records (a route,
``relay_to``) have no preference: only those that are the relay are dropped.

"The relay itself" is an address and a port (the tests run peers on other
loopback addresses on port 25, and every 127/8 address is this machine):

- each listener's address and port; a listener on ``0.0.0.0`` stands for
  every IPv4 address of this machine, one on ``::`` for every address,
  IPv4 included (Linux listens on both through one IPv6 socket);
- each of ``proxy_addresses``: where clients reach the relay through NAT or
  a proxy, which no local check can see (Postfix's ``proxy_interfaces``).

Which addresses are this machine's is not a fact of the configuration, so
the decisions here take it as a function (``is_local``).  The relay passes
`bound_locally`, the one piece of I/O in this module; the configuration
check passes `is_loopback`, which needs none.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Generic, Protocol, TypeVar

IsLocal = Callable[[str], bool]

# Addresses no machine has (RFC 5737, RFC 3849): if a socket binds to one,
# it binds to anything (Linux's ip_nonlocal_bind), and the bind test says
# nothing.
_NOBODY = {socket.AF_INET: "192.0.2.1", socket.AF_INET6: "2001:db8::1"}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An address and port the relay takes mail on, and what made it ours:
    ``listener NAME`` or ``proxy_addresses``."""

    address: str
    port: int
    owner: str

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port} ({self.owner})"


class Server(Protocol):
    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def preference(self) -> int | None: ...


S = TypeVar("S", bound=Server)


@dataclass(frozen=True, slots=True)
class LoopCheck(Generic[S]):
    """The servers left to try, and those that are the relay itself."""

    left: tuple[S, ...]
    ourselves: tuple[S, ...]


def endpoint_for(
    address: str, port: int, endpoints: Iterable[Endpoint], is_local: IsLocal
) -> Endpoint | None:
    """The endpoint of ours that ``address``:``port`` reaches, if any."""
    wanted = _plain(address)
    for endpoint in endpoints:
        if endpoint.port != port:
            continue
        own = _plain(endpoint.address)
        if own == wanted:
            return endpoint
        if own.is_unspecified and _covers(own, wanted) and is_local(str(wanted)):
            return endpoint
    return None


def without_ourselves(
    servers: Iterable[S], endpoints: Iterable[Endpoint], is_local: IsLocal
) -> LoopCheck[S]:
    """RFC 5321 5.1: drop the servers that are the relay, and with MX
    records every one not better than the best of ours."""
    servers = list(servers)
    endpoints = tuple(endpoints)
    ourselves = [server for server in servers
                 if endpoint_for(server.address, server.port, endpoints, is_local)]
    if not ourselves:
        return LoopCheck(tuple(servers), ())

    preferences = [server.preference for server in ourselves]
    if any(preference is None for preference in preferences):
        left = [server for server in servers if server not in ourselves]
    else:
        best = min(p for p in preferences if p is not None)
        left = [server for server in servers
                if server.preference is not None and server.preference < best]
    return LoopCheck(tuple(left), tuple(ourselves))


def loop_reason(domain: str, ourselves: S, endpoint: Endpoint | None) -> str:
    """Postfix's words, then which server is us and by which endpoint."""
    why = f" ({endpoint.owner})" if endpoint is not None else ""
    return (f"mail for {domain} loops back to myself: "
            f"{ourselves}:{ourselves.port} is this relay{why}")


@lru_cache(maxsize=1024)  # asked for each delivery
def _plain(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # An IPv4-mapped IPv6 address reaches the IPv4 socket.
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _covers(
    wildcard: ipaddress.IPv4Address | ipaddress.IPv6Address,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    # 0.0.0.0 takes IPv4 only; :: takes both (IPV6_V6ONLY is off).
    return wildcard.version == 6 or address.version == 4


# --- what counts as this machine's address ----------------------------------


def is_loopback(address: str) -> bool:
    """Local on every machine, with no check: 127/8 and ::1."""
    return _plain(address).is_loopback


def bound_locally(address: str) -> bool:
    """Whether ``address`` is one of this machine's: a socket binds to it
    (any free port) only if so.  Where any address binds (Linux's
    ``ip_nonlocal_bind``), only loopback addresses are known to be ours:
    list the others in ``proxy_addresses``."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    if _binds(family, _NOBODY[family]):
        return is_loopback(address)
    return _binds(family, address)


def _binds(family: socket.AddressFamily, address: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True
