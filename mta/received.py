"""The Received header we put at the top of every message we accept.

RFC 5321 4.4 fixes its clauses (from, by, with, id, for) and the date after
the last ";".  The "with" word is the RFC 3848 protocol name.  The header is
folded with CRLF and a tab, since every line we store must end in CRLF
(Twisted's own joins with a bare LF).
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import re
from collections.abc import Sequence

from mta.envelope import TLSFacts

# Client-chosen text (the HELO name) goes into a header: keep it printable
# ASCII and short, so no one can shape our header with what they send.
_UNSAFE = re.compile(r"[^\x21-\x7e]+")
MAX_HELO = 255


def protocol_name(
    esmtp: bool, tls: TLSFacts | None, authenticated: bool = False
) -> str:
    """RFC 3848: SMTP after HELO, ESMTP after EHLO, ESMTPS with TLS, and an
    A after a successful AUTH (ESMTPSA, ESMTPA).  The user name is not
    written: the header travels with the message to its recipients."""
    name = "ESMTP" if esmtp or tls is not None or authenticated else "SMTP"
    if tls is not None:
        name += "S"
    return name + ("A" if authenticated else "")


def received_header(
    *,
    helo: str,
    client_host: str,
    client_address: str,
    hostname: str,
    queue_id: str,
    esmtp: bool,
    tls: TLSFacts | None,
    recipients: Sequence[str],
    when: float,
    authenticated: bool = False,
) -> bytes:
    """The header as bytes, each line ending in CRLF.  ``for <rcpt>`` is
    given only for a single recipient, so that a message to many does not
    tell each one who the others are."""
    protocol = protocol_name(esmtp, tls, authenticated)
    clauses = [
        f"from {_printable(helo)} ({client_host} [{client_address}])",
        f"by {hostname} (mta) with {protocol} id {queue_id}",
    ]
    if tls is not None:
        clauses.append(f"(version={tls.protocol} cipher={tls.cipher})")
    if len(recipients) == 1:
        clauses.append(f"for <{recipients[0]}>")
    clauses[-1] += "; " + _date(when)
    return ("Received: " + "\r\n\t".join(clauses) + "\r\n").encode("ascii")


def _printable(text: str) -> str:
    cleaned = _UNSAFE.sub("?", text)[:MAX_HELO]
    return cleaned or "unknown"


def _date(when: float) -> str:
    return _date_of_second(int(when))


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    # Whole seconds are all the header shows: one formatting a second
    # serves every message received in it.
    moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
    return email.utils.format_datetime(moment)
