"""A client's address as the relay writes it and judges it.

A listener bound to ``::`` takes IPv4 clients too (dual stack, unless the
socket is IPV6_V6ONLY), and the kernel reports them as IPv4-mapped IPv6
addresses (RFC 4291 2.5.5.2): ``::ffff:192.0.2.1``.  That is the same host
as ``192.0.2.1``: logs and Received headers show it so, as Postfix does,
and ``networks: [192.0.2.0/24]`` must match it.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache


# Clients come back; each address is parsed once while it does.
@lru_cache(maxsize=4096)
def client_address(host: str) -> str:
    """``host`` with an IPv4-mapped address in its IPv4 form; anything else
    (IPv4, other IPv6, not an address) as it is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return host
