"""The envelope: everything the relay knows about a message but its bytes.

Values are frozen; a change is a new value (`dataclasses.replace`) written
back to the spool whole.  The JSON form is the spool's contract with other
processes (the CLI, a second worker), so it carries a version number.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

FORMAT_VERSION = 1

# Recipient states.
PENDING = "pending"
DEFERRED = "deferred"
DELIVERED = "delivered"
FAILED = "failed"
FINAL_STATES = (DELIVERED, FAILED)


@dataclass(frozen=True, slots=True)
class TLSFacts:
    """What a TLS session was: ``TLSv1.3/TLS_AES_128_GCM_SHA256``."""

    protocol: str
    cipher: str
    bits: int | None = None

    def __str__(self) -> str:
        return f"{self.protocol}/{self.cipher}"


@dataclass(frozen=True, slots=True)
class Client:
    """Who handed us the message."""

    helo: str
    host: str
    address: str
    listener: str
    tls: TLSFacts | None = None
    user: str | None = None  # who logged in with SMTP AUTH


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt for one recipient, as the log line shows it."""

    time: float
    status: str  # sent, deferred, bounced
    dsn: str
    reply: str
    policy: str
    relay: str | None = None
    tls: TLSFacts | None = None
    trust: str | None = None
    matched: str | None = None
    rule: str | None = None
    fallback: str | None = None
    connected: bool = False  # an SMTP session was made with `relay`


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    state: str = PENDING
    reason: str | None = None
    dsn: str | None = None
    next_attempt: float | None = None
    history: tuple[Attempt, ...] = ()
    # Its failure was reported (a bounce written, or dropped with a log
    # line): no second bounce is made for it (mta.notices).
    notified: bool = False

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def deferrals(self) -> int:
        return sum(1 for attempt in self.history if attempt.status == "deferred")


@dataclass(frozen=True, slots=True)
class Envelope:
    queue_id: str
    sender: str  # "" for the null sender <>
    arrival: float
    size: int
    client: Client
    recipients: tuple[Recipient, ...]
    body: str = "7BIT"  # or 8BITMIME, as declared at MAIL
    hold: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    delay_notified: bool = False  # its one delay notice is written

    @property
    def is_done(self) -> bool:
        return all(recipient.is_final for recipient in self.recipients)

    def with_recipient(self, updated: Recipient) -> Envelope:
        recipients = tuple(
            updated if recipient.address == updated.address else recipient
            for recipient in self.recipients
        )
        return replace(self, recipients=recipients)

    def recipient(self, address: str) -> Recipient:
        for recipient in self.recipients:
            if recipient.address == address:
                return recipient
        raise KeyError(address)


# The spool stamps each envelope file's modification time with the moment
# the message is next due (`due_time`), so that the queue runner finds due
# mail with a stat of each file, never reading them all.  A held message is
# due at this far-off time: never, until it is released.
HELD_DUE = 4102444800.0  # 2100-01-01T00:00:00Z


def due_time(envelope: Envelope) -> float:
    """When the queue runner should next take ``envelope`` up: the earliest
    next attempt of a recipient not yet final (arrival for one not tried
    yet); arrival when every recipient is final (its notices and removal
    are left to do); `HELD_DUE` when it is on hold."""
    if envelope.hold:
        return HELD_DUE
    times = [recipient.next_attempt or envelope.arrival
             for recipient in envelope.recipients if not recipient.is_final]
    return min(times, default=envelope.arrival)


def to_json(envelope: Envelope) -> bytes:
    data = asdict(envelope)
    data["version"] = FORMAT_VERSION
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False)
    return text.encode("utf-8") + b"\n"


def from_json(data: bytes) -> Envelope:
    """Parse an envelope; raise ValueError for anything that is not one.

    Every field's type is checked here, once: a spool file edited by hand
    or damaged must be refused whole (and quarantined), never half-used by
    the queue runner, where a wrong type would fail after a delivery."""
    try:
        raw = json.loads(data)
        _check(raw, _ENVELOPE, "envelope")
        if raw["version"] != FORMAT_VERSION:
            raise ValueError(f"unknown envelope format version {raw['version']!r}")
        del raw["version"]
        client = raw.pop("client")
        recipients = raw.pop("recipients")
        return Envelope(
            client=Client(**{**client, "tls": _tls(client.get("tls"))}),
            recipients=tuple(_recipient(item) for item in recipients),
            **raw,
        )
    except (KeyError, TypeError, AttributeError, RecursionError,
            UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not a valid envelope: {error}") from None


def _tls(raw: dict[str, Any] | None) -> TLSFacts | None:
    return None if raw is None else TLSFacts(**raw)


def _recipient(raw: dict[str, Any]) -> Recipient:
    history = tuple(
        Attempt(**{**item, "tls": _tls(item.get("tls"))})
        for item in raw.pop("history", ())
    )
    return Recipient(history=history, **raw)


# --- the JSON form's types -------------------------------------------------

def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Queue ids are upper-case hex (mta.spool.new_queue_id makes 17 digits);
# anything else could not be a file name in the spool.
QUEUE_ID = re.compile(r"[0-9A-F]{1,64}")


def is_queue_id(value: Any) -> bool:
    return isinstance(value, str) and QUEUE_ID.fullmatch(value) is not None


def _is_address(value: Any) -> bool:
    # What the listener let in: no line end, no angle bracket, no control
    # character; anything else would make a wrong command when delivered.
    return isinstance(value, str) and not any(
        char in "<>" or ord(char) < 32 or ord(char) == 127 for char in value)


def _one_of(*choices: str) -> Any:
    return lambda value: value in choices


def _mapping(fields: dict[str, Any], name: str) -> Any:
    def check(value: Any) -> bool:
        _check(value, fields, name)
        return True

    return check


def _list_of(check: Any) -> Any:
    return lambda value: isinstance(value, list) and all(map(check, value))


_TLS = _optional(_mapping(
    {"protocol": _is_str, "cipher": _is_str, "bits": _optional(_is_int)}, "tls"))
_ATTEMPT = {
    "time": _is_number, "status": _one_of("sent", "deferred", "bounced"),
    "dsn": _is_str, "reply": _is_str, "policy": _is_str,
    "relay": _optional(_is_str), "tls": _TLS, "trust": _optional(_is_str),
    "matched": _optional(_is_str), "rule": _optional(_is_str),
    "fallback": _optional(_is_str), "connected": _is_bool,
}
_RECIPIENT = {
    "address": _is_address,
    "state": _one_of(PENDING, DEFERRED, DELIVERED, FAILED),
    "reason": _optional(_is_str), "dsn": _optional(_is_str),
    "next_attempt": _optional(_is_number),
    "history": _list_of(_mapping(_ATTEMPT, "attempt")),
    "notified": _is_bool,
}
_CLIENT = {"helo": _is_str, "host": _is_str, "address": _is_str,
           "listener": _is_str, "tls": _TLS, "user": _optional(_is_str)}
_ENVELOPE = {
    "version": _is_int, "queue_id": is_queue_id, "sender": _is_address,
    "arrival": _is_number, "size": _is_int, "client": _mapping(_CLIENT, "client"),
    "recipients": lambda value: isinstance(value, list) and len(value) > 0
    and all(_mapping(_RECIPIENT, "recipient")(item) for item in value),
    "body": _one_of("7BIT", "8BITMIME"), "hold": _is_bool,
    "extra": lambda value: isinstance(value, dict),
    "delay_notified": _is_bool,
}

# Fields added after FORMAT_VERSION 1 was first written, with the value an
# envelope written before them means: old spools keep loading.
_ADDED_LATER: dict[str, dict[str, Any]] = {
    "recipient": {"notified": False},
    "envelope": {"delay_notified": False},
    "client": {"user": None},
}


def _check(raw: Any, fields: dict[str, Any], name: str) -> None:
    if not isinstance(raw, dict):
        raise TypeError(f"{name} is not an object")
    unknown = set(raw) - set(fields)
    if unknown:
        raise KeyError(f"{name} has unknown fields {sorted(unknown)}")
    for key, value in _ADDED_LATER.get(name, {}).items():
        raw.setdefault(key, value)
    for key, check in fields.items():
        if key not in raw:
            raise KeyError(f"{name} lacks {key}")
        if not check(raw[key]):
            raise TypeError(f"{name}.{key} has a bad value {raw[key]!r}")
