"""The running relay: listeners and the queue runner around one spool.

``twistd mta --config FILE`` builds this through the plugin in
``twisted/plugins/mta_plugin.py``.  The configuration is read and checked in
`Options.postOptions`, so a bad file stops twistd with the error before
anything starts.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from typing import Any

from twisted.application import service
from twisted.internet import error as netError
from twisted.internet.interfaces import IListeningPort
from twisted.python import usage

from mta import __version__
from mta.config import Config, ConfigError, default_config_path, load_config
from mta.delivery import Deliverer
from mta.envelope import Envelope
from mta.logs import log_event
from mta.queue import QueueRunner
from mta.resolver import make_resolver, resolve_targets
from mta.smtpclient import deliver
from mta.smtpserver import RelayServerFactory
from mta.spool import Spool
from mta.tlsctx import ServerCreator, client_context, server_context


class Options(usage.Options):
    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", None, "the configuration file (default etc/mta.yaml)"],
    ]

    def postOptions(self) -> None:
        path = self["config"] or default_config_path()
        try:
            self["loaded"] = load_config(path)
        except ConfigError as error:
            # Not a UsageError: twistd would print its whole usage first.
            sys.stderr.write(f"mta: not started: bad configuration\n{error}\n")
            raise SystemExit(1) from None


def makeService(options: Options) -> service.IService:
    return RelayService(options["loaded"])


class RelayService(service.Service):
    """Everything of one relay process.  The current configuration and the
    objects built from it are swapped whole (a later reload replaces them);
    listeners and the queue ask for them per connection and per attempt."""

    def __init__(self, config: Config, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.ports: list[IListeningPort] = []
        self.spool = Spool(config.spool)
        self._install(config)
        self.queue = QueueRunner(
            reactor, self.spool, lambda: self.config, lambda: self.deliverer
        )

    def _install(self, config: Config) -> None:
        self.config = config
        self.tls_creator = ServerCreator(server_context(config.tls))
        resolver = make_resolver(config.nameservers)
        self.deliverer = Deliverer(
            config=config,
            tls_context=client_context(config.tls),
            resolve=partial(resolve_targets, resolver),
            session=partial(deliver, self.reactor),
        )

    def privilegedStartService(self) -> None:
        # Ports are bound here, before twistd drops privileges (-u/-g), so
        # an unprivileged relay can still listen on port 25.  The spool is
        # created later, as the user the relay runs as.
        for listener in self.config.listeners:
            factory = RelayServerFactory(
                listener.name,
                lambda: self.config,
                self.spool,
                lambda: self.tls_creator,
                self._queued,
                reactor=self.reactor,
            )
            try:
                port = self.reactor.listenTCP(
                    listener.port, factory, interface=listener.address
                )
            except netError.CannotListenError as error:
                sys.stderr.write(
                    f"mta: not started: {self.config.path}: listener "
                    f"{listener.name}: cannot listen on {listener.address}:"
                    f"{listener.port}: {error.socketError}\n"
                )
                raise SystemExit(1) from None
            self.ports.append(port)
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        self._open_spool()
        service.Service.startService(self)
        self._ignore_sighup()
        names = ", ".join(f"{listener.name}={listener.address}:{listener.port}"
                          f"/{listener.role}" for listener in self.config.listeners)
        log_event("info", f"mta {__version__} started: config={self.config.path} "
                  f"spool={self.config.spool} listeners={names}", "start")
        self.queue.start()

    def stopService(self) -> Any:
        service.Service.stopService(self)
        for port in self.ports:
            port.stopListening()
        self.ports = []
        log_event("info", "mta stopping", "stop")
        return self.queue.stop()

    def _open_spool(self) -> None:
        try:
            self.spool.create()
            self.spool.check_writable()
        except OSError as error:
            sys.stderr.write(
                f"mta: not started: {self.config.path}: spool: cannot use "
                f"{self.config.spool} as uid {os.getuid()}: {error.strerror}; "
                "create it and give it to the user the relay runs as "
                "(twistd -u/-g)\n"
            )
            raise SystemExit(1) from None

    def _ignore_sighup(self) -> None:
        # Until reload exists, a SIGHUP (logrotate sends them) must not stop
        # the relay, which is its default action.
        def hangup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(
                log_event, "warn", "SIGHUP: reload is not supported yet; the "
                "running configuration stays in force", "reload")

        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, hangup)

    def _queued(self, envelope: Envelope) -> None:
        self.queue.wakeup(envelope.queue_id)
