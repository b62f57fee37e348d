# Twisted's cred and thread modules carry no type hints.
# mypy: disallow-untyped-calls=False
"""Checking a login against the users file, through Twisted's cred.

The listener asks a `Portal` for an `ISubmitter` with `UsernamePassword`
credentials; `UsersChecker` (an `ICredentialsChecker`) looks the name up in
the users file and has the password checked by a `Verifier`, which runs
scrypt off the reactor thread.  An unknown name is checked against the
file's decoy hash: the same work, then a refusal, so neither the reply nor
its time tells which names exist.

A `Verifier` has a thread pool of its own (`THREADS` threads: each hash
holds 32 MiB for a third of a second) and takes at most `WAITING` logins
waiting beyond those; past that it refuses at once with `VerifierBusy`
(answered 454 4.7.0), so a flood of attempts costs neither unbounded
memory nor the threads the spool commits run in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from mta.passwords import PasswordHash, verify_password
from mta.users import Users

THREADS = 2
WAITING = 32


class ISubmitter(Interface):
    """A client that logged in on a submission listener."""


@implementer(ISubmitter)
@dataclass(frozen=True, slots=True)
class Submitter:
    user: str


class UnknownUser(UnauthorizedLogin):
    """No such name in the users file (for the log only: the client gets
    the same 535 as for a wrong password)."""


class WrongPassword(UnauthorizedLogin):
    pass


class VerifierBusy(Exception):
    """Too many logins are being checked already; try again later."""


RunInThread = Callable[..., "Deferred[bool]"]


class Verifier:
    """Runs `verify_password` in a bounded thread pool of its own.
    ``run`` replaces the pool (tests run the check at once)."""

    def __init__(
        self,
        reactor: Any,
        threads: int = THREADS,
        waiting: int = WAITING,
        run: RunInThread | None = None,
    ) -> None:
        self.reactor = reactor
        self.limit = threads + waiting
        self.pending = 0
        self._threads = threads
        self._pool: ThreadPool | None = None
        self._run = run or self._in_pool

    def verify(self, password: bytes, stored: PasswordHash) -> Deferred[bool]:
        if self.pending >= self.limit:
            return fail(VerifierBusy(f"{self.pending} logins being checked"))
        self.pending += 1
        checked = self._run(verify_password, password, stored)
        checked.addBoth(self._done)
        return checked

    def _done(self, result: Any) -> Any:
        self.pending -= 1
        return result

    def _in_pool(self, function: Callable[..., bool], *args: Any) -> Deferred[bool]:
        if self._pool is None:
            # Started at the first login, stopped with the reactor, as the
            # reactor's own pool is.
            self._pool = ThreadPool(0, self._threads, name="mta-auth")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return deferToThreadPool(self.reactor, self._pool, function, *args)


@implementer(ICredentialsChecker)
class UsersChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: Users, verifier: Verifier) -> None:
        self.users = users
        self.verifier = verifier

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        name: str = credentials.username.decode("utf-8", "replace")
        stored, known = self.users.lookup(name)
        checked = self.verifier.verify(credentials.password, stored)

        def verdict(matches: bool) -> str:
            if not known:
                raise UnknownUser(name)
            if not matches:
                raise WrongPassword(name)
            return name

        return checked.addCallback(verdict)


@implementer(IRealm)
class SubmitterRealm:
    def requestAvatar(
        self, avatarId: Any, mind: Any, *interfaces: Any
    ) -> tuple[Any, Submitter, Callable[[], None]]:
        if ISubmitter not in interfaces:
            raise NotImplementedError("only ISubmitter avatars are made here")
        return ISubmitter, Submitter(str(avatarId)), lambda: None


def make_portal(users: Users, verifier: Verifier) -> Portal:
    return Portal(SubmitterRealm(), [UsersChecker(users, verifier)])
