"""A corpus of messages of the kinds real mail has, made deterministically.

Each message is built from a seeded `random.Random`, so a run that fails can
be repeated byte for byte.  Every line ends in CRLF, every message ends with
one, and every message carries a unique Message-ID by which a delivered copy
is matched to its original.  The kinds are the ones that break relays:

- multipart MIME with base64 attachments of awkward sizes (0, 57, 64 KiB);
- 8-bit bodies (latin-1, UTF-8) sent without BODY=8BITMIME, as many real
  clients do, and a few that declare it;
- long folded headers (To, References, DKIM-Signature, earlier Received);
- a first body line with no colon, a body that looks like a header, an
  empty body;
- leading dots: lone "." lines at the message offsets 16384 and 32768 (a
  TLS record's worth of plaintext, and 2 of them), ".." and "..." lines,
  and bodies made only of dot lines so that every read or chunk boundary,
  wherever it falls, lands on or next to a leading dot;
- lines longer than the 998 octets of RFC 5322 2.1.1 (relayed unchanged);
- one message of 10 MiB.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field
from typing import Any

CRLF = b"\r\n"
DOMAIN = "dest.test"
SEED = 20240229

# RFC 2045 6.8: base64 lines of at most 76 characters.
BASE64_LINE = 76
TEN_MIB = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    """One message to submit, and the envelope it goes with."""

    name: str
    message_id: str
    message: bytes
    recipients: tuple[str, ...]
    mail_options: tuple[str, ...] = field(default=())


class _Builder:
    """Makes the samples of one corpus, numbered in the order made."""

    def __init__(self, seed: int, tag: str) -> None:
        self.rng = random.Random(seed)
        self.tag = tag
        self.samples: list[Sample] = []

    def add(self, name: str, body: bytes, **options: Any) -> Sample:
        """Make a sample and keep it in the corpus."""
        sample = self.make(name, body, **options)
        self.samples.append(sample)
        return sample

    def head(self, name: str, **options: Any) -> bytes:
        """The header section (blank line included) `add` would give the
        next sample: for bodies that must put a line at an exact offset."""
        return self.make(name, b"", **options).message

    def make(
        self,
        name: str,
        body: bytes,
        *,
        headers: list[bytes] | None = None,
        content_type: bytes = b"text/plain; charset=us-ascii",
        encoding: bytes | None = b"7bit",
        recipients: tuple[str, ...] | None = None,
        mail_options: tuple[str, ...] = (),
        subject: bytes | None = None,
    ) -> Sample:
        number = len(self.samples)
        message_id = f"corpus-{self.tag}-{number:03d}-{name}@org.test"
        recipients = recipients or (f"user{number:03d}@{DOMAIN}",)
        top = [
            b"From: Alice Sender <alice@org.test>",
            b"To: " + b", ".join(r.encode() for r in recipients),
            b"Subject: " + (subject or f"corpus {number}: {name}".encode()),
            b"Date: " + _date(number).encode(),
            b"Message-ID: <" + message_id.encode() + b">",
            b"MIME-Version: 1.0",
        ]
        if content_type:
            top.append(b"Content-Type: " + content_type)
        if encoding:
            top.append(b"Content-Transfer-Encoding: " + encoding)
        message = CRLF.join(top + (headers or [])) + CRLF + CRLF + body
        _check(name, message)
        return Sample(name, message_id, message, recipients, mail_options)

    # Pieces of bodies.

    def words(self, count: int, vocabulary: list[str] | None = None) -> str:
        vocabulary = vocabulary or _ENGLISH
        return " ".join(self.rng.choice(vocabulary) for _ in range(count))

    def paragraph_lines(self, count: int, vocabulary: list[str] | None = None,
                        width: int = 72) -> list[str]:
        """Lines of prose wrapped at `width`, as a mail client writes them."""
        lines: list[str] = []
        line = ""
        while len(lines) < count:
            word = self.rng.choice(vocabulary or _ENGLISH)
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        return lines

    def text(self, count: int, encoding: str = "ascii",
             vocabulary: list[str] | None = None) -> bytes:
        lines = self.paragraph_lines(count, vocabulary)
        return b"".join(line.encode(encoding) + CRLF for line in lines)

    def printable(self, length: int) -> bytes:
        """`length` octets of printable ASCII, no leading dot or space."""
        alphabet = _PRINTABLE
        data = bytes(self.rng.choice(alphabet) for _ in range(length))
        return b"x" + data[1:] if length else b""

    def binary(self, length: int) -> bytes:
        return self.rng.randbytes(length)


def _date(number: int) -> str:
    return f"Thu, {1 + number % 28:02d} Feb 2024 12:{number % 60:02d}:00 +0100"


def longest_line(message: bytes) -> int:
    """The length of the longest line, its CRLF not counted."""
    return max(len(line) for line in message.split(CRLF))


def _check(name: str, message: bytes) -> None:
    """The corpus holds only well-formed SMTP input: CRLF line ends only."""
    if not message.endswith(CRLF):
        raise ValueError(f"{name}: does not end in CRLF")
    pairs = message.count(CRLF)
    if message.count(b"\r") != pairs or message.count(b"\n") != pairs:
        raise ValueError(f"{name}: bare CR or LF")


def base64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join(
        encoded[start : start + BASE64_LINE] + CRLF
        for start in range(0, len(encoded), BASE64_LINE)
    )


def multipart(boundary: bytes, parts: list[tuple[list[bytes], bytes]],
              preamble: bytes = b"This is a multi-part message in MIME format.\r\n"
              ) -> bytes:
    """A multipart body; each part is (its header lines, its body)."""
    out = [preamble]
    for headers, body in parts:
        out.append(b"\r\n--" + boundary + CRLF)
        out.append(CRLF.join(headers) + CRLF + CRLF)
        out.append(body.removesuffix(CRLF))
    out.append(b"\r\n--" + boundary + b"--\r\n")
    return b"".join(out)


def attachment(
    name: str, data: bytes, content_type: str = "application/octet-stream"
) -> tuple[list[bytes], bytes]:
    headers = [
        f'Content-Type: {content_type}; name="{name}"'.encode(),
        b"Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{name}"'.encode(),
    ]
    return headers, base64_lines(data)


def text_part(body: bytes, charset: str = "us-ascii",
              encoding: str = "7bit") -> tuple[list[bytes], bytes]:
    headers = [
        f"Content-Type: text/plain; charset={charset}; format=flowed".encode(),
        f"Content-Transfer-Encoding: {encoding}".encode(),
    ]
    return headers, body


def fold(name: bytes, items: list[bytes], separator: bytes = b",",
         width: int = 76, indent: bytes = b"\t") -> bytes:
    """A header whose items are folded onto continuation lines (RFC 5322
    2.2.3); returned without its final CRLF."""
    lines = [name + b":"]
    for index, item in enumerate(items):
        piece = item + (separator if index < len(items) - 1 else b"")
        if len(lines[-1]) + 1 + len(piece) > width and lines[-1] != name + b":":
            lines.append(indent + piece)
        else:
            lines[-1] += b" " + piece
    return CRLF.join(lines)


def pad_to(prefix: bytes, offset: int, builder: _Builder) -> bytes:
    """Lines of text after `prefix`, so that the next line starts exactly
    at `offset` of the message."""
    out = bytearray(prefix)
    if not prefix.endswith(CRLF):
        raise ValueError("pad_to needs a prefix that ends a line")
    while offset - len(out) > 200:
        width = builder.rng.randint(10, 78)
        out += builder.printable(width) + CRLF
    gap = offset - len(out)
    if gap < 2:
        raise ValueError(f"cannot pad {len(out)} to {offset}")
    out += builder.printable(gap - 2) + CRLF
    assert len(out) == offset
    return bytes(out)


# --- the corpus -----------------------------------------------------------


def corpus(seed: int = SEED, tag: str = "c") -> list[Sample]:
    """At least fifty messages of the everyday kinds (no 10 MiB one).

    `tag` goes into every Message-ID, so that two runs of one corpus
    through one destination can be told apart.
    """
    builder = _Builder(seed, tag)
    _attachments(builder)
    _alternatives(builder)
    _eight_bit(builder)
    _long_headers(builder)
    _first_lines(builder)
    _dots(builder)
    _long_lines(builder)
    _odd_but_valid(builder)
    return builder.samples


def big_message(seed: int = SEED, size: int = TEN_MIB) -> Sample:
    """One message of exactly `size` octets: a text part, a base64
    attachment that takes up the room, and a closing text part full of
    leading dots."""
    b = _Builder(seed + 1, "big")
    boundary = b"----=_Part_big_0001"
    intro = b.text(40)
    closing = b"".join(
        b.rng.choice([b".", b"..", b". dot", b".\t.", b"x"]) + CRLF
        for _ in range(20_000)
    ) + b.text(20)

    def build(raw: bytes, closing: bytes) -> Sample:
        body = multipart(boundary, [
            text_part(intro),
            attachment("archive.bin", raw),
            text_part(closing),
        ])
        return b.make("ten-mib", body, encoding=None,
                      content_type=b'multipart/mixed; boundary="' + boundary
                      + b'"')

    # Whole base64 lines (57 octets become 76 characters and CRLF), then
    # one text line to make up the rest; a line is at least its CRLF.
    room = size - len(build(b"", closing).message)
    lines = room // (BASE64_LINE + 2)
    if room % (BASE64_LINE + 2) == 1:
        lines -= 1
    raw = b.binary(lines * 57)
    short = size - len(build(raw, closing).message)
    if short:
        closing += b.printable(short - 2) + CRLF
    sample = build(raw, closing)
    assert len(sample.message) == size, (len(sample.message), size)
    return sample


# --- the kinds --------------------------------------------------------------


def _attachments(b: _Builder) -> None:
    # Sizes around base64's 57-octet line and the 64 KiB chunk sizes.
    for size in (0, 1, 57, 58, 1000, 4096, 65535, 65536, 150_000, 400_000):
        boundary = f"----=_NextPart_{size:06d}_{b.rng.getrandbits(32):08X}".encode()
        body = multipart(boundary, [
            text_part(b.text(12)),
            attachment(f"file-{size}.bin", b.binary(size)),
        ])
        b.add(f"attachment-{size}", body,
              content_type=b'multipart/mixed; boundary="' + boundary + b'"',
              encoding=None)

    # Several attachments, an image and a PDF-like, nested in a related part.
    outer, inner = b"outer-boundary-7f3a", b"inner-boundary-9c2e"
    html = (b"<html><body><p>See the picture:</p>"
            b'<img src="cid:logo@org.test"></body></html>\r\n')
    related = multipart(inner, [
        ([b"Content-Type: text/html; charset=us-ascii",
          b"Content-Transfer-Encoding: 7bit"], html),
        ([b"Content-Type: image/png",
          b"Content-Transfer-Encoding: base64",
          b"Content-ID: <logo@org.test>"], base64_lines(b.binary(3000))),
    ], preamble=b"")
    body = multipart(outer, [
        ([b'Content-Type: multipart/related; boundary="' + inner + b'"'],
         related),
        attachment("report.pdf", b"%PDF-1.4\n" + b.binary(20_000),
                   "application/pdf"),
        attachment("data.csv", b.text(50), "text/csv"),
    ])
    b.add("nested-multipart", body,
          content_type=b'multipart/mixed; boundary="' + outer + b'"',
          encoding=None)


def _alternatives(b: _Builder) -> None:
    for index in range(3):
        boundary = f"alt-{index}-{b.rng.getrandbits(40):010x}".encode()
        plain = b.text(15)
        # Quoted-printable, with soft line breaks ("=" at the end) and an
        # "=2E" where a line would start with a dot.
        qp = (b"<html><body style=3D\"font-family: sans-serif\">=\r\n"
              + b"".join(b"<p>" + line.encode() + b"</p>=\r\n"
                         for line in b.paragraph_lines(10))
              + b"=2E leading dot, encoded\r\n"
              + b"</body></html>\r\n")
        body = multipart(boundary, [
            text_part(plain),
            ([b"Content-Type: text/html; charset=utf-8",
              b"Content-Transfer-Encoding: quoted-printable"], qp),
        ])
        b.add(f"alternative-{index}", body,
              content_type=b'multipart/alternative; boundary="' + boundary + b'"',
              encoding=None)


def _eight_bit(b: _Builder) -> None:
    for index in range(3):
        b.add(f"latin1-{index}", b.text(30, "latin-1", _LATIN1),
              content_type=b"text/plain; charset=iso-8859-1",
              encoding=b"8bit")
    for index in range(3):
        b.add(f"utf8-{index}", b.text(30, "utf-8", _UTF8),
              content_type=b"text/plain; charset=utf-8", encoding=b"8bit")

    # Every octet from 0x80 to 0xFF, in lines, as a broken client might
    # send in a "text" part: still only CRLF line ends.
    high = bytes(range(0x80, 0x100))
    b.add("all-high-octets", b"".join(high[i:i + 32] + CRLF
                                      for i in range(0, 128, 32)) * 4,
          content_type=b"text/plain; charset=unknown-8bit", encoding=b"8bit")

    # Declared 8BITMIME, as a well-behaved client does.
    for index in range(2):
        b.add(f"declared-8bitmime-{index}", b.text(20, "utf-8", _UTF8),
              content_type=b"text/plain; charset=utf-8", encoding=b"8bit",
              mail_options=("BODY=8BITMIME",))

    # Raw UTF-8 in a header, without SMTPUTF8: common, if not correct.
    b.add("utf8-header", b.text(5, "utf-8", _UTF8),
          subject="Grüße aus Köln – 你好".encode(),
          content_type=b"text/plain; charset=utf-8", encoding=b"8bit")

    # A latin-1 attachment part inside a multipart, 8bit, no base64.
    boundary = b"latin1-mixed"
    body = multipart(boundary, [
        text_part(b.text(10, "latin-1", _LATIN1), "iso-8859-1", "8bit"),
        text_part(b.text(10, "utf-8", _UTF8), "utf-8", "8bit"),
    ])
    b.add("mixed-charsets", body,
          content_type=b'multipart/mixed; boundary="' + boundary + b'"',
          encoding=None)


def _long_headers(b: _Builder) -> None:
    many = [f"Person {i} <person{i}@{DOMAIN}>".encode() for i in range(80)]
    b.add("folded-to-cc", b.text(5), headers=[
        fold(b"Cc", many),
        fold(b"X-Long-List", [f"item-{i}".encode() for i in range(500)], b";",
             indent=b" "),
    ])

    references = [f"<{b.rng.getrandbits(64):016x}.{i}@mail.org.test>".encode()
                  for i in range(60)]
    b.add("references", b.text(5), headers=[
        fold(b"References", references, b""),
        b"In-Reply-To: " + references[-1],
    ])

    # What a message that crossed a few hops looks like: earlier Received
    # headers, a DKIM signature, an ARC seal, an encoded-word subject.
    signature = base64.b64encode(b.binary(256))
    dkim = fold(b"DKIM-Signature", [
        b"v=1;", b"a=rsa-sha256;", b"c=relaxed/relaxed;", b"d=org.test;",
        b"s=selector1;", b"h=From:To:Subject:Date:Message-ID;",
        b"bh=" + base64.b64encode(b.binary(32)) + b";",
        b"b=" + signature[:60], *[signature[i:i + 70]
                                  for i in range(60, len(signature), 70)],
    ], b"")
    hops = [
        b"Received: from mail.org.test (mail.org.test [192.0.2.10])\r\n"
        b"\tby gateway.org.test (Postfix) with ESMTPS id 4TxYz12abc\r\n"
        b"\tfor <user@dest.test>; Thu, 29 Feb 2024 11:59:58 +0100 (CET)",
        b"Received: from [10.0.0.5] (unknown [10.0.0.5])\r\n"
        b"        by mail.org.test (Postfix) with ESMTPSA id 3AB12C\r\n"
        b"        for <user@dest.test>; Thu, 29 Feb 2024 11:59:57 +0100",
    ]
    subject = fold(b"Subject", [
        b"=?UTF-8?B?" + base64.b64encode(w.encode()) + b"?="
        for w in ("Grüße", "und", "ein", "sehr", "langer", "Betreff",
                  "über", "mehrere", "Zeilen", "hinweg", "—", "Ende")
    ], b"")[len(b"Subject: "):]
    b.add("trace-and-dkim", b.text(8), headers=[*hops, dkim], subject=subject)

    b.add("header-flood", b.text(3), headers=[
        f"X-Header-{i:03d}: {b.words(8)}".encode() for i in range(300)
    ])


def _first_lines(b: _Builder) -> None:
    b.add("first-body-line-no-colon", b"Hello Bob\r\n" + b.text(5))
    b.add("first-body-line-with-colon",
          b"Note: this line looks like a header but is the body\r\n" + b.text(3))
    b.add("first-body-line-blank", CRLF + CRLF + b.text(3))
    b.add("first-body-line-whitespace", b"  indented first line\r\n\tand a tab\r\n")
    b.add("empty-body", b"")
    b.add("body-one-empty-line", CRLF)


def _dots(b: _Builder) -> None:
    # A lone "." line starting exactly at offset 16384, and another at
    # 32768, of the message; ".." and "..." lines right after them.
    head = b.head("dot-at-16k-32k")
    body = pad_to(head, 16384, b) + b".\r\n" + b"..\r\n"
    body = pad_to(body, 32768, b) + b".\r\n" + b"...\r\n" + b.text(10)
    sample = b.add("dot-at-16k-32k", body[len(head):])
    assert sample.message[16384 - 2 : 16387] == b"\r\n.\r\n"
    assert sample.message[32768 - 2 : 32771] == b"\r\n.\r\n"

    # The same, one octet to each side.
    for shift in (-1, 1):
        name = f"dot-near-16k{shift:+d}"
        head = b.head(name)
        body = pad_to(head, 16384 + shift, b) + b".\r\n"
        body = pad_to(body, 32768 + shift, b) + b"..\r\n" + b.text(3)
        b.add(name, body[len(head):])

    b.add("dot-lines", b"".join(line + CRLF for line in [
        b".", b"..", b"...", b". a dot and a space", b".leading dot",
        b"..two leading dots", b"", b".", b"", b"ends with a dot.", b" .",
        b".\t", b"x",
    ]))
    b.add("first-line-is-dot", b".\r\n" + b.text(3))
    b.add("last-line-is-dot", b.text(3) + b".\r\n")
    b.add("last-line-is-dotdot", b.text(3) + b"..\r\n")

    # Bodies made only of short dot lines: wherever a read, a TLS record
    # or a 64 KiB chunk of the spool file ends, it is at or next to a
    # leading dot; three phases of line length, and a mix.
    # With 3-octet lines, 64 KiB (which is 1 modulo 3) chunks starting
    # anywhere put a chunk boundary at a line start within three chunks;
    # 5-octet lines need five.
    for name, line, size in (("dots-1", b".\r\n", 300_000),
                             ("dots-2", b"..\r\n", 300_000),
                             ("dots-3", b"...\r\n", 400_000)):
        b.add(name, line * (size // len(line)))
    b.add("dots-mixed", b"".join(
        b"." * b.rng.randint(1, 4) + CRLF for _ in range(60_000)))


def _long_lines(b: _Builder) -> None:
    # RFC 5322 2.1.1 allows 998 octets; a relay must still pass longer
    # ones on unchanged, as Postfix does.  Around 998, around Postfix's
    # 2048-octet records, and past the 64 KiB chunks.
    for length in (998, 999, 1000, 2047, 2048, 2049, 4096, 16384, 70_000):
        b.add(f"long-line-{length}",
              b.text(2) + b.printable(length) + CRLF + b.text(2))

    # A long line that starts with a dot, and an unwrapped base64 blob.
    b.add("long-dot-line", b"." + b.printable(5000) + CRLF + b.text(1))
    b.add("unwrapped-base64",
          base64.b64encode(b.binary(30_000)) + CRLF,
          content_type=b"application/octet-stream", encoding=b"base64")


def _odd_but_valid(b: _Builder) -> None:
    b.add("trailing-whitespace",
          b"spaces at the end   \r\ntab at the end\t\r\n   \r\n\t\r\n")
    b.add("many-blank-lines", b.text(2) + CRLF * 50)
    b.add("from-lines", b"From the desk of Alice\r\nFrom: not a header\r\n"
          b">From quoted\r\n" + b.text(2))
    b.add("crlf-dot-crlf-lookalike",
          b"a line\r\n .\r\n.x\r\n\r\n..\r\n\r\nend\r\n")
    b.add("smtp-commands-in-body",
          b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@example.test>\r\n"
          b"DATA\r\n.\r\nQUIT\r\n")

    # A forwarded message (message/rfc822) with its own headers and dots.
    inner = (b"From: Carol <carol@elsewhere.test>\r\n"
             b"Subject: the original\r\n"
             b"Message-ID: <inner-1@elsewhere.test>\r\n\r\n"
             b"Original text.\r\n.\r\n..and more\r\n")
    boundary = b"fwd-boundary"
    body = multipart(boundary, [
        text_part(b"See below.\r\n"),
        ([b"Content-Type: message/rfc822",
          b"Content-Disposition: inline"], inner),
    ])
    b.add("forwarded-rfc822", body,
          content_type=b'multipart/mixed; boundary="' + boundary + b'"',
          encoding=None)

    # A delivery status notification (RFC 3464).
    boundary = b"dsn-boundary"
    body = multipart(boundary, [
        text_part(b"Your message could not be delivered.\r\n"),
        ([b"Content-Type: message/delivery-status"],
         b"Reporting-MTA: dns; relay.test\r\n\r\n"
         b"Final-Recipient: rfc822; gone@dest.test\r\n"
         b"Action: failed\r\nStatus: 5.1.1\r\n"),
        ([b"Content-Type: text/rfc822-headers"],
         b"From: alice@org.test\r\nSubject: hi\r\n"),
    ])
    b.add("dsn-report", body,
          content_type=b'multipart/report; report-type=delivery-status; '
          b'boundary="' + boundary + b'"', encoding=None)

    b.add("calendar", b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\n"
          b"SUMMARY:Meeting\r\nDTSTART:20240301T100000Z\r\nEND:VEVENT\r\n"
          b"END:VCALENDAR\r\n", content_type=b"text/calendar; method=REQUEST")

    b.add("three-recipients", b.text(4),
          recipients=tuple(f"team{i}@{DOMAIN}" for i in range(3)))


_ENGLISH = (
    "the quick brown fox jumps over lazy dog mail relay message server "
    "delivery queue spool transport layer security certificate cipher "
    "protocol header body line octet report meeting tomorrow invoice "
    "attached please find regards thanks agenda minutes project budget"
).split()
_LATIN1 = (
    "Größe Übermaß Äpfel Öl straße café crème brûlée façade naïve "
    "garçon déjà vu señor año mañana niño ¿qué? ¡olé! £5 ±1 ×2 ½ ¼ ¾ "
    "Ærø Østergade Åland þorn ðe"
).split()
_UTF8 = (
    "Grüße 你好 мир Καλημέρα שלום مرحبا こんにちは 안녕하세요 "
    "emoji 📧 ✉️ 🔒 naïve café ∑ ∞ → ≠ — € ‰ “quoted” ‘single’"
).split()
_PRINTABLE = bytes(range(0x21, 0x7F))
