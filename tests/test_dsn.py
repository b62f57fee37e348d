"""The delivery status notification as bytes (mta.dsn, mta.dsnwords): each
report is parsed back with Python's email package, as a mail program
would read it."""

from __future__ import annotations

import email
import email.utils
import re
from email.message import Message

import pytest

from mta.dsn import (
    ReportContext,
    build_report,
    diagnostic_code,
    header_section,
    status_code,
)
from mta.dsnwords import span
from mta.envelope import (
    DEFERRED,
    FAILED,
    Attempt,
    Client,
    Envelope,
    Recipient,
    TLSFacts,
)
from mta.notices import DELAY, FAILURE, Notice

ARRIVAL = 1_800_000_000.0
NOW = ARRIVAL + 10
ORIGINAL = (
    b"Received: from client.test (unknown [127.0.0.1])\r\n"
    b"\tby relay.test (mta) with ESMTPS id 0ABC; Fri, 15 Jan 2027 08:00:00 +0000\r\n"
    b"From: Alice <alice@org.test>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: the quarterly figures\r\n"
    b"Message-ID: <figures.1@org.test>\r\n"
    b"\r\n"
    b"The body, which a bounce does not return.\r\n"
)
CONTEXT = ReportContext("relay.test", "0NOTICE", NOW, 5 * 86400)


def attempt(dsn: str, reply: str, **fields: object) -> Attempt:
    values: dict[str, object] = {
        "time": NOW - 1, "status": "bounced" if dsn[0] == "5" else "deferred",
        "dsn": dsn, "reply": reply, "policy": "opportunistic",
    }
    values.update(fields)
    return Attempt(**values)  # type: ignore[arg-type]


def recipient(address: str, last: Attempt, state: str = FAILED) -> Recipient:
    return Recipient(address, state=state, reason=last.reply, dsn=last.dsn,
                     history=(last,))


REFUSED = recipient("gone@dest.test", attempt(
    "5.1.1", "host mx.dest.test[192.0.2.1] said: 550 5.1.1 no such user "
    "(in reply to RCPT TO)", relay="mx.dest.test[192.0.2.1]:25",
    connected=True, tls=TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256")))
NO_TLS = recipient("carol@partner.test", attempt(
    "5.7.4", "message expired after 5 days in the queue; last problem: TLS "
    "required by rule partner (enforce-tls): TLS is required, but was not "
    "offered by host mx.partner.test[192.0.2.7]", policy="enforce-tls",
    rule="partner", relay="mx.partner.test[192.0.2.7]:25", connected=True,
    time=ARRIVAL + 5 * 86400))
UNVERIFIED = recipient("dan@secure.test", attempt(
    "5.7.5", "message expired after 5 days in the queue; last problem: a "
    "verified certificate required by rule bank (enforce-secure): "
    "certificate of mx.secure.test does not name secure.test",
    policy="enforce-secure", rule="bank",
    relay="mx.secure.test[192.0.2.8]:25", connected=True,
    tls=TLSFacts("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256"), trust="Trusted"))
UNREACHABLE = recipient("eve@slow.test", attempt(
    "4.4.1", "connect to mx.slow.test[192.0.2.9]:25: Connection refused",
    relay="mx.slow.test[192.0.2.9]:25"), state=DEFERRED)


def original(*recipients: Recipient, sender: str = "alice@org.test") -> Envelope:
    return Envelope("0ABC", sender, ARRIVAL, len(ORIGINAL),
                    Client("client.test", "unknown", "127.0.0.1", "submission"),
                    recipients)


def report(notice: Notice, envelope: Envelope) -> tuple[bytes, Message]:
    data = build_report(notice, envelope, header_section(ORIGINAL), CONTEXT)
    return data, email.message_from_bytes(data)


def parts(parsed: Message) -> tuple[Message, list[Message], Message]:
    text, status, headers = parsed.get_payload()  # type: ignore[misc]
    return text, status.get_payload(), headers  # type: ignore[return-value]


def test_a_failure_report_is_multipart_report_of_three_parts() -> None:
    envelope = original(REFUSED, NO_TLS)
    data, parsed = report(Notice(FAILURE, (REFUSED, NO_TLS), "alice@org.test"),
                          envelope)

    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in parsed.get_payload()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert parsed["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert parsed["To"] == "<alice@org.test>"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["Message-ID"] == "<0NOTICE@relay.test>"
    assert parsed["In-Reply-To"] == "<figures.1@org.test>"
    assert email.utils.parsedate_to_datetime(parsed["Date"]).timestamp() == NOW
    assert data.startswith(b"Received: by relay.test (mta) id 0NOTICE;")


def test_the_report_is_7bit_with_crlf_line_ends_only() -> None:
    data, _ = report(Notice(FAILURE, (REFUSED,), "alice@org.test"),
                     original(REFUSED))

    assert data.isascii()
    assert re.search(rb"[^\r]\n|\r[^\n]", data) is None
    assert data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_delivery_status_has_a_group_per_recipient() -> None:
    _, parsed = report(Notice(FAILURE, (REFUSED, NO_TLS), "alice@org.test"),
                       original(REFUSED, NO_TLS))
    per_message, refused, no_tls = parts(parsed)[1]

    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert email.utils.parsedate_to_datetime(
        per_message["Arrival-Date"]).timestamp() == ARRIVAL

    assert refused["Final-Recipient"] == "rfc822; gone@dest.test"
    assert refused["Action"] == "failed"
    assert refused["Status"] == "5.1.1"
    assert refused["Remote-MTA"] == "dns; mx.dest.test"
    assert refused["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert email.utils.parsedate_to_datetime(
        refused["Last-Attempt-Date"]).timestamp() == NOW - 1

    assert no_tls["Final-Recipient"] == "rfc822; carol@partner.test"
    assert no_tls["Status"] == "5.7.4"
    code = " ".join(no_tls["Diagnostic-Code"].split())
    assert code.startswith("X-mta; message expired after 5 days")
    assert "TLS required by rule partner (enforce-tls)" in code


def test_the_original_headers_are_returned_without_the_body() -> None:
    _, parsed = report(Notice(FAILURE, (REFUSED,), "alice@org.test"),
                       original(REFUSED))
    headers = parts(parsed)[2].get_payload(decode=True)

    assert b"Subject: the quarterly figures" in headers
    assert headers.startswith(b"Received: from client.test")
    assert b"The body" not in headers


def test_8bit_original_headers_come_back_exact_in_quoted_printable() -> None:
    eight_bit = b"Subject: caf\xc3\xa9\r\nFrom: a@org.test\r\n\r\nbody\r\n"
    data = build_report(Notice(FAILURE, (REFUSED,), "alice@org.test"),
                        original(REFUSED), header_section(eight_bit), CONTEXT)
    headers = parts(email.message_from_bytes(data))[2]

    assert data.isascii()
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers.get_payload(decode=True) == (
        b"Subject: caf\xc3\xa9\r\nFrom: a@org.test\r\n")


def text_of(parsed: Message) -> str:
    return " ".join(str(parts(parsed)[0].get_payload()).split())


def test_the_text_says_which_recipients_and_why_in_plain_words() -> None:
    _, parsed = report(Notice(FAILURE, (REFUSED,), "alice@org.test"),
                       original(REFUSED))
    text = text_of(parsed)

    assert "could not be delivered to this recipient" in text
    assert "<gone@dest.test>" in text
    assert "the address does not exist there" in text
    assert "550 5.1.1 no such user" in text


def test_a_tls_failure_says_which_policy_required_what_and_what_was_offered(
) -> None:
    _, parsed = report(
        Notice(FAILURE, (NO_TLS, UNVERIFIED), "alice@org.test"),
        original(NO_TLS, UNVERIFIED))
    text = text_of(parsed)

    assert "The relay tried to deliver it for 5 days and has given up" in text
    assert "(rule partner, level enforce-tls)" in text
    assert "must travel encrypted (TLS)" in text
    assert "mx.partner.test[192.0.2.7] did not offer encryption (STARTTLS)" in text
    assert "(rule bank, level enforce-secure)" in text
    assert "certificate is verified and names the destination" in text
    assert ("offered encryption (TLSv1.2/ECDHE-RSA-AES128-GCM-SHA256), but its "
            "certificate is valid but does not name the destination") in text


def test_a_delay_notice_is_action_delayed_with_a_4xx_status() -> None:
    _, parsed = report(Notice(DELAY, (UNREACHABLE,), "alice@org.test"),
                       original(UNREACHABLE))
    group = parts(parsed)[1][1]

    assert group["Action"] == "delayed"
    assert group["Status"] == "4.4.1"
    assert "Remote-MTA" not in group  # never connected
    assert group["Diagnostic-Code"].startswith("X-mta; connect to mx.slow.test")
    until = email.utils.parsedate_to_datetime(group["Will-Retry-Until"])
    assert until.timestamp() == ARRIVAL + 5 * 86400
    assert parsed["Subject"].startswith("Delivery delayed")
    text = text_of(parsed)
    assert "has not yet been delivered" in text and "keeps trying until" in text
    assert "could not be reached" in text


def test_a_postmaster_notice_says_the_mail_was_from_the_null_sender() -> None:
    envelope = original(REFUSED, sender="")
    _, parsed = report(Notice(FAILURE, (REFUSED,), "postmaster@org.test",
                              to_postmaster=True), envelope)

    assert parsed["To"] == "<postmaster@org.test>"
    assert parsed["Subject"].startswith("Postmaster notice")
    assert "from the null sender <>" in text_of(parsed)
    assert parts(parsed)[1][1]["Status"] == "5.1.1"


@pytest.mark.parametrize("dsn, delayed, expected", [
    ("5.1.1", False, "5.1.1"),
    ("4.4.1", True, "4.4.1"),
    (None, False, "5.0.0"),
    (None, True, "4.0.0"),
    ("4.4.1", False, "5.0.0"),  # a failure is never reported with a 4
])
def test_status_code(dsn: str | None, delayed: bool, expected: str) -> None:
    assert status_code(Recipient("a@b.test", dsn=dsn), delayed) == expected


@pytest.mark.parametrize("reason, expected", [
    ("host mx[192.0.2.1] said: 550 5.1.1 no (in reply to RCPT TO)",
     "smtp; 550 5.1.1 no"),
    ("host mx[192.0.2.1] said: 554 5.7.1 go away (in reply to end of DATA)",
     "smtp; 554 5.7.1 go away"),
    ("message expired after 5 days in the queue; last problem: host "
     "mx[192.0.2.1] said: 451 4.3.0 later (in reply to RCPT TO)",
     "smtp; 451 4.3.0 later"),
    ("Host or domain name not found", "X-mta; Host or domain name not found"),
    (None, None),
])
def test_diagnostic_code(reason: str | None, expected: str | None) -> None:
    assert diagnostic_code(reason) == expected


def test_header_section_stops_at_the_blank_line_or_a_whole_line() -> None:
    assert header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == b"A: 1\r\nB: 2\r\n"
    assert header_section(b"A: 1\r\nB: cut of") == b"A: 1\r\n"
    assert header_section(b"") == b""


@pytest.mark.parametrize("seconds, words", [
    (3, "3 seconds"), (1, "1 second"), (90, "1.5 minutes"),
    (3600, "1 hour"), (5 * 86400, "5 days"),
])
def test_span(seconds: float, words: str) -> None:
    assert span(seconds) == words
