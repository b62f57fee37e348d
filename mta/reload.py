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
implicit``: its clients expect what it did), and the spool folder.  Those
wait for a restart; `needs_restart` names them and the log says so.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet import threads

from mta.config import Config, ConfigError, load_config
from mta.delivery import Deliverer
from mta.filemodes import warn_if_users_exposed
from mta.logs import log_event
from mta.resolver import make_resolver, resolve_targets
from mta.connectioncache import ConnectionCache
from mta.tlsctx import ServerCreator, certificate_expiry, client_context, server_context

# Warn this long before the relay's own certificate runs out.
EXPIRY_WARNING = datetime.timedelta(days=14)


@dataclass(frozen=True, slots=True)
class Running:
    """A configuration and everything built from it: swapped as one."""

    config: Config
    tls_creator: ServerCreator
    deliverer: Deliverer
    certificate_expires: datetime.datetime
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
        certificate_expires=certificate_expiry(config.tls.certificate),
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


def needs_restart(old: Config, new: Config) -> list[str]:
    """What ``new`` changes that a reload cannot apply, in words for the
    log; [] when everything applies."""
    changes = []
    before = {listener.name: listener for listener in old.listeners}
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
    if old.spool != new.spool:
        changes.append(f"spool moves from {old.spool} to {new.spool}")
    return changes


def _bound(listener: Any) -> str:
    return f"{listener.address}:{listener.port}"


def expiry_warning(
    path: Path, expires: datetime.datetime, now: datetime.datetime
) -> str | None:
    """The warning for the relay's own certificate, or None while it has
    more than `EXPIRY_WARNING` left."""
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    left = expires - now
    if left <= datetime.timedelta(0):
        return (f"tls.certificate {path} expired on {when}: clients that "
                "check it refuse STARTTLS with us; renew it, then reload "
                "(SIGHUP)")
    if left <= EXPIRY_WARNING:
        return (f"tls.certificate {path} expires on {when} "
                f"({_in_days(left.days)}); renew it, then reload (SIGHUP)")
    return None


def _in_days(days: int) -> str:
    if days == 0:
        return "in less than a day"
    return f"in {days} day{'' if days == 1 else 's'}"


def log_expiry(running: Running) -> None:
    warning = expiry_warning(
        running.config.tls.certificate,
        running.certificate_expires,
        datetime.datetime.now(datetime.UTC),
    )
    if warning is not None:
        log_event("warn", warning, "certificate-expiry")


# --- the reload itself ---------------------------------------------------


class Reloader:
    """Runs one reload at a time; a SIGHUP that comes during one asks for
    another after it, so the last version of the file always wins."""

    def __init__(
        self,
        reactor: Any,
        current: Callable[[], Running],
        install: Callable[[Running], None],
    ) -> None:
        self.reactor = reactor
        self.current = current
        self.install = install
        self._busy = False
        self._again = False

    def request(self) -> None:
        """Reload now, or after the reload under way.  Reactor thread."""
        if self._busy:
            self._again = True
            return
        self._busy = True
        path = self.current().config.path
        loading = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), load, path, self.reactor
        )
        loading.addCallbacks(self._loaded, self._refused, errbackArgs=(path,))
        loading.addBoth(self._done)

    def _loaded(self, running: Running) -> None:
        old = self.current().config
        self.install(running)
        log_event("info", f"reload: ok config={running.config.path}", "reload")
        for change in needs_restart(old, running.config):
            log_event("warn", f"reload: {change}: this needs a restart; until "
                      "then the relay runs as before on this point", "reload",
                      config=str(running.config.path))
        log_expiry(running)
        warn_if_users_exposed(running.config)

    def _refused(self, failure: Any, path: Path) -> None:
        error = failure.value
        if isinstance(error, ConfigError):
            # config= names the file: each problem says only where in it,
            # unless it is about another file (a recipient list).
            reason = "; ".join(problem.removeprefix(f"{path}: ")
                               for problem in error.problems)
        else:
            reason = f"{path}: {error!r}"
        # One line, whatever the YAML parser's message looks like.
        reason = re.sub(r"\s*\n\s*", " ", reason)
        log_event("error", f"reload: refused config={path}: {reason}; the "
                  "running configuration stays in force", "reload",
                  config=str(path))

    def _done(self, _: object) -> None:
        self._busy = False
        if self._again:
            self._again = False
            self.request()
