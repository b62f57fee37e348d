"""Configuration values from their written form: durations, sizes, ports,
addresses, networks, host names and next hops.

Each parser takes the raw YAML value and returns the parsed one, or raises
ValueError with the words that follow "KEY: " in the problem reported.
What the relay's own keys mean (levels, roles, the TLS floor) is in
`mta.config`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable


@dataclass(frozen=True, slots=True)
class HostPort:
    """A server named in the configuration: ``host``, ``host:port``,
    ``[host]:port``.  Brackets mean "this exact host, no MX lookup", as in
    Postfix; an address literal is always taken as it is."""

    host: str
    port: int
    bracketed: bool

    @property
    def is_literal(self) -> bool:
        return _is_ip(self.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.bracketed else self.host
        return f"{host}:{self.port}"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {
    "ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400, "w": 604800
}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def scalar_text(value: Any, expected: str) -> str:
    """``str(value)`` for a single value; ValueError(``expected``) for a
    list or a mapping, whose text could be enormous (aliases) and is never
    what was meant."""
    if isinstance(value, (list, dict, tuple, set)):
        raise ValueError(expected)
    return str(value)


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 10m, 4h or 5d")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(scalar_text(
            value, "expected a duration such as 30s, 10m, 4h or 5d"))
        if not match:
            raise ValueError("expected a duration such as 30s, 10m, 4h or 5d")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if not math.isfinite(seconds) or seconds > 10 * 365 * 86400:
        raise ValueError("a duration must be finite and at most ten years")
    return seconds


def parse_timeout(value: Any) -> float:
    """A duration above zero: a zero timeout would end every session at
    once."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("a timeout must be above zero")
    return seconds


# A pause shorter than this between two tries of the same thing is no
# pause: the relay would retry in a tight loop.
MIN_PAUSE = 1.0


def parse_pause(what: str) -> Callable[[Any], float]:
    """A duration of at least `MIN_PAUSE`, for ``what`` (in the words
    "WHAT must last at least 1s")."""

    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < MIN_PAUSE:
            raise ValueError(f"{what} must last at least 1s: a shorter one "
                             "would make the relay try again without pause")
        return seconds

    return parse


def parse_size(value: Any) -> int:
    """Bytes; K, M and G (with or without B or iB) are powers of 1024."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 50MB or 10240")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(scalar_text(
            value, "expected a size such as 50MB or 10240"))
        if not match:
            raise ValueError("expected a size such as 50MB or 10240")
        unit = (match.group(2) or "")[:1].lower()
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size <= 0:
        raise ValueError("a size must be above zero")
    if size > 1024**4:
        raise ValueError("a size must be at most 1TB")
    return size


def parse_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected a port number from 1 to 65535")
    if not 1 <= value <= 65535:
        raise ValueError("expected a port number from 1 to 65535")
    return value


def parse_ip(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(
            scalar_text(value, "expected an IPv4 or IPv6 address")))
    except ValueError:
        raise ValueError("expected an IPv4 or IPv6 address") from None


def parse_network(
    value: Any,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(
            scalar_text(value, "expected a network"), strict=False)
    except ValueError:
        raise ValueError("expected a network such as 192.0.2.0/24") from None


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)"
    r"(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)*\.?$",
    re.IGNORECASE,
)


def parse_hostname(value: Any) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not _HOSTNAME.match(text):
        raise ValueError("expected a host name such as mail.example.com")
    return text.lower().rstrip(".")


def parse_domain(value: Any) -> str:
    return parse_hostname(value)


def parse_hostport(value: Any, default_port: int = 25) -> HostPort:
    """``host``, ``host:port``, ``[host]``, ``[host]:port``, ``[v6]:port``."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected host, host:port or [host]:port")
    text = value.strip()
    port = default_port
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("a '[' without its ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected ':port' after ']'")
            port = _port_text(rest[1:])
        return HostPort(_host_or_ip(host), port, bracketed=True)
    if text.count(":") == 1:
        text, port_text = text.split(":")
        port = _port_text(port_text)
    elif text.count(":") > 1:
        raise ValueError("an IPv6 address must be written in brackets: [::1]:25")
    return HostPort(_host_or_ip(text), port, bracketed=_is_ip(text))


def _port_text(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    return parse_port(int(text))


def _host_or_ip(text: str) -> str:
    if _is_ip(text):
        return str(ipaddress.ip_address(text))
    return parse_hostname(text)


@lru_cache(maxsize=1024)  # asked for each delivery of each next hop
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def parse_positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number above zero")
    return value


def parse_choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return str(value)

    return parse


def parse_name_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.replace(",", ":").split(":")
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of names")
    names = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError("every entry must be a name")
        names.append(item.strip())
    return tuple(names)
