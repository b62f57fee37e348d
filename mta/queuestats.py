"""How many messages the spool holds in each state, and how old the oldest
of each is: a pure summary of envelopes, for the metrics and anyone else.

A message's state is the one an operator acts on, first that applies:

- ``held``: put on hold (``mta queue hold``, or after an internal error);
- ``deferred``: some recipient was tried and must be tried again;
- ``pending``: some recipient has not been tried yet;
- ``failed``: every recipient is done and some failed (kept for the
  operator).

A message whose recipients were all delivered is about to be removed and
is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from mta.envelope import DEFERRED, FAILED, PENDING, Envelope

HELD = "held"
STATES = (PENDING, DEFERRED, HELD, FAILED)


@dataclass(frozen=True, slots=True)
class QueueSummary:
    messages: dict[str, int]  # every state of STATES, 0 when none
    oldest_arrival: dict[str, float]  # only the states that have messages

    def oldest_age(self, state: str, now: float) -> float:
        """Seconds since the oldest message of ``state`` arrived; 0 when
        there is none."""
        arrival = self.oldest_arrival.get(state)
        return 0.0 if arrival is None else max(0.0, now - arrival)


def message_state(envelope: Envelope) -> str | None:
    if envelope.hold:
        return HELD
    states = {recipient.state for recipient in envelope.recipients}
    for state in (DEFERRED, PENDING, FAILED):
        if state in states:
            return state
    return None


def summarize(envelopes: Iterable[Envelope]) -> QueueSummary:
    messages = dict.fromkeys(STATES, 0)
    oldest: dict[str, float] = {}
    for envelope in envelopes:
        state = message_state(envelope)
        if state is None:
            continue
        messages[state] += 1
        oldest[state] = min(oldest.get(state, envelope.arrival), envelope.arrival)
    return QueueSummary(messages, oldest)
