# Twisted's cred carries no type hints.
# mypy: disallow-untyped-calls=False
"""SMTP AUTH on one listener connection: the glue between the protocol in
`mta.smtpserver`, the pure SASL steps of `mta.sasl`, the cred portal of
`mta.authcheck` and the slowdown of `mta.authfailures`.

The protocol hands over the AUTH command and, while an exchange is under
way, every line the client sends (its responses to 334); `AuthSession`
answers through the `AuthHost` the protocol is.  While a password is being
checked, or a failure waits out its delay, the protocol holds its input,
so that replies stay in command order.

Nothing here logs a credential: a failure is logged with the client's
address and the user name it gave, never the password or the base64 it
came in.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta import sasl
from mta.authcheck import ISubmitter, UnknownUser, VerifierBusy, WrongPassword
from mta.authfailures import FailureTable, failure_delay, session_closes
from mta.config import Limits
from mta.logs import log_event
from mta.reply import Reply

_log = Logger(namespace="mta.smtpauth")

# RFC 4954 4: an AUTH command line, and a response line, may be up to
# 12,288 octets (initial responses of large tokens); the CRLF counts.
MAX_AUTH_LINE = 12288

# User names as the client typed them go into a log line: keep them short
# and printable, so no one can write our log with what they send.
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
MAX_LOGGED_NAME = 64


class AuthHost(Protocol):
    """What the protocol does for an AUTH exchange."""

    def reply_auth(self, reply: Reply, logged: bool) -> None: ...

    def send_challenge(self, prompt: str) -> None: ...

    def hold_input(self) -> None: ...

    def release_input(self) -> None: ...

    def close_with(self, reply: Reply) -> None: ...


class AuthSession:
    """The AUTH state of one connection: who logged in, the exchange under
    way, the failures so far."""

    def __init__(
        self,
        host: AuthHost,
        portal: Portal | None,
        failures: FailureTable,
        limits: Limits,
        clock: Any,
        client: str,
        client_address: str,
        listener: str,
    ) -> None:
        self.host = host
        self.portal = portal
        self.failures = failures
        self.limits = limits
        self.clock = clock
        self.client = client  # unknown[192.0.2.1], for the log
        self.client_address = client_address
        self.listener = listener
        self.user: str | None = None
        self._state: sasl.State | None = None
        self._mechanism = ""
        self._session_failures = 0
        self._delay: Deferred[None] | None = None
        self._gone = False

    @property
    def offered(self) -> bool:
        return self.portal is not None

    @property
    def in_exchange(self) -> bool:
        """A 334 was sent: the next line is the client's response."""
        return self._state is not None

    def ehlo_keyword(self, tls: bool) -> str | None:
        # RFC 4954 4 and RFC 8314: offered only where the password travels
        # encrypted.
        if self.offered and tls:
            return "AUTH " + " ".join(sasl.MECHANISMS)
        return None

    def reset(self) -> None:
        """STARTTLS: nothing said before it counts (RFC 3207 4.2)."""
        self.user = None
        self._state = None

    def cancel(self) -> None:
        """The connection is gone: no late reply, no timer left."""
        self._state = None
        self._gone = True
        if self._delay is not None:
            self._delay.cancel()

    # --- the command and its responses -------------------------------

    def command(
        self, argument: str, *, tls: bool, greeted: bool, in_transaction: bool
    ) -> None:
        refusal = sasl.auth_refusal(
            offered=self.offered,
            tls=tls,
            greeted=greeted,
            in_transaction=in_transaction,
            authenticated=self.user is not None,
        )
        if refusal is not None:
            self.host.reply_auth(refusal, logged=True)
            return
        self._mechanism = (argument.split() or [""])[0].upper()
        self._step(sasl.begin(argument))

    def response(self, line: bytes, bad_line: Reply | None) -> None:
        """The client's line after a 334; ``bad_line`` when it was too long
        or held a bare CR or LF, which ends the exchange."""
        state, self._state = self._state, None
        assert state is not None
        if bad_line is not None:
            self.host.reply_auth(bad_line, logged=True)
            return
        self._step(sasl.respond(state, line.decode("ascii", "replace")))

    def _step(self, step: sasl.Step) -> None:
        if isinstance(step, sasl.Challenge):
            self._state = step.state
            self.host.send_challenge(step.prompt)
        elif isinstance(step, sasl.Refusal):
            self.host.reply_auth(step.reply, logged=True)
        elif isinstance(step, sasl.Denied):
            self.host.hold_input()
            self._failed(step.mechanism, step.user, step.reason)
        else:
            self._check(step)

    # --- checking the password ---------------------------------------

    def _check(self, credentials: sasl.Credentials) -> None:
        assert self.portal is not None
        self.host.hold_input()
        login = self.portal.login(
            UsernamePassword(credentials.user.encode("utf-8"), credentials.password),
            None,
            ISubmitter,
        )
        login.addCallbacks(
            self._succeeded,
            self._not_succeeded,
            callbackArgs=(credentials,),
            errbackArgs=(credentials,),
        )
        login.addErrback(self._unexpected)

    def _succeeded(self, result: Any, credentials: sasl.Credentials) -> None:
        _, avatar, _ = result
        self.user = avatar.user
        self.failures.succeeded(self.client_address)
        log_event(
            "info",
            f"{self.client}: SASL {credentials.mechanism} authentication "
            f"succeeded: sasl_username={_loggable(avatar.user)} "
            f"listener={self.listener}",
            "auth",
            client=self.client,
            sasl_username=avatar.user,
        )
        self.host.reply_auth(sasl.SUCCEEDED, logged=False)
        self.host.release_input()

    def _not_succeeded(self, failure: Failure, credentials: sasl.Credentials) -> None:
        if failure.check(UnknownUser):
            self._failed(credentials.mechanism, credentials.user, "unknown user")
            return
        if failure.check(WrongPassword):
            self._failed(credentials.mechanism, credentials.user, "wrong password")
            return
        if failure.check(VerifierBusy):
            reason = f"too many logins being checked ({failure.value})"
        else:
            _log.failure("checking a login from {client}", failure,
                         client=self.client)
            reason = f"internal error: {failure.getErrorMessage()}"
        log_event(
            "warn",
            f"{self.client}: SASL {credentials.mechanism} authentication not "
            f"checked: sasl_username={_loggable(credentials.user)} "
            f"listener={self.listener} ({reason}); answered "
            f"{sasl.TEMPORARY_FAILURE}",
            "auth",
            client=self.client,
        )
        self.host.reply_auth(sasl.TEMPORARY_FAILURE, logged=False)
        self.host.release_input()

    def _unexpected(self, failure: Failure) -> None:
        _log.failure("after an AUTH command", failure)

    # --- a failed login ------------------------------------------------

    def _failed(self, mechanism: str, user: str, reason: str) -> None:
        """Logged at once; answered after the delay, 535 or, at the limit,
        421 and the end of the session.  Input is held meanwhile."""
        failures = self.failures.record(self.client_address)
        self._session_failures += 1
        delay = failure_delay(failures, self.limits)
        log_event(
            "warn",
            f"warning: {self.client}: SASL {mechanism} authentication failed: "
            f"sasl_username={_loggable(user)} listener={self.listener} "
            f"failures={failures} delay={delay:g}s ({reason})",
            "auth_failed",
            client=self.client,
            sasl_username=user,
            failures=failures,
        )
        if delay <= 0 or self._gone:
            self._answer_failure()
            return
        self._delay = deferLater(self.clock, delay, lambda: None)
        self._delay.addCallbacks(lambda _: self._answer_failure(), self._cancelled)

    def _answer_failure(self) -> None:
        self._delay = None
        if session_closes(self._session_failures, self.limits):
            # The host puts its name first, as in every 421 (RFC 5321 3.8).
            self.host.close_with(Reply(
                421, "4.7.0",
                f"Error: too many failed authentications "
                f"({self._session_failures}); closing connection",
            ))
            return
        self.host.reply_auth(sasl.FAILED, logged=False)
        self.host.release_input()

    def _cancelled(self, failure: Failure) -> None:
        self._delay = None
        failure.trap(CancelledError)


def _loggable(name: str) -> str:
    return _UNPRINTABLE.sub("?", name)[:MAX_LOGGED_NAME] or "?"
