"""Delivery status notifications (RFC 3464) as bytes: pure, no I/O.

One report per notice (`mta.notices`): a ``multipart/report;
report-type=delivery-status`` of three parts (RFC 6522):

1. ``text/plain`` for a person: which recipients, what happened in plain
   words (`mta.dsnwords`), and the server's reply or the relay's reason;
2. ``message/delivery-status`` for programs: the per-message fields, then
   one group per recipient with its ``Action``, ``Status`` (RFC 3463),
   ``Remote-MTA`` when a server was reached, ``Diagnostic-Code`` and
   ``Last-Attempt-Date``;
3. ``text/rfc822-headers``: the original message's headers (its body is
   not returned: RFC 6522 allows either, and it keeps bounces small).

The bytes are as the spool holds a received message: our Received header
first, every line ending in CRLF, 7-bit only.
"""

from __future__ import annotations

import datetime
import email.utils
import quopri
import re
import textwrap
from dataclasses import dataclass
from email.message import Message, MIMEPart
from email.parser import BytesHeaderParser
from email.policy import SMTP

from mta.dsnwords import explain
from mta.envelope import Envelope, Recipient
from mta.notices import DELAY, Notice

HEADER_LIMIT = 64 * 1024  # how much of the original is read for its headers

# Fields are folded only past the hard limit of 998 (RFC 5322 2.1.1): a
# program reading Diagnostic-Code then finds the reply on one line, as
# Postfix writes it.
POLICY = SMTP.clone(max_line_length=998)

# Text from the network (replies, addresses) goes into header-like fields:
# printable ASCII only, so nothing can shape the report with what it sends.
_UNSAFE = re.compile(r"[^\x20-\x7e]+")
_REMOTE_REPLY = re.compile(r"\bsaid: (\d{3}(?: .*?)?)(?: \(in reply to [^)]*\))?$")
_MESSAGE_ID = re.compile(r"^<[\x21-\x3b\x3d\x3f-\x7e]+>$")


@dataclass(frozen=True, slots=True)
class ReportContext:
    """What a report needs besides the notice and the original."""

    hostname: str  # Reporting-MTA, MAILER-DAEMON@hostname
    queue_id: str  # the report's own queue id
    now: float
    max_lifetime: float  # for "tried for ..." and Will-Retry-Until


def header_section(data: bytes) -> bytes:
    """The headers at the start of ``data`` (the start of a spool file):
    everything before the first empty line, ending in CRLF."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    if not head.endswith(b"\r\n"):
        # Cut off at HEADER_LIMIT: drop the partial last line.
        head = head[: head.rfind(b"\r\n") + 2] if b"\r\n" in head else b""
    return head


def build_report(
    notice: Notice, original: Envelope, headers: bytes, context: ReportContext
) -> bytes:
    """The whole report, ready for the spool."""
    assert notice.to is not None, "a notice to no one is only logged"
    report = Message(policy=POLICY)
    _top_headers(report, notice, original, headers, context)
    report.set_payload([
        _text_part(notice, original, context),
        _status_part(notice, original, context),
        _headers_part(headers),
    ])
    data = report.as_bytes(policy=POLICY)
    return received(context) + (data if data.endswith(b"\r\n") else data + b"\r\n")


def received(context: ReportContext) -> bytes:
    """Our Received header, as every message in the spool starts with one
    (RFC 5321 4.4); made here, it has no "from" clause."""
    return (f"Received: by {context.hostname} (mta) id {context.queue_id};"
            f"\r\n\t{_date(context.now)}\r\n").encode("ascii")


# --- the top-level headers ---------------------------------------------------

def _top_headers(
    report: Message,
    notice: Notice,
    original: Envelope,
    headers: bytes,
    context: ReportContext,
) -> None:
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{context.hostname}>"
    report["To"] = f"<{_printable(notice.to or '')}>"
    report["Subject"] = _subject(notice)
    report["Date"] = _date(context.now)
    report["Message-ID"] = f"<{context.queue_id}@{context.hostname}>"
    message_id = _original_message_id(headers)
    if message_id is not None:
        report["In-Reply-To"] = message_id
        report["References"] = message_id
    # RFC 3834: a report is an automatic reply; well-behaved software
    # sends nothing back to it.
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = ("multipart/report; "
                              "report-type=delivery-status")


def _subject(notice: Notice) -> str:
    first = _printable(notice.recipients[0].address)
    more = len(notice.recipients) - 1
    whom = first + (f" and {more} more" if more else "")
    if notice.to_postmaster:
        return f"Postmaster notice: undeliverable mail from <> to {whom}"
    if notice.kind == DELAY:
        return f"Delivery delayed: your message to {whom} is not delivered yet"
    return f"Delivery failed: your message to {whom} could not be delivered"


def _original_message_id(headers: bytes) -> str | None:
    parsed = BytesHeaderParser(policy=POLICY).parsebytes(headers)
    try:
        value = parsed.get("Message-ID")
    except Exception:  # a damaged header is no reason not to bounce
        return None
    text = str(value).strip() if value is not None else ""
    return text if _MESSAGE_ID.match(text) else None


# --- part 1: for a person ----------------------------------------------------

def _text_part(
    notice: Notice, original: Envelope, context: ReportContext
) -> MIMEPart:
    lines = []
    for paragraph in _opening(notice, original, context):
        lines.extend([*_wrap(paragraph), ""])
    for recipient in notice.recipients:
        lines.append(f"<{recipient.address}>")
        for paragraph in explain(recipient, context.max_lifetime,
                                 original.arrival):
            lines.extend(_wrap(paragraph, indent="    "))
        lines.append("")
    for paragraph in _closing(notice):
        lines.extend(_wrap(paragraph))
    part = MIMEPart(policy=POLICY)
    part.set_content(_printable_text("\n".join(lines) + "\n"),
                     charset="us-ascii", cte="7bit")
    del part["MIME-Version"]
    part["Content-Description"] = "Notification"
    return part


def _opening(
    notice: Notice, original: Envelope, context: ReportContext
) -> list[str]:
    sent = _date(original.arrival)
    count = len(notice.recipients)
    whom = "this recipient" if count == 1 else f"these {count} recipients"
    head = [f"This is the mail relay at {context.hostname}."]
    if notice.to_postmaster:
        return head + [
            f"A message from the null sender <> (a bounce or another "
            f"automatic notice), received on {sent} with queue id "
            f"{original.queue_id}, could not be delivered to {whom}. "
            "Such mail is never returned to its sender; you get this "
            "notice as the postmaster.",
        ]
    if notice.kind == DELAY:
        until = _date(original.arrival + context.max_lifetime)
        return head + [
            f"Your message of {sent} has not yet been delivered to {whom}. "
            "You need not do anything yet: the relay keeps trying until "
            f"{until}, and writes to you again only if it then gives up.",
        ]
    return head + [
        f"Your message of {sent} could not be delivered to {whom}. The "
        "relay has stopped trying: they will not get it unless it is "
        "sent again, after the problem below is solved.",
    ]


def _closing(notice: Notice) -> list[str]:
    if notice.kind == DELAY:
        return ["The headers of your message are attached."]
    return [
        "The headers of the message are attached; its body is not. If you "
        "need help, send this whole notice to your mail administrator.",
    ]


# --- part 2: for programs ------------------------------------------------------

def _status_part(
    notice: Notice, original: Envelope, context: ReportContext
) -> Message:
    per_message = _fields({
        "Reporting-MTA": f"dns; {context.hostname}",
        "X-Mta-Queue-ID": original.queue_id,
        "X-Mta-Sender": f"rfc822; {original.sender}",
        "Arrival-Date": _date(original.arrival),
    })
    groups: list[Message | str] = [per_message]
    groups.extend(_recipient_fields(recipient, notice, original, context)
                  for recipient in notice.recipients)
    part = Message(policy=POLICY)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.set_payload(groups)
    return part


def _recipient_fields(
    recipient: Recipient,
    notice: Notice,
    original: Envelope,
    context: ReportContext,
) -> Message:
    last = recipient.history[-1] if recipient.history else None
    delayed = notice.kind == DELAY
    fields = {
        "Final-Recipient": f"rfc822; {recipient.address}",
        "Action": "delayed" if delayed else "failed",
        "Status": status_code(recipient, delayed),
        "Remote-MTA": None,
        "Diagnostic-Code": diagnostic_code(recipient.reason),
        "Last-Attempt-Date": _date(last.time) if last else None,
        "Will-Retry-Until": (_date(original.arrival + context.max_lifetime)
                             if delayed else None),
    }
    if last is not None and last.connected and last.relay:
        fields["Remote-MTA"] = f"dns; {last.relay.split('[', 1)[0]}"
    return _fields(fields)


def status_code(recipient: Recipient, delayed: bool) -> str:
    """RFC 3463: a 5 for a failure, a 4 for a delay; an unknown detail
    says only that."""
    dsn = recipient.dsn or ""
    wanted = "4" if delayed else "5"
    return dsn if dsn.startswith(wanted + ".") else f"{wanted}.0.0"


def diagnostic_code(reason: str | None) -> str | None:
    """``smtp; REPLY`` for a server's reply (RFC 3464 2.3.6), else the
    relay's own reason (a TLS policy, DNS, a connection), typed ``X-mta``
    as Postfix types its own ``X-Postfix``."""
    if not reason:
        return None
    remote = _REMOTE_REPLY.search(reason)
    if remote is not None:
        return f"smtp; {remote.group(1)}"
    return f"X-mta; {reason}"


def _fields(values: dict[str, str | None]) -> Message:
    group = Message(policy=POLICY)
    for name, value in values.items():
        if value is not None:
            group[name] = _printable(value)
    return group


# --- part 3: the original headers ------------------------------------------

def _headers_part(headers: bytes) -> Message:
    part = Message(policy=POLICY)
    part["Content-Type"] = "text/rfc822-headers"
    part["Content-Description"] = "Headers of the original message"
    if headers.isascii():
        part.set_payload(headers.decode("ascii"))
        return part
    # 8-bit header bytes (not allowed, yet seen): quoted-printable keeps
    # them exactly, and the report stays 7-bit.
    part["Content-Transfer-Encoding"] = "quoted-printable"
    part.set_payload(quopri.encodestring(headers).decode("ascii"))
    return part


# --- small helpers -------------------------------------------------------------

def _date(when: float) -> str:
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return email.utils.format_datetime(moment)


def _wrap(paragraph: str, indent: str = "") -> list[str]:
    # Short lines keep the part 7-bit and readable in any mail program.
    return textwrap.wrap(paragraph, 76, initial_indent=indent,
                         subsequent_indent=indent, break_on_hyphens=False)


def _printable(text: str) -> str:
    return _UNSAFE.sub("?", text)


def _printable_text(text: str) -> str:
    return "\n".join(_printable(line) for line in text.split("\n"))

