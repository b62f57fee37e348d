"""Delivering one message's recipients: group them, find the servers, drop
those that are the relay itself (`mta.ownendpoints`), try the rest in order
under the group's policy, and say what became of each recipient.  The rules
it applies live in `mta.outcomes`; this module only gathers facts (DNS,
SMTP sessions) and acts on those rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from OpenSSL import SSL
from twisted.internet.defer import Deferred

from mta import outcomes
from mta.clientsession import (
    ClientSettings,
    SessionFailure,
    SessionResult,
    Target,
    TLSSession,
    Transaction,
)
from mta.config import Config
from mta.destinations import (
    DEFER,
    FAILED,
    NEUTRAL,
    Admission,
    Destinations,
    Manners,
    Outcome,
    destination_name,
    session_outcome,
)
from mta.envelope import Attempt, Envelope
from mta.nexthop import NextHop, domain_of, next_hop
from mta.outcomes import FALLBACK_LATER, FALLBACK_NOW, plan_fallback, status_of
from mta.ownendpoints import (
    IsLocal,
    bound_locally,
    endpoint_for,
    loop_reason,
    without_ourselves,
)
from mta.policy import PolicyChoice, choose_policy
from mta.resolver import LookupFailed
from mta.tlsverdict import (
    ESTABLISHED,
    FALLBACK_CANDIDATE,
    HANDSHAKE_FAILED,
    NOT_OFFERED,
    PASS_OVER,
    REFUSED,
    judge_trust,
    reference_names,
    required_by,
    secure_refusal,
    verdict,
)

ENFORCED = ("enforce-tls", "enforce-secure")


@dataclass(frozen=True, slots=True)
class Group:
    """Recipients that share a domain, a next hop and a policy, and so one
    transaction (SPEC.md section 3)."""

    domain: str
    next_hop: NextHop
    policy: PolicyChoice
    recipients: tuple[str, ...]


def group_recipients(config: Config, addresses: list[str]) -> list[Group]:
    groups: dict[tuple[str, NextHop, PolicyChoice], list[str]] = {}
    for address in addresses:
        domain = domain_of(address)
        key = (domain, next_hop(config, domain), choose_policy(config, address))
        groups.setdefault(key, []).append(address)
    return [Group(domain, hop, policy, tuple(recipients))
            for (domain, hop, policy), recipients in groups.items()]


Session = Callable[[Target, Transaction, ClientSettings], "Deferred[SessionResult]"]
Resolve = Callable[[NextHop], "Deferred[list[Target]]"]


@dataclass(frozen=True, slots=True)
class GroupResult:
    """What one attempt did for each recipient of a group; ``not_after``
    is the latest time a deferred recipient may be retried (the moment a
    plaintext fallback becomes allowed)."""

    attempts: dict[str, Attempt]
    not_after: float | None = None


@dataclass
class Deliverer:
    """Delivers groups with one configuration's settings and contexts.
    ``destinations`` outlives a configuration: the relay passes the same
    table to each new Deliverer."""

    config: Config
    tls_context: SSL.Context
    resolve: Resolve
    session: Session
    clock: Callable[[], float] = time.time
    destinations: Destinations = field(default_factory=Destinations)
    is_local: IsLocal = bound_locally  # is an address this machine's?

    def admit(self, group: Group) -> Admission:
        """A turn of the group's destination: GO (then `deliver` with it),
        DEFER (`deliver` records why, without trying) or WAIT (no free
        turn now: see `Destinations.when_free`)."""
        # One turn per delivery: its sessions (one host after another) are
        # never more than one at a time.
        return self.destinations.try_enter(
            group.next_hop, destination_name(group.next_hop),
            Manners.of(self.config.delivery))

    async def deliver(
        self, envelope: Envelope, group: Group, body: Path, admission: Admission
    ) -> GroupResult:
        """Deliver under ``admission`` (from `admit`; never WAIT), and give
        the turn back."""
        if admission.kind == DEFER:
            return self._not_tried(group, admission)

        outcome = Outcome(NEUTRAL)
        try:
            result, outcome = await self._deliver(envelope, group, body)
        finally:
            self.destinations.leave(group.next_hop, destination_name(group.next_hop),
                                    outcome, Manners.of(self.config.delivery))
        return result

    async def _deliver(
        self, envelope: Envelope, group: Group, body: Path
    ) -> tuple[GroupResult, Outcome]:
        try:
            targets = await self.resolve(group.next_hop)
        except LookupFailed as error:
            reply = error.reply
            attempt = self._attempt(group, status_of(reply), reply.dsn,
                                    reply.text)
            # A lookup that failed for now (SERVFAIL, no answer in time)
            # counts against the destination; one that failed for good
            # says nothing about it.
            outcome = (Outcome(FAILED, reply.text, reply.dsn)
                       if reply.is_temporary else Outcome(NEUTRAL))
            return self._everyone(group, attempt), outcome

        check = without_ourselves(targets, self.config.own_endpoints,
                                  self.is_local)
        if check.ourselves and not check.left:
            return self._loops_back(group, check.ourselves[0]), Outcome(NEUTRAL)

        transaction = Transaction(
            sender=envelope.sender,
            recipients=group.recipients,
            body_path=body,
            # Checked against the file when the envelope was read.
            size=envelope.size,
            body_8bit=envelope.body == "8BITMIME",
        )
        sessions: list[SessionResult] = []
        result = await self._try_hosts(envelope, group, list(check.left),
                                       transaction, sessions)
        return result, session_outcome(sessions)

    async def _try_hosts(
        self,
        envelope: Envelope,
        group: Group,
        targets: list[Target],
        transaction: Transaction,
        sessions: list[SessionResult],
    ) -> GroupResult:
        """Tries the hosts in order; ``sessions`` gathers every session's
        result, for the destination's health."""
        level = group.policy.level
        passed_over: tuple[Target, SessionResult] | None = None
        last: tuple[Target, SessionResult] | None = None

        for target in targets:
            result = await self.session(
                target, transaction, self._settings(group, target, level)
            )
            sessions.append(result)
            if not result.failed_before_recipients:
                return self._results(group, target, result, None)
            if (passed_over is None and
                    verdict(level, _tls_outcome(result)) == FALLBACK_CANDIDATE):
                passed_over = (target, result)
            last = (target, result)

        delivery = self.config.delivery
        plan = plan_fallback(
            level, delivery.opportunistic_fallback,
            delivery.plaintext_fallback_delay, envelope.arrival, self.clock(),
            passed_over is not None,
        )
        if plan.kind == FALLBACK_NOW and passed_over is not None:
            target, first = passed_over
            result = await self.session(
                target, transaction, self._settings(group, target, "none")
            )
            sessions.append(result)
            if not result.failed_before_recipients:
                return self._results(group, target, result,
                                     _fallback_reason(first))
            last = (target, result)

        assert last is not None, "a next hop always has at least one target"
        attempt = self._session_failure(group, *last)
        if plan.kind == FALLBACK_LATER:
            attempt = _awaiting_fallback(attempt, plan.due)
            return GroupResult(self._everyone(group, attempt).attempts, plan.due)
        return self._everyone(group, attempt)

    # --- settings per host --------------------------------------------

    def _settings(self, group: Group, target: Target, level: str) -> ClientSettings:
        names = self._names(group, target)

        def check_tls(session: TLSSession) -> str | None:
            # The verdict is taken in the handshake, before EHLO or MAIL.
            trust = judge_trust(session.peer_certificate,
                                session.verify_error, names)
            if verdict(level, ESTABLISHED, trust.trust) != PASS_OVER:
                return None
            refusal = secure_refusal(trust, target.name, names,
                                     session.verify_reason)
            return f"{required_by(level, group.policy.rule)}: {refusal}"

        return ClientSettings(
            helo=self.config.hostname,
            tls_context=self.tls_context if level != "none" else None,
            starttls=level != "none",
            require_tls=verdict(level, NOT_OFFERED) == PASS_OVER,
            timeouts=self.config.delivery.timeouts,
            check_tls=check_tls if level == "enforce-secure" else None,
            transcript=self.config.log_transcript,
            # A kept connection serves only the same level, rule and names.
            reuse_key=(level, group.policy.rule, names),
        )

    def _names(self, group: Group, target: Target) -> tuple[str, ...]:
        return reference_names(
            group.domain, target.name, group.next_hop.configured_names,
            group.policy.match,
        )

    # --- turning session results into attempts ------------------------

    def _attempt(
        self,
        group: Group,
        status: str,
        dsn: str,
        reply: str,
        target: Target | None = None,
        result: SessionResult | None = None,
        fallback: str | None = None,
    ) -> Attempt:
        tls = trust = matched = None
        if result is not None and result.tls is not None and target is not None:
            tls = result.tls.facts
            verdict = judge_trust(result.tls.peer_certificate,
                                  result.tls.verify_error,
                                  self._names(group, target))
            trust, matched = verdict.trust, verdict.matched
        return Attempt(
            time=self.clock(),
            status=status,
            dsn=dsn,
            reply=reply,
            policy=group.policy.level,
            relay=_relay(target),
            tls=tls,
            trust=trust,
            matched=matched,
            rule=group.policy.rule,
            fallback=fallback,
            connected=result is not None and _connected(result),
        )

    def _loops_back(self, group: Group, us: Target) -> GroupResult:
        """Every recipient bounces, without a connection: the servers left
        are this relay, and the mail would only come round again."""
        own = endpoint_for(us.address, us.port, self.config.own_endpoints,
                           self.is_local)
        reason = loop_reason(group.domain, us, own)
        return self._everyone(group, self._attempt(
            group, outcomes.BOUNCED, "5.4.6", reason))

    def _not_tried(self, group: Group, admission: Admission) -> GroupResult:
        return self._everyone(group, self._attempt(
            group, outcomes.DEFERRED, admission.dsn, admission.reason))

    def _everyone(self, group: Group, attempt: Attempt) -> GroupResult:
        return GroupResult({recipient: attempt for recipient in group.recipients})

    def _results(
        self,
        group: Group,
        target: Target,
        result: SessionResult,
        fallback: str | None,
    ) -> GroupResult:
        attempts = {}
        for recipient in group.recipients:
            reply = result.reply_for(recipient)
            if reply is None:
                # The connection broke without a reply: try again later.
                status, dsn = outcomes.DEFERRED, _deferral_dsn(result)
            else:
                status, dsn = status_of(reply), reply.dsn
            attempts[recipient] = self._attempt(
                group, status, dsn, result.reason_for(recipient), target,
                result, fallback,
            )
        return GroupResult(attempts)

    def _session_failure(
        self, group: Group, target: Target, result: SessionResult
    ) -> Attempt:
        failure = result.failure
        assert failure is not None
        reason = failure.reason
        level = group.policy.level
        if (level in ENFORCED and failure.stage in TLS_STAGES
                and not _server_closing(failure)):
            # Never a bounce on the server's word here: the policy refused
            # the host, and the next attempt may find a good one.
            status, dsn = outcomes.DEFERRED, _deferral_dsn(result)
            if failure.stage != "TLS policy":  # that reason already says so
                reason = f"{required_by(level, group.policy.rule)}: {reason}"
        elif failure.reply is not None and failure.reply.is_permanent:
            status, dsn = outcomes.BOUNCED, failure.reply.dsn
        else:
            status, dsn = outcomes.DEFERRED, _deferral_dsn(result)
        return self._attempt(group, status, dsn, reason, target, result)


TLS_STAGES = ("STARTTLS", "TLS handshake", "TLS policy")


def _tls_outcome(result: SessionResult) -> str:
    """What the TLS part of a session came to, from the client's facts."""
    if result.tls is not None:
        return ESTABLISHED
    if result.tls_failure is None:
        return NOT_OFFERED
    failure = result.failure
    if failure is not None and failure.stage == "STARTTLS":
        return REFUSED
    return HANDSHAKE_FAILED


def _connected(result: SessionResult) -> bool:
    return result.failure is None or result.failure.stage != "connect"


def _relay(target: Target | None) -> str | None:
    if target is None:
        return None
    return f"{target.name}[{target.address}]:{target.port}"


def _server_closing(failure: SessionFailure) -> bool:
    # RFC 5321 3.8: a 421 is the server closing the channel, whatever we
    # were doing; at STARTTLS it is no TLS refusal and not the policy's doing.
    return failure.reply is not None and failure.reply.code == 421


def _deferral_dsn(result: SessionResult) -> str:
    failure = result.failure
    if failure is None:
        return "4.4.2"
    if _server_closing(failure):
        assert failure.reply is not None
        return failure.reply.dsn
    if failure.stage == "TLS policy" and result.tls is not None:
        # A session was made and its certificate refused (enforce-secure):
        # X.7.5, as Postfix reports an untrusted or unmatched certificate.
        return "4.7.5"
    if failure.stage in ("STARTTLS", "TLS policy"):
        return "4.7.4"
    if failure.stage == "TLS handshake":
        return "4.7.5"
    if failure.reply is not None and failure.reply.is_temporary:
        return failure.reply.dsn
    return "4.4.1" if failure.stage == "connect" else "4.4.2"


def _fallback_reason(result: SessionResult) -> str:
    if _tls_outcome(result) == REFUSED:
        return "starttls-refused"
    return "tls-handshake-failed"


def _awaiting_fallback(attempt: Attempt, due: float | None) -> Attempt:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(due or 0))
    return replace(
        attempt,
        status=outcomes.DEFERRED,
        dsn="4.7.5",
        reply=f"{attempt.reply}; TLS failed with every host, plaintext "
        f"fallback allowed from {when}",
    )
