"""The envelope: everything the relay knows about a message but its bytes.

Values are frozen; a change is a new value (`dataclasses.replace`) written
back to the spool whole.  The JSON form is the spool's contract with other
processes (the CLI, a second worker), so it carries a version number.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from operator import itemgetter
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
    """The envelope as one line of JSON (keys sorted).  Compact, so that
    the json module's C encoder writes it: every message is written at
    least once, and the indented form took the pure-Python one."""
    data = _plain(envelope)
    data["version"] = FORMAT_VERSION
    text = json.dumps(data, sort_keys=True, allow_nan=False,
                      separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def _plain(value: Any) -> Any:
    """`dataclasses.asdict`, for our classes: their fields as dicts, tuples
    as lists, without asdict's deep copy of every value."""
    names = _FIELDS.get(type(value))
    if names is not None:
        return {name: _plain(getattr(value, name)) for name in names}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def from_json(data: bytes) -> Envelope:
    """Parse an envelope; raise ValueError for anything that is not one.

    Every field's type is checked here, once (`checked_json`): a spool file
    edited by hand or damaged must be refused whole (and quarantined), never
    half-used by the queue runner, where a wrong type would fail after a
    delivery."""
    raw = checked_json(data)
    try:
        return from_checked(raw)
    except (KeyError, TypeError, AttributeError, RecursionError) as error:
        raise ValueError(f"not a valid envelope: {error}") from None


def checked_json(data: bytes) -> dict[str, Any]:
    """The envelope's JSON form, parsed and checked: what `from_json`
    accepts, as plain dicts and lists (fields added after the first format
    filled in with their old meaning; no "version").  The one place the
    checks are made: a reader that needs no `Envelope` (`mta queue list`
    over a big spool) is exactly as strict.  ValueError for anything that
    is not an envelope."""
    try:
        # What to_json writes begins '{"' (and what it wrote before,
        # "{\n"): UTF-8, as json.loads would find (a byte order mark or a
        # NUL makes it guess another), decoded here as it would decode it.
        if data[:2] in (b'{"', b"{\n"):
            raw = _parsed(data.decode("utf-8", "surrogatepass"))
        else:
            raw = json.loads(data)
        _ENVELOPE.valid(raw)
    except (KeyError, TypeError, AttributeError, RecursionError, OverflowError,
            UnicodeDecodeError, json.JSONDecodeError) as error:
        # OverflowError: an integer too big for a float where a number of
        # seconds belongs (math.isfinite).
        raise ValueError(f"not a valid envelope: {error}") from None
    if raw["version"] != FORMAT_VERSION:
        raise ValueError(f"unknown envelope format version {raw['version']!r}")
    del raw["version"]
    return raw


# json.loads(text) is this decoder's raw_decode at the first character that
# is not white space, then a search for anything but white space after the
# value; called here straight, for the text to_json writes.
_DECODER = json.JSONDecoder()


def _parsed(text: str) -> Any:
    """json.loads(text), for a text that begins with "{"."""
    raw, end = _DECODER.raw_decode(text)
    if end == len(text) or text[end:] == "\n":
        return raw
    return json.loads(text)  # raises "Extra data", or ends in other space


def from_checked(raw: dict[str, Any]) -> Envelope:
    """The `Envelope` of a `checked_json` result (which it takes apart)."""
    client = raw.pop("client")
    recipients = raw.pop("recipients")
    return Envelope(
        client=Client(**{**client, "tls": _tls(client.get("tls"))}),
        recipients=tuple(_recipient(item) for item in recipients),
        **raw,
    )


def _tls(raw: dict[str, Any] | None) -> TLSFacts | None:
    return None if raw is None else TLSFacts(**raw)


def _recipient(raw: dict[str, Any]) -> Recipient:
    history = tuple(
        Attempt(**{**item, "tls": _tls(item.get("tls"))})
        for item in raw.pop("history", ())
    )
    return Recipient(history=history, **raw)


def in_field_order(raw: dict[str, Any]) -> dict[str, Any]:
    """A `checked_json` result as `dataclasses.asdict` of its `Envelope`
    would have it (the same keys and values, in the classes' field order),
    without making the `Envelope`."""
    out = {key: raw[key] for key in _FIELDS[Envelope]}
    out["client"] = _ordered_client(raw["client"])
    out["recipients"] = [_ordered_recipient(item) for item in raw["recipients"]]
    return out


def _ordered_tls(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if raw is None else {key: raw[key] for key in _FIELDS[TLSFacts]}


def _ordered_client(raw: dict[str, Any]) -> dict[str, Any]:
    out = {key: raw[key] for key in _FIELDS[Client]}
    out["tls"] = _ordered_tls(out["tls"])
    return out


def _ordered_recipient(raw: dict[str, Any]) -> dict[str, Any]:
    out = {key: raw[key] for key in _FIELDS[Recipient]}
    history = out["history"]
    if history:
        out["history"] = [_ordered_attempt(item) for item in history]
    return out


def _ordered_attempt(raw: dict[str, Any]) -> dict[str, Any]:
    out = {key: raw[key] for key in _FIELDS[Attempt]}
    out["tls"] = _ordered_tls(out["tls"])
    return out


_FIELDS = {cls: tuple(item.name for item in fields(cls))
           for cls in (Envelope, Client, TLSFacts, Recipient, Attempt)}


# --- the JSON form's types -------------------------------------------------
#
# Each field of each object is declared once, as (types, check): its value
# must be an instance of one of ``types`` and pass ``check`` (None: no
# further check), except a None where ``types`` allows None (an optional
# field), which needs no check.  `_Shape.valid` tries every field at C
# speed first, and only when one fails goes through them in order to say
# which (`_Shape.check`): the same rule either way, and the error a
# field-by-field check raises.

_NONE = type(None)


def _non_negative(value: int) -> bool:
    return not isinstance(value, bool) and value >= 0


def _finite(value: float) -> bool:
    # An integer too big for a float raises OverflowError: refused too.
    return not isinstance(value, bool) and math.isfinite(value)


# Times are seconds since 1970; past this (the year 3058) no clock or
# calendar function copes, and no message waits that long (a held one is
# due in 2100).  A file edited by hand to 1e300 is refused as damaged
# rather than crashing whoever reads it.
LATEST_TIME = float(2**35)


def _a_time(value: float) -> bool:
    # `_finite` written out: this runs for every time of every envelope.
    return (not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value < LATEST_TIME)


# Queue ids are upper-case hex (mta.spool.new_queue_id makes 17 digits);
# anything else could not be a file name in the spool.
QUEUE_ID = re.compile(r"[0-9A-F]{1,64}")


def is_queue_id(value: Any) -> bool:
    return isinstance(value, str) and QUEUE_ID.fullmatch(value) is not None


# A mailbox as the listener writes it (mta.relaycontrol.canonical_address):
# local@domain, the local part plain or quoted whole (only then may it hold
# a space), the domain a name or an address literal.  "nobody", "x@" or
# "x@y NOTIFY=NEVER" never came from a listener, and would be sent as RCPT.
_RECIPIENT_TEXT = re.compile(
    r'(?:"(?:[^"\\\x00-\x1f\x7f]|\\[^\x00-\x1f\x7f])*"'
    r"|[^ \"@<>\x00-\x1f\x7f]+)"
    r"@[^ @<>\x00-\x1f\x7f]+"
)


Field = tuple[tuple[type, ...], Any]


def _field(*types: type, check: Any = None) -> Field:
    return (types, check)


def _optional(field: Field) -> Field:
    types, check = field
    return ((*types, _NONE), check)


def _one_of(*choices: str) -> Field:
    # Of any type: ``in`` compares a list or a dict as well.
    return _field(object, check=choices.__contains__)


_STR = _field(str)
_BOOL = _field(bool)
_INT = _field(int, check=_non_negative)
_NUMBER = _field(int, float, check=_finite)
_TIME = _field(int, float, check=_a_time)
# Checks may answer with any true value: a match here.
_MAILBOX = _field(str, check=_RECIPIENT_TEXT.fullmatch)
# The sender: a mailbox, or "" for the null sender <>.
_SENDER = _field(str, check=lambda value: value == "" or _RECIPIENT_TEXT.fullmatch(value))


class _Shape:
    """The fields of one kind of JSON object (``name`` in errors), and the
    fields added after FORMAT_VERSION 1 was first written, with the value
    an object written before them means: old spools keep loading."""

    def __init__(self, name: str, fields: dict[str, Field],
                 added_later: dict[str, Any] | None = None) -> None:
        self.name = name
        self.fields = fields
        self.keys = fields.keys()
        self.added_later = tuple((added_later or {}).items())
        self._values = itemgetter(*fields)
        self._types = tuple(types for types, _ in fields.values())
        self._checks = tuple((key, check, _NONE in types)
                             for key, (types, check) in fields.items()
                             if check is not None)

    def valid(self, raw: Any) -> bool:
        """True, or raise as `check` does.  Fields added later are filled
        in, in ``raw``."""
        # Every field at once first: this runs for each envelope of a
        # listing.  Anything amiss, and `check` says what.
        if not isinstance(raw, dict):
            return self._wrong(raw)
        if len(raw) < len(self.keys):
            for key, value in self.added_later:
                raw.setdefault(key, value)
        # Every field there (or KeyError), and no more keys than fields: no
        # other.  Cheaper than comparing the keys.
        try:
            values = self._values(raw)
        except KeyError:
            return self._wrong(raw)
        if len(raw) != len(values) or not all(map(isinstance, values,
                                                  self._types)):
            return self._wrong(raw)
        for key, check, optional in self._checks:
            value = raw[key]
            if value is None and optional:
                continue
            # A nested object's check raises its own error: every field
            # before this one has passed, so it is the first wrong one.
            if not check(value):
                return self._wrong(raw)
        return True

    def _wrong(self, raw: Any) -> bool:
        self.check(raw)  # raises, saying what is wrong
        return True

    def check(self, raw: Any) -> None:
        """Field by field, in order: raise for the first that is wrong."""
        name = self.name
        if not isinstance(raw, dict):
            raise TypeError(f"{name} is not an object")
        unknown = set(raw) - set(self.fields)
        if unknown:
            raise KeyError(f"{name} has unknown fields {sorted(unknown)}")
        for key, value in self.added_later:
            raw.setdefault(key, value)
        for key, (types, check) in self.fields.items():
            if key not in raw:
                raise KeyError(f"{name} lacks {key}")
            value = raw[key]
            if not isinstance(value, types) or not (
                    check is None or (value is None and _NONE in types)
                    or check(value)):
                raise TypeError(f"{name}.{key} has a bad value {value!r}")


def _object(shape: _Shape) -> Field:
    # Of any type: "is not an object" is the shape's own error.
    return _field(object, check=shape.valid)


def _list_of(shape: _Shape, at_least: int = 0) -> Field:
    valid = shape.valid
    return _field(list, check=lambda value: len(value) >= at_least
                  and all(map(valid, value)))


_TLS = _Shape("tls", {
    "protocol": _STR, "cipher": _STR, "bits": _optional(_INT),
})
_ATTEMPT = _Shape("attempt", {
    "time": _TIME, "status": _one_of("sent", "deferred", "bounced"),
    "dsn": _STR, "reply": _STR, "policy": _STR,
    "relay": _optional(_STR), "tls": _optional(_object(_TLS)),
    "trust": _optional(_STR), "matched": _optional(_STR),
    "rule": _optional(_STR), "fallback": _optional(_STR), "connected": _BOOL,
})
_RECIPIENT = _Shape("recipient", {
    "address": _MAILBOX,
    "state": _one_of(PENDING, DEFERRED, DELIVERED, FAILED),
    "reason": _optional(_STR), "dsn": _optional(_STR),
    "next_attempt": _optional(_TIME),
    "history": _list_of(_ATTEMPT),
    "notified": _BOOL,
}, added_later={"notified": False})
_CLIENT = _Shape("client", {
    "helo": _STR, "host": _STR, "address": _STR, "listener": _STR,
    "tls": _optional(_object(_TLS)), "user": _optional(_STR),
}, added_later={"user": None})
_ENVELOPE = _Shape("envelope", {
    "version": _INT, "queue_id": _field(str, check=QUEUE_ID.fullmatch),
    "sender": _SENDER, "arrival": _TIME, "size": _INT,
    "client": _object(_CLIENT), "recipients": _list_of(_RECIPIENT, at_least=1),
    "body": _one_of("7BIT", "8BITMIME"), "hold": _BOOL,
    "extra": _field(dict), "delay_notified": _BOOL,
}, added_later={"delay_notified": False})
