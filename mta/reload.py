"""Reloading the configuration while the relay runs (SIGHUP).

A reload reads the same file again and checks it whole, certificate and
key included, then builds everything that derives from it (the listeners'
TLS context, the delivery client's context and resolver) away from the
reactor thread, since it reads files.  Only then is it swapped in, in one
step of the reactor; a file that fails is refused with its problems in one
log line, and the running configuration stays in force.

What a reload changes, for the next connection and the next delivery
attempt (mail already queued included): hostname, limits, domains, routes,
dns, delivery, defaults, policies, the certificate and key, and each
listener's role, require_tls, networks and users file (``auth``, read again
at each reload).  What it cannot change: which listeners exist, the address
and port each is bound to (the port may be privileged, and the relay no
longer is), whether a port speaks TLS from the first byte (``tls:
implicit``: its clients expect what it did), the spool folder, the
metrics endpoint and the number of worker processes.  Those wait for a
restart; `needs_restart` names them, measured against what the relay
started with, and the log says so.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet import threads

from mta.certcheck import expiry_warning as expiry_warning  # for the tests
from mta.certcheck import warnings_for
from mta.config import Config, ConfigError, MetricsEndpoint, load_config
from mta.configfiles import read_regular
from mta.configreader import shortened
from mta.connectioncache import ConnectionCache
from mta.delivery import Deliverer
from mta.filemodes import warn_if_users_exposed
from mta.logs import log_event
from mta.resolver import make_resolver, resolve_targets
from mta.tlsctx import ServerCreator, client_context, server_context


@dataclass(frozen=True, slots=True)
class Running:
    """A configuration and everything built from it: swapped as one."""

    config: Config
    tls_creator: ServerCreator
    deliverer: Deliverer
    certificate: x509.Certificate  # the relay's own, first in the chain
    # The deliverer's kept connections: closed when this is replaced.
    connections: ConnectionCache


def build(config: Config, reactor: Any) -> Running:
    """The objects a configuration needs.  Blocking: it reads the
    certificate, the key and the trust store."""
    resolver = make_resolver(config.nameservers)
    # Built here but used on the reactor thread only.
    connections = ConnectionCache(reactor, config.delivery.connection_reuse)
    return Running(
        config=config,
        tls_creator=ServerCreator(server_context(config.tls)),
        deliverer=Deliverer(
            config=config,
            tls_context=client_context(config.tls),
            resolve=partial(resolve_targets, resolver),
            session=connections.session,
        ),
        # Read as the contexts read it: a FIFO is refused, not waited on.
        certificate=x509.load_pem_x509_certificates(
            read_regular(config.tls.certificate))[0],
        connections=connections,
    )


def load(path: Path, reactor: Any) -> Running:
    """Read, check and build; `ConfigError` when the file cannot be used.
    Blocking."""
    config = load_config(path)
    try:
        return build(config, reactor)
    except Exception as error:
        # The file changed between the check and the build (a certificate
        # being replaced): refused like any other bad file.
        raise ConfigError([f"{path}: tls: cannot be used: {error}"]) from None


# --- pure decisions ------------------------------------------------------


def needs_restart(in_use: Config, new: Config) -> list[str]:
    """What ``new`` changes that a reload cannot apply, in words for the
    log; [] when everything applies.  ``in_use`` is the configuration the
    relay started with: its listeners, spool and metrics endpoint are the
    ones running whatever reloads came since, so a change undone by a
    later reload is no change at all."""
    changes = []
    before = {listener.name: listener for listener in in_use.listeners}
    after = {listener.name: listener for listener in new.listeners}
    for name, listener in after.items():
        if name not in before:
            changes.append(f"listener {name} ({_bound(listener)}) is new")
        elif _bound(before[name]) != _bound(listener):
            changes.append(f"listener {name} moves from {_bound(before[name])} "
                           f"to {_bound(listener)}")
        if name in before and before[name].tls != listener.tls:
            changes.append(f"listener {name} changes from tls: "
                           f"{before[name].tls} to tls: {listener.tls}")
    for name, listener in before.items():
        if name not in after:
            changes.append(f"listener {name} ({_bound(listener)}) is removed; "
                           "until then its connections are closed at once")
    if in_use.spool != new.spool:
        changes.append(f"spool moves from {in_use.spool} to {new.spool}")
    if in_use.metrics != new.metrics:
        changes.append(f"metrics moves from {_endpoint(in_use.metrics)} to "
                       f"{_endpoint(new.metrics)}")
    if in_use.workers != new.workers:
        changes.append(f"workers changes from {in_use.workers} to "
                       f"{new.workers}")
    if in_use.cpu_affinity != new.cpu_affinity:
        changes.append(f"cpu_affinity changes from {in_use.cpu_affinity} to "
                       f"{new.cpu_affinity}")
    return changes


def _bound(listener: Any) -> str:
    return f"{listener.address}:{listener.port}"


def _endpoint(metrics: MetricsEndpoint | None) -> str:
    return "off" if metrics is None else f"{metrics.address}:{metrics.port}"


def log_certificate_warnings(running: Running) -> None:
    """At start and at each reload: the certificate runs out soon, or does
    not name `hostname` (mta.certcheck)."""
    config = running.config
    now = datetime.datetime.now(datetime.UTC)
    for warning in warnings_for(config.tls.certificate, config.hostname,
                                running.certificate, now):
        log_event("warn", warning, "certificate")


# --- the reload itself ---------------------------------------------------


class Reloader:
    """Runs one reload at a time; a SIGHUP that comes during one asks for
    another after it, so the last version of the file always wins.
    ``in_use`` is the configuration the relay started with: what waits for
    a restart is measured against it (`needs_restart`)."""

    def __init__(
        self,
        reactor: Any,
        current: Callable[[], Running],
        install: Callable[[Running], None],
        in_use: Config | None = None,
    ) -> None:
        self.reactor = reactor
        self.current = current
        self.install = install
        self.in_use = in_use or current().config
        self._busy = False
        self._again = False
        self._started = 0.0

    def request(self) -> None:
        """Reload now, or after the reload under way.  Reactor thread."""
        if self._busy:
            self._again = True
            under_way = self.reactor.seconds() - self._started
            # Never silent: a reload that does not end is seen at the next.
            log_event("warn" if under_way > 30 else "info",
                      f"reload: another is under way (for {under_way:.0f}s); "
                      "this one follows it", "reload")
            return
        self._busy = True
        self._started = self.reactor.seconds()
        path: Path | str = "(unknown)"
        try:
            path = self.current().config.path
            loading = threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), load, path,
                self.reactor
            )
        except Exception as error:
            # Nothing runs that would clear the flag: clear it here, or
            # every later SIGHUP would wait for this one for ever.
            self._busy = False
            self._failed(error, path)
            return
        loading.addCallbacks(self._loaded, self._refused,
                             callbackArgs=(path,), errbackArgs=(path,))
        loading.addErrback(lambda failure: self._failed(failure.value, path))
        loading.addBoth(self._done)

    def _loaded(self, running: Running, path: Path) -> None:
        self.install(running)
        log_event("info", f"reload: ok config={running.config.path}", "reload")
        for change in needs_restart(self.in_use, running.config):
            log_event("warn", f"reload: {change}: this needs a restart; until "
                      "then the relay runs as before on this point", "reload",
                      config=str(running.config.path))
        log_certificate_warnings(running)
        warn_if_users_exposed(running.config)

    def _refused(self, failure: Any, path: Path) -> None:
        error = failure.value
        if not isinstance(error, ConfigError):
            self._failed(error, path)
            return
        # config= names the file: each problem says only where in it,
        # unless it is about another file (a recipient list).
        reason = "; ".join(problem.removeprefix(f"{path}: ")
                           for problem in error.problems)
        # One line, whatever the YAML parser's message looks like.
        reason = re.sub(r"\s*\n\s*", " ", reason)
        log_event("error", f"reload: refused config={path}: {reason}; the "
                  "running configuration stays in force", "reload",
                  config=str(path))

    def _failed(self, error: BaseException, path: Path | str) -> None:
        """One line for what no check foresaw (a bug, memory, a file that
        changed under the reader): the reload did not happen."""
        what = re.sub(r"\s*\n\s*", " ",
                      shortened(f"{type(error).__name__}: {error}"))
        log_event("error", f"reload: refused config={path}: unexpected {what}; "
                  "the running configuration stays in force", "reload",
                  config=str(path))

    def _done(self, _: object) -> None:
        self._busy = False
        if self._again:
            self._again = False
            self.request()
