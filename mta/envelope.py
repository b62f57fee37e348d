"""The envelope: everything the relay knows about a message but its bytes.

Values are frozen; a change is a new value (`dataclasses.replace`) written
back to the spool whole.  The JSON form is the spool's contract with other
processes (the CLI, a second worker), so it carries a version number.
"""

from __future__ import annotations

import json
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


def to_json(envelope: Envelope) -> bytes:
    data = asdict(envelope)
    data["version"] = FORMAT_VERSION
    return json.dumps(data, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def from_json(data: bytes) -> Envelope:
    """Parse an envelope; raise ValueError for anything that is not one."""
    try:
        raw = json.loads(data)
        if raw.pop("version") != FORMAT_VERSION:
            raise ValueError("unknown envelope format version")
        client = raw.pop("client")
        recipients = raw.pop("recipients")
        return Envelope(
            client=Client(**{**client, "tls": _tls(client.get("tls"))}),
            recipients=tuple(_recipient(item) for item in recipients),
            **raw,
        )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise ValueError(f"not a valid envelope: {error}") from None


def _tls(raw: dict[str, Any] | None) -> TLSFacts | None:
    return None if raw is None else TLSFacts(**raw)


def _recipient(raw: dict[str, Any]) -> Recipient:
    history = tuple(
        Attempt(**{**item, "tls": _tls(item.get("tls"))})
        for item in raw.pop("history", ())
    )
    return Recipient(history=history, **raw)
