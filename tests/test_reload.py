"""Reload on SIGHUP (mta.reload): the real relay (`twistd -n mta`) gets a
new configuration file and a SIGHUP, and what it does next is checked on
the wire, in the log and in the spool.

- a policy changed by a reload applies to a message already deferred, at
  its next attempt;
- a bad file is refused with one log line that names the file, the key
  and the value, and the old policy goes on deciding;
- a certificate renewed on disk is presented to the next client;
- a certificate that runs out within 14 days is warned about at start
  and at reload;
- what a reload cannot change (listeners, spool) is named in the log.

Peers listen on 127.0.6.101-109: addresses no other test file uses.
"""

from __future__ import annotations

import datetime
import os
import signal
import smtplib
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import yaml
from cryptography import x509
from twisted.internet import defer, task

from mta.config import ConfigError, load_config
from mta import reload as reloading
from mta.reload import Reloader, expiry_warning, needs_restart
from tests.peers import certs, smtppeer
from tests.peers.certs import CertFiles
from tests.peers.smtppeer import Peer
from tests.relay import RelayProcess, base_config, free_port

PLAIN_PEER = "127.0.6.101"
DOMAIN = "plain.test"
MESSAGE = b"Subject: reload\r\n\r\nA message that waits for a new policy.\r\n"

UTC = datetime.UTC


# --- pure decisions ----------------------------------------------------------


def _config(tmp_path: Path, relay_cert: CertFiles, **overrides: Any) -> Any:
    raw = base_config(tmp_path, relay_cert.chain, relay_cert.key, **overrides)
    path = tmp_path / f"mta-{len(list(tmp_path.glob('mta-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _listeners(*entries: tuple[str, str, int, str]) -> list[dict[str, Any]]:
    return [{"name": name, "address": address, "port": port, "role": role,
             "networks": ["127.0.0.0/8"]}
            for name, address, port, role in entries]


MX = ("mx", "127.0.0.1", 2525, "inbound")


@pytest.mark.parametrize(
    ("after", "spool", "expected"),
    [
        ([MX], None, []),
        # Role, require_tls and networks are read per connection: live.
        ([("mx", "127.0.0.1", 2525, "outbound")], None, []),
        ([("mx", "127.0.0.1", 2526, "inbound")], None,
         ["listener mx moves from 127.0.0.1:2525 to 127.0.0.1:2526"]),
        ([("mx", "127.0.0.2", 2525, "inbound")], None,
         ["listener mx moves from 127.0.0.1:2525 to 127.0.0.2:2525"]),
        ([MX, ("sub", "127.0.0.1", 2587, "outbound")], None,
         ["listener sub (127.0.0.1:2587) is new"]),
        ([("sub", "127.0.0.1", 2587, "outbound")], None,
         ["listener sub (127.0.0.1:2587) is new",
          "listener mx (127.0.0.1:2525) is removed; until then its "
          "connections are closed at once"]),
        ([MX], "other-spool", ["spool moves from {old} to {new}"]),
    ],
    ids=["same", "role", "port", "address", "added", "renamed", "spool"],
)
def test_what_needs_a_restart(
    tmp_path: Path, relay_cert: CertFiles, after: list[Any],
    spool: str | None, expected: list[str],
) -> None:
    old = _config(tmp_path, relay_cert, listeners=_listeners(MX))
    changes: dict[str, Any] = {"listeners": _listeners(*after)}
    if spool is not None:
        changes["spool"] = str(tmp_path / spool)
    new = _config(tmp_path, relay_cert, **changes)

    wanted = [line.format(old=old.spool, new=new.spool) for line in expected]
    assert needs_restart(old, new) == wanted


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (None, None, []),
        ({"port": 9125}, {"port": 9125}, []),
        (None, {"port": 9125}, ["metrics moves from off to 127.0.0.1:9125"]),
        ({"port": 9125}, None, ["metrics moves from 127.0.0.1:9125 to off"]),
        ({"port": 9125}, {"address": "127.0.0.2", "port": 9126},
         ["metrics moves from 127.0.0.1:9125 to 127.0.0.2:9126"]),
    ],
    ids=["off", "same", "on", "off-again", "moved"],
)
def test_a_changed_metrics_endpoint_needs_a_restart(
    tmp_path: Path, relay_cert: CertFiles, before: Any, after: Any,
    expected: list[str],
) -> None:
    def config(metrics: Any) -> Any:
        extra = {} if metrics is None else {"metrics": metrics}
        return _config(tmp_path, relay_cert, listeners=_listeners(MX), **extra)

    assert needs_restart(config(before), config(after)) == expected


NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        (DAY * 90, None),
        (DAY * 14 + datetime.timedelta(seconds=1), None),
        (DAY * 14, "expires on 2026-12-17 12:00 UTC (in 14 days)"),
        (DAY * 5 + HOUR * 3, "expires on 2026-12-08 15:00 UTC (in 5 days and "
         "3 hours)"),
        # Days and hours, never rounded up: 2 days 23 hours is not "3 days",
        # nor "2 days".
        (DAY * 2 + HOUR * 23 + datetime.timedelta(minutes=59),
         "(in 2 days and 23 hours)"),
        (HOUR * 30, "(in 1 day and 6 hours)"),
        (HOUR * 24, "(in 1 day)"),
        (HOUR * 2, "(in 2 hours)"),
        (HOUR, "(in 1 hour)"),
        (datetime.timedelta(minutes=59), "(in less than an hour)"),
        (DAY * 0, "expired on 2026-12-03 12:00 UTC"),
        (DAY * -3, "expired on 2026-11-30 12:00 UTC"),
    ],
)
def test_expiry_warning(left: datetime.timedelta, expected: str | None) -> None:
    warning = expiry_warning(Path("/etc/mta/relay.crt"), NOW + left, NOW)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None
        assert warning.startswith("tls.certificate /etc/mta/relay.crt ")
        assert expected in warning
        assert "reload (SIGHUP)" in warning


# --- the real relay ------------------------------------------------------------


class Site:
    """A relay that routes ``plain.test`` to a peer without STARTTLS."""

    def __init__(self, tmp_path: Path, relay_cert: CertFiles, mx_port: int,
                 policy: str) -> None:
        self.peer: Peer = smtppeer.plain(PLAIN_PEER, mx_port)
        config = base_config(
            tmp_path, relay_cert.chain, relay_cert.key,
            routes={DOMAIN: f"[{PLAIN_PEER}]:{mx_port}"},
            policies=[_rule(policy)],
        )
        self.relay = RelayProcess(tmp_path / "relay", config)
        self.relay.start()

    def close(self) -> None:
        self.relay.stop()
        self.peer.stop()


def _rule(level: str) -> dict[str, Any]:
    return {"name": "partner", "direction": "outbound",
            "recipient_domain": DOMAIN, "tls": level}


@pytest.fixture
def enforcing(tmp_path: Path, relay_cert: CertFiles,
              mx_port: int) -> Iterator[Site]:
    site = Site(tmp_path, relay_cert, mx_port, "enforce-tls")
    yield site
    site.close()


def reload(relay: RelayProcess, config: dict[str, Any] | str) -> str:
    """Write ``config`` (a dict, or the file's text), send SIGHUP and wait
    for the relay's verdict; returns the new "reload:" line."""
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    relay.config_path.write_text(text)
    before = len(reload_lines(relay))
    assert relay.process is not None
    os.kill(relay.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = reload_lines(relay)
        if len(lines) > before:
            return lines[before]
        time.sleep(0.05)
    raise AssertionError(f"no reload line:\n{relay.log()}")


def reload_lines(relay: RelayProcess) -> list[str]:
    return [line for line in relay.log().splitlines()
            if "reload: ok" in line or "reload: refused" in line]


def attempts(relay: RelayProcess, queue_id: str) -> list[str]:
    return [line for line in relay.log().splitlines()
            if f"{queue_id}: to=<" in line]


def wait_for_attempts(relay: RelayProcess, queue_id: str, n: int) -> list[str]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = attempts(relay, queue_id)
        if len(lines) >= n:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} attempts of {queue_id}:\n"
                         f"{relay.log()}")


def test_a_new_policy_applies_to_a_deferred_message(enforcing: Site) -> None:
    relay = enforcing.relay
    queue_id = relay.submit("alice@org.test", [f"bob@{DOMAIN}"], MESSAGE)
    first = wait_for_attempts(relay, queue_id, 1)[0]
    assert "policy=enforce-tls rule=partner" in first, first
    assert "status=deferred" in first, first

    relaxed = dict(relay.config, policies=[_rule("opportunistic")])
    assert "reload: ok" in reload(relay, relaxed)

    received = enforcing.peer.wait_for(1, timeout=15)
    assert received[0].rcpt_tos == (f"bob@{DOMAIN}",)
    sent = relay.wait_for_log("status=sent")
    assert f"{queue_id}: to=<bob@{DOMAIN}>" in sent, sent
    assert "policy=opportunistic rule=partner" in sent, sent
    relay.wait_for_log(f"{queue_id}: removed")


def test_a_bad_file_is_refused_and_the_old_policy_stays(
    enforcing: Site,
) -> None:
    relay = enforcing.relay
    # The file would relax the rule, but one value in it is wrong: none of
    # it may apply.
    broken = dict(relay.config, policies=[_rule("opportunistic")],
                  delivery={**relay.config["delivery"], "max_lifetime": "soon"})
    line = reload(relay, broken)

    path = relay.config_path.resolve()
    assert f"[mta#error] reload: refused config={path}: " in line, line
    assert "delivery.max_lifetime: expected a duration" in line, line
    assert "(got 'soon')" in line and "running configuration stays" in line
    with pytest.raises(ConfigError):
        load_config(relay.config_path)  # the same words check-config gives
    # One line for the whole refusal.
    assert sum("reload: refused" in line for line in relay.log().splitlines()) == 1

    queue_id = relay.submit("alice@org.test", [f"bob@{DOMAIN}"], MESSAGE)
    for line in wait_for_attempts(relay, queue_id, 2):
        assert "policy=enforce-tls rule=partner" in line, line
        assert "status=deferred" in line, line
    assert enforcing.peer.messages == []


def test_yaml_that_does_not_parse_is_refused_in_one_line(
    enforcing: Site,
) -> None:
    relay = enforcing.relay
    line = reload(relay, "hostname: [unclosed\npolicies: {\n")
    assert "reload: refused" in line and "not valid YAML" in line, line
    assert line.endswith("the running configuration stays in force"), line

    # Still the old file's listeners and policy.
    queue_id = relay.submit("alice@org.test", [f"bob@{DOMAIN}"], MESSAGE)
    assert "policy=enforce-tls" in wait_for_attempts(relay, queue_id, 1)[0]


def test_listener_changes_are_named_and_wait_for_a_restart(
    enforcing: Site,
) -> None:
    relay = enforcing.relay
    moved = [dict(listener) for listener in relay.config["listeners"]]
    old_port = moved[0]["port"]
    moved[0]["port"] = free_port()
    line = reload(relay, dict(relay.config, listeners=moved))

    assert "reload: ok" in line, line
    warning = relay.wait_for_log("needs a restart")
    assert "[mta#warn]" in warning
    assert f"listener mx moves from 127.0.0.1:{old_port} to 127.0.0.1:" \
        f"{moved[0]['port']}" in warning, warning
    # The old port still serves, as the warning says.
    with smtplib.SMTP("127.0.0.1", old_port, timeout=10) as client:
        assert client.ehlo()[0] == 250


def restart_warnings(relay: RelayProcess) -> list[str]:
    return [line.split("reload: ", 1)[1] for line in relay.log().splitlines()
            if "needs a restart" in line]


def test_what_waits_for_a_restart_is_measured_against_what_runs(
    enforcing: Site,
) -> None:
    relay = enforcing.relay
    started = relay.config
    port = started["listeners"][0]["port"]
    spool = started["spool"]
    moved = [dict(started["listeners"][0], port=free_port()),
             *started["listeners"][1:]]
    metrics_port = free_port()

    assert "reload: ok" in reload(relay, dict(started, listeners=moved,
                                              spool=spool + "-new"))
    assert "reload: ok" in reload(relay, dict(started, metrics={
        "port": metrics_port}))
    # Back to the file the relay started with: nothing waits any more.
    assert "reload: ok" in reload(relay, started)

    assert restart_warnings(relay) == [
        f"listener mx moves from 127.0.0.1:{port} to 127.0.0.1:"
        f"{moved[0]['port']}: this needs a restart; until then the relay "
        "runs as before on this point",
        f"spool moves from {spool} to {spool}-new: this needs a restart; "
        "until then the relay runs as before on this point",
        f"metrics moves from off to 127.0.0.1:{metrics_port}: this needs a "
        "restart; until then the relay runs as before on this point",
    ]
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        assert client.ehlo()[0] == 250


# --- the relay's own certificate -------------------------------------------


def presented_certificate(relay: RelayProcess) -> x509.Certificate:
    """The certificate the mx listener shows a client after STARTTLS."""
    address, port = relay.listener("mx")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(address, port, timeout=10) as client:
        client.starttls(context=context)
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _leaf(files: CertFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificates(files.chain.read_bytes())[0]


def _in_days(days: float) -> datetime.datetime:
    return datetime.datetime.now(UTC) + datetime.timedelta(days=days)


def test_a_renewed_certificate_is_served_after_reload(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "relay-tls"
    soon = certs.issue_server_cert("relay.test", not_after=_in_days(5))
    old = certs.write_cert_files(soon, folder, stem="relay")
    relay = RelayProcess(tmp_path / "relay", base_config(
        tmp_path, old.chain, old.key))
    relay.start()
    try:
        # Warned at start: the file and the day it runs out.
        warning = relay.wait_for_log("tls.certificate")
        expires = _leaf(old).not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
        assert "[mta#warn]" in warning
        # Issued for 5 days, a moment ago: 4 days and 23 hours are left.
        assert f"tls.certificate {old.chain} expires on {expires} (in 4 " \
            "days and 23 hours)" in warning, warning
        assert presented_certificate(relay).serial_number == \
            _leaf(old).serial_number

        # Renewed in place, as certbot or an operator would.
        renewed = certs.write_cert_files(
            certs.issue_server_cert("relay.test", key_type=certs.RSA),
            folder, stem="relay")
        assert "reload: ok" in reload(relay, relay.config)

        assert presented_certificate(relay).serial_number == \
            _leaf(renewed).serial_number
        # 90 days left: no new warning.
        warnings = [line for line in relay.log().splitlines()
                    if "tls.certificate" in line]
        assert len(warnings) == 1, warnings
    finally:
        relay.stop()


def test_reload_warns_of_a_certificate_about_to_expire(
    tmp_path: Path, relay_cert: CertFiles,
) -> None:
    relay = RelayProcess(tmp_path / "relay", base_config(
        tmp_path, relay_cert.chain, relay_cert.key))
    relay.start()
    try:
        assert "tls.certificate" not in relay.log()
        certs.write_cert_files(
            certs.issue_server_cert("relay.test", not_after=_in_days(3.5)),
            relay_cert.chain.parent, stem="relay")
        assert "reload: ok" in reload(relay, relay.config)
        warning = relay.wait_for_log("tls.certificate")
        assert f"tls.certificate {relay_cert.chain} expires on " in warning
        assert "(in 3 days and 11 hours)" in warning, warning
    finally:
        relay.stop()


def test_a_key_that_does_not_match_is_refused(
    tmp_path: Path, relay_cert: CertFiles,
) -> None:
    relay = RelayProcess(tmp_path / "relay", base_config(
        tmp_path, relay_cert.chain, relay_cert.key))
    relay.start()
    try:
        before = presented_certificate(relay).serial_number
        other = certs.issue_server_cert("relay.test")
        # A half-done renewal: the new chain beside the old key.
        relay_cert.chain.write_bytes(
            b"".join(blob.bytes() for blob in other.cert_chain_pems))
        line = reload(relay, relay.config)
        assert "reload: refused" in line, line
        assert "tls.private_key" in line and str(relay_cert.key) in line, line
        # The old certificate, from the context built at start.
        assert presented_certificate(relay).serial_number == before
    finally:
        relay.stop()


# --- files that are not regular files, and failures no check foresaw ----------


def test_a_fifo_is_refused_at_reload_and_the_next_reload_still_runs(
    tmp_path: Path, relay_cert: CertFiles,
) -> None:
    """A FIFO where a file belongs used to hang the reload in its thread,
    and every later SIGHUP was ignored: now it is refused like any bad
    value, and the next SIGHUP reloads."""
    listed = tmp_path / "recipients.txt"
    listed.write_text("bob@strict.test\n")
    config = base_config(tmp_path, relay_cert.chain, relay_cert.key, domains={
        "strict.test": {"relay_to": ["[127.0.6.109]"],
                        "recipients": str(listed)}})
    relay = RelayProcess(tmp_path / "relay", config)
    relay.start()
    try:
        listed.unlink()
        os.mkfifo(listed)
        line = reload(relay, relay.config)
        assert "reload: refused" in line, line
        assert (f"domains.strict.test.recipients: cannot read: not a regular "
                f"file but a FIFO (named pipe) (got '{listed}')") in line, line

        # The certificate too, renewed into a FIFO by mistake.
        listed.unlink()
        listed.write_text("bob@strict.test\n")
        chain = relay_cert.chain.read_bytes()
        relay_cert.chain.unlink()
        os.mkfifo(relay_cert.chain)
        line = reload(relay, relay.config)
        assert "reload: refused" in line, line
        assert (f"tls.certificate: cannot read {relay_cert.chain}: not a "
                "regular file but a FIFO (named pipe)") in line, line

        relay_cert.chain.unlink()
        relay_cert.chain.write_bytes(chain)
        assert "reload: ok" in reload(relay, relay.config)
    finally:
        relay.stop()


def test_yaml_nested_too_deep_is_refused_in_one_clear_line(
    enforcing: Site,
) -> None:
    relay = enforcing.relay
    line = reload(relay, yaml.safe_dump(relay.config)
                  + "colour: " + "[" * 600 + "]" * 600 + "\n")
    assert "reload: refused" in line, line
    assert ": nesting too deep: more than 64 levels of lists and mappings " \
        "(line " in line, line
    assert "RecursionError" not in relay.log()
    assert "reload: ok" in reload(relay, relay.config)


class _Reactor(task.Clock):
    def getThreadPool(self) -> None:
        return None


def _reloader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
              load: Any) -> tuple[Reloader, list[str], list[Any]]:
    """A Reloader whose thread runs at once, with ``load`` in place of
    reading the file; the log lines it writes and what it installs."""
    lines: list[str] = []
    installed: list[Any] = []
    monkeypatch.setattr(reloading, "log_event",
                        lambda level, text, *args, **kwargs: lines.append(
                            f"[{level}] {text}"))
    monkeypatch.setattr(reloading.threads, "deferToThreadPool",
                        lambda reactor, pool, function, *args:
                        defer.maybeDeferred(function, *args))
    monkeypatch.setattr(reloading, "load", load)
    running = SimpleNamespace(config=SimpleNamespace(path=tmp_path / "m.yaml"))
    reloader = Reloader(_Reactor(), lambda: running,  # type: ignore[arg-type,return-value]
                        installed.append, in_use=running.config)  # type: ignore[arg-type]
    return reloader, lines, installed


def test_an_unexpected_failure_is_one_line_and_frees_the_next_reload(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    calls: list[Path] = []

    def load(path: Path, reactor: Any) -> Any:
        calls.append(path)
        raise RecursionError("maximum recursion depth exceeded")

    reloader, lines, installed = _reloader(monkeypatch, tmp_path, load)
    reloader.request()
    reloader.request()

    assert len(calls) == 2  # the first one did not leave the flag set
    path = tmp_path / "m.yaml"
    assert lines == [
        f"[error] reload: refused config={path}: unexpected RecursionError: "
        "maximum recursion depth exceeded; the running configuration stays "
        "in force"] * 2
    assert installed == []


def test_a_reload_that_cannot_start_frees_the_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    reloader, lines, _ = _reloader(monkeypatch, tmp_path, None)

    def no_thread(*args: Any) -> Any:
        raise RuntimeError("the thread pool is stopped")

    monkeypatch.setattr(reloading.threads, "deferToThreadPool", no_thread)
    reloader.request()
    reloader.request()
    assert len(lines) == 2 and "unexpected RuntimeError: the thread pool is " \
        "stopped" in lines[1], lines


def test_an_install_that_fails_is_logged_and_frees_the_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    reloader, lines, _ = _reloader(monkeypatch, tmp_path,
                                   lambda path, reactor: "new")

    def install(running: Any) -> None:
        raise ValueError("cannot listen")

    reloader.install = install
    reloader.request()
    reloader.request()
    assert lines == [f"[error] reload: refused config={tmp_path / 'm.yaml'}: "
                     "unexpected ValueError: cannot listen; the running "
                     "configuration stays in force"] * 2


def test_a_sighup_during_a_reload_is_never_silent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    pending: defer.Deferred[Any] = defer.Deferred()
    reloader, lines, _ = _reloader(monkeypatch, tmp_path,
                                   lambda path, reactor: pending)
    reloader.request()
    assert isinstance(reloader.reactor, task.Clock)
    reloader.reactor.advance(45)
    reloader.request()
    assert lines == ["[warn] reload: another is under way (for 45s); this "
                     "one follows it"]
