"""Which servers are the relay itself (mta.ownendpoints): tables of
endpoints, servers and what is left to try."""

from __future__ import annotations

import pytest

from mta.clientsession import Target
from mta.ownendpoints import (
    Endpoint,
    bound_locally,
    endpoint_for,
    is_loopback,
    loop_reason,
    without_ourselves,
)

MX = Endpoint("127.0.0.1", 2525, "listener mx")
SUBMISSION = Endpoint("192.0.2.5", 587, "listener submission")
ANY4 = Endpoint("0.0.0.0", 25, "listener any4")
ANY6 = Endpoint("::", 465, "listener any6")
PROXY = Endpoint("203.0.113.5", 25, "proxy_addresses")
ENDPOINTS = (MX, SUBMISSION, ANY4, ANY6, PROXY)

# What this machine has, for the wildcard listeners: 127/8, ::1, one more
# address of each family.
LOCAL = {"10.0.0.5", "2001:db8::5", "::1"}


def local(address: str) -> bool:
    return address in LOCAL or address.startswith("127.")


@pytest.mark.parametrize(
    ("address", "port", "expected"),
    [
        # a listener on one address: that address and port, nothing else
        ("127.0.0.1", 2525, MX),
        ("127.0.0.2", 2525, None),  # local, but not where it listens
        ("127.0.0.1", 2526, None),  # its address, another port
        ("::ffff:127.0.0.1", 2525, MX),  # IPv4-mapped reaches it too
        ("192.0.2.5", 587, SUBMISSION),
        ("192.0.2.5", 25, None),
        # 0.0.0.0:25 stands for every IPv4 address of this machine
        ("127.0.5.1", 25, ANY4),
        ("10.0.0.5", 25, ANY4),
        ("10.0.0.6", 25, None),  # not ours
        ("198.51.100.7", 25, None),
        ("2001:db8::5", 25, None),  # 0.0.0.0 takes no IPv6
        # [::]:465 stands for every address, IPv4 included
        ("2001:db8::5", 465, ANY6),
        ("::1", 465, ANY6),
        ("10.0.0.5", 465, ANY6),
        ("2001:db8::6", 465, None),
        # an address we are reached at through NAT
        ("203.0.113.5", 25, PROXY),
        ("203.0.113.5", 2525, None),
    ],
)
def test_endpoint_for(address: str, port: int, expected: Endpoint | None) -> None:
    assert endpoint_for(address, port, ENDPOINTS, local) == expected


def mx(name: str, address: str, preference: int | None, port: int = 25) -> Target:
    return Target(name, address, port, preference)


US = mx("relay.test", "10.0.0.5", 20)


@pytest.mark.parametrize(
    ("servers", "left"),
    [
        # RFC 5321 5.1: drop ourselves and every MX record not better
        ([mx("a", "198.51.100.1", 10), US, mx("c", "198.51.100.3", 30)],
         ["a"]),
        ([US, mx("c", "198.51.100.3", 30)], []),
        ([mx("b", "198.51.100.2", 20), US], []),  # equal preference goes too
        ([US], []),
        # two addresses of one host, one of them ours: the host goes
        ([mx("a", "198.51.100.1", 10), US, mx("relay.test", "198.51.100.9", 20)],
         ["a"]),
        # the implicit MX (preference 0) that is us
        ([mx("dest", "127.0.0.9", 0)], []),
        # configured hosts (no preference): only ourselves are dropped
        ([mx("a", "198.51.100.1", None), mx("us", "127.0.0.1", None, 2525),
          mx("c", "198.51.100.3", None)], ["a", "c"]),
        ([mx("us", "127.0.0.1", None, 2525)], []),
        # nobody is us: all left, in their order
        ([mx("b", "198.51.100.2", 20), mx("a", "198.51.100.1", 10)],
         ["b", "a"]),
        ([], []),
    ],
)
def test_without_ourselves(servers: list[Target], left: list[str]) -> None:
    check = without_ourselves(servers, ENDPOINTS, local)
    assert [server.name for server in check.left] == left
    us = [server for server in servers
          if endpoint_for(server.address, server.port, ENDPOINTS, local)]
    assert list(check.ourselves) == us


def test_the_preference_is_no_part_of_a_target() -> None:
    assert mx("a", "198.51.100.1", 10) == mx("a", "198.51.100.1", None)


def test_loop_reason_says_who_and_why() -> None:
    assert loop_reason("dest.test", US, ANY4) == (
        "mail for dest.test loops back to myself: "
        "relay.test[10.0.0.5]:25 is this relay (listener any4)")


def test_endpoint_text() -> None:
    assert str(ANY6) == "[::]:465 (listener any6)"
    assert str(MX) == "127.0.0.1:2525 (listener mx)"


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1", True), ("127.0.14.9", True), ("::1", True),
     ("::ffff:127.0.0.1", True), ("10.0.0.5", False), ("2001:db8::1", False)],
)
def test_is_loopback(address: str, expected: bool) -> None:
    assert is_loopback(address) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    # Every 127/8 address is this machine's; the documentation ranges are
    # nobody's (RFC 5737, RFC 3849).
    [("127.0.0.1", True), ("127.0.14.9", True), ("192.0.2.77", False),
     ("198.51.100.1", False), ("2001:db8::77", False)],
)
def test_bound_locally(address: str, expected: bool) -> None:
    assert bound_locally(address) == expected
