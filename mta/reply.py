"""SMTP replies as values: a code, an enhanced status code and text."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

# The most of a reply's text kept: a server's words, not its novel.
MAX_TEXT = 2000

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    dsn: str  # enhanced status code, RFC 3463: "2.0.0", "5.7.1"
    text: str
    # False when the server wrote no enhanced code (RFC 2034 is optional)
    # and `dsn` was derived from the basic code: `line()` then gives the
    # server's words as they came, never a code it did not say.
    stated: bool = True

    @classmethod
    def parse(cls, code: int, text: str) -> Reply:
        """A reply as a peer sent it; its enhanced code is read from the
        text when present, or derived from the basic code (RFC 3463)."""
        text = " ".join(text.split())
        match = _ENHANCED.match(text)
        if match and match.group(1) == str(code)[0]:
            return cls(code, match.group(0), text[match.end() :].strip())
        return cls(code, f"{str(code)[0]}.0.0", text, stated=False)

    @classmethod
    def parse_lines(cls, code: int, lines: list[str]) -> Reply:
        """A multi-line reply: RFC 2034 repeats the enhanced code on every
        line; it is kept once, in front."""
        first = cls.parse(code, lines[0] if lines else "")
        if len(lines) <= 1 and len(first.text) <= MAX_TEXT:
            return first  # most replies: one short line
        rest = []
        for line in lines[1:]:
            line = " ".join(line.split())
            if first.stated and (line.startswith(first.dsn + " ")
                                 or line == first.dsn):
                line = line[len(first.dsn) :].strip()
            rest.append(line)
        text = " ".join(part for part in (first.text, *rest) if part)
        if len(text) > MAX_TEXT:
            # Kept in the log, the spool at every attempt and the bounce.
            text = text[:MAX_TEXT] + " [...]"
        return replace(first, text=text)

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def line(self) -> str:
        """As written in logs and bounces: ``250 2.0.0 Ok``, or ``250 Ok``
        from a server that gave no enhanced code: what the server said."""
        if not self.stated:
            return f"{self.code} {self.text}".rstrip()
        return f"{self.code} {self.dsn} {self.text}".rstrip()

    def __str__(self) -> str:
        return self.line()
