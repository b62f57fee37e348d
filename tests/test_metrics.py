"""The Prometheus endpoint: what is counted, with which labels, and how it
is configured.

Unit tests feed envelopes and attempts to the collectors in memory and read
prometheus_client's own text output back through its parser.  End-to-end
tests run the real relay with a real peer, submit a message, and scrape
``/metrics`` over HTTP as Prometheus would.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mta import logs
from mta.clientsession import Target, said
from mta.config import Config, ConfigError, MetricsEndpoint, load_config
from mta.envelope import (
    DEFERRED,
    DELIVERED,
    FAILED,
    PENDING,
    Attempt,
    Client,
    Envelope,
    Recipient,
    TLSFacts,
)
from mta.metrics import RelayMetrics
from mta.queuestats import message_state, summarize
from mta.reply import Reply
from mta.spool import Spool
from mta.tlsfailure import (
    CERTIFICATE_UNTRUSTED,
    HANDSHAKE_FAILED,
    NAME_MISMATCH,
    NO_CERTIFICATE,
    NO_STARTTLS,
    OTHER,
    STARTTLS_REFUSED,
    failure_reason,
)
from mta.tlsverdict import required_by
from tests.peers import smtppeer
from tests.relay import RelayProcess, base_config, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

TLS13 = TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128)
TARGET = Target("mx.dest.test", "127.0.9.1", 25)


# --- reading the text format back ----------------------------------------


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (sample, labels) in samples if sample == name]


# --- TLS failure reasons: a table ----------------------------------------


def attempt(**fields: Any) -> Attempt:
    base: dict[str, Any] = {"time": 0.0, "status": "deferred", "dsn": "4.4.1",
                            "reply": "", "policy": "opportunistic",
                            "connected": True}
    return Attempt(**{**base, **fields})


ENFORCED_BY = required_by("enforce-tls", "partner")
REASONS = [
    # (attempt, reason)
    (attempt(status="sent", tls=TLS13, trust="Verified"), None),
    (attempt(status="sent", dsn="2.0.0", reply="250 ok"), None),
    (attempt(status="sent", fallback="starttls-refused"), STARTTLS_REFUSED),
    (attempt(status="sent", fallback="tls-handshake-failed"), HANDSHAKE_FAILED),
    (attempt(policy="enforce-tls", dsn="4.7.4",
             reply=f"{ENFORCED_BY}: TLS is required, but was not offered by "
             "host mx.dest.test[127.0.9.1]:25"), NO_STARTTLS),
    (attempt(policy="enforce-tls", dsn="4.7.4",
             reply=f"{ENFORCED_BY}: " + said(
                 TARGET, Reply(454, "4.7.0", "TLS not available"), "STARTTLS")),
     STARTTLS_REFUSED),
    (attempt(policy="enforce-tls", dsn="4.7.5",
             reply=f"{ENFORCED_BY}: lost connection with mx.dest.test"
             "[127.0.9.1]:25 while performing the TLS handshake"),
     HANDSHAKE_FAILED),
    # opportunistic, waiting for the plaintext fallback
    (attempt(dsn="4.7.5", reply="lost connection with mx while performing "
             "the TLS handshake; TLS failed with every host, plaintext "
             "fallback allowed from 2026-01-01T00:00:00Z"), HANDSHAKE_FAILED),
    # expired: 5.7.x, the last problem quoted
    (attempt(status="bounced", policy="enforce-tls", dsn="5.7.4",
             reply="message expired after 5 days in the queue; last problem: "
             "TLS is required, but was not offered by host mx"), NO_STARTTLS),
    # enforce-secure refused the certificate, after a handshake
    (attempt(policy="enforce-secure", dsn="4.7.4", tls=TLS13, trust="Anonymous"),
     NO_CERTIFICATE),
    (attempt(policy="enforce-secure", dsn="4.7.4", tls=TLS13, trust="Untrusted"),
     CERTIFICATE_UNTRUSTED),
    (attempt(policy="enforce-secure", dsn="4.7.4", tls=TLS13, trust="Trusted"),
     NAME_MISMATCH),
    (attempt(policy="enforce-tls", dsn="4.7.4",
             reply="TLS is required, but STARTTLS is turned off for mx"), OTHER),
    # not TLS failures
    (attempt(policy="enforce-secure", tls=TLS13, trust="Verified",
             dsn="4.2.0", reply="host mx said: 450 4.2.0 busy"), None),
    (attempt(policy="opportunistic", tls=TLS13, trust="Untrusted",
             dsn="4.2.0", reply="host mx said: 450 4.2.0 busy"), None),
    (attempt(policy="enforce-tls", dsn="4.4.1", connected=False,
             reply="connect to mx.dest.test[127.0.9.1]:25: Connection refused"),
     None),
    (attempt(dsn="4.7.5", reply=said(TARGET, Reply(450, "4.7.5", "odd"),
                                     "RCPT TO")), None),
    (attempt(policy="none", dsn="4.7.5", reply="anything"), None),
]


@pytest.mark.parametrize("given, reason", REASONS)
def test_tls_failure_reason(given: Attempt, reason: str | None) -> None:
    assert failure_reason(given) == reason


# --- the queue summary ---------------------------------------------------


def envelope(queue_id: str, arrival: float, *states: str,
             hold: bool = False) -> Envelope:
    return Envelope(
        queue_id=queue_id, sender="alice@org.test", arrival=arrival, size=10,
        client=Client("client.test", "client.test", "127.0.0.1", "mx"),
        recipients=tuple(Recipient(f"r{index}@dest.test", state)
                         for index, state in enumerate(states)),
        hold=hold,
    )


@pytest.mark.parametrize("states, hold, expected", [
    ((PENDING,), False, "pending"),
    ((PENDING, DEFERRED), False, "deferred"),
    ((DELIVERED, DEFERRED, FAILED), False, "deferred"),
    ((DELIVERED, PENDING), False, "pending"),
    ((DELIVERED, FAILED), False, "failed"),
    ((DEFERRED,), True, "held"),
    ((FAILED,), True, "held"),
    ((DELIVERED, DELIVERED), False, None),
])
def test_a_message_state_is_the_one_an_operator_acts_on(
    states: tuple[str, ...], hold: bool, expected: str | None
) -> None:
    assert message_state(envelope("A", 0.0, *states, hold=hold)) == expected


def test_the_summary_counts_every_state_and_keeps_the_oldest() -> None:
    summary = summarize([
        envelope("A", 100.0, DEFERRED), envelope("B", 50.0, DEFERRED),
        envelope("C", 70.0, PENDING), envelope("D", 10.0, DELIVERED),
    ])

    assert summary.messages == {"pending": 1, "deferred": 2, "held": 0,
                                "failed": 0}
    assert summary.oldest_age("deferred", 150.0) == 100.0
    assert summary.oldest_age("pending", 150.0) == 80.0
    assert summary.oldest_age("held", 150.0) == 0.0


# --- the collectors, in memory -------------------------------------------


def write_config(folder: Path, **extra: Any) -> Path:
    data = {
        "hostname": "relay.test", "spool": "spool",
        "tls": {"certificate": "relay.crt", "private_key": "relay.key"},
        "listeners": [
            {"name": "mx", "address": "127.0.0.1", "port": 2525,
             "role": "inbound"},
            {"name": "submission", "address": "127.0.0.1", "port": 5870,
             "role": "outbound", "networks": ["127.0.0.0/8"]},
        ],
        "domains": {"example.test": {"relay_to": ["127.0.9.9:25"]}},
        **extra,
    }
    path = folder / "mta.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path), check_tls=False)


@pytest.fixture
def spool(config: Config) -> Spool:
    spool = Spool(config.spool)
    spool.create()
    return spool


@pytest.fixture
def metrics(config: Config, spool: Spool) -> RelayMetrics:
    return RelayMetrics(lambda: config, spool, clock=lambda: 1000.0)


def read(metrics: RelayMetrics) -> Samples:
    return parse(generate_latest(metrics.registry).decode())


def commit(spool: Spool, message: Envelope) -> None:
    writer = spool.new_message()
    writer.write(b"x" * message.size)
    writer.commit(replace(message, queue_id=writer.queue_id))


def test_accepted_messages_are_counted_by_listener_direction_and_tls(
    metrics: RelayMetrics,
) -> None:
    inbound = envelope("A", 0.0, PENDING)
    metrics.accepted(inbound)
    metrics.accepted(inbound)
    metrics.accepted(replace(inbound, client=replace(
        inbound.client, listener="submission", tls=TLS13)))

    samples = read(metrics)
    total = "mta_messages_accepted_total"
    assert value(samples, total, listener="mx", direction="inbound",
                 tls="none") == 2
    assert value(samples, total, listener="submission", direction="outbound",
                 tls="TLSv1.3") == 1


def test_deliveries_are_counted_by_direction_policy_tls_and_status(
    metrics: RelayMetrics,
) -> None:
    metrics.delivery("bob@example.test", attempt(status="sent", tls=TLS13))
    metrics.delivery("carol@dest.test", attempt(status="deferred"))
    metrics.delivery("dave@dest.test", attempt(status="bounced",
                                               policy="enforce-tls"))

    samples = read(metrics)
    total = "mta_deliveries_total"
    assert value(samples, total, direction="inbound", policy="opportunistic",
                 tls="TLSv1.3", status="sent") == 1
    assert value(samples, total, direction="outbound", policy="opportunistic",
                 tls="none", status="deferred") == 1
    assert value(samples, total, direction="outbound", policy="enforce-tls",
                 tls="none", status="bounced") == 1
    assert series(samples, "mta_tls_failures_total") == []


def test_tls_failures_are_counted_by_reason(metrics: RelayMetrics) -> None:
    for given, _ in REASONS:
        metrics.delivery("bob@dest.test", given)

    samples = read(metrics)
    counted = sum(v for (name, _), v in samples.items()
                  if name == "mta_tls_failures_total")
    assert counted == sum(1 for _, reason in REASONS if reason is not None)
    assert value(samples, "mta_tls_failures_total", direction="outbound",
                 policy="enforce-secure", reason="name-mismatch") == 1


def test_labels_never_carry_an_address_or_a_domain(
    metrics: RelayMetrics,
) -> None:
    for index in range(50):
        metrics.delivery(f"user{index}@domain{index}.test",
                         attempt(reply=f"host mx{index} said: 450 4.2.0 no"))
        metrics.accepted(replace(envelope("A", 0.0, PENDING),
                                 sender=f"s{index}@org{index}.test"))

    samples = read(metrics)
    assert len(series(samples, "mta_deliveries_total")) == 1
    assert len(series(samples, "mta_messages_accepted_total")) == 1
    for (_, labels), _ in samples.items():
        for _, label in labels:
            assert "@" not in label and ".test" not in label, label


def test_queue_gauges_are_read_from_the_spool(
    metrics: RelayMetrics, spool: Spool
) -> None:
    commit(spool, envelope("A", 400.0, DEFERRED))
    commit(spool, envelope("B", 900.0, DEFERRED, PENDING))
    commit(spool, envelope("C", 990.0, PENDING))
    commit(spool, envelope("D", 10.0, FAILED, hold=True))

    samples = read(metrics)
    gauge, age = "mta_queue_messages", "mta_queue_oldest_message_age_seconds"
    assert value(samples, gauge, state="deferred") == 2
    assert value(samples, gauge, state="pending") == 1
    assert value(samples, gauge, state="held") == 1
    assert value(samples, gauge, state="failed") == 0
    assert value(samples, age, state="deferred") == 600.0
    assert value(samples, age, state="pending") == 10.0
    assert value(samples, age, state="failed") == 0.0
    assert value(samples, "mta_spool_quarantined_messages") == 0


def test_quarantined_messages_are_counted(
    metrics: RelayMetrics, spool: Spool
) -> None:
    commit(spool, envelope("A", 400.0, PENDING))
    queue_id = spool.queue_ids()[0]
    spool.quarantine(queue_id)

    samples = read(metrics)
    assert value(samples, "mta_spool_quarantined_messages") == 1
    assert value(samples, "mta_queue_messages", state="pending") == 0


def test_the_log_calls_feed_a_registered_counter(
    metrics: RelayMetrics,
) -> None:
    logs.add_event_counter(metrics)
    try:
        logs.log_accepted(envelope("A", 0.0, PENDING))
        logs.log_delivery("A", "bob@dest.test", attempt(status="sent"), 1.0)
    finally:
        logs.remove_event_counter(metrics)
    logs.log_accepted(envelope("B", 0.0, PENDING))  # no longer counted

    samples = read(metrics)
    assert value(samples, "mta_messages_accepted_total", listener="mx",
                 direction="inbound", tls="none") == 1
    assert value(samples, "mta_deliveries_total", direction="outbound",
                 policy="opportunistic", tls="none", status="sent") == 1


def test_a_failing_counter_never_fails_the_log_call() -> None:
    class Broken:
        def accepted(self, envelope: Envelope) -> None:
            raise RuntimeError("broken")

        def delivery(self, recipient: str, attempt: Attempt) -> None:
            raise RuntimeError("broken")

    broken = Broken()
    logs.add_event_counter(broken)
    try:
        logs.log_accepted(envelope("A", 0.0, PENDING))
        logs.log_delivery("A", "bob@dest.test", attempt(), 1.0)
    finally:
        logs.remove_event_counter(broken)


def test_the_registry_is_not_the_global_one(
    config: Config, spool: Spool
) -> None:
    from prometheus_client import REGISTRY

    first = RelayMetrics(lambda: config, spool)
    second = RelayMetrics(lambda: config, spool)  # would clash if global
    assert first.registry is not REGISTRY is not second.registry


# --- configuration -------------------------------------------------------


def test_metrics_are_off_unless_configured(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path), check_tls=False).metrics is None


def test_the_address_defaults_to_loopback(tmp_path: Path) -> None:
    path = write_config(tmp_path, metrics={"port": 9125})
    loaded = load_config(path, check_tls=False)
    assert loaded.metrics == MetricsEndpoint("127.0.0.1", 9125)


@pytest.mark.parametrize("address", ["::1", "127.0.0.2"])
def test_any_loopback_address_is_allowed(tmp_path: Path, address: str) -> None:
    path = write_config(tmp_path, metrics={"address": address, "port": 9125})
    loaded = load_config(path, check_tls=False)
    assert loaded.metrics == MetricsEndpoint(address, 9125)


def test_a_non_loopback_address_needs_an_acknowledgement(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, metrics={
        "address": "192.0.2.1", "port": 9125, "allow_non_loopback": True})
    loaded = load_config(path, check_tls=False)
    assert loaded.metrics == MetricsEndpoint("192.0.2.1", 9125)


BAD_METRICS = [
    ({"address": "0.0.0.0", "port": 9125},
     ["metrics.address: is not a loopback address", "allow_non_loopback",
      "(got '0.0.0.0')"]),
    ({"address": "192.0.2.1", "port": 9125, "allow_non_loopback": False},
     ["metrics.address: is not a loopback address", "(got '192.0.2.1')"]),
    ({"address": "localhost", "port": 9125},
     ["metrics.address: expected an IPv4 or IPv6 address",
      "(got 'localhost')"]),
    ({"address": "127.0.0.1"}, ["metrics.port: is required"]),
    ({}, ["metrics.port: is required"]),
    ({"port": "9125"}, ["metrics.port: expected a port number", "(got '9125')"]),
    ({"port": 70000}, ["metrics.port: expected a port number", "(got 70000)"]),
    ({"port": 9125, "allow_non_loopback": "yes"},
     ["metrics.allow_non_loopback: expected true or false", "(got 'yes')"]),
    ({"port": 9125, "path": "/m"}, ["metrics.path: unknown key"]),
    ({"port": 2525}, ["metrics.port: 127.0.0.1:2525 is already used by "
                      "listener mx", "(got 2525)"]),
    (True, ["metrics: expected a mapping", "(got True)"]),
    ("127.0.0.1:9125", ["metrics: expected a mapping"]),
]


@pytest.mark.parametrize("raw, parts", BAD_METRICS,
                         ids=[repr(raw) for raw, _ in BAD_METRICS])
def test_a_bad_metrics_section_is_reported_with_file_key_and_value(
    tmp_path: Path, raw: Any, parts: list[str]
) -> None:
    path = write_config(tmp_path, metrics=raw)
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_tls=False)
    problems = caught.value.problems
    prefix = f"{path.resolve()}: "
    assert any(problem.startswith(prefix) and all(part in problem
                                                  for part in parts)
               for problem in problems), problems


def test_a_wildcard_listener_on_the_metrics_port_is_refused(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, metrics={"port": 2626}, listeners=[
        {"name": "mx", "address": "0.0.0.0", "port": 2626, "role": "inbound"}])
    with pytest.raises(ConfigError, match="already used by listener mx"):
        load_config(path, check_tls=False)


def test_the_repository_file_documents_metrics_commented_out() -> None:
    text = (Path(__file__).resolve().parent.parent / "etc/mta.yaml").read_text()
    assert "# metrics:" in text
    assert "metrics" not in (yaml.safe_load(text) or {})


# --- the running relay ----------------------------------------------------


def scrape(port: int, path: str = "/metrics") -> Samples:
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return parse(response.read().decode())


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Relay:
    """A relay with a peer at an address of this file's own range."""

    def __init__(self, tmp_path: Path, relay_cert: Any) -> None:
        self.tmp_path = tmp_path
        self.relay_cert = relay_cert
        self.peers: list[smtppeer.Peer] = []
        self.process: RelayProcess | None = None

    def start(self, **overrides: Any) -> RelayProcess:
        config = base_config(self.tmp_path, self.relay_cert.chain,
                             self.relay_cert.key, **overrides)
        self.process = RelayProcess(self.tmp_path / "relay", config)
        return self.process.start()

    def close(self) -> None:
        if self.process is not None:
            self.process.stop()
        for peer in self.peers:
            peer.stop()


@pytest.fixture
def relay(tmp_path: Path, relay_cert: Any) -> Iterator[Relay]:
    world = Relay(tmp_path, relay_cert)
    yield world
    world.close()


MESSAGE = b"From: a@org.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHi.\r\n"


def test_a_delivered_message_is_counted_with_its_labels(
    relay: Relay, mx_port: int
) -> None:
    peer = smtppeer.tls13("127.0.9.1", mx_port)
    relay.peers.append(peer)
    port = free_port()
    process = relay.start(
        metrics={"address": "127.0.0.1", "port": port},
        domains={"example.test": {"relay_to": [f"127.0.9.1:{mx_port}"]}},
    )

    queue_id = process.submit("alice@org.test", ["bob@example.test"], MESSAGE,
                              listener="mx")
    peer.wait_for(1, timeout=15)
    process.wait_for_log(f"{queue_id}: removed")
    samples = scrape(port)

    assert value(samples, "mta_messages_accepted_total", listener="mx",
                 direction="inbound", tls="TLSv1.3") == 1
    assert series(samples, "mta_messages_accepted_total") == [
        {"listener": "mx", "direction": "inbound", "tls": "TLSv1.3"}]
    assert value(samples, "mta_deliveries_total", direction="inbound",
                 policy="opportunistic", tls="TLSv1.3", status="sent") == 1
    assert len(series(samples, "mta_deliveries_total")) == 1
    assert series(samples, "mta_tls_failures_total") == []
    for state in ("pending", "deferred", "held", "failed"):
        assert value(samples, "mta_queue_messages", state=state) == 0
    assert value(samples, "mta_info", version=__import__("mta").__version__) == 1
    assert process.process is not None
    smtp_ports = {listener["port"] for listener in process.config["listeners"]}
    assert listening_ports(process.process.pid) == smtp_ports | {port}


def test_a_deferred_message_shows_in_the_queue_and_its_tls_failure(
    relay: Relay, mx_port: int
) -> None:
    # A peer without STARTTLS, for a domain whose rule demands TLS.
    relay.peers.append(smtppeer.plain("127.0.9.2", mx_port))
    port = free_port()
    process = relay.start(
        metrics={"port": port},
        routes={"dest.test": f"[127.0.9.2]:{mx_port}"},
        policies=[{"name": "partner", "direction": "outbound",
                   "recipient_domain": "dest.test", "tls": "enforce-tls"}],
        delivery={"retry_schedule": ["1h"],
                  "timeouts": {"connect": "5s", "command": "10s",
                               "data": "20s"}},
    )

    before = time.time()
    queue_id = process.submit("alice@org.test", ["bob@dest.test"], MESSAGE,
                              starttls=False)
    process.wait_for_log(f"{queue_id}: to=<bob@dest.test>")
    samples = scrape(port)

    assert value(samples, "mta_messages_accepted_total", listener="submission",
                 direction="outbound", tls="none") == 1
    assert value(samples, "mta_deliveries_total", direction="outbound",
                 policy="enforce-tls", tls="none", status="deferred") == 1
    assert value(samples, "mta_tls_failures_total", direction="outbound",
                 policy="enforce-tls", reason="starttls-not-offered") == 1
    assert value(samples, "mta_queue_messages", state="deferred") == 1
    assert value(samples, "mta_queue_messages", state="pending") == 0
    age = value(samples, "mta_queue_oldest_message_age_seconds",
                state="deferred")
    assert age is not None and 0 < age <= time.time() - before + 1


def test_a_scrape_has_no_created_series_and_leaves_no_log_line(
    relay: Relay,
) -> None:
    port = free_port()
    process = relay.start(metrics={"port": port})
    process.submit("alice@org.test", ["bob@dest.test"], MESSAGE,
                   starttls=False)
    url = f"http://127.0.0.1:{port}/metrics"

    for _ in range(3):
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    time.sleep(0.5)  # a log line would be written as the request ends

    assert "mta_messages_accepted_total{" in text
    assert [line for line in text.splitlines() if "_created" in line] == []
    assert "GET /metrics" not in process.log()
    assert "HTTP/1.1" not in process.log()


def test_only_the_metrics_path_is_served(relay: Relay) -> None:
    port = free_port()
    relay.start(metrics={"port": port})

    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert caught.value.code == 404
    assert "mta_queue_messages" in {name for name, _ in scrape(port)}


def test_nothing_listens_for_metrics_by_default(relay: Relay) -> None:
    process = relay.start()

    assert process.process is not None
    smtp_ports = {listener["port"] for listener in process.config["listeners"]}
    assert listening_ports(process.process.pid) == smtp_ports
    assert "metrics: serving" not in process.log()


def test_a_metrics_port_in_use_stops_the_relay_with_a_clear_error(
    relay: Relay,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            relay.start(metrics={"port": port})
        except AssertionError:
            # It may exit before or after its SMTP ports, bound first,
            # answered the start's probe.
            pass
        assert relay.process is not None and relay.process.process is not None
        assert relay.process.process.wait(timeout=15) == 1

    assert (f"metrics: cannot listen on 127.0.0.1:{port}"
            in relay.process.log())
