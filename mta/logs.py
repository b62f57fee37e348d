"""The log lines an operator greps, exactly as SPEC.md section 5 lists them.

One line per event, queue id first, then ``key=value`` fields in a fixed
order; a field that does not apply is left out.  Each line is emitted as a
structured `twisted.logger` event whose fields are the same keys, so a JSON
observer sees what the text shows.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any, Protocol

import twisted.logger
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
    timeFormatRFC3339,
)

from mta.envelope import Attempt, Envelope

log = Logger(namespace="mta")

# Every line of ours is this format with its text in one field (`_emit`).
LINE_FORMAT = "{mta_line}"

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
    extra = {f"mta_{key}": value for key, value in fields.items()
             if value is not None}
    getattr(log, level)(LINE_FORMAT, mta_line=text, mta_event=event, **extra)


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


def is_line(event: dict[str, Any]) -> bool:
    """Whether ``event`` is one of our lines as `_emit` made it: its text
    in one field, nothing Twisted's formatter would add (a traceback, a
    system name, a form flattened for JSON)."""
    return (event.get("log_format") == LINE_FORMAT and "mta_line" in event
            and "log_failure" not in event and "log_system" not in event
            and "log_flattened" not in event)


class _ClassicText:
    """Twisted's classic text line (`formatEventAsClassicLogText`: time,
    ``[namespace#level]``, text, continuation lines indented by a tab),
    made cheaper for our own lines: the time is formatted once a second,
    and the text is taken as it is rather than through a format string.
    Any other event is Twisted's to format.  The relay writes three or
    more lines per message, and Twisted's formatting of each cost more
    than the commands of the SMTP session it reports."""

    def __init__(self, time_format: str | None) -> None:
        self._time_format = time_format
        self._second = -1
        self._stamp = ""

    def _format_time(self, when: float | None) -> str:
        return formatTime(when, self._time_format)

    def __call__(self, event: dict[str, Any]) -> str | None:
        when = event.get("log_time")
        if not is_line(event) or when is None or self._time_format is None:
            return formatEventAsClassicLogText(event, self._format_time)
        if int(when) != self._second:
            # The format has whole seconds (and the local UTC offset can
            # only change on one).
            self._second = int(when)
            self._stamp = formatTime(when, self._time_format)
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        text = str(event["mta_line"]).replace("\n", "\n\t")
        return f"{self._stamp} [{system}] {text}\n"


def text_observer(
    out: IO[Any], timeFormat: str | None = timeFormatRFC3339
) -> FileLogObserver:
    """`twisted.logger.textFileLogObserver`, writing the same lines more
    cheaply (`_ClassicText`)."""
    return FileLogObserver(out, _ClassicText(timeFormat))


def use_text_observer() -> None:
    """Make twistd's default log (standard output, ``--logfile``) ours.
    twistd builds it with `twisted.logger.textFileLogObserver` after the
    plugin's options are read, looking the name up at that moment; there
    is no other hook short of ``--logger``, which would lose ``--logfile``
    and its rotation on SIGUSR1.  The lines are the same byte for byte
    (tests/test_logs.py compares them with Twisted's)."""
    twisted.logger.textFileLogObserver = text_observer  # type: ignore[assignment]


# --- our lines between processes (mta.workers) ---------------------------

# A worker sends each of its lines to the first process as one JSON object
# with this key; anything else goes in Twisted's own JSON form.
RELAYED = "mta_relayed"


def line_as_json(event: dict[str, Any]) -> str | None:
    """One of our lines (`is_line`) as a JSON object of its level, time,
    namespace and fields; None for any other event, or one whose fields
    JSON cannot hold.  Twisted's `eventAsJSON` flattens every event for
    any reader, at a cost per line larger than writing it."""
    if not is_line(event):
        return None
    level = event.get("log_level")
    fields = {key: value for key, value in event.items()
              if key.startswith("mta_")}
    try:
        return json.dumps({RELAYED: 1, "log_level": level.name if level else None,
                           "log_time": event.get("log_time"),
                           "log_namespace": event.get("log_namespace"),
                           **fields})
    except (TypeError, ValueError):
        return None


def line_from_json(data: dict[str, Any]) -> dict[str, Any] | None:
    """The event `line_as_json` wrote, as `_emit` made it; None when
    ``data`` is not one (Twisted's JSON form, or anything else)."""
    if data.pop(RELAYED, None) != 1:
        return None
    level = data.pop("log_level", None)
    try:
        data["log_level"] = LogLevel.levelWithName(level) if level else None
    except InvalidLogLevelError:
        data["log_level"] = LogLevel.info
    data["log_format"] = LINE_FORMAT
    return data


def json_observer() -> ILogObserver:
    """``twistd --logger mta.logs.json_observer``: every event as one JSON
    object per line on standard output, with the fields above.  Without
    the record separator (0x1E, RFC 7464) that Twisted puts before each:
    a line is JSON as it is, for jq, json.loads or a log shipper alike."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


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
