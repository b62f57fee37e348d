"""The configuration: YAML in, frozen typed values out.

The file is read and checked once; the rest of the relay only ever sees a
`Config`.  Every problem is collected (not just the first) and reported as
``FILE: KEY: what is wrong (got VALUE)``, so an operator can fix a file in
one pass.  A reload builds a new `Config` and swaps it in whole, or keeps
the old one.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import yaml

from mta import cpuaffinity
from mta.configfiles import check_regular, read_regular_text
from mta.configreader import Reader, load_yaml, shown, yaml_problem
from mta.users import Users, UsersFileError, load_users
from mta.configvalues import (
    HostPort as HostPort,  # re-exported: a Domain and a Config hold them
    parse_bool,
    parse_choice,
    parse_domain,
    parse_duration,
    parse_hostname,
    parse_hostport,
    parse_ip,
    parse_name_list,
    parse_network,
    parse_pause,
    parse_port,
    parse_positive_int,
    parse_size,
    parse_timeout,
    scalar_text,
)
from mta.ownendpoints import Endpoint, endpoint_for, is_loopback

LEVELS = ("none", "opportunistic", "enforce-tls", "enforce-secure")
ROLES = ("inbound", "outbound")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
FALLBACKS = ("plaintext", "defer")
# A listener's TLS: STARTTLS offered on a plaintext connection, or TLS from
# the first byte (RFC 8314 "implicit TLS", port 465).
LISTENER_TLS = ("starttls", "implicit")
CPU_AFFINITY = cpuaffinity.CHOICES
NONE = cpuaffinity.NONE

# SPEC.md section 1: the lists Proofpoint Essentials published, with the
# ECDSA twin before each ECDHE-RSA suite so ECDSA certificates work at 1.2.
DEFAULT_CIPHERSUITES = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_256_GCM_SHA384",
)
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA384",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA256",
    "AES256-SHA256",
)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class TLSConfig:
    certificate: Path
    private_key: Path
    min_version: str
    ciphers: tuple[str, ...]
    ciphersuites: tuple[str, ...]
    trust: Path | None  # None: the system store


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: str
    port: int
    role: str
    require_tls: bool
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    tls: str = "starttls"  # or "implicit" (LISTENER_TLS)
    auth: Path | None = None  # the users file of SMTP AUTH
    users: Users | None = None  # what it held when the file was read

    def allows_client(self, address: str) -> bool:
        try:
            ip = _ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


# Asked for each connection and each recipient: each client's address is
# parsed once while it comes back.
_ip_address = lru_cache(maxsize=4096)(ipaddress.ip_address)


@dataclass(frozen=True, slots=True)
class Limits:
    message_size: int
    recipients: int
    # RFC 5321 4.5.3.2.7: how long the listener waits for the next complete
    # command line (a partial line does not count as activity).
    idle_timeout: float
    hops: int = 50  # Received headers a message may carry (Postfix's 50)
    # How long a stop waits for messages being received and deliveries
    # under way before it closes them (mta.stopping).
    stop_timeout: float = 30.0
    # Hostile clients (mta.clientlimits): error replies in one session
    # (Postfix's smtpd_hard_error_limit), client connections in total and
    # from one address (Postfix's smtpd_client_connection_count_limit), and
    # the time from 354 to the end of the message.
    errors: int = 20
    connections: int = 300
    client_connections: int = 50
    data_timeout: float = 600.0
    # Failed logins (mta.authfailures): the first delay before a 535,
    # doubled per failure of the same address up to the longest, and the
    # failures one session may have before 421.
    auth_failure_delay: float = 1.0
    auth_failure_max_delay: float = 30.0
    auth_failure_limit: int = 3


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    relay_to: tuple[HostPort, ...]
    recipients: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    command: float
    data: float


@dataclass(frozen=True, slots=True)
class ConnectionReuse:
    """`delivery.connection_reuse` (mta.connectioncache): Postfix's
    smtp_connection_reuse_count_limit, smtp_connection_cache_time_limit and
    smtp_connection_reuse_time_limit."""

    messages: int = 100  # transactions per connection; 1: no reuse
    idle: float = 2.0
    lifetime: float = 300.0
    # How long a TLS session is offered again to a new connection to the
    # same host (smtp_tls_session_cache_timeout); 0: never.
    tls_sessions: float = 3600.0


@dataclass(frozen=True, slots=True)
class Delivery:
    retry_schedule: tuple[float, ...]
    max_lifetime: float
    opportunistic_fallback: str
    plaintext_fallback_delay: float
    timeouts: Timeouts
    port: int
    concurrency: int
    # Manners toward one next hop (mta.destinations): sessions at once,
    # failures in a row before it is suspended, the first suspension and
    # the longest.
    destination_concurrency: int = 20
    destination_failure_limit: int = 3
    destination_backoff: float = 60.0  # parsed: retry_schedule[0]
    destination_max_backoff: float = 3600.0
    connection_reuse: ConnectionReuse = ConnectionReuse()


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    direction: str
    level: str
    recipient_domain: str | None = None
    recipient: str | None = None
    match: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    """Where the Prometheus text endpoint listens (mta.metrics)."""

    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Notices:
    """Bounces and delay notices (mta.notices).  A failure is always
    reported to the sender; these are the choices around it."""

    delay_warning: float = 0.0  # 0: no delay notice
    postmaster: str | None = None  # told when mail from <> fails


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    hostname: str
    spool: Path
    tls: TLSConfig
    listeners: tuple[Listener, ...]
    limits: Limits
    domains: Mapping[str, Domain]
    routes: Mapping[str, HostPort]
    nameservers: tuple[tuple[str, int], ...] | None
    delivery: Delivery
    defaults: Mapping[str, str]
    policies: tuple[Policy, ...] = field(default=())
    log_transcript: bool = False  # SMTP transcripts of deliveries, at debug
    notices: Notices = Notices()
    metrics: MetricsEndpoint | None = None  # None: no Prometheus endpoint
    # Where clients reach the relay through NAT or a proxy (Postfix's
    # proxy_interfaces): mail to these is mail to ourselves.
    proxy_addresses: tuple[Endpoint, ...] = ()
    # Processes that share the listening sockets and the spool (mta.workers).
    workers: int = 1
    # "spread": each worker on a CPU of its own (mta.cpuaffinity).
    cpu_affinity: str = "none"

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.domains

    @property
    def own_endpoints(self) -> tuple[Endpoint, ...]:
        """Every address and port that reaches this relay (mta.ownendpoints)."""
        return _own_endpoints(self.listeners, self.proxy_addresses)


def default_config_path() -> Path:
    """``etc/mta.yaml`` in the current folder, else the one beside the
    package (a checkout installed in place)."""
    here = Path("etc/mta.yaml")
    if here.exists():
        return here
    beside = Path(__file__).resolve().parent.parent / "etc" / "mta.yaml"
    return beside if beside.exists() else here


def load_config(
    path: str | os.PathLike[str], check_tls: bool = True, read_users: bool = True
) -> Config:
    """Read, parse and check the file; raise `ConfigError` listing every
    problem.  ``check_tls`` also loads the certificate and key and checks the
    cipher lists against the OpenSSL that pyOpenSSL uses; ``read_users``
    reads the users file of each listener with ``auth`` (`mta users` does
    without, to make the file)."""
    raw, reader = _read(Path(path))
    config = _parse(reader, raw, check_tls, read_users)
    if reader.problems or config is None:
        raise ConfigError(reader.problems)
    return config


def spool_setting(path: str | os.PathLike[str]) -> tuple[Path, tuple[str, ...]]:
    """The spool folder, for `mta queue`, and the file's other problems.

    The queue commands need only ``spool``: after a typo elsewhere (which
    the running relay refuses to reload) they must still show and steer
    the queue, as Postfix's mailq works after a typo in main.cf.  Raises
    `ConfigError` only when ``spool`` itself cannot be read."""
    try:
        return load_config(path, check_tls=False, read_users=False).spool, ()
    except ConfigError as error:
        others = error.problems
    raw, reader = _read(Path(path))
    spool = None
    if isinstance(raw, dict):
        reader.problems.clear()  # the whole file's, in `others` already
        spool = reader.path_value(raw, "", "spool")
        spool = None if spool is None else _check_spool(reader, spool)
    if spool is None or any(
        problem.startswith(f"{reader.path}: spool:") for problem in others
    ):
        raise ConfigError(others)
    return spool, others


def _read(path: Path) -> tuple[Any, Reader]:
    """The YAML document and a `Reader` holding the problems found so far
    (keys given twice); `ConfigError` when there is no document to read."""
    try:
        # Never blocks: a FIFO or a device is refused, not waited on.
        text = read_regular_text(path)
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: is not UTF-8 text"]) from None
    try:
        raw, duplicates = load_yaml(text, path)
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: {yaml_problem(error)}"]) from None

    reader = Reader(path.resolve())
    for key, what in duplicates:
        reader.problem(key, what)
    return raw, reader


def _check_spool(reader: Reader, spool: Path) -> Path | None:
    if spool.exists() and not spool.is_dir():
        reader.problem("spool", "is not a folder", str(spool))
        return None
    return spool


_TOP_KEYS = (
    "hostname", "spool", "tls", "listeners", "limits", "domains", "routes",
    "dns", "delivery", "defaults", "policies", "log_transcript", "notices",
    "metrics", "proxy_addresses", "workers", "cpu_affinity",
)

# More processes than this only contend for the same spool folder.
MAX_WORKERS = 64


def _parse(
    reader: Reader, raw: Any, check_tls: bool, read_users: bool = True
) -> Config | None:
    if raw is None:
        reader.problem("(top level)", "the file is empty; expected a mapping")
        return None
    top = reader.mapping(raw, "", _TOP_KEYS)
    if not isinstance(raw, dict):
        return None

    hostname = reader.value(
        top, "", "hostname", parse_hostname, default=_default_hostname()
    )
    spool = reader.path_value(top, "", "spool")
    if spool is not None:
        _check_spool(reader, spool)
    tls = _parse_tls(reader, top.get("tls"))
    if tls is not None and check_tls:
        # Checked whatever else is wrong, so that one run of check-config
        # shows every problem of the file.
        from mta.tlsctx import check_tls_config

        reader.problems.extend(
            f"{reader.path}: {problem}" for problem in check_tls_config(tls)
        )
    listeners = _parse_listeners(reader, top.get("listeners"), read_users)
    limits = _parse_limits(reader, top.get("limits"))
    domains = _parse_domains(reader, top.get("domains"))
    routes = _parse_routes(reader, top.get("routes"))
    nameservers = _parse_dns(reader, top.get("dns"))
    delivery = _parse_delivery(reader, top.get("delivery"))
    defaults = _parse_defaults(reader, top.get("defaults"))
    policies = _parse_policies(reader, top.get("policies"))
    notices = _parse_notices(reader, top.get("notices"))
    metrics = _parse_metrics(reader, top.get("metrics"), listeners)
    proxies = _parse_proxy_addresses(reader, top, listeners)
    workers = _parse_workers(reader, top, metrics)
    cpu_affinity = reader.value(top, "", "cpu_affinity",
                                parse_choice(*CPU_AFFINITY), default=NONE) or NONE
    _check_no_loop(reader, domains, routes, _own_endpoints(listeners, proxies))

    if reader.problems:
        return None
    assert hostname is not None and spool is not None and tls is not None
    return Config(
        path=reader.path,
        hostname=hostname,
        spool=spool,
        tls=tls,
        listeners=listeners,
        limits=limits,
        domains=MappingProxyType(domains),
        routes=MappingProxyType(routes),
        nameservers=nameservers,
        delivery=delivery,
        defaults=MappingProxyType(defaults),
        policies=policies,
        log_transcript=bool(
            reader.value(top, "", "log_transcript", parse_bool, default=False)
        ),
        notices=notices,
        metrics=metrics,
        proxy_addresses=proxies,
        workers=workers,
        cpu_affinity=cpu_affinity,
    )


def _parse_workers(
    reader: Reader, top: dict[str, Any], metrics: MetricsEndpoint | None
) -> int:
    workers = reader.value(top, "", "workers", parse_positive_int, default=1)
    if workers is None:
        return 1
    if workers > MAX_WORKERS:
        reader.problem("workers", f"is more than {MAX_WORKERS}; one per core "
                       "is enough", workers)
    # Each process counts only its own mail, and the endpoint would show
    # one process's share as if it were the whole: refused rather than
    # wrong (README "Limitations").
    if workers > 1 and metrics is not None:
        reader.problem("workers", "above 1 cannot be combined with metrics "
                       "yet: the counters would show one process's share; "
                       "remove the metrics section or set workers: 1", workers)
    return workers


def _default_hostname() -> str:
    """The machine's name, as Postfix's myhostname defaults to it."""
    for name in (socket.getfqdn(), socket.gethostname()):
        if name and name != "localhost" and "." in name:
            return name.lower()
    return (socket.gethostname() or "localhost").lower()


def _parse_tls(reader: Reader, raw: Any) -> TLSConfig | None:
    keys = ("certificate", "private_key", "min_version", "ciphers",
            "ciphersuites", "trust")
    if raw is None:
        reader.problem("tls", "is required (certificate and private_key)")
        return None
    tls = reader.mapping(raw, "tls", keys)
    certificate = reader.path_value(tls, "tls", "certificate")
    private_key = reader.path_value(tls, "tls", "private_key")
    min_version = reader.value(
        tls, "tls", "min_version", _parse_min_version, default="TLSv1.2"
    )
    ciphers = reader.value(
        tls, "tls", "ciphers", parse_name_list, default=DEFAULT_CIPHERS
    )
    ciphersuites = reader.value(
        tls, "tls", "ciphersuites", parse_name_list, default=DEFAULT_CIPHERSUITES
    )
    trust = None
    if tls.get("trust", "system") != "system":
        trust = reader.path_value(tls, "tls", "trust")
        if trust is not None:
            try:
                check_regular(trust)
            except FileNotFoundError:
                reader.problem("tls.trust", "no such file", str(trust))
                trust = None  # reported once; the file is refused anyway
            except OSError as error:
                reader.problem("tls.trust", f"cannot read: {error.strerror}",
                               str(trust))
                trust = None
    if certificate is None or private_key is None:
        return None
    return TLSConfig(
        certificate=certificate,
        private_key=private_key,
        min_version=min_version or "TLSv1.2",
        ciphers=ciphers or DEFAULT_CIPHERS,
        ciphersuites=ciphersuites or DEFAULT_CIPHERSUITES,
        trust=trust,
    )


def _parse_min_version(value: Any) -> str:
    if value in TLS_VERSIONS:
        return str(value)
    if value in ("SSLv3", "TLSv1", "TLSv1.0", "TLSv1.1"):
        raise ValueError("TLS 1.2 is the floor; use TLSv1.2 or TLSv1.3")
    raise ValueError("expected TLSv1.2 or TLSv1.3")


def _parse_listeners(
    reader: Reader, raw: Any, read_users: bool = True
) -> tuple[Listener, ...]:
    keys = ("name", "address", "port", "role", "require_tls", "networks", "tls",
            "auth")
    if not isinstance(raw, list) or not raw:
        reader.problem("listeners", "expected a non-empty list of listeners", raw)
        return ()
    listeners = []
    seen: set[str] = set()
    # Two listeners may share a users file: read once, its problems once.
    users_files: dict[Path, Users | None] = {}
    for index, item in enumerate(raw):
        key = f"listeners[{index}]"
        entry = reader.mapping(item, key, keys)
        if item is not None and not isinstance(item, dict):
            continue
        name = reader.value(entry, key, "name", parse_name,
                            default=f"listener{index}")
        if name in seen:
            reader.problem(f"{key}.name", "is used by another listener", name)
        seen.add(name or "")
        address = reader.value(entry, key, "address", parse_ip, required=True)
        port = reader.value(entry, key, "port", parse_port, required=True)
        role = reader.value(
            entry, key, "role", parse_choice(*ROLES), required=True
        )
        require_tls = reader.value(
            entry, key, "require_tls", parse_bool, default=False
        )
        networks = reader.list_of(entry, key, "networks", parse_network)
        tls = reader.value(entry, key, "tls", parse_choice(*LISTENER_TLS),
                           default="starttls") or "starttls"
        if tls == "implicit":
            # RFC 8314 3.3: nothing is said before TLS on such a port.
            if entry.get("require_tls") is False:
                reader.problem(f"{key}.require_tls", "cannot be false with "
                               "tls: implicit (every session is TLS)", False)
            require_tls = True
        auth, users = _parse_auth(reader, entry, key, role,
                                  users_files if read_users else None)
        if address is None or port is None or role is None:
            continue
        for other in listeners:
            if other.port == port and other.address == address:
                reader.problem(f"{key}.port", f"{address}:{port} is already "
                               f"used by listener {other.name}", port)
        listeners.append(
            Listener(
                name=name or f"listener{index}",
                address=address,
                port=port,
                role=role,
                require_tls=bool(require_tls),
                networks=networks,
                tls=tls,
                auth=auth,
                users=users,
            )
        )
    return tuple(listeners)


def _parse_auth(
    reader: Reader, entry: dict[str, Any], key: str, role: str | None,
    users_files: dict[Path, Users | None] | None,
) -> tuple[Path | None, Users | None]:
    """A listener's ``auth``: the users file, and what it holds (None
    when ``users_files``, those read so far, is None: not read at all)."""
    path = reader.path_value(entry, key, "auth", required=False)
    if path is None:
        return None, None
    if role == "inbound":
        reader.problem(f"{key}.auth", "is for outbound listeners (submission); "
                       "an inbound listener takes mail for `domains` from "
                       "anyone", str(path))
        return None, None
    if users_files is None:
        return path, None
    if path in users_files:
        return path, users_files[path]
    users_files[path] = None
    try:
        check_regular(path)  # never opened when it is a FIFO or a device
    except FileNotFoundError:
        reader.problem(f"{key}.auth", "no such file; create it with `mta "
                       "users add NAME`", str(path))
        return path, None
    except OSError as error:
        reader.problem(f"{key}.auth", f"cannot read: {error.strerror}",
                       str(path))
        return path, None
    try:
        users_files[path] = load_users(path)
    except UsersFileError as error:
        reader.problems.extend(error.problems)
    return path, users_files[path]


def _parse_metrics(
    reader: Reader, raw: Any, listeners: tuple[Listener, ...]
) -> MetricsEndpoint | None:
    """Off unless the section is there.  The endpoint has no authentication,
    so an address other than loopback must be acknowledged in so many words
    (``allow_non_loopback: true``): a typo must not publish it."""
    if raw is None:
        return None
    key = "metrics"
    metrics = reader.mapping(raw, key, ("address", "port", "allow_non_loopback"))
    if not isinstance(raw, dict):
        return None
    address = reader.value(metrics, key, "address", parse_ip, default="127.0.0.1")
    port = reader.value(metrics, key, "port", parse_port, required=True)
    allowed = reader.value(
        metrics, key, "allow_non_loopback", parse_bool, default=False
    )
    if address is None or port is None:
        return None

    if not ipaddress.ip_address(address).is_loopback and not allowed:
        reader.problem(f"{key}.address", "is not a loopback address and the "
                       "endpoint has no authentication: use 127.0.0.1, or set "
                       "metrics.allow_non_loopback: true and firewall the port",
                       address)
    for listener in listeners:
        if listener.port == port and _addresses_overlap(listener.address, address):
            reader.problem(f"{key}.port", f"{address}:{port} is already used "
                           f"by listener {listener.name}", port)
    return MetricsEndpoint(address=address, port=port)


def _own_endpoints(
    listeners: Iterable[Listener], proxies: tuple[Endpoint, ...]
) -> tuple[Endpoint, ...]:
    bound = tuple(Endpoint(listener.address, listener.port,
                           f"listener {listener.name}")
                  for listener in listeners)
    return bound + proxies


def _parse_proxy_addresses(
    reader: Reader, top: dict[str, Any], listeners: tuple[Listener, ...]
) -> tuple[Endpoint, ...]:
    """``ADDRESS`` (on every listener's port) or ``ADDRESS:PORT``."""
    ports = sorted({listener.port for listener in listeners})

    def parse(value: Any) -> tuple[str, int | None]:
        text = scalar_text(value, "expected an IP address, ADDRESS:PORT or "
                           "[IPv6]:PORT").strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            address, port = parse_ip(text), None
        except ValueError:
            hostport = parse_hostport(value)
            if not hostport.is_literal:
                raise ValueError("expected an IP address, ADDRESS:PORT or "
                                 "[IPv6]:PORT") from None
            address, port = hostport.host, hostport.port
        if ipaddress.ip_address(address).is_unspecified:
            raise ValueError("expected the address clients reach the relay "
                             "at, not a wildcard")
        return address, port

    entries = reader.list_of(top, "", "proxy_addresses", parse)
    return tuple(Endpoint(address, port, "proxy_addresses")
                 for address, given in entries
                 for port in ([given] if given is not None else ports))


def _check_no_loop(
    reader: Reader,
    domains: Mapping[str, Domain],
    routes: Mapping[str, HostPort],
    endpoints: tuple[Endpoint, ...],
) -> None:
    """A ``relay_to`` or ``routes`` server that is the relay itself would
    send every message round in circles.  Only addresses are checked here
    (loopback counts as this machine for a listener on 0.0.0.0 or ::);
    a name, or another address of this machine, is caught at delivery
    (mta.ownendpoints, 5.4.6)."""
    servers = [(f"domains.{name}.relay_to", host)
               for name, domain in domains.items() for host in domain.relay_to]
    servers += [(f"routes.{name}", host) for name, host in routes.items()]
    for key, host in servers:
        if not host.is_literal:
            continue
        own = endpoint_for(host.host, host.port, endpoints, is_loopback)
        if own is not None:
            reader.problem(key, f"is this relay's own {own}: its mail would "
                           "come straight back; name the server that should "
                           "take it", str(host))


def _addresses_overlap(one: str, other: str) -> bool:
    # 0.0.0.0 and :: take the port on every address.
    return one == other or any(
        ipaddress.ip_address(address).is_unspecified for address in (one, other)
    )


def _parse_limits(reader: Reader, raw: Any) -> Limits:
    limits = reader.mapping(raw, "limits", ("message_size", "recipients",
                                            "idle_timeout", "hops",
                                            "stop_timeout", "errors",
                                            "connections", "client_connections",
                                            "data_timeout", *AUTH_LIMITS))
    return Limits(
        message_size=reader.value(
            limits, "limits", "message_size", parse_size, default=50 * 1024**2
        ) or 50 * 1024**2,
        recipients=reader.value(
            limits, "limits", "recipients", parse_positive_int, default=1000
        ) or 1000,
        idle_timeout=reader.value(
            limits, "limits", "idle_timeout", parse_timeout, default=300.0
        ) or 300.0,
        hops=reader.value(
            limits, "limits", "hops", parse_positive_int, default=50
        ) or 50,
        stop_timeout=_duration(reader, limits, "limits", "stop_timeout", 30),
        errors=_count(reader, limits, "limits", "errors", 20),
        connections=_count(reader, limits, "limits", "connections", 300),
        client_connections=_count(
            reader, limits, "limits", "client_connections", 50
        ),
        data_timeout=_duration(
            reader, limits, "limits", "data_timeout", 600, parse_timeout
        ),
        **_parse_auth_limits(reader, limits),
    )


AUTH_LIMITS = ("auth_failure_delay", "auth_failure_max_delay",
               "auth_failure_limit")


def _parse_auth_limits(reader: Reader, limits: dict[str, Any]) -> dict[str, Any]:
    key = "limits"
    delay = _duration(reader, limits, key, "auth_failure_delay", 1)
    longest = _duration(reader, limits, key, "auth_failure_max_delay",
                        max(delay, 30))
    if longest < delay:
        reader.problem(f"{key}.auth_failure_max_delay", "must not be shorter "
                       f"than limits.auth_failure_delay ({delay:g}s)",
                       limits.get("auth_failure_max_delay"))
    return {
        "auth_failure_delay": delay,
        "auth_failure_max_delay": max(longest, delay),
        "auth_failure_limit": reader.value(
            limits, key, "auth_failure_limit", parse_positive_int, default=3
        ) or 3,
    }


def _parse_domains(reader: Reader, raw: Any) -> dict[str, Domain]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        reader.problem("domains", "expected a mapping of domain names", raw)
        return {}
    domains = {}
    spelled: dict[str, Any] = {}  # each domain as it was first written
    for name, item in raw.items():
        key = f"domains.{name}"
        try:
            domain = parse_domain(name)
        except ValueError as error:
            reader.problem(key, str(error), name)
            continue
        if domain in spelled:
            _same_name(reader, key, "domain", f"domains.{spelled[domain]}",
                       name)
            continue
        spelled[domain] = name
        entry = reader.mapping(item, key, ("relay_to", "recipients"))
        relay_to = reader.list_of(entry, key, "relay_to", parse_hostport)
        if not relay_to:
            reader.problem(f"{key}.relay_to", "is required: where this "
                           "domain's mail goes")
        recipients = _parse_recipients(reader, entry, key, domain)
        domains[domain] = Domain(domain, relay_to, recipients)
    return domains


def _same_name(
    reader: Reader, key: str, what: str, first: str, value: Any
) -> None:
    """``key`` names again the {what} that ``first`` named: case and a
    trailing dot do not make another one, so one of them would silently
    win."""
    reader.problem(key, f"is the same {what} as {first} (case and a trailing "
                   "dot do not count); keep one", value)


# At most this many bad entries of one recipient list are told one by one.
MAX_RECIPIENT_PROBLEMS = 10


def _parse_recipients(
    reader: Reader, entry: dict[str, Any], key: str, domain: str
) -> frozenset[str] | None:
    """The addresses of ``domain`` that may receive mail, in the form
    `mta.relaycontrol` compares at RCPT (its local part lower-case, the
    domain as in ``domains``), from a list or a file of one per line."""
    raw = entry.get("recipients")
    if raw is None:
        return None
    where = f"{key}.recipients"
    if isinstance(raw, str):
        listed = reader.path_value(entry, key, "recipients")
        if listed is None:
            return None
        try:
            # Never blocks: a FIFO or a device is refused, not waited on.
            lines = read_regular_text(listed).splitlines()
        except OSError as error:
            reader.problem(where, f"cannot read: {error.strerror}", str(listed))
            return None
        except UnicodeDecodeError:
            reader.problem(where, "is not a UTF-8 text file of addresses, "
                           "one per line", str(listed))
            return None
        items = [(f"{listed} line {number}: ", line.strip())
                 for number, line in enumerate(lines, start=1)
                 if line.strip() and not line.strip().startswith("#")]
        keys = [where] * len(items)
    elif isinstance(raw, list):
        items = [("", item) for item in raw]
        keys = [f"{where}[{index}]" for index in range(len(raw))]
    else:
        reader.problem(where, "expected a list or a file", raw)
        return None
    addresses = set()
    bad = 0
    for problem_key, (place, item) in zip(keys, items):
        try:
            addresses.add(_parse_recipient(item, domain))
        except ValueError as error:
            bad += 1
            if bad <= MAX_RECIPIENT_PROBLEMS:
                reader.problem(problem_key, place + str(error), item)
    if bad > MAX_RECIPIENT_PROBLEMS:
        reader.problem(where, f"{bad - MAX_RECIPIENT_PROBLEMS} more entries "
                       "are not addresses of this domain either")
    return frozenset(addresses)


# RFC 5321 4.1.2 Dot-string: what a client may write unquoted, and what a
# quoted local part comes down to when it needs no quotes.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL_PART = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# RFC 5321 4.5.3.1: longer ones are refused at RCPT (mta.relaycontrol).
MAX_LOCAL_PART = 64
MAX_ADDRESS = 253  # local@domain: a path of 256 with "<", "@" and ">"


def _parse_recipient(value: Any, domain: str) -> str:
    """One address of a recipient list, as `mta.relaycontrol` compares it
    at RCPT: ``local@domain`` with a plain local part (no quotes, spaces,
    brackets, comments or control characters) and this domain."""
    example = f"expected a plain address such as alice@{domain}"
    if not isinstance(value, str):
        raise ValueError(example)
    local, at, written = value.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local):
        raise ValueError(example)
    if len(local) > MAX_LOCAL_PART or len(local) + len(domain) > MAX_ADDRESS:
        raise ValueError(f"too long: a local part of more than "
                         f"{MAX_LOCAL_PART} characters, or an address of more "
                         f"than {MAX_ADDRESS}, is refused at RCPT")
    try:
        if written != written.strip():
            raise ValueError(example)
        other = parse_domain(written)
    except ValueError:
        raise ValueError(example) from None
    if other != domain:
        raise ValueError(f"is not an address of {domain}: only those can "
                         "match this list")
    return f"{local.lower()}@{domain}"


def _parse_routes(reader: Reader, raw: Any) -> dict[str, HostPort]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        reader.problem("routes", "expected a mapping of domain: next hop", raw)
        return {}
    routes = {}
    spelled: dict[str, Any] = {}  # each domain as it was first written
    for name, item in raw.items():
        key = f"routes.{name}"
        if name != "*":
            try:
                leading_dot = str(name).startswith(".")
                domain = ("." if leading_dot else "") + parse_domain(
                    str(name).lstrip(".")
                )
            except ValueError as error:
                reader.problem(key, str(error), name)
                continue
        else:
            domain = "*"
        if domain in spelled:
            _same_name(reader, key, "domain", f"routes.{spelled[domain]}", name)
            continue
        spelled[domain] = name
        try:
            routes[domain] = parse_hostport(item)
        except ValueError as error:
            reader.problem(key, str(error), item)
    return routes


def _parse_dns(reader: Reader, raw: Any) -> tuple[tuple[str, int], ...] | None:
    dns = reader.mapping(raw, "dns", ("nameservers",))
    if "nameservers" not in dns:
        return None

    def parse(value: Any) -> tuple[str, int]:
        hostport = parse_hostport(value, default_port=53)
        if not hostport.is_literal:
            raise ValueError("a name server must be an IP address")
        return hostport.host, hostport.port

    servers = reader.list_of(dns, "dns", "nameservers", parse)
    return servers or None


def _parse_delivery(reader: Reader, raw: Any) -> Delivery:
    key = "delivery"
    keys = ("retry_schedule", "max_lifetime", "opportunistic_fallback",
            "plaintext_fallback_delay", "timeouts", "port", "concurrency",
            "connection_reuse", *DESTINATION_KEYS)
    delivery = reader.mapping(raw, key, keys)
    # A step of 0s would retry a deferred message in a tight loop.
    schedule = reader.list_of(
        delivery, key, "retry_schedule", parse_pause("a retry step"),
        default=(60.0, 300.0, 900.0, 3600.0, 14400.0),
    )
    if delivery.get("retry_schedule") == []:
        reader.problem(f"{key}.retry_schedule", "expected at least one "
                       "duration (the last step repeats)", [])
    timeouts = reader.mapping(
        delivery.get("timeouts"), "delivery.timeouts", ("connect", "command",
                                                        "data")
    )
    tkey = "delivery.timeouts"
    return Delivery(
        retry_schedule=schedule or (60.0,),
        max_lifetime=_duration(reader, delivery, key, "max_lifetime", 5 * 86400),
        opportunistic_fallback=reader.value(
            delivery, key, "opportunistic_fallback", parse_choice(*FALLBACKS),
            default="plaintext",
        ) or "plaintext",
        plaintext_fallback_delay=_duration(
            reader, delivery, key, "plaintext_fallback_delay", 600
        ),
        timeouts=Timeouts(
            connect=_duration(reader, timeouts, tkey, "connect", 30,
                              parse_timeout),
            command=_duration(reader, timeouts, tkey, "command", 300,
                              parse_timeout),
            data=_duration(reader, timeouts, tkey, "data", 600, parse_timeout),
        ),
        port=reader.value(delivery, key, "port", parse_port, default=25) or 25,
        concurrency=reader.value(
            delivery, key, "concurrency", parse_positive_int, default=20
        ) or 20,
        connection_reuse=_parse_connection_reuse(reader, delivery),
        **_parse_destination_manners(reader, delivery, schedule or (60.0,)),
    )


def _parse_connection_reuse(reader: Reader, delivery: dict[str, Any]) -> ConnectionReuse:
    key = "delivery.connection_reuse"
    raw = reader.mapping(delivery.get("connection_reuse"), key,
                         ("messages", "idle", "lifetime", "tls_sessions"))
    default = ConnectionReuse()
    return ConnectionReuse(
        messages=reader.value(raw, key, "messages", parse_positive_int,
                              default=default.messages) or default.messages,
        # 0s would mean no reuse, which is written messages: 1.
        idle=_duration(reader, raw, key, "idle", default.idle, _parse_reuse),
        lifetime=_duration(reader, raw, key, "lifetime", default.lifetime,
                           _parse_reuse),
        tls_sessions=_duration(reader, raw, key, "tls_sessions",
                               default.tls_sessions),
    )


def _parse_reuse(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be above zero; to reuse no connection, set "
                         "delivery.connection_reuse.messages: 1")
    return seconds


# As short as a retry step may be: a suspension of 0s suspends nothing.
_parse_backoff = parse_pause("a suspension")


DESTINATION_KEYS = ("destination_concurrency", "destination_failure_limit",
                    "destination_backoff", "destination_max_backoff")


def _parse_destination_manners(
    reader: Reader, delivery: dict[str, Any], schedule: tuple[float, ...]
) -> dict[str, Any]:
    # By default a suspension follows the retry schedule: it starts at its
    # first step and grows to its last, at most an hour (Postfix's
    # minimal_backoff_time and maximal_backoff_time play both parts).
    key = "delivery"
    backoff = _duration(reader, delivery, key, "destination_backoff",
                        max(schedule[0], 1.0), _parse_backoff)
    longest = _duration(reader, delivery, key, "destination_max_backoff",
                        max(backoff, min(schedule[-1], 3600.0)),
                        _parse_backoff)
    if longest < backoff:
        reader.problem(f"{key}.destination_max_backoff", "must not be shorter "
                       f"than delivery.destination_backoff ({backoff:g}s)",
                       delivery.get("destination_max_backoff"))
    return {
        "destination_concurrency": reader.value(
            delivery, key, "destination_concurrency", parse_positive_int,
            default=20) or 20,
        "destination_failure_limit": reader.value(
            delivery, key, "destination_failure_limit", parse_positive_int,
            default=3) or 3,
        "destination_backoff": backoff,
        "destination_max_backoff": max(longest, backoff),
    }


def _count(
    reader: Reader, raw: dict[str, Any], key: str, name: str, default: int
) -> int:
    value = reader.value(raw, key, name, parse_positive_int, default=default)
    return default if value is None else value


def _duration(
    reader: Reader,
    raw: dict[str, Any],
    key: str,
    name: str,
    default: float,
    parse: Callable[[Any], float] = parse_duration,
) -> float:
    value = reader.value(raw, key, name, parse, default=float(default))
    return float(default) if value is None else value


def parse_level(value: Any) -> str:
    if value not in LEVELS:
        raise ValueError("expected one of " + ", ".join(LEVELS))
    return str(value)


def _parse_defaults(reader: Reader, raw: Any) -> dict[str, str]:
    defaults = reader.mapping(raw, "defaults", ROLES)
    return {
        direction: reader.value(
            defaults, "defaults", direction, parse_level, default="opportunistic"
        ) or "opportunistic"
        for direction in ROLES
    }


def _parse_policies(reader: Reader, raw: Any) -> tuple[Policy, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        reader.problem("policies", "expected a list of rules", raw)
        return ()
    keys = ("name", "direction", "recipient_domain", "recipient", "tls", "match")
    policies = []
    named: dict[str, tuple[str, str]] = {}  # the first rule of each name
    for index, item in enumerate(raw):
        key = f"policies[{index}]"
        entry = reader.mapping(item, key, keys)
        if item is not None and not isinstance(item, dict):
            continue
        policy = _parse_policy(reader, entry, key, index)
        if policy is None:
            continue
        # The log and `mta policy explain` name a rule by its name: two
        # rules of one name could not be told apart.
        same = policy.name.strip().casefold()
        if same in named:
            first_key, first_name = named[same]
            given = "is" if entry.get("name") else "(given when none is) is"
            reader.problem(f"{key}.name", f"{given} the name of {first_key} "
                           f"too ({shown(first_name)}; case does not count); "
                           "give each rule its own name", policy.name)
        else:
            named[same] = (key, policy.name)
        policies.append(policy)
    return tuple(policies)


def _parse_policy(
    reader: Reader, entry: dict[str, Any], key: str, index: int
) -> Policy | None:
    name = reader.value(entry, key, "name", parse_name,
                        default=f"rule{index + 1}")
    direction = reader.value(
        entry, key, "direction", parse_choice(*ROLES), required=True
    )
    level = reader.value(entry, key, "tls", parse_level, required=True)
    domain = reader.value(entry, key, "recipient_domain", _parse_rule_domain)
    recipient = reader.value(entry, key, "recipient", _parse_rule_address)
    match = reader.list_of(entry, key, "match", parse_hostname) or None
    if entry.get("match") == []:
        # An empty list would match no certificate: every delivery refused.
        reader.problem(f"{key}.match", "expected at least one host name", [])

    if (domain is None) == (recipient is None):
        reader.problem(key, "needs exactly one of recipient_domain or recipient")
    elif recipient is not None and direction == "outbound":
        reader.problem(f"{key}.recipient", "outbound rules match "
                       "recipient_domain only", recipient)
    if direction is None or level is None:
        return None
    return Policy(
        name=name or f"rule{index + 1}",
        direction=direction,
        level=level,
        recipient_domain=domain,
        recipient=recipient,
        match=match,
    )


def parse_name(value: Any) -> str:
    """A listener's or a rule's name: one value, shown in the log."""
    return scalar_text(value, "expected a name")


def _parse_rule_domain(value: Any) -> str:
    text = scalar_text(value, "expected a domain such as example.com")
    dot = "." if text.startswith(".") else ""
    return dot + parse_domain(text.lstrip("."))


def _parse_rule_address(value: Any) -> str:
    text = scalar_text(value, "expected an address such as ceo@example.com"
                       ).strip()
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise ValueError("expected an address such as ceo@example.com")
    return f"{local.lower()}@{parse_domain(domain)}"


def _parse_notices(reader: Reader, raw: Any) -> Notices:
    notices = reader.mapping(raw, "notices", ("delay_warning", "postmaster"))
    return Notices(
        delay_warning=_duration(reader, notices, "notices", "delay_warning", 0),
        postmaster=reader.value(
            notices, "notices", "postmaster", _parse_postmaster
        ),
    )


def _parse_postmaster(value: Any) -> str:
    """An address to send notices to, kept as written but for the domain's
    case: it goes into an envelope, where the local part's case counts."""
    text = scalar_text(
        value, "expected an address such as postmaster@example.com").strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or any(c in local for c in " <>\"\t"):
        raise ValueError("expected an address such as postmaster@example.com")
    return f"{local}@{parse_domain(domain)}"
