"""Delivery connections kept between transactions, as Postfix's connection
cache keeps them (smtp_connection_cache_on_demand): a connection whose
transaction ended well waits a moment for the next message to the same
host, which then costs a RSET instead of a TCP connection, a greeting, an
EHLO and a TLS handshake.

The rules:

- A connection is kept only when its transaction ended with the session
  sound (the reply to the end of data came, or every recipient or the MAIL
  was refused) and only under the key of the settings it was opened with
  (`ClientSettings.reuse_key`: the policy level, the rule and the names a
  certificate must carry).  It is handed only to a transaction of the same
  host and the same key: never across policies.
- Before it is handed out, its TLS facts are checked again against the new
  transaction's settings (TLS required, the certificate verdict), so a kept
  connection never carries mail its TLS facts would not allow.
- At most `Reuse.messages` transactions on one connection; idle at most
  `Reuse.idle` seconds; not handed out once `Reuse.lifetime` seconds have
  passed since it was opened.  Idle connections are closed with QUIT.
- A kept connection that fails before its new transaction begins (the
  server closed it while idle, or refused the RSET) is not that
  transaction's failure: the transaction goes on a new connection.
- A new connection offers the TLS session of the last one to the same
  host under the same key, for `Reuse.tls_sessions` seconds, so that the
  server may resume it instead of a full handshake.  What the first, full
  handshake showed (the certificate and its chain verdict) goes with the
  session: a resumed connection is judged by the policy on those facts,
  never as though the certificate had been checked again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from mta.config import ConnectionReuse as Reuse
from mta.clientsession import (
    ClientSettings,
    Resumption,
    SessionResult,
    Target,
    Transaction,
)
from mta.smtpclient import DeliveryClient, Keeper, deliver

Connect = Callable[
    [Any, Target, Transaction, ClientSettings, Keeper | None],
    "Deferred[SessionResult]",
]


# TLS sessions kept at most: one per host and policy key.
MAX_TLS_SESSIONS = 1000


@dataclass(slots=True)
class _Idle:
    client: DeliveryClient
    timer: IDelayedCall


def fits(client: DeliveryClient, settings: ClientSettings) -> bool:
    """Whether ``client``'s TLS facts allow a transaction under
    ``settings``: the same key should guarantee it, and this makes sure."""
    tls = client.tls
    if settings.require_tls and tls is None:
        return False
    if settings.check_tls is not None:
        return tls is not None and settings.check_tls(tls) is None
    return True


class ConnectionCache:
    """The idle connections of one configuration, by host and key."""

    def __init__(self, reactor: Any, reuse: Reuse, connect: Connect = deliver) -> None:
        self._reactor = reactor
        self._reuse = reuse
        self._connect = connect
        self._idle: dict[tuple[Target, Hashable], list[_Idle]] = {}
        self._sessions: dict[tuple[Target, Hashable], tuple[Resumption, float]] = {}
        self._closed = False

    @property
    def idle(self) -> int:
        """How many connections wait for a transaction now."""
        return sum(len(entries) for entries in self._idle.values())

    def session(
        self, target: Target, transaction: Transaction, settings: ClientSettings
    ) -> Deferred[SessionResult]:
        """`mta.smtpclient.deliver`, on a kept connection when one fits."""
        client = self._take(target, settings)
        if client is None:
            return self._new(target, transaction, settings)
        return self._again(client, target, transaction, settings)

    def close(self) -> None:
        """Close every idle connection and keep no more (a stop, or a new
        configuration with a cache of its own)."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for entries in idle.values():
            for entry in entries:
                entry.timer.cancel()
                entry.client.retire()

    # --- the keeper's side (mta.smtpclient.Keeper) -------------------------

    def keep(self, client: DeliveryClient) -> bool:
        key = client.settings.reuse_key
        if (self._closed or key is None or client.uses >= self._reuse.messages
                or self._too_old(client)):
            return False
        entry_key = (client.target, key)
        timer = self._reactor.callLater(self._reuse.idle, self._expire,
                                        entry_key, client)
        self._idle.setdefault(entry_key, []).append(_Idle(client, timer))
        return True

    def lost(self, client: DeliveryClient) -> None:
        key = client.settings.reuse_key
        if key is not None:
            self._drop((client.target, key), client)

    def resumable(self, client: DeliveryClient, resumption: Resumption) -> None:
        key = client.settings.reuse_key
        if key is None or self._reuse.tls_sessions <= 0:
            return
        entry_key = (client.target, key)
        self._sessions.pop(entry_key, None)
        self._sessions[entry_key] = (
            resumption, self._reactor.seconds() + self._reuse.tls_sessions)
        # One per host and key, the oldest forgotten first.
        while len(self._sessions) > MAX_TLS_SESSIONS:
            del self._sessions[next(iter(self._sessions))]

    # --- internals ---------------------------------------------------------

    def _new(
        self, target: Target, transaction: Transaction, settings: ClientSettings
    ) -> Deferred[SessionResult]:
        if settings.reuse_key is None:
            return self._connect(self._reactor, target, transaction, settings, None)
        resumption = self._resumption((target, settings.reuse_key))
        if resumption is not None:
            settings = replace(settings, resume=resumption)
        return self._connect(self._reactor, target, transaction, settings, self)

    def _resumption(self, key: tuple[Target, Hashable]) -> Resumption | None:
        entry = self._sessions.get(key)
        if entry is None:
            return None
        resumption, until = entry
        if self._reactor.seconds() >= until:
            del self._sessions[key]
            return None
        return resumption

    def _again(
        self,
        client: DeliveryClient,
        target: Target,
        transaction: Transaction,
        settings: ClientSettings,
    ) -> Deferred[SessionResult]:
        done: Deferred[SessionResult] = Deferred(lambda _: client.abort())

        def on_result(result: SessionResult) -> Any:
            if result.stale_connection:
                return self._new(target, transaction, settings)
            return result

        done.addCallback(on_result)
        client.next_transaction(transaction, settings, done)
        return done

    def _take(self, target: Target, settings: ClientSettings) -> DeliveryClient | None:
        if settings.reuse_key is None:
            return None
        key = (target, settings.reuse_key)
        entries = self._idle.get(key, [])
        while entries:
            # The most recently used first: the likeliest to be alive.
            entry = entries.pop()
            entry.timer.cancel()
            if not entries:
                del self._idle[key]
            if fits(entry.client, settings) and not self._too_old(entry.client):
                return entry.client
            entry.client.retire()
        return None

    def _too_old(self, client: DeliveryClient) -> bool:
        return self._reactor.seconds() - client.opened >= self._reuse.lifetime

    def _expire(self, key: tuple[Target, Hashable], client: DeliveryClient) -> None:
        if self._drop(key, client):
            client.retire()

    def _drop(self, key: tuple[Target, Hashable], client: DeliveryClient) -> bool:
        entries = self._idle.get(key, [])
        for index, entry in enumerate(entries):
            if entry.client is client:
                del entries[index]
                if entry.timer.active():
                    entry.timer.cancel()
                if not entries:
                    del self._idle[key]
                return True
        return False
