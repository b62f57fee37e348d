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
from typing import Any

from twisted.application import service
from twisted.internet import error as netError
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort
from twisted.python import usage

from mta import __version__, cpuaffinity
from mta.clientlimits import ClientConnections
from mta.authcheck import Verifier
from mta.authfailures import FailureTable
from mta.config import Config, ConfigError, default_config_path, load_config
from mta.destinations import Destinations
from mta.envelope import Envelope
from mta.filemodes import warn_if_key_exposed, warn_if_users_exposed
from mta.logs import log_event, use_text_observer
from mta.metrics import start_metrics
from mta.queue import QueueRunner
from mta.reload import Reloader, Running, build, log_certificate_warnings
from mta.smtpserver import RelayServerFactory
from mta.spool import MessageLock, Spool
from mta.spoolworker import SpoolWorker
from mta.stopping import stop_gracefully
from mta.workers import InheritedSocket, WorkerPool


class Options(usage.Options):
    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", None, "the configuration file (default etc/mta.yaml)"],
    ]

    def postOptions(self) -> None:
        use_text_observer()  # before twistd makes its log (mta.logs)
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

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        inherited: tuple[InheritedSocket, ...] | None = None,
        number: int = 1,
        cpus: tuple[int, ...] | None = None,
    ) -> None:
        # inherited: the listening sockets of a worker process started by
        # the first one (mta.workers); None in the first process, which
        # binds them itself.
        self.inherited = inherited
        self.number = number
        # The CPUs the first process started with (mta.cpuaffinity); a
        # worker is told them, since it starts on its parent's CPU.
        self.cpus = cpus
        self.cpu: int | None = None
        self.pool: WorkerPool | None = None
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.ports: list[IListeningPort] = []
        self.factories: list[RelayServerFactory] = []
        self.spool = Spool(config.spool)
        self.spool_worker = SpoolWorker(reactor, self.spool)
        self.destinations = Destinations()
        # One count for every listener: limits.client_connections is per
        # address, whichever port the client uses.
        self.clients = ClientConnections()
        # One bound on password checks and one memory of failed logins for
        # every listener (mta.authcheck, mta.authfailures).
        self.verifier = Verifier(reactor)
        self.auth_failures = FailureTable(reactor)
        self._install(build(config, reactor))
        self.queue = QueueRunner(
            reactor, self.spool, lambda: self.config, lambda: self.deliverer,
            spool_worker=self.spool_worker,
        )
        self.reloader = Reloader(reactor, lambda: self.live, self._install)

    def _install(self, running: Running) -> None:
        # One reactor step: no connection or attempt sees half of it.
        # Connections kept under the old settings are not handed out again.
        previous = getattr(self, "live", None)
        if previous is not None:
            previous.connections.close()
        self.live = running
        self.config = running.config
        self.tls_creator = running.tls_creator
        self.deliverer = running.deliverer
        # Each destination's health and turns outlive a configuration.
        self.deliverer.destinations = self.destinations

    def privilegedStartService(self) -> None:
        # Ports are bound here, before twistd drops privileges (-u/-g), so
        # an unprivileged relay can still listen on port 25.  The spool is
        # created later, as the user the relay runs as.
        # SIGHUP is caught before any port answers: one sent as soon as the
        # relay is seen listening must reload it, not kill it.
        self._reload_on_sighup()
        if self.inherited is not None:
            self._adopt_listeners(self.inherited)
            service.Service.privilegedStartService(self)
            return
        warn_if_key_exposed(self.config.tls.private_key)  # root sees every folder
        warn_if_users_exposed(self.config)
        for listener in self.config.listeners:
            factory = self._factory(listener)
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
            self.factories.append(factory)
        # Off unless configured; it serves until the process ends, so a
        # graceful stop can be watched draining.
        self.metrics = start_metrics(self.reactor, lambda: self.config, self.spool)
        service.Service.privilegedStartService(self)

    def _factory(self, listener: Any) -> RelayServerFactory:
        return RelayServerFactory(
            listener.name,
            lambda: self.config,
            self.spool,
            lambda: self.tls_creator,
            self._queued,
            reactor=self.reactor,
            clients=self.clients,
            verifier=self.verifier,
            auth_failures=self.auth_failures,
            tls_mode=listener.tls,
            spool_worker=self.spool_worker,
        )

    def _adopt_listeners(self, inherited: tuple[InheritedSocket, ...]) -> None:
        """A worker serves the sockets the first process bound, with the
        settings its configuration file now gives each listener by name.
        A listener the file has gained since is not served (the first
        process could not bind it either); one it has lost is closed."""
        self.metrics = None
        listeners = {listener.name: listener for listener in self.config.listeners}
        for socket_ in inherited:
            listener = listeners.get(socket_.name)
            if listener is None:
                os.close(socket_.descriptor)
                continue
            factory = self._factory(listener)
            port = self.reactor.adoptStreamPort(
                socket_.descriptor, socket_.family, factory
            )
            # The reactor holds its own copy of the socket now.
            os.close(socket_.descriptor)
            self.ports.append(port)
            self.factories.append(factory)

    def startService(self) -> None:
        self._open_spool()
        self._pin()  # before any thread is started: they stay on its CPU
        self.spool_worker.start()
        service.Service.startService(self)
        names = ", ".join(f"{listener.name}={listener.address}:{listener.port}"
                          f"/{listener.role}" for listener in self.config.listeners)
        who = (f"mta {__version__}" if self.number == 1
               else f"worker {self.number} (pid {os.getpid()})")
        log_event("info", f"{who} started: config={self.config.path} "
                  f"spool={self.config.spool} listeners={names}"
                  + (f" workers={self.config.workers}"
                     if self.config.workers > 1 and self.number == 1 else "")
                  + (f" cpu={self.cpu}" if self.cpu is not None else ""),
                  "start")
        if self.number == 1:
            log_certificate_warnings(self.live)
        self.queue.start()
        if self.inherited is None and self.config.workers > 1:
            self.pool = WorkerPool(
                self.reactor, self.config.path, self.config.workers,
                [(listener.name, listener.address, port) for listener, port
                 in zip(self.config.listeners, self.ports)],
                self.cpus,
            )
            self.pool.start()

    def stopService(self) -> Any:
        # twistd waits for the returned Deferred before closing the rest.
        service.Service.stopService(self)
        who = "mta" if self.number == 1 else f"worker {self.number}"
        log_event("info", f"{who} stopping", "stop")
        ports, self.ports = self.ports, []
        timeout = self.config.limits.stop_timeout
        stopped = Deferred.fromCoroutine(stop_gracefully(
            self.reactor, ports, self.factories, self.queue, timeout,
        ))
        stopped.addBoth(self._stopped)
        if self.pool is None:
            return stopped
        # The workers stop alongside, each as gracefully as this one.
        return DeferredList([stopped, self.pool.stop(timeout)])

    def _pin(self) -> None:
        if self.config.cpu_affinity != cpuaffinity.SPREAD:
            return
        if self.cpus is None:
            self.cpus = cpuaffinity.usable_cpus()
        self.cpu = cpuaffinity.pin(self.number, self.cpus)

    def _stopped(self, result: object) -> object:
        # Then QUIT to every delivery connection kept idle, and the spool
        # thread ends once its last batch is done.
        self.live.connections.close()
        self.spool_worker.stop()
        return result

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

    def _reload_on_sighup(self) -> None:
        # The handler runs between two bytecodes of whatever the reactor
        # was doing: it only asks the reactor to start the reload.
        def hangup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reloader.request)
            if self.pool is not None:
                self.reactor.callFromThread(self.pool.signal_all, signal.SIGHUP)

        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, hangup)

    def _queued(self, envelope: Envelope, lock: MessageLock | None) -> None:
        if lock is None:
            self.queue.wakeup(envelope.queue_id)
        else:
            self.queue.adopt(envelope, lock)
