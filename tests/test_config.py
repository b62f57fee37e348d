"""The configuration file: what it parses to, and how each mistake is told.

Every error must name the file, the key and the bad value, so the tables
below assert on the text an operator reads.  Certificates are real (trustme),
files are real (tmp_path); the TLS checks run against the OpenSSL that
pyOpenSSL uses.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
import trustme
import yaml
from OpenSSL import SSL

from mta.config import DEFAULT_CIPHERS, DEFAULT_CIPHERSUITES, ConfigError, load_config
from mta.configvalues import HostPort, parse_duration, parse_hostport, parse_size
from mta.selfsigned import write_self_signed
from mta.tlsctx import check_tls_config, client_context, server_context

REPOSITORY = Path(__file__).resolve().parent.parent


# --- fixtures: a minimal valid file, with a real certificate ---------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("relay.example.net")


@pytest.fixture(scope="module")
def other_leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("other.example.net")


def base_config() -> dict[str, Any]:
    """The smallest file that loads; every test changes one thing in it."""
    return {
        "hostname": "relay.example.net",
        "spool": "spool",
        "tls": {"certificate": "tls/relay.crt", "private_key": "tls/relay.key"},
        "listeners": [
            {"name": "mx", "address": "127.0.0.1", "port": 2525,
             "role": "inbound"},
        ],
        "domains": {"example.com": {"relay_to": ["mail.example.com:25"]}},
        "policies": [
            {"name": "partner", "direction": "outbound",
             "recipient_domain": "partner.example", "tls": "enforce-secure"},
        ],
    }


@pytest.fixture
def folder(tmp_path: Path, leaf: trustme.LeafCert) -> Path:
    """A configuration folder holding tls/relay.crt and tls/relay.key."""
    (tmp_path / "tls").mkdir()
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls/relay.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "tls/relay.key"))
    return tmp_path


def write(folder: Path, data: Any, name: str = "mta.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def changed(where: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """`base_config()` with the item at ``where`` set to ``value``."""
    data = base_config()
    target: Any = data
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = copy.deepcopy(value)
    return data


def problems_of(path: Path, check_tls: bool = True) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_tls=check_tls)
    assert str(caught.value) == "\n".join(caught.value.problems)
    assert caught.value.problems, "a ConfigError must say what is wrong"
    return caught.value.problems


def assert_reported(problems: tuple[str, ...], path: Path, *parts: str) -> None:
    """One problem line names the file and holds every one of ``parts``."""
    prefix = f"{path.resolve()}: "
    for problem in problems:
        if problem.startswith(prefix) and all(part in problem for part in parts):
            return
    pytest.fail(f"no problem with {parts!r} in:\n" + "\n".join(problems))


# --- value parsers ---------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("4h", 14400.0),
        ("5d", 432000.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1.5m", 90.0),
        ("0s", 0.0),
        ("45", 45.0),
        (90, 90.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_reads_units(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["10x", "", "m", "-5s", "5 days", True, None, "1h30m"]
)
def test_parse_duration_refuses_what_is_not_a_duration(text: Any) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_parse_duration_refuses_a_negative_number() -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(-1)


@pytest.mark.parametrize(
    "text, size",
    [
        ("50MB", 50 * 1024**2),
        ("50mb", 50 * 1024**2),
        ("10240", 10240),
        (10240, 10240),
        ("1k", 1024),
        ("2KiB", 2048),
        ("1G", 1024**3),
        ("7b", 7),
        ("3 M", 3 * 1024**2),
    ],
)
def test_parse_size_reads_powers_of_1024(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text, words",
    [
        ("0", "above zero"),
        (0, "above zero"),
        ("1.5MB", "expected a size"),
        ("50TB", "expected a size"),
        ("MB", "expected a size"),
        (True, "expected a size"),
        ("-1", "expected a size"),
    ],
)
def test_parse_size_refuses_bad_sizes(text: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_size(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("mail.example.com", HostPort("mail.example.com", 25, False)),
        ("mail.example.com:2525", HostPort("mail.example.com", 2525, False)),
        ("Mail.Example.COM.:26", HostPort("mail.example.com", 26, False)),
        ("[mail.example.com]", HostPort("mail.example.com", 25, True)),
        ("[mail.example.com]:587", HostPort("mail.example.com", 587, True)),
        # An address literal is always "this host": bracketed or not.
        ("192.0.2.7", HostPort("192.0.2.7", 25, True)),
        ("192.0.2.7:2525", HostPort("192.0.2.7", 2525, True)),
        ("[2001:DB8::1]:25", HostPort("2001:db8::1", 25, True)),
        ("[::1]", HostPort("::1", 25, True)),
        (" relay.example.net ", HostPort("relay.example.net", 25, False)),
    ],
)
def test_parse_hostport_reads_every_form(text: str, expected: HostPort) -> None:
    assert parse_hostport(text) == expected


def test_parse_hostport_uses_the_default_port_given() -> None:
    assert parse_hostport("192.0.2.53", default_port=53).port == 53


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "expected host"),
        (25, "expected host"),
        ("::1", "must be written in brackets"),
        ("2001:db8::1:25", "must be written in brackets"),
        ("[mail.example.com", "without its"),
        ("[mail.example.com]25", "expected ':port'"),
        ("mail.example.com:smtp", "is not a number"),
        ("mail.example.com:", "is not a number"),
        ("mail.example.com:0", "port number"),
        ("mail.example.com:65536", "port number"),
        ("bad_host!:25", "host name"),
        ("[not a host]:25", "host name"),
    ],
)
def test_parse_hostport_refuses_bad_forms(text: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_hostport(text)


def test_hostport_prints_brackets_only_when_bracketed() -> None:
    assert str(HostPort("mx.example.com", 25, False)) == "mx.example.com:25"
    assert str(HostPort("192.0.2.7", 2525, True)) == "[192.0.2.7]:2525"


# --- a whole file ----------------------------------------------------------


SPEC_EXAMPLE = """\
hostname: Relay.Example.NET
spool: ../spool
tls:
  certificate: tls/relay.crt
  private_key: tls/relay.key
  min_version: TLSv1.3
  ciphers: [ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-GCM-SHA256]
  ciphersuites: [TLS_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256]
  trust: system
listeners:
  - {name: mx, address: 0.0.0.0, port: 25, role: inbound}
  - {name: submission, address: "::", port: 587, role: outbound,
     require_tls: true, networks: [192.0.2.0/24, "2001:db8::/32"]}
limits: {message_size: 10MB, recipients: 50, idle_timeout: 2m}
domains:
  Example.COM:
    relay_to: ["mail.example.com:25", "[192.0.2.20]:2526"]
    recipients: [CEO@example.com, postmaster@example.com]
routes:
  partner.example: "[192.0.2.7]:2525"
  .hosted.example: "gw.hosted.example"
  "*": "[smarthost.example.net]:587"
dns: {nameservers: ["127.0.0.1:10053", "[::1]"]}
delivery:
  retry_schedule: [1m, 5m, 15m]
  max_lifetime: 2d
  opportunistic_fallback: defer
  plaintext_fallback_delay: 0s
  timeouts: {connect: 10s, command: 1m, data: 3m}
  port: 2500
  concurrency: 4
defaults: {outbound: enforce-tls, inbound: none}
policies:
  - {name: partner, direction: outbound, recipient_domain: partner.example,
     tls: enforce-secure, match: [MX.Provider.example]}
  - {direction: inbound, recipient: CEO@Example.com, tls: enforce-tls}
"""


def test_every_concept_of_the_spec_example_is_parsed(folder: Path) -> None:
    """The file of SPEC.md section 4 becomes frozen, typed, normalised
    values: lower-case names, seconds, bytes, resolved paths."""
    path = folder / "etc" / "mta.yaml"
    path.parent.mkdir()
    shutil.move(folder / "tls", folder / "etc" / "tls")
    path.write_text(SPEC_EXAMPLE)

    config = load_config(path)

    assert config.path == path.resolve()
    assert config.hostname == "relay.example.net"
    assert config.spool == (folder / "spool").resolve()
    assert config.tls.certificate == (folder / "etc/tls/relay.crt").resolve()
    assert config.tls.min_version == "TLSv1.3"
    assert config.tls.ciphers == (
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"
    )
    assert config.tls.ciphersuites == (
        "TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"
    )
    assert config.tls.trust is None

    mx, submission = config.listeners
    assert (mx.name, mx.address, mx.port, mx.role) == ("mx", "0.0.0.0", 25,
                                                       "inbound")
    assert not mx.require_tls and mx.networks == ()
    assert submission.require_tls and submission.role == "outbound"
    assert submission.allows_client("192.0.2.99")
    assert submission.allows_client("2001:db8::5")
    assert not submission.allows_client("198.51.100.1")
    assert not submission.allows_client("not an address")

    assert config.limits.message_size == 10 * 1024**2
    assert config.limits.recipients == 50
    assert config.limits.idle_timeout == 120.0

    domain = config.domains["example.com"]
    assert domain.relay_to == (
        HostPort("mail.example.com", 25, False),
        HostPort("192.0.2.20", 2526, True),
    )
    assert domain.recipients == {"ceo@example.com", "postmaster@example.com"}
    assert config.is_local_domain("EXAMPLE.com.")
    assert not config.is_local_domain("sub.example.com")

    assert dict(config.routes) == {
        "partner.example": HostPort("192.0.2.7", 2525, True),
        ".hosted.example": HostPort("gw.hosted.example", 25, False),
        "*": HostPort("smarthost.example.net", 587, True),
    }
    assert config.nameservers == (("127.0.0.1", 10053), ("::1", 53))

    delivery = config.delivery
    assert delivery.retry_schedule == (60.0, 300.0, 900.0)
    assert delivery.max_lifetime == 2 * 86400
    assert delivery.opportunistic_fallback == "defer"
    assert delivery.plaintext_fallback_delay == 0.0
    assert (delivery.timeouts.connect, delivery.timeouts.command,
            delivery.timeouts.data) == (10.0, 60.0, 180.0)
    assert (delivery.port, delivery.concurrency) == (2500, 4)

    assert dict(config.defaults) == {"outbound": "enforce-tls",
                                     "inbound": "none"}
    partner, ceo = config.policies
    assert (partner.name, partner.direction, partner.level) == (
        "partner", "outbound", "enforce-secure")
    assert partner.recipient_domain == "partner.example"
    assert partner.match == ("mx.provider.example",)
    assert ceo.name == "rule2" and ceo.recipient == "ceo@example.com"
    assert ceo.match is None


def test_defaults_fill_what_the_file_leaves_out(folder: Path) -> None:
    """Cipher lists, delivery settings and policy defaults have the
    documented defaults when the file says nothing."""
    config = load_config(write(folder, base_config()))

    assert config.tls.min_version == "TLSv1.2"
    assert config.tls.ciphers == DEFAULT_CIPHERS
    assert config.tls.ciphersuites == DEFAULT_CIPHERSUITES
    assert config.delivery.retry_schedule == (60.0, 300.0, 900.0, 3600.0,
                                              14400.0)
    assert config.delivery.max_lifetime == 5 * 86400
    assert config.delivery.opportunistic_fallback == "plaintext"
    assert config.delivery.plaintext_fallback_delay == 600.0
    assert config.delivery.port == 25
    assert config.limits.message_size == 50 * 1024**2
    assert config.limits.stop_timeout == 30.0
    assert config.limits.errors == 20
    assert config.limits.connections == 300
    assert config.limits.client_connections == 50
    assert config.limits.data_timeout == 600.0
    assert config.nameservers is None
    assert dict(config.defaults) == {"inbound": "opportunistic",
                                     "outbound": "opportunistic"}


def test_limits_on_clients(folder: Path) -> None:
    data = base_config()
    data["limits"] = {"errors": 5, "connections": 1000, "client_connections": 2,
                      "data_timeout": "30m", "idle_timeout": "90s"}
    limits = load_config(write(folder, data)).limits
    assert (limits.errors, limits.connections, limits.client_connections) == (
        5, 1000, 2
    )
    assert (limits.data_timeout, limits.idle_timeout) == (1800.0, 90.0)


def test_the_default_cipher_lists_are_the_spec_lists() -> None:
    """SPEC.md section 1, in its order: ECDSA twin before each ECDHE-RSA."""
    assert DEFAULT_CIPHERSUITES == (
        "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_256_GCM_SHA384",
    )
    assert DEFAULT_CIPHERS == (
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-SHA256", "ECDHE-RSA-AES128-SHA256",
        "ECDHE-ECDSA-AES256-SHA384", "ECDHE-RSA-AES256-SHA384",
        "AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-SHA256",
        "AES256-SHA256",
    )


def test_relative_paths_are_relative_to_the_file_not_the_cwd(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spool, certificate, key, trust bundle and recipient file are all
    resolved against the configuration file's folder."""
    etc = folder / "etc"
    etc.mkdir()
    shutil.move(folder / "tls", etc / "tls")
    shutil.copy(etc / "tls/relay.crt", etc / "tls/ca.pem")
    (etc / "users.txt").write_text("# valid addresses\nAlice@example.com\n\n")
    data = base_config()
    data["spool"] = "../spool"
    data["tls"]["trust"] = "tls/ca.pem"
    data["domains"]["example.com"]["recipients"] = "users.txt"
    write(etc, data)
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config("../etc/mta.yaml")

    assert config.spool == (folder / "spool").resolve()
    assert config.tls.certificate == (etc / "tls/relay.crt").resolve()
    assert config.tls.private_key == (etc / "tls/relay.key").resolve()
    assert config.tls.trust == (etc / "tls/ca.pem").resolve()
    assert config.domains["example.com"].recipients == {"alice@example.com"}


def test_absolute_paths_are_kept(folder: Path) -> None:
    data = base_config()
    data["spool"] = str(folder / "var" / "spool")
    config = load_config(write(folder / "tls", data, "nested.yaml"),
                         check_tls=False)
    assert config.spool == folder / "var" / "spool"


def test_the_repository_default_file_loads(tmp_path: Path) -> None:
    """etc/mta.yaml, with a self-signed pair written beside a copy of it
    (never into the repository's own etc/), passes every check."""
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(REPOSITORY / "etc" / "mta.yaml", etc / "mta.yaml")
    write_self_signed("relay.localhost", etc / "tls/relay.crt",
                      etc / "tls/relay.key")

    config = load_config(etc / "mta.yaml")

    assert config.hostname == "relay.localhost"
    assert config.spool == (tmp_path / "spool").resolve()
    assert config.tls.ciphers == DEFAULT_CIPHERS
    assert config.tls.ciphersuites == DEFAULT_CIPHERSUITES
    assert [listener.address for listener in config.listeners] == [
        "127.0.0.1", "127.0.0.1"]
    assert all(listener.port > 1024 for listener in config.listeners)
    assert config.is_local_domain("example.com")
    assert config.policies == ()


# --- mistakes: each names the file, the key and the bad value ---------------


BAD_VALUES = [
    # (where, value, what the problem line must hold)
    # unknown keys, at every level
    (("colour",), "blue", ["colour: unknown key"]),
    (("tls", "colour"), "blue", ["tls.colour: unknown key"]),
    (("listeners", 0, "colour"), "blue", ["listeners[0].colour: unknown key"]),
    (("limits",), {"colour": 1}, ["limits.colour: unknown key"]),
    (("domains", "example.com", "colour"), 1,
     ["domains.example.com.colour: unknown key"]),
    (("dns",), {"servers": ["127.0.0.1"]}, ["dns.servers: unknown key"]),
    (("delivery",), {"retries": 3}, ["delivery.retries: unknown key"]),
    (("delivery",), {"timeouts": {"idle": "1m"}},
     ["delivery.timeouts.idle: unknown key"]),
    (("defaults",), {"sideways": "none"}, ["defaults.sideways: unknown key"]),
    (("policies", 0, "colour"), "blue", ["policies[0].colour: unknown key"]),
    # durations
    (("delivery",), {"max_lifetime": "5 days"},
     ["delivery.max_lifetime: expected a duration", "(got '5 days')"]),
    (("delivery",), {"retry_schedule": ["1m", "soon"]},
     ["delivery.retry_schedule[1]: expected a duration", "(got 'soon')"]),
    (("delivery",), {"retry_schedule": []},
     ["delivery.retry_schedule: ", "(got [])"]),
    (("delivery",), {"plaintext_fallback_delay": -5},
     ["delivery.plaintext_fallback_delay: a duration cannot be negative",
      "(got -5)"]),
    (("delivery",), {"timeouts": {"connect": "fast"}},
     ["delivery.timeouts.connect: expected a duration", "(got 'fast')"]),
    (("limits",), {"idle_timeout": "forever"},
     ["limits.idle_timeout: expected a duration", "(got 'forever')"]),
    (("limits",), {"idle_timeout": "0s"},
     ["limits.idle_timeout: a timeout must be above zero", "(got '0s')"]),
    (("limits",), {"stop_timeout": "a while"},
     ["limits.stop_timeout: expected a duration", "(got 'a while')"]),
    (("limits",), {"stop_timeout": -1},
     ["limits.stop_timeout: a duration cannot be negative", "(got -1)"]),
    (("limits",), {"data_timeout": "0s"},
     ["limits.data_timeout: a timeout must be above zero", "(got '0s')"]),
    (("limits",), {"errors": 0},
     ["limits.errors: expected a whole number above zero", "(got 0)"]),
    (("limits",), {"connections": "many"},
     ["limits.connections: expected a whole number above zero",
      "(got 'many')"]),
    (("limits",), {"client_connections": -1},
     ["limits.client_connections: expected a whole number above zero",
      "(got -1)"]),
    (("delivery",), {"timeouts": {"data": 0}},
     ["delivery.timeouts.data: a timeout must be above zero", "(got 0)"]),
    # sizes and counts
    (("limits",), {"message_size": "50TB"},
     ["limits.message_size: expected a size", "(got '50TB')"]),
    (("limits",), {"message_size": 0},
     ["limits.message_size: a size must be above zero", "(got 0)"]),
    (("limits",), {"recipients": 0},
     ["limits.recipients: expected a whole number above zero", "(got 0)"]),
    (("delivery",), {"concurrency": "lots"},
     ["delivery.concurrency: expected a whole number", "(got 'lots')"]),
    (("delivery",), {"destination_concurrency": 0},
     ["delivery.destination_concurrency: expected a whole number above zero",
      "(got 0)"]),
    (("delivery",), {"destination_failure_limit": 2.5},
     ["delivery.destination_failure_limit: expected a whole number",
      "(got 2.5)"]),
    (("delivery",), {"destination_backoff": "0s"},
     ["delivery.destination_backoff: a suspension must last at least 1s",
      "(got '0s')"]),
    # zero (or next to it) where it has no meaning: a retry without pause,
    # a connection kept for no time
    (("delivery",), {"retry_schedule": ["0s"]},
     ["delivery.retry_schedule[0]: a retry step must last at least 1s: a "
      "shorter one would make the relay try again without pause",
      "(got '0s')"]),
    (("delivery",), {"retry_schedule": ["1m", "500ms"]},
     ["delivery.retry_schedule[1]: a retry step must last at least 1s",
      "(got '500ms')"]),
    (("delivery",), {"retry_schedule": [0]},
     ["delivery.retry_schedule[0]: a retry step must last at least 1s",
      "(got 0)"]),
    (("delivery",), {"destination_max_backoff": "0.5s"},
     ["delivery.destination_max_backoff: a suspension must last at least 1s",
      "(got '0.5s')"]),
    (("delivery",), {"connection_reuse": {"idle": "0s"}},
     ["delivery.connection_reuse.idle: must be above zero; to reuse no "
      "connection, set delivery.connection_reuse.messages: 1", "(got '0s')"]),
    (("delivery",), {"connection_reuse": {"lifetime": 0}},
     ["delivery.connection_reuse.lifetime: must be above zero", "(got 0)"]),
    (("delivery",), {"timeouts": {"connect": "0s"}},
     ["delivery.timeouts.connect: a timeout must be above zero",
      "(got '0s')"]),
    (("delivery",), {"timeouts": {"command": "0ms"}},
     ["delivery.timeouts.command: a timeout must be above zero",
      "(got '0ms')"]),
    (("delivery",), {"destination_backoff": "10m",
                     "destination_max_backoff": "1m"},
     ["delivery.destination_max_backoff: must not be shorter than "
      "delivery.destination_backoff (600s)", "(got '1m')"]),
    # addresses, networks and host names
    (("listeners", 0, "address"), "localhost",
     ["listeners[0].address: expected an IPv4 or IPv6 address",
      "(got 'localhost')"]),
    (("listeners", 0, "address"), "300.1.1.1",
     ["listeners[0].address: expected an IPv4", "(got '300.1.1.1')"]),
    (("listeners", 0, "networks"), ["10.0.0.0/8", "10.0.0.0/33"],
     ["listeners[0].networks[1]: expected a network", "(got '10.0.0.0/33')"]),
    (("hostname",), "not a host!",
     ["hostname: expected a host name", "(got 'not a host!')"]),
    (("domains",), {"bad domain!": {"relay_to": ["mx.example.com"]}},
     ["domains.bad domain!: expected a host name", "(got 'bad domain!')"]),
    (("domains", "example.com", "relay_to"), ["mail.example.com:99999"],
     ["domains.example.com.relay_to[0]: expected a port number",
      "(got 'mail.example.com:99999')"]),
    (("domains", "example.com"), {"recipients": None},
     ["domains.example.com.relay_to: is required"]),
    (("routes",), {"partner.example": "[192.0.2.7"},
     ["routes.partner.example: a '[' without its ']'", "(got '[192.0.2.7')"]),
    (("routes",), {"bad_domain!": "[192.0.2.7]"},
     ["routes.bad_domain!: expected a host name", "(got 'bad_domain!')"]),
    (("dns",), {"nameservers": ["ns.example.net"]},
     ["dns.nameservers[0]: a name server must be an IP address",
      "(got 'ns.example.net')"]),
    # ports
    (("listeners", 0, "port"), 0,
     ["listeners[0].port: expected a port number from 1 to 65535", "(got 0)"]),
    (("listeners", 0, "port"), 70000,
     ["listeners[0].port: expected a port number", "(got 70000)"]),
    (("listeners", 0, "port"), "25",
     ["listeners[0].port: expected a port number", "(got '25')"]),
    (("listeners", 0, "port"), True,
     ["listeners[0].port: expected a port number", "(got True)"]),
    (("delivery",), {"port": 0}, ["delivery.port: expected a port", "(got 0)"]),
    # levels, roles, choices
    (("defaults",), {"outbound": "secure"},
     ["defaults.outbound: expected one of none, opportunistic, enforce-tls, "
      "enforce-secure", "(got 'secure')"]),
    (("policies", 0, "tls"), "enforce",
     ["policies[0].tls: expected one of", "(got 'enforce')"]),
    (("listeners", 0, "role"), "submission",
     ["listeners[0].role: expected one of inbound, outbound",
      "(got 'submission')"]),
    (("policies", 0, "direction"), "sideways",
     ["policies[0].direction: expected one of inbound, outbound",
      "(got 'sideways')"]),
    (("delivery",), {"opportunistic_fallback": "retry"},
     ["delivery.opportunistic_fallback: expected one of plaintext, defer",
      "(got 'retry')"]),
    (("listeners", 0, "require_tls"), "yes",
     ["listeners[0].require_tls: expected true or false", "(got 'yes')"]),
    # the TLS floor
    (("tls", "min_version"), "TLSv1",
     ["tls.min_version: TLS 1.2 is the floor", "(got 'TLSv1')"]),
    (("tls", "min_version"), "TLSv1.1",
     ["tls.min_version: TLS 1.2 is the floor", "(got 'TLSv1.1')"]),
    (("tls", "min_version"), "SSLv3",
     ["tls.min_version: TLS 1.2 is the floor", "(got 'SSLv3')"]),
    (("tls", "min_version"), 1.2,
     ["tls.min_version: expected TLSv1.2 or TLSv1.3", "(got 1.2)"]),
    (("tls", "ciphers"), [],
     ["tls.ciphers: expected a non-empty list", "(got [])"]),
    (("tls", "trust"), "missing-ca.pem",
     ["tls.trust: no such file", "missing-ca.pem"]),
    # required things
    (("listeners",), [], ["listeners: expected a non-empty list", "(got [])"]),
    (("listeners", 0), {"name": "mx", "port": 25, "role": "inbound"},
     ["listeners[0].address: is required"]),
    (("listeners",), [{}], ["listeners[0].address: is required"]),
    (("listeners",), ["mx"], ["listeners[0]: expected a mapping", "(got 'mx')"]),
    (("tls",), {"certificate": "tls/relay.crt"},
     ["tls.private_key: is required"]),
    (("tls",), "tls/relay.crt", ["tls: expected a mapping"]),
    # policy rules
    (("policies", 0), {"direction": "outbound", "tls": "none"},
     ["policies[0]: needs exactly one of recipient_domain or recipient"]),
    (("policies",), [{}], ["policies[0].direction: is required"]),
    (("policies", 0, "recipient"), "ceo@partner.example",
     ["policies[0]: needs exactly one"]),
    (("policies", 0),
     {"direction": "outbound", "recipient": "ceo@partner.example",
      "tls": "none"},
     ["policies[0].recipient: outbound rules match recipient_domain only",
      "(got 'ceo@partner.example')"]),
    (("policies", 0),
     {"direction": "inbound", "recipient": "example.com", "tls": "none"},
     ["policies[0].recipient: expected an address", "(got 'example.com')"]),
    (("policies", 0, "match"), ["mx.provider.example", "not a name"],
     ["policies[0].match[1]: expected a host name", "(got 'not a name')"]),
    (("policies", 0, "match"), [],
     ["policies[0].match: expected at least one host name", "(got [])"]),
    # a server that is the relay itself (mta.ownendpoints)
    (("domains", "example.com", "relay_to"), ["127.0.0.1:2525"],
     ["domains.example.com.relay_to: is this relay's own 127.0.0.1:2525 "
      "(listener mx): its mail would come straight back",
      "(got '[127.0.0.1]:2525')"]),
    (("routes",), {"*": "[127.0.0.1]:2525"},
     ["routes.*: is this relay's own 127.0.0.1:2525 (listener mx)"]),
    (("proxy_addresses",), ["relay.example.net"],
     ["proxy_addresses[0]: expected an IP address, ADDRESS:PORT or "
      "[IPv6]:PORT", "(got 'relay.example.net')"]),
    (("proxy_addresses",), ["0.0.0.0"],
     ["proxy_addresses[0]: expected the address clients reach the relay at, "
      "not a wildcard", "(got '0.0.0.0')"]),
    (("proxy_addresses",), "203.0.113.5:99999",
     ["proxy_addresses[0]: expected a port number"]),
]


@pytest.mark.parametrize(
    "where, value, parts",
    BAD_VALUES,
    ids=[".".join(map(str, row[0])) + "=" + repr(row[1]) for row in BAD_VALUES],
)
def test_a_bad_value_is_reported_with_file_key_and_value(
    folder: Path, where: tuple[Any, ...], value: Any, parts: list[str]
) -> None:
    path = write(folder, changed(where, value))
    assert_reported(problems_of(path), path, *parts)


@pytest.mark.parametrize("key", ["spool", "tls", "listeners"])
def test_a_missing_required_section_is_reported(folder: Path, key: str) -> None:
    data = base_config()
    del data[key]
    path = write(folder, data)
    assert_reported(problems_of(path), path, f"{key}: ")


def test_a_second_listener_with_the_same_name_is_refused(folder: Path) -> None:
    data = base_config()
    data["listeners"].append(dict(data["listeners"][0], port=2526))
    path = write(folder, data)
    assert_reported(problems_of(path), path,
                    "listeners[1].name: is used by another listener",
                    "(got 'mx')")


def test_every_problem_is_reported_not_just_the_first(folder: Path) -> None:
    data = changed(("listeners", 0, "port"), 0)
    data["delivery"] = {"max_lifetime": "ages"}
    path = write(folder, data)

    problems = problems_of(path)

    assert len(problems) == 2
    assert_reported(problems, path, "listeners[0].port")
    assert_reported(problems, path, "delivery.max_lifetime", "(got 'ages')")


@pytest.mark.parametrize(
    "text, parts",
    [
        ("hostname: [unclosed\n", ["not valid YAML", "line 1"]),
        ("hostname: a\n  spool: b\n", ["not valid YAML"]),
        ("- a list\n- of things\n", ["(top level): expected a mapping",
                                     "(got ['a list', 'of things'])"]),
        ("just words\n", ["(top level): expected a mapping"]),
        ("", ["(top level)", "empty"]),
        ("# only a comment\n", ["(top level)", "empty"]),
    ],
    ids=["unclosed", "indentation", "list", "scalar", "empty", "comment"],
)
def test_a_file_that_is_not_a_mapping_is_refused(
    tmp_path: Path, text: str, parts: list[str]
) -> None:
    path = tmp_path / "mta.yaml"
    path.write_text(text)
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: ")
    for part in parts:
        assert part in problems[0]


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    problems = problems_of(path)
    assert problems == (f"{path}: cannot read: No such file or directory",)


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mta.yaml"
    path.write_bytes(b"hostname: caf\xe9\n")
    assert problems_of(path) == (f"{path}: is not UTF-8 text",)


def test_an_unreadable_recipient_file_is_named(folder: Path) -> None:
    path = write(folder, changed(("domains", "example.com", "recipients"),
                                 "users.txt"))
    assert_reported(problems_of(path), path,
                    "domains.example.com.recipients: cannot read",
                    str(folder / "users.txt"))


# --- TLS: files, key pair and cipher names, through load_config ------------


def _supports_suite(name: str) -> bool:
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_tls13_ciphersuites(name.encode())
    except SSL.Error:
        return False
    return name in SSL.Connection(context).get_cipher_list()


def break_files(folder: Path, how: str, other: trustme.LeafCert) -> None:
    tls = folder / "tls"
    if how == "certificate missing":
        (tls / "relay.crt").unlink()
    elif how == "key missing":
        (tls / "relay.key").unlink()
    elif how == "certificate is a folder":
        (tls / "relay.crt").unlink()
        (tls / "relay.crt").mkdir()
    elif how == "certificate not PEM":
        (tls / "relay.crt").write_text("not a certificate\n")
    elif how == "key not PEM":
        (tls / "relay.key").write_text("not a key\n")
    elif how == "certificate given as key":
        shutil.copy(tls / "relay.crt", tls / "relay.key")
    elif how == "key of another certificate":
        other.private_key_pem.write_to_path(str(tls / "relay.key"))
    elif how == "trust bundle not PEM":
        (tls / "ca.pem").write_text("not a bundle\n")


BAD_FILES = [
    ("certificate missing",
     ["tls.certificate: cannot read", "tls/relay.crt: No such file"]),
    ("key missing", ["tls.private_key: cannot read", "tls/relay.key"]),
    ("certificate is a folder",
     ["tls.certificate: cannot read", "tls/relay.crt: Is a directory"]),
    ("certificate not PEM",
     ["tls.certificate: ", "tls/relay.crt holds no PEM certificate"]),
    ("key not PEM", ["tls.private_key: ", "tls/relay.key holds no PEM key"]),
    ("certificate given as key",
     ["tls.private_key: ", "tls/relay.key holds no PEM key"]),
    ("key of another certificate",
     ["tls.private_key: ", "tls/relay.key does not match", "tls/relay.crt"]),
    ("trust bundle not PEM", ["tls.trust: ", "tls/ca.pem"]),
]


@pytest.mark.parametrize("how, parts", BAD_FILES,
                         ids=[row[0] for row in BAD_FILES])
def test_a_bad_certificate_or_key_file_is_reported(
    folder: Path, other_leaf: trustme.LeafCert, how: str, parts: list[str]
) -> None:
    break_files(folder, how, other_leaf)
    data = base_config()
    if how.startswith("trust"):
        data["tls"]["trust"] = "tls/ca.pem"
    path = write(folder, data)

    problems = problems_of(path)

    assert len(problems) == 1
    assert_reported(problems, path, *parts)


def test_file_problems_wait_for_check_tls(folder: Path) -> None:
    """check_tls=False (used by tools that only read the spool) does not
    open the certificate."""
    (folder / "tls/relay.crt").unlink()
    config = load_config(write(folder, base_config()), check_tls=False)
    assert config.tls.certificate == folder / "tls/relay.crt"


BAD_CIPHERS = [
    # (key, configured names, names the problem must quote)
    ("ciphers", ["RC4-MD5", "AES128-GCM-SHA256"], ["RC4-MD5"]),
    ("ciphers", ["DES-CBC3-SHA", "AES128-GCM-SHA256", "BOGUS"],
     ["DES-CBC3-SHA", "BOGUS"]),
    ("ciphers", ["BOGUS"], ["BOGUS"]),
    ("ciphers", ["AES128-GCM-SHA256", "HIGH"], ["HIGH"]),
    # A TLS 1.3 name in the TLS 1.2 list would be ignored by OpenSSL.
    ("ciphers", ["AES128-GCM-SHA256", "TLS_AES_128_GCM_SHA256"],
     ["TLS_AES_128_GCM_SHA256"]),
    ("ciphersuites", ["BOGUS_SUITE"], ["BOGUS_SUITE"]),
    ("ciphersuites", ["TLS_AES_128_GCM_SHA256", "TLS_FAKE_SHA256"],
     ["TLS_FAKE_SHA256"]),
    ("ciphersuites", ["TLS_AES_128_GCM_SHA256", "AES128-SHA256"],
     ["AES128-SHA256"]),
]


@pytest.mark.parametrize(
    "key, names, dropped", BAD_CIPHERS,
    ids=[f"{row[0]}={':'.join(row[1])}" for row in BAD_CIPHERS],
)
def test_a_cipher_name_openssl_drops_is_reported(
    folder: Path, key: str, names: list[str], dropped: list[str]
) -> None:
    """Only the cipher problem is reported: a cipher list OpenSSL refuses
    outright must not be mistaken for a key that does not match."""
    path = write(folder, changed(("tls", key), names))

    problems = problems_of(path)

    assert len(problems) == 1, problems
    assert_reported(problems, path, f"tls.{key}: not supported by this OpenSSL",
                    *dropped)
    # Exactly the dropped names are listed, in the order written, then a
    # hint on how to write the list.
    listed, hint = problems[0].rsplit("): ", 1)[1].split("; ", 1)
    assert listed.split(", ") == dropped
    other = "tls.ciphers" if key == "ciphersuites" else "tls.ciphersuites"
    crossed = any(name.startswith("TLS_") != (key == "ciphersuites")
                  for name in dropped)
    assert (other in hint) == crossed, hint


def test_a_repeated_cipher_name_is_reported(folder: Path) -> None:
    """OpenSSL keeps one of two equal names: the list would not be the one
    configured."""
    path = write(folder, changed(("tls", "ciphers"),
                                 ["AES128-GCM-SHA256", "AES128-GCM-SHA256"]))
    assert_reported(problems_of(path), path, "tls.ciphers: ",
                    "AES128-GCM-SHA256")


def test_ccm8_suite_is_accepted_exactly_when_openssl_supports_it(
    folder: Path,
) -> None:
    name = "TLS_AES_128_CCM_8_SHA256"
    path = write(folder, changed(("tls", "ciphersuites"), [name]))
    if _supports_suite(name):
        assert load_config(path).tls.ciphersuites == (name,)
    else:
        assert_reported(problems_of(path), path, "tls.ciphersuites: ", name)


def test_cipher_lists_in_any_valid_order_are_kept_as_written(
    folder: Path,
) -> None:
    ciphers = ["AES256-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"]
    suites = ["TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_256_GCM_SHA384"]
    data = changed(("tls", "ciphers"), ciphers)
    data["tls"]["ciphersuites"] = suites
    config = load_config(write(folder, data))
    assert config.tls.ciphers == tuple(ciphers)
    assert config.tls.ciphersuites == tuple(suites)


def test_check_tls_config_passes_a_good_pair(folder: Path) -> None:
    config = load_config(write(folder, base_config()), check_tls=False)
    assert check_tls_config(config.tls) == []


def test_check_tls_config_reports_both_cipher_lists_at_once(
    folder: Path,
) -> None:
    data = changed(("tls", "ciphers"), ["BOGUS"])
    data["tls"]["ciphersuites"] = ["BOGUS_SUITE"]
    config = load_config(write(folder, data), check_tls=False)

    problems = check_tls_config(config.tls)

    assert len(problems) == 2
    assert problems[0].startswith("tls.ciphers: ") and "BOGUS" in problems[0]
    assert problems[1].startswith("tls.ciphersuites: ")
    assert "BOGUS_SUITE" in problems[1]


def test_two_listeners_on_one_address_and_port_are_refused(folder: Path) -> None:
    data = base_config()
    data["listeners"].append(dict(data["listeners"][0], name="other"))
    path = write(folder, data)
    assert_reported(problems_of(path), path, "listeners[1].port",
                    "127.0.0.1:2525 is already used by listener mx")


def test_a_key_given_twice_is_refused_with_file_key_and_lines(
    folder: Path,
) -> None:
    path = folder / "mta.yaml"
    text = yaml.safe_dump(base_config(), sort_keys=False)
    lines = len(text.splitlines())
    path.write_text(text + "hostname: second.example.net\n"
                    "limits: {recipients: 10, recipients: 20}\n")

    problems = problems_of(path)

    assert problems == (
        f"{path}: hostname: is given twice (line 1 and line {lines + 1}); "
        "keep one",
        f"{path}: limits.recipients: is given twice (line {lines + 2} and "
        f"line {lines + 2}); keep one",
    )


def test_a_key_given_twice_hides_no_other_problem(folder: Path) -> None:
    data = changed(("delivery",), {"max_lifetime": "ages"})
    data["listeners"].append(dict(data["listeners"][0], name="sub", port=2526))
    path = folder / "mta.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False).replace(
        "  port: 2526\n", "  port: 2526\n  port: 2527\n"))

    problems = problems_of(path)

    assert len(problems) == 2, problems
    assert_reported(problems, path, "listeners[1].port: is given twice")
    assert_reported(problems, path, "delivery.max_lifetime", "(got 'ages')")


def test_tls_problems_are_reported_beside_every_other(folder: Path) -> None:
    # A cipher OpenSSL drops, a key that is missing, and a bad duration:
    # one run of check-config must show all three.
    data = changed(("tls", "ciphers"), ["ECDHE-RSA-AES128-GCM-SHA256", "BOGUS"])
    data["tls"]["trust"] = "no-such-ca.pem"
    data["delivery"] = {"max_lifetime": "ages"}
    path = write(folder, data)

    problems = problems_of(path)

    assert len(problems) == 3, problems
    assert_reported(problems, path, "tls.ciphers: not supported", "BOGUS")
    assert_reported(problems, path, "tls.trust: no such file")
    assert_reported(problems, path, "delivery.max_lifetime", "(got 'ages')")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "100000d"])
def test_a_duration_must_be_finite(folder: Path, value: str) -> None:
    path = folder / "mta.yaml"
    path.write_text(yaml.safe_dump(base_config(), sort_keys=False)
                    + f"limits: {{idle_timeout: {value}}}\n")
    assert_reported(problems_of(path), path, "limits.idle_timeout")


def test_a_spool_that_is_a_file_is_refused(folder: Path) -> None:
    (folder / "spool").write_text("not a folder")
    path = write(folder, base_config())
    assert_reported(problems_of(path), path, "spool: is not a folder")


def test_a_binary_recipients_file_is_refused(folder: Path) -> None:
    (folder / "users.bin").write_bytes(b"\xff\xfe\x00garbage")
    path = write(folder, changed(("domains", "example.com", "recipients"),
                                 "users.bin"))
    assert_reported(problems_of(path), path, "domains.example.com.recipients",
                    "is not a UTF-8 text file")


# --- the relay's own addresses (mta.ownendpoints) ----------------------------


def test_a_listener_on_every_address_counts_loopback_as_itself(
    folder: Path,
) -> None:
    data = changed(("listeners", 0, "address"), "0.0.0.0")
    data["domains"]["example.com"]["relay_to"] = ["[127.0.0.9]:2525"]
    path = write(folder, data)
    assert_reported(problems_of(path), path,
                    "domains.example.com.relay_to: is this relay's own "
                    "0.0.0.0:2525 (listener mx)", "(got '[127.0.0.9]:2525')")


@pytest.mark.parametrize(
    "relay_to", ["[127.0.0.1]:2526", "[127.0.0.2]:2525", "[192.0.2.9]:2525",
                 "localhost:2525"],
)
def test_a_server_beside_the_relay_is_not_itself(
    folder: Path, relay_to: str
) -> None:
    # Another port, another address, or a name (checked at delivery).
    path = write(folder, changed(("domains", "example.com", "relay_to"),
                                 [relay_to]))
    assert load_config(path).domains["example.com"].relay_to


def test_proxy_addresses_stand_for_every_listener_port_or_one(
    folder: Path,
) -> None:
    data = base_config()
    data["listeners"].append({"name": "submission", "address": "127.0.0.1",
                              "port": 5870, "role": "outbound"})
    data["proxy_addresses"] = ["203.0.113.5", "[2001:db8::5]:25",
                               "2001:db8::6", "198.51.100.5:2525"]
    config = load_config(write(folder, data))

    assert [(e.address, e.port, e.owner) for e in config.own_endpoints] == [
        ("127.0.0.1", 2525, "listener mx"),
        ("127.0.0.1", 5870, "listener submission"),
        ("203.0.113.5", 2525, "proxy_addresses"),
        ("203.0.113.5", 5870, "proxy_addresses"),
        ("2001:db8::5", 25, "proxy_addresses"),
        ("2001:db8::6", 2525, "proxy_addresses"),
        ("2001:db8::6", 5870, "proxy_addresses"),
        ("198.51.100.5", 2525, "proxy_addresses"),
    ]


def test_a_relay_to_that_is_a_proxy_address_is_refused(folder: Path) -> None:
    data = changed(("domains", "example.com", "relay_to"), ["203.0.113.5:25"])
    data["proxy_addresses"] = ["203.0.113.5:25"]
    path = write(folder, data)
    assert_reported(problems_of(path), path,
                    "domains.example.com.relay_to: is this relay's own "
                    "203.0.113.5:25 (proxy_addresses)")


# --- zero where it means nothing ------------------------------------------------


def test_a_zero_keeps_its_documented_meaning(folder: Path) -> None:
    """0s stays "at once" or "off" where the README says so; the refusals
    are in BAD_VALUES."""
    data = base_config()
    data["delivery"] = {"plaintext_fallback_delay": "0s",
                        "connection_reuse": {"tls_sessions": "0s"},
                        "retry_schedule": ["1s"]}
    data["notices"] = {"delay_warning": "0s"}
    data["limits"] = {"auth_failure_delay": "0s"}
    config = load_config(write(folder, data))
    assert config.delivery.plaintext_fallback_delay == 0.0
    assert config.delivery.connection_reuse.tls_sessions == 0.0
    assert config.delivery.retry_schedule == (1.0,)
    assert config.notices.delay_warning == 0.0
    assert config.limits.auth_failure_delay == 0.0


# --- files that are not regular files --------------------------------------------


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: opening a FIFO waits for a writer."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still blocked after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _special(folder: Path, kind: str, name: str) -> Path:
    path = folder / name
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/null")  # a character device behind a link
    else:
        path.mkdir()
    return path.resolve()  # as the configuration names it


SPECIAL_WORDS = {
    "fifo": "not a regular file but a FIFO (named pipe)",
    "device": "not a regular file but a character device",
    "folder": "Is a directory",
}


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
@pytest.mark.parametrize("key", ["certificate", "private_key"])
def test_a_certificate_or_key_that_is_not_a_regular_file_is_refused(
    folder: Path, key: str, kind: str
) -> None:
    name = "tls/relay.crt" if key == "certificate" else "tls/relay.key"
    target = _special(folder, kind, name)
    path = write(folder, base_config())
    with within(5):
        problems = problems_of(path)
    assert_reported(problems, path, f"tls.{key}: cannot read {target}: "
                    + SPECIAL_WORDS[kind])


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_trust_bundle_that_is_not_a_regular_file_is_refused(
    folder: Path, kind: str
) -> None:
    target = _special(folder, kind, "tls/ca.pem")
    path = write(folder, changed(("tls", "trust"), "tls/ca.pem"))
    with within(5):
        problems = problems_of(path)
    assert problems == (f"{path}: tls.trust: cannot read: {SPECIAL_WORDS[kind]} "
                        f"(got '{target}')",)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_recipients_file_that_is_not_a_regular_file_is_refused(
    folder: Path, kind: str
) -> None:
    target = _special(folder, kind, "users.txt")
    path = write(folder, changed(("domains", "example.com", "recipients"),
                                 "users.txt"))
    with within(5):
        problems = problems_of(path)
    assert problems == (f"{path}: domains.example.com.recipients: cannot read: "
                        f"{SPECIAL_WORDS[kind]} (got '{target}')",)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_users_file_that_is_not_a_regular_file_is_refused(
    folder: Path, kind: str
) -> None:
    target = _special(folder, kind, "users.yaml")
    data = base_config()
    data["listeners"].append({"name": "sub", "address": "127.0.0.1",
                              "port": 2587, "role": "outbound",
                              "auth": "users.yaml"})
    path = write(folder, data)
    with within(5):
        problems = problems_of(path)
    assert problems == (f"{path}: listeners[1].auth: cannot read: "
                        f"{SPECIAL_WORDS[kind]} (got '{target}')",)


def test_a_configuration_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    path = _special(tmp_path, "fifo", "mta.yaml")
    with within(5):
        problems = problems_of(path)
    assert problems == (f"{path}: cannot read: {SPECIAL_WORDS['fifo']}",)


def test_symbolic_links_to_regular_files_still_work(folder: Path) -> None:
    """certbot's live/ folder holds links into archive/."""
    archive, live = folder / "archive", folder / "live"
    archive.mkdir()
    live.mkdir()
    for name in ("relay.crt", "relay.key"):
        shutil.move(folder / "tls" / name, archive / name)
        (live / name).symlink_to(archive / name)
    shutil.copy(archive / "relay.crt", archive / "ca.pem")
    (live / "ca.pem").symlink_to(archive / "ca.pem")
    (archive / "users.txt").write_text("alice@example.com\n")
    (folder / "users.txt").symlink_to(archive / "users.txt")
    data = base_config()
    data["tls"] = {"certificate": "live/relay.crt",
                   "private_key": "live/relay.key", "trust": "live/ca.pem"}
    data["domains"]["example.com"]["recipients"] = "users.txt"

    config = load_config(write(folder, data))

    assert config.tls.certificate == (archive / "relay.crt").resolve()
    assert config.domains["example.com"].recipients == {"alice@example.com"}
    # The contexts are built from the files behind the links too.
    server_context(config.tls)
    client_context(config.tls)


def test_the_contexts_never_wait_on_a_fifo_swapped_in(folder: Path) -> None:
    """A FIFO put in place of the certificate after the check (a reload
    builds its contexts after reading the file) is refused, not waited
    on."""
    config = load_config(write(folder, changed(("tls", "trust"), "tls/relay.crt")))
    for name in ("relay.crt", "relay.key"):
        keep = folder / "tls" / name
        shutil.move(keep, folder / name)
        os.mkfifo(keep)
        with within(5), pytest.raises(OSError, match="FIFO"):
            server_context(config.tls)
        if name == "relay.crt":
            with within(5), pytest.raises(OSError, match="FIFO"):
                client_context(config.tls)
        keep.unlink()
        shutil.move(folder / name, keep)


# --- YAML that is too deep or too big ---------------------------------------------


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def _laughs(levels: int) -> str:
    """Anchors nested ``levels`` deep, each nine aliases of the one
    before: a few hundred bytes that stand for 9**levels values."""
    lines = ["laughs:", "  l1: &l1 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(2, levels + 1):
        aliases = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(f"  l{level}: &l{level} [{aliases}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["hostname: {}", "colour: {}",
                                   "limits: {{recipients: {}}}",
                                   "policies: [{}]"])
def test_nesting_too_deep_is_one_problem(folder: Path, where: str) -> None:
    path = folder / "mta.yaml"
    path.write_text(yaml.safe_dump(base_config()).replace("hostname: ", "x: ")
                    + where.format(_deep(600)) + "\n")
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: nesting too deep: more than 64 "
                                  "levels of lists and mappings (line ")


def test_aliases_nested_too_deep_are_one_problem(folder: Path) -> None:
    chain = "".join(f"  a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 600))
    path = folder / "mta.yaml"
    path.write_text(yaml.safe_dump(base_config()) + "chain:\n  a0: &a0 [x]\n"
                    + chain)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert "nesting too deep" in problems[0]


def test_an_alias_inside_its_own_anchor_is_one_problem(folder: Path) -> None:
    path = folder / "mta.yaml"
    text = yaml.safe_dump(base_config())
    path.write_text(text + "colour: &a [*a]\n")
    line = len(text.splitlines()) + 1
    assert problems_of(path) == (
        f"{path}: nesting too deep: an alias inside its own anchor never "
        f"ends (line {line}, column 9)",)


@pytest.mark.parametrize("levels", [5, 6, 7])
@pytest.mark.parametrize("key", ["hostname", "colour", "limits", "listeners",
                                 "domains", "policies", "proxy_addresses"])
def test_a_billion_laughs_gives_short_problems(
    folder: Path, key: str, levels: int
) -> None:
    data = base_config()
    data.pop(key, None)
    path = folder / "mta.yaml"
    path.write_text(yaml.safe_dump(data) + _laughs(levels)
                    + f"{key}: *l{levels}\n")

    problems = problems_of(path, check_tls=False)

    assert all(len(problem) < 600 for problem in problems), \
        [len(problem) for problem in problems]
    if levels > 5:  # a million values or more: refused before it is read
        # (9 levels, 387 million, would take the unfixed reader all memory)
        assert problems == (
            f"{path}: too big: its aliases stand for more than 1,000,000 "
            "values (anchors and aliases nested into each other, as in a "
            "\"billion laughs\" file)",)
    else:
        assert_reported(problems, path, "laughs: unknown key")
        if key != "colour":
            # A few items of a few levels, then "…": never the whole.
            assert_reported(problems, path, f"{key}", "(got [[[...], [...], ",
                            "…)")


def test_a_long_value_or_key_is_cut_short(folder: Path) -> None:
    data = changed(("hostname",), "h" * 5000 + "!")
    data["domains"]["d" * 5000 + "!"] = {"relay_to": ["mx.example.com"]}
    problems = problems_of(write(folder, data))
    assert len(problems) == 2, problems
    assert all(len(problem) < 700 for problem in problems), problems
    assert_reported(problems, folder / "mta.yaml", "hostname: expected a host "
                    "name", "(got 'hhhhhhhh", "...hhhh", "h!')")
    assert_reported(problems, folder / "mta.yaml", ": domains.dddddddd", "dddd…: ",
                    "(got 'dddd")


@pytest.mark.parametrize("value", ["2024-13-45", "1" * 5000])
def test_a_value_yaml_cannot_build_is_one_problem(
    folder: Path, value: str
) -> None:
    path = folder / "mta.yaml"
    path.write_text(yaml.safe_dump(base_config()) + f"colour: {value}\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: not valid YAML: a value cannot be "
                                  "read: ")


@pytest.mark.parametrize("command", [
    ["check-config"], ["queue", "list"], ["policy", "explain", "a@example.com"],
    ["users", "list"],
])
def test_every_command_reports_deep_yaml_in_one_line(
    folder: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    from mta.cli import main

    path = folder / "mta.yaml"
    text = yaml.safe_dump(base_config())
    path.write_text(text + f"colour: {_deep(600)}\n")
    line = len(text.splitlines()) + 1

    assert main(["--config", str(path), *command]) == 1

    out, err = capsys.readouterr()
    assert (out + err).strip() == (
        f"{path}: nesting too deep: more than 64 levels of lists and mappings "
        f"(line {line}, column 72), aliases counted as what they name")


# --- the same name twice -------------------------------------------------------------


@pytest.mark.parametrize("second", ["Strict.Test.", "STRICT.test", "strict.test."])
def test_a_domain_written_twice_is_refused(folder: Path, second: str) -> None:
    data = base_config()
    data["domains"] = {"strict.test": {"relay_to": ["mx.strict.test"]},
                       second: {"relay_to": ["other.strict.test"]}}
    path = write(folder, data)
    assert problems_of(path) == (
        f"{path}: domains.{second}: is the same domain as domains.strict.test "
        f"(case and a trailing dot do not count); keep one (got '{second}')",)


@pytest.mark.parametrize("second", ["Partner.Example.", ".Hosted.Example"])
def test_a_route_written_twice_is_refused(folder: Path, second: str) -> None:
    first = second.lower().rstrip(".")
    data = changed(("routes",), {first: "[192.0.2.7]", second: "[192.0.2.8]",
                                 "hosted.example": "[192.0.2.9]"})
    path = write(folder, data)
    assert problems_of(path) == (
        f"{path}: routes.{second}: is the same domain as routes.{first} "
        f"(case and a trailing dot do not count); keep one (got '{second}')",)


def test_two_policies_of_one_name_are_refused(folder: Path) -> None:
    data = base_config()
    data["policies"] += [
        {"name": "Partner", "direction": "inbound",
         "recipient_domain": "example.com", "tls": "enforce-tls"},
        {"name": "rule4", "direction": "inbound",
         "recipient_domain": "example.com", "tls": "none"},
        {"direction": "inbound", "recipient_domain": "example.com",
         "tls": "none"},
    ]
    path = write(folder, data)
    assert problems_of(path) == (
        f"{path}: policies[1].name: is the name of policies[0] too "
        "('partner'; case does not count); give each rule its own name "
        "(got 'Partner')",
        f"{path}: policies[3].name: (given when none is) is the name of "
        "policies[2] too ('rule4'; case does not count); give each rule its "
        "own name (got 'rule4')",
    )


# --- recipient lists ---------------------------------------------------------------


def _strict(recipients: Any) -> dict[str, Any]:
    data = base_config()
    data["domains"]["Strict.Test"] = {"relay_to": ["mx.strict.test"],
                                      "recipients": recipients}
    return data


BAD_RECIPIENTS = [
    ("alice@strict.test # the boss", "expected a plain address such as "
     "alice@strict.test"),
    ("<carol@strict.test>", "expected a plain address"),
    (42, "expected a plain address"),
    ("dave@other.test", "is not an address of strict.test: only those can "
     "match this list"),
    ("eve@sub.strict.test", "is not an address of strict.test"),
    ("frank strict.test", "expected a plain address"),
    ("gina @strict.test", "expected a plain address"),
    ('"h i"@strict.test', "expected a plain address"),
    ("j..k@strict.test", "expected a plain address"),
    ("l\x07@strict.test", "expected a plain address"),
    ("mé@strict.test", "expected a plain address"),
    ("x" * 65 + "@strict.test", "too long"),
    (["nested@strict.test"], "expected a plain address"),
]


@pytest.mark.parametrize("entry, words", BAD_RECIPIENTS,
                         ids=[repr(row[0])[:30] for row in BAD_RECIPIENTS])
def test_a_bad_recipient_in_a_list_is_refused(
    folder: Path, entry: Any, words: str
) -> None:
    path = write(folder, _strict(["ok@strict.test", entry]))
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert_reported(problems, path, "domains.Strict.Test.recipients[1]: "
                    + words, f"(got {entry!r})")


@pytest.mark.parametrize("entry, words", [row for row in BAD_RECIPIENTS
                                          if isinstance(row[0], str)],
                         ids=[repr(row[0])[:30] for row in BAD_RECIPIENTS
                              if isinstance(row[0], str)])
def test_a_bad_recipient_in_a_file_is_refused_with_its_line(
    folder: Path, entry: str, words: str
) -> None:
    listed = folder / "strict.txt"
    listed.write_text(f"# who may get mail\nok@strict.test\n\n{entry}\n")
    path = write(folder, _strict("strict.txt"))
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert_reported(problems, path, f"domains.Strict.Test.recipients: {listed} "
                    f"line 4: {words}", f"(got {entry.strip()!r})")


def test_a_list_of_many_bad_recipients_is_told_in_a_few_lines(
    folder: Path,
) -> None:
    listed = folder / "strict.txt"
    listed.write_text("".join(f"<user{n}@strict.test>\n" for n in range(5000)))
    problems = problems_of(write(folder, _strict("strict.txt")))
    assert len(problems) == 11
    assert problems[-1].endswith("domains.Strict.Test.recipients: 4990 more "
                                 "entries are not addresses of this domain "
                                 "either")


def test_recipients_are_kept_as_the_listener_compares_them(folder: Path) -> None:
    """Local part in lower case, the domain as under `domains`: exactly
    what mta.relaycontrol looks up at RCPT."""
    from mta.relaycontrol import recipient_verdict

    listed = folder / "strict.txt"
    listed.write_text("  # indented comment\nBob@STRICT.test.\n")
    data = _strict(["Alice@Strict.Test", "o'neil+tag@strict.test"])
    data["domains"]["other.test"] = {"relay_to": ["mx.other.test"],
                                     "recipients": "strict.txt"}
    listed.write_text("  # indented comment\nBob@OTHER.test.\n")
    config = load_config(write(folder, data))

    assert config.domains["strict.test"].recipients == {
        "alice@strict.test", "o'neil+tag@strict.test"}
    assert config.domains["other.test"].recipients == {"bob@other.test"}
    mx = config.listeners[0]
    for taken in ("ALICE@strict.test", '"alice"@Strict.Test',
                  "O'Neil+tag@strict.test", "bob@other.test",
                  "Postmaster@strict.test"):
        assert recipient_verdict(config, mx, "192.0.2.1", taken) is None, taken
    refused = recipient_verdict(config, mx, "192.0.2.1", "carol@strict.test")
    assert refused is not None and refused.code == 550
