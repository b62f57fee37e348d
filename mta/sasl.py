"""SMTP AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms, as
pure steps: the AUTH command's argument, or a client's response line, in;
the next step out.  No socket, no clock, no password check here.

A step is one of:

- `Challenge`: send ``334 PROMPT`` and give the next line to `respond`;
- `Credentials`: a user name and password to check (`mta.authcheck`);
- `Denied`: a login that fails without a check (PLAIN's authorization
  identity differs from the user's: the relay lets no one act as another);
- `Refusal`: the reply that ends the exchange (501 cancelled or bad
  base64, 504 an unknown mechanism), not a failed login.

The rules of the command around the exchange (only after TLS, not in a
transaction, once per session) are `auth_refusal`, also pure.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from mta.reply import Reply

MECHANISMS = ("PLAIN", "LOGIN")

# RFC 4954 4 and 6, with RFC 3463 / RFC 5248 enhanced codes.
SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
CANCELLED = Reply(501, "5.7.0", "Authentication aborted")
CANNOT_DECODE = Reply(501, "5.5.2", "Cannot decode response")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
NOT_OFFERED = Reply(502, "5.5.2", "Error: command not recognized")

# RFC 4616 2: each of authzid, authcid and passwd is at most 255 octets.
MAX_FIELD = 255

# LOGIN is not in an RFC; these are the prompts every client expects.
USERNAME_PROMPT = "VXNlcm5hbWU6"  # "Username:"
PASSWORD_PROMPT = "UGFzc3dvcmQ6"  # "Password:"


# --- exchange states ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AwaitingPlain:
    """PLAIN sent without an initial response: the whole message next."""


@dataclass(frozen=True, slots=True)
class AwaitingUser:
    """LOGIN: the user name next."""


@dataclass(frozen=True, slots=True)
class AwaitingPassword:
    """LOGIN: the password of ``user`` next."""

    user: str


State = AwaitingPlain | AwaitingUser | AwaitingPassword


# --- steps ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    prompt: str  # base64, "" for PLAIN's empty challenge
    state: State


@dataclass(frozen=True, slots=True)
class Credentials:
    mechanism: str
    user: str
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Denied:
    mechanism: str
    user: str
    reason: str


@dataclass(frozen=True, slots=True)
class Refusal:
    reply: Reply


Step = Challenge | Credentials | Denied | Refusal


def auth_refusal(
    *,
    offered: bool,
    tls: bool,
    greeted: bool,
    in_transaction: bool,
    authenticated: bool,
) -> Reply | None:
    """Why an AUTH command may not start here, or None.  ``offered``: the
    listener has a users file."""
    if not offered:
        # As any listener without AUTH answers: not an extension we have.
        return NOT_OFFERED
    if not tls:
        # RFC 4954 6: 538 when the mechanism needs an encrypted channel;
        # every mechanism here sends the password in the clear.
        return ENCRYPTION_REQUIRED
    if not greeted:
        return Reply(503, "5.5.1", "Error: send HELO/EHLO first")
    if authenticated:
        # RFC 4954 4: no AUTH after a successful one.
        return ALREADY_AUTHENTICATED
    if in_transaction:
        # RFC 4954 4: not permitted during a mail transaction.
        return Reply(503, "5.5.1", "Error: MAIL transaction in progress")
    return None


def begin(argument: str) -> Step:
    """The AUTH command's argument: ``MECHANISM [initial-response]``."""
    words = argument.split()
    if not words or len(words) > 2:
        return Refusal(SYNTAX)
    mechanism = words[0].upper()
    initial = words[1] if len(words) == 2 else None
    if mechanism not in MECHANISMS:
        return Refusal(UNKNOWN_MECHANISM)
    if mechanism == "PLAIN":
        if initial is None:
            return Challenge("", AwaitingPlain())
        return _plain(initial)
    if initial is None:
        return Challenge(USERNAME_PROMPT, AwaitingUser())
    return respond(AwaitingUser(), initial)


def respond(state: State, line: str) -> Step:
    """A client's response to a challenge."""
    # RFC 4954 4: "*" cancels the exchange, with a 501.
    if line.strip() == "*":
        return Refusal(CANCELLED)
    if isinstance(state, AwaitingPlain):
        return _plain(line)
    decoded = _decode(line)
    if decoded is None:
        return Refusal(CANNOT_DECODE)
    if isinstance(state, AwaitingUser):
        if not decoded or len(decoded) > MAX_FIELD:
            return Refusal(Reply(501, "5.5.2", "Invalid user name"))
        return Challenge(PASSWORD_PROMPT, AwaitingPassword(_text(decoded)))
    return _credentials("LOGIN", state.user, decoded)


def _plain(response: str) -> Step:
    """RFC 4616 2: ``[authzid] NUL authcid NUL passwd``."""
    decoded = _decode(response)
    if decoded is None:
        return Refusal(CANNOT_DECODE)
    parts = decoded.split(b"\x00")
    if len(parts) != 3 or any(len(part) > MAX_FIELD for part in parts):
        return Refusal(Reply(501, "5.5.2", "Invalid PLAIN response"))
    authzid, authcid, password = parts
    if not authcid:
        return Refusal(Reply(501, "5.5.2", "Invalid PLAIN response"))
    user = _text(authcid)
    if authzid and authzid != authcid:
        # RFC 4616 2: the server decides whether authcid may act as
        # authzid; here no one may act as another.
        return Denied("PLAIN", user, "authorization identity differs")
    return _credentials("PLAIN", user, password)


def _credentials(mechanism: str, user: str, password: bytes) -> Step:
    if not password or len(password) > MAX_FIELD:
        return Denied(mechanism, user, "empty or over-long password")
    return Credentials(mechanism, user, password)


def _decode(text: str) -> bytes | None:
    """RFC 4954 4: base64; "=" alone is an empty response."""
    text = text.strip()
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def _text(data: bytes) -> str:
    # A name that is not UTF-8 matches no user; it is kept readable for
    # the log.
    return data.decode("utf-8", "replace")
