"""The log lines an operator greps, exactly as SPEC.md section 5 lists them.

One line per event, queue id first, then ``key=value`` fields in a fixed
order; a field that does not apply is left out.  Each line is emitted as a
structured `twisted.logger` event whose fields are the same keys, so a JSON
observer sees what the text shows.
"""

from __future__ import annotations

from typing import Any, Protocol

import sys

from twisted.logger import ILogObserver, Logger, jsonFileLogObserver

from mta.envelope import Attempt, Envelope

log = Logger(namespace="mta")

ACCEPTED_FIELDS = (
    "from", "size", "nrcpt", "client", "listener", "tls", "sasl_username",
)
DELIVERY_FIELDS = (
    "to", "relay", "delay", "tls", "trust", "matched", "policy", "rule",
    "fallback", "dsn", "status",
)


def format_fields(order: tuple[str, ...], fields: dict[str, Any]) -> str:
    return " ".join(
        f"{key}={fields[key]}" for key in order if fields.get(key) is not None
    )


def _emit(level: str, text: str, event: str, fields: dict[str, Any]) -> None:
    # The text is passed as a field so that braces in addresses or replies
    # are never read as format placeholders.
    getattr(log, level)("{mta_line}", mta_line=text, mta_event=event, **{
        f"mta_{key}": value for key, value in fields.items() if value is not None
    })


def accepted_line(envelope: Envelope) -> str:
    client = envelope.client
    fields = {
        "from": f"<{envelope.sender}>",
        "size": envelope.size,
        "nrcpt": len(envelope.recipients),
        "client": f"{client.host}[{client.address}]",
        "listener": client.listener,
        "tls": str(client.tls) if client.tls else None,
        "sasl_username": client.user,
    }
    return f"{envelope.queue_id}: accepted " + format_fields(ACCEPTED_FIELDS, fields)


def log_accepted(envelope: Envelope) -> None:
    _emit("info", accepted_line(envelope), "accepted",
          {"queue_id": envelope.queue_id})
    _count("accepted", envelope)


def delivery_line(
    queue_id: str, recipient: str, attempt: Attempt, delay: float
) -> str:
    fields = {
        "to": f"<{recipient}>",
        "relay": attempt.relay or "none",
        "delay": f"{delay:.2f}",
        "tls": _tls_text(attempt),
        "trust": attempt.trust,
        "matched": attempt.matched,
        "policy": attempt.policy,
        "rule": attempt.rule,
        "fallback": attempt.fallback,
        "dsn": attempt.dsn,
        "status": attempt.status,
    }
    return (f"{queue_id}: " + format_fields(DELIVERY_FIELDS, fields)
            + f" ({attempt.reply})")


def _tls_text(attempt: Attempt) -> str | None:
    if attempt.tls is not None:
        return str(attempt.tls)
    # No session, no TLS field: "none" would claim a plaintext session.
    return "none" if attempt.connected else None


def log_delivery(
    queue_id: str, recipient: str, attempt: Attempt, delay: float
) -> None:
    level = "info" if attempt.status == "sent" else "warn"
    _emit(level, delivery_line(queue_id, recipient, attempt, delay),
          "delivery", {"queue_id": queue_id, "to": recipient,
                       "status": attempt.status})
    _count("delivery", recipient, attempt)


def reject_line(command: str, host: str, address: str, reply: str) -> str:
    return f"reject: {command} from {host}[{address}]: {reply}"


def log_reject(command: str, host: str, address: str, reply: str) -> None:
    _emit("info", reject_line(command, host, address, reply), "reject",
          {"command": command, "client": f"{host}[{address}]"})


def log_event(level: str, text: str, event: str, **fields: Any) -> None:
    """Any other operator-facing line (start, stop, spool problems)."""
    _emit(level, text, event, fields)


def json_observer() -> ILogObserver:
    """``twistd --logger mta.logs.json_observer``: every event as one JSON
    object per line on standard output, with the fields above."""
    return jsonFileLogObserver(sys.stdout)


# --- counters fed by the same calls --------------------------------------


class EventCounter(Protocol):
    """Told of every accepted message and every recipient attempt, as they
    are logged (mta.metrics), so counters and log lines never disagree."""

    def accepted(self, envelope: Envelope) -> None: ...

    def delivery(self, recipient: str, attempt: Attempt) -> None: ...


_counters: list[EventCounter] = []


def add_event_counter(counter: EventCounter) -> None:
    _counters.append(counter)


def remove_event_counter(counter: EventCounter) -> None:
    if counter in _counters:
        _counters.remove(counter)


def _count(event: str, *args: Any) -> None:
    for counter in list(_counters):
        # A fault in counting must never fail a delivery or a 250.
        try:
            getattr(counter, event)(*args)
        except Exception:
            log.failure("counting a {event} event failed", event=event)
