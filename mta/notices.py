"""Which bounces and delay notices a message needs, as pure functions.

The rules:

- Every failed recipient is reported once, in one delivery status
  notification (a bounce) per message and queue run: the failures of one
  attempt go out together.  ``Recipient.notified`` records that its
  report was made, so no second bounce is made for it.
- A bounce goes to the envelope sender.  A message from the null sender
  ``<>`` (a bounce, or another automatic notice) never gets one (RFC 5321
  4.5.5, RFC 3464 section 2): its failures go to ``notices.postmaster``
  when that is set, as Postfix sends a "double bounce" to
  ``2bounce_notice_recipient``, or are dropped with a log line.  A notice
  to the postmaster that fails is always dropped, so notices never loop.
- A delay notice is optional (``notices.delay_warning``, off at 0): once
  per message, when it is older than that and some recipients are still
  waiting, at the first queue run after that moment.  Never for ``<>``.
- A message leaves the spool once every recipient is final and every
  failure reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from mta.config import Notices
from mta.envelope import FAILED, Client, Envelope, Recipient

FAILURE = "failure"
DELAY = "delay"

# The listener names of the messages the relay writes itself: a bounce or
# delay notice to a sender, and a notice to the postmaster about mail from
# <> that failed (Postfix's "2bounce").
BOUNCE_LISTENER = "bounce"
POSTMASTER_LISTENER = "2bounce"


@dataclass(frozen=True, slots=True)
class Notice:
    """One notice a message needs.

    ``to`` is None when no one may be told (the message is from ``<>``
    and no postmaster is configured, or it is itself a notice to the
    postmaster): the failures are then only logged.  ``to_postmaster``:
    the notice goes to the postmaster, not to the sender."""

    kind: str  # FAILURE or DELAY
    recipients: tuple[Recipient, ...]  # those it reports, in envelope order
    to: str | None
    to_postmaster: bool = False

    @property
    def listener(self) -> str:
        return POSTMASTER_LISTENER if self.to_postmaster else BOUNCE_LISTENER


def notices_due(
    envelope: Envelope, now: float, settings: Notices
) -> list[Notice]:
    """The notices to make now: a bounce for failures not yet reported,
    then a delay notice if one is due."""
    due = []
    failed = tuple(r for r in envelope.recipients
                   if r.state == FAILED and not r.notified)
    if failed:
        due.append(_bounce(envelope, failed, settings))
    waiting = tuple(r for r in envelope.recipients if not r.is_final)
    if waiting and delay_notice_due(envelope, now, settings):
        due.append(Notice(DELAY, waiting, envelope.sender))
    return due


def _bounce(
    envelope: Envelope, failed: tuple[Recipient, ...], settings: Notices
) -> Notice:
    if envelope.sender:
        return Notice(FAILURE, failed, envelope.sender)
    if settings.postmaster is None or is_postmaster_notice(envelope):
        return Notice(FAILURE, failed, None)
    return Notice(FAILURE, failed, settings.postmaster, to_postmaster=True)


def delay_notice_due(envelope: Envelope, now: float, settings: Notices) -> bool:
    return (
        settings.delay_warning > 0
        and bool(envelope.sender)
        and not envelope.delay_notified
        and now - envelope.arrival >= settings.delay_warning
        and not envelope.is_done
    )


def is_postmaster_notice(envelope: Envelope) -> bool:
    return envelope.sender == "" and envelope.client.listener == POSTMASTER_LISTENER


def mark_notified(envelope: Envelope, notice: Notice) -> Envelope:
    """The envelope once ``notice`` is written (or dropped)."""
    if notice.kind == DELAY:
        return replace(envelope, delay_notified=True)
    reported = {recipient.address for recipient in notice.recipients}
    return replace(envelope, recipients=tuple(
        replace(recipient, notified=True) if recipient.address in reported
        else recipient
        for recipient in envelope.recipients
    ))


def is_finished(envelope: Envelope) -> bool:
    """Every recipient final and every failure reported: it may go."""
    return envelope.is_done and all(
        recipient.notified for recipient in envelope.recipients
        if recipient.state == FAILED
    )


def discarded_line(envelope: Envelope, notice: Notice) -> str:
    """The one line logged for failures no one may be told of."""
    why = ("it is itself a notice to the postmaster"
           if is_postmaster_notice(envelope)
           else "notices.postmaster is not set")
    return (f"{envelope.queue_id}: bounce discarded: undeliverable mail from "
            f"the null sender <> ({why}); failed: "
            + _listed(notice.recipients))


def _listed(recipients: Iterable[Recipient]) -> str:
    return ", ".join(f"<{r.address}> dsn={r.dsn or '5.0.0'} ({r.reason or ''})"
                     for r in recipients)


def notified_line(queue_id: str, notice: Notice, notice_id: str) -> str:
    """As Postfix logs it: ``ID: sender non-delivery notification: ID2``."""
    who = "postmaster" if notice.to_postmaster else "sender"
    what = "delay" if notice.kind == DELAY else "non-delivery"
    return f"{queue_id}: {who} {what} notification: {notice_id}"


def notice_envelope(
    notice: Notice,
    original: Envelope,
    queue_id: str,
    size: int,
    hostname: str,
    now: float,
) -> Envelope:
    """The envelope of the notice itself: from the null sender (RFC 5321
    4.5.5), to the sender or the postmaster, taken in by the relay."""
    assert notice.to is not None
    client = Client(helo=hostname, host="localhost", address="127.0.0.1",
                    listener=notice.listener)
    return Envelope(
        queue_id=queue_id,
        sender="",
        arrival=now,
        size=size,
        client=client,
        recipients=(Recipient(notice.to),),
        extra={"notice": notice.kind, "about": original.queue_id},
    )
