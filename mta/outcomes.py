"""Every defer-or-bounce rule of the relay, as pure functions.

The rules (SPEC.md section 2):

- Hosts are tried in preference order.  Anything that fails before RCPT
  (connection, greeting, EHLO, STARTTLS, TLS, MAIL) moves on to the next
  host, whatever the code; only the last host's outcome decides: a 5xx from
  it fails the recipients, anything else defers them.
- RCPT replies are per recipient: 2xx accepted, 4xx deferred, 5xx failed.
  The reply after DATA applies to every recipient accepted in that
  transaction.  A 421 ends the connection and defers what is left.
- ``none`` never tries STARTTLS.  ``opportunistic`` delivers in plaintext to
  a host that does not offer STARTTLS; a host whose STARTTLS is refused or
  whose handshake fails is passed over.  When no host took the mail over
  TLS and one was passed over, the relay falls back to plaintext with the
  first host passed over, once the message is older than
  ``plaintext_fallback_delay``; before then the recipient is deferred, due
  again no later than arrival + the delay.  ``opportunistic_fallback:
  defer`` turns the fallback off.  The enforce levels never fall back.
- A deferred recipient is retried on ``retry_schedule`` (the last step
  repeats); once the message is older than ``max_lifetime`` a deferral
  becomes a failure: ``5.4.7`` for an ordinary one, ``5.7.x`` for a TLS
  one (the 4 of its status code becomes a 5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mta import envelope
from mta.config import Delivery
from mta.envelope import Attempt, Recipient
from mta.reply import Reply

SENT = "sent"
DEFERRED = "deferred"
BOUNCED = "bounced"

# What happens to recipients when no host took the mail.
FALLBACK_NOW = "now"
FALLBACK_LATER = "later"
NO_FALLBACK = "none"


def status_of(reply: Reply) -> str:
    if reply.is_success:
        return SENT
    return BOUNCED if reply.is_permanent else DEFERRED


@dataclass(frozen=True, slots=True)
class FallbackPlan:
    kind: str
    due: float | None = None  # for FALLBACK_LATER: when it may happen


def plan_fallback(
    level: str,
    mode: str,
    delay: float,
    arrival: float,
    now: float,
    passed_over: bool,
) -> FallbackPlan:
    """Whether to retry in plaintext a host that was passed over for its
    TLS, when no host took the mail."""
    if level != "opportunistic" or mode != "plaintext" or not passed_over:
        return FallbackPlan(NO_FALLBACK)
    if now - arrival >= delay:
        return FallbackPlan(FALLBACK_NOW)
    return FallbackPlan(FALLBACK_LATER, arrival + delay)


def next_attempt(
    deferrals: int, schedule: tuple[float, ...], now: float
) -> float:
    """``deferrals`` counts earlier deferrals; the last step repeats."""
    step = schedule[min(deferrals, len(schedule) - 1)]
    return now + step


def is_expired(arrival: float, now: float, max_lifetime: float) -> bool:
    return now - arrival >= max_lifetime


def expired_reply(last: Reply, max_lifetime: float) -> Reply:
    """The failure a deferral becomes once ``max_lifetime`` has run out."""
    subject, detail = last.dsn.split(".")[1:]
    dsn = f"5.{subject}.{detail}" if subject == "7" else "5.4.7"
    days = max_lifetime / 86400
    span = f"{days:g} days" if days >= 1 else f"{max_lifetime:g} seconds"
    return Reply(
        550 if subject == "7" else 554,
        dsn,
        f"message expired after {span} in the queue; last problem: "
        f"{last.text}",
    )


def deferral_due(
    deferrals: int,
    schedule: tuple[float, ...],
    now: float,
    fallback_due: float | None,
) -> float:
    """When a deferred recipient is due again: the retry schedule, but no
    later than the moment a plaintext fallback becomes allowed."""
    due = next_attempt(deferrals, schedule, now)
    return due if fallback_due is None else min(due, max(fallback_due, now))


def settle(
    recipient: Recipient,
    attempt: Attempt,
    arrival: float,
    now: float,
    delivery: Delivery,
    not_after: float | None = None,
) -> tuple[Recipient, Attempt]:
    """The recipient's new state after ``attempt``, and the attempt as it
    is recorded (a deferral past ``max_lifetime`` is recorded as a bounce)."""
    if attempt.status == DEFERRED and is_expired(
        arrival, now, delivery.max_lifetime
    ):
        expired = expired_reply(
            Reply(451, attempt.dsn, attempt.reply), delivery.max_lifetime
        )
        attempt = replace(
            attempt, status=BOUNCED, dsn=expired.dsn, reply=expired.text
        )

    history = (*recipient.history, attempt)
    if attempt.status == SENT:
        state = replace(recipient, state=envelope.DELIVERED, next_attempt=None)
    elif attempt.status == BOUNCED:
        state = replace(recipient, state=envelope.FAILED, next_attempt=None)
    else:
        due = deferral_due(
            recipient.deferrals(), delivery.retry_schedule, now, not_after
        )
        state = replace(recipient, state=envelope.DEFERRED, next_attempt=due)
    return (
        replace(state, reason=attempt.reply, dsn=attempt.dsn, history=history),
        attempt,
    )
