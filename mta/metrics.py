"""Counters and gauges for Prometheus, served as text over HTTP.

Off unless the configuration has a ``metrics`` section (README "Metrics").
Events are counted where their log lines are written (`mta.logs`), so a
counter and the log always agree: one count per ``accepted`` line, one per
recipient delivery line.  Queue sizes are read from the spool when
Prometheus scrapes, in the reactor's thread pool (prometheus_client's
Twisted resource is a WSGI app run there), so a large spool never stalls
SMTP.

Labels never hold an address, a domain or a server's words: their values
come from small fixed sets (directions, levels, statuses, TLS protocols,
`mta.tlsfailure` reasons) or from the configuration (listener names), so
the number of series stays bounded whatever the mail.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from twisted.internet import error as netError
from twisted.web.resource import Resource
from twisted.web.server import Site

from mta import __version__
from mta.config import LEVELS, Config, MetricsEndpoint
from mta.envelope import Attempt, Envelope, TLSFacts
from mta.logs import add_event_counter, log_event, remove_event_counter
from mta.policy import direction_of
from mta.queuestats import STATES, summarize
from mta.spool import Spool
from mta.tlsfailure import failure_reason

# TLS protocols as OpenSSL names them; anything else is "other".
PROTOCOLS = ("TLSv1.3", "TLSv1.2", "TLSv1.1", "TLSv1")
STATUSES = ("sent", "deferred", "bounced")

# prometheus_client adds a `_created` series (a timestamp) beside every
# counter; the README documents the counters alone, and process_start_time
# already says when they started at zero.  Its documented switch is
# process-wide, which suits a relay process.
disable_created_metrics()  # type: ignore[no-untyped-call]


def protocol_label(tls: TLSFacts | None) -> str:
    if tls is None:
        return "none"
    return tls.protocol if tls.protocol in PROTOCOLS else "other"


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"


def listener_direction(config: Config, name: str) -> str:
    """A listener's role is the direction of what it accepts."""
    for listener in config.listeners:
        if listener.name == name:
            return listener.role
    return "unknown"  # renamed by a reload since the message came in


class RelayMetrics:
    """The relay's counters and the spool's gauges, in a registry of their
    own (never prometheus_client's global one, which tests would share)."""

    def __init__(
        self,
        get_config: Callable[[], Config],
        spool: Spool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.get_config = get_config
        self.registry = CollectorRegistry()
        self._accepted = Counter(
            "mta_messages_accepted", "Messages accepted (250 after DATA), by "
            "listener, its direction and the client's TLS protocol",
            ["listener", "direction", "tls"], registry=self.registry)
        self._deliveries = Counter(
            "mta_deliveries", "Recipient delivery attempts, by direction, "
            "policy level, TLS protocol and status",
            ["direction", "policy", "tls", "status"], registry=self.registry)
        self._tls_failures = Counter(
            "mta_tls_failures", "Recipient delivery attempts in which TLS "
            "failed, by direction, policy level and reason",
            ["direction", "policy", "reason"], registry=self.registry)
        self.registry.register(QueueCollector(spool, clock))
        ProcessCollector(registry=self.registry)
        Info("mta", "The relay's version", registry=self.registry).info(
            {"version": __version__})

    # mta.logs.EventCounter

    def accepted(self, envelope: Envelope) -> None:
        listener = envelope.client.listener
        direction = listener_direction(self.get_config(), listener)
        self._accepted.labels(
            listener, direction, protocol_label(envelope.client.tls)).inc()

    def delivery(self, recipient: str, attempt: Attempt) -> None:
        direction = direction_of(self.get_config(), recipient)
        policy = _one_of(attempt.policy, LEVELS)
        self._deliveries.labels(
            direction, policy, protocol_label(attempt.tls),
            _one_of(attempt.status, STATUSES)).inc()

        reason = failure_reason(attempt)
        if reason is not None:
            self._tls_failures.labels(direction, policy, reason).inc()


class QueueCollector:
    """The spool's gauges, computed at each scrape from the envelopes on
    disk (the spool is the truth; nothing is kept in memory).  Runs in a
    thread: scrapes are taken one at a time, so a slow one never piles up
    spool readers."""

    def __init__(self, spool: Spool, clock: Callable[[], float]) -> None:
        self.spool = spool
        self.clock = clock
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            summary = summarize(self.spool.envelopes())
            quarantined = self._quarantined()
        now = self.clock()
        messages, ages, corrupt = self._families()
        for state in STATES:
            messages.add_metric([state], summary.messages[state])
            ages.add_metric([state], summary.oldest_age(state, now))
        corrupt.add_metric([], quarantined)
        yield from (messages, ages, corrupt)

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "mta_queue_messages", "Messages in the spool by state "
                "(pending, deferred, held, failed)", labels=["state"]),
            GaugeMetricFamily(
                "mta_queue_oldest_message_age_seconds", "Age of the oldest "
                "message in each state; 0 when there is none",
                labels=["state"]),
            GaugeMetricFamily(
                "mta_spool_quarantined_messages", "Messages moved aside to "
                "the spool's corrupt/ folder, waiting for an operator",
                labels=[]),
        )

    def _quarantined(self) -> int:
        try:
            names = {path.name.split(".", 1)[0]
                     for path in self.spool.corrupt.iterdir()}
        except FileNotFoundError:
            return 0
        return len(names)


class MetricsServer:
    """The HTTP endpoint: ``GET /metrics`` on the configured address."""

    def __init__(
        self, reactor: Any, get_config: Callable[[], Config], spool: Spool
    ) -> None:
        self.reactor = reactor
        self.metrics = RelayMetrics(get_config, spool)
        self.port: Any = None  # an IListeningPort once started

    def start(self, config: Config) -> None:
        endpoint = config.metrics
        assert endpoint is not None
        # Imported here: it imports the global reactor, which must not be
        # installed by merely importing this module (twistd --reactor).
        from prometheus_client.twisted import MetricsResource

        # twisted.web and prometheus_client's resource carry no types.
        root = Resource()  # type: ignore[no-untyped-call]
        registry = self.metrics.registry
        resource: Any = MetricsResource(registry)  # type: ignore[no-untyped-call]
        root.putChild(b"metrics", resource)
        site = _QuietSite(root)  # type: ignore[no-untyped-call]
        site.noisy = False
        try:
            self.port = self.reactor.listenTCP(
                endpoint.port, site, interface=endpoint.address)
        except netError.CannotListenError as error:
            sys.stderr.write(
                f"mta: not started: {config.path}: metrics: cannot listen on "
                f"{endpoint.address}:{endpoint.port}: {error.socketError}\n")
            raise SystemExit(1) from None
        add_event_counter(self.metrics)
        log_event("info", f"metrics: serving {_url(endpoint)}", "metrics")

    def stop(self) -> None:
        remove_event_counter(self.metrics)
        if self.port is not None:
            self.port.stopListening()
            self.port = None


class _QuietSite(Site):
    """A Site without an access log: twisted.web would write a line per
    scrape ("GET /metrics HTTP/1.1" 200) into the mail log, every 15
    seconds, for nothing an operator reads there."""

    def log(self, request: Any) -> None:
        pass


def _url(endpoint: MetricsEndpoint) -> str:
    address = endpoint.address
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{endpoint.port}/metrics"


def start_metrics(
    reactor: Any, get_config: Callable[[], Config], spool: Spool
) -> MetricsServer | None:
    """Serve the metrics when the configuration asks for them; None when it
    does not (nothing listens, nothing is counted)."""
    config = get_config()
    if config.metrics is None:
        return None
    server = MetricsServer(reactor, get_config, spool)
    server.start(config)
    return server
