"""What happened to a recipient, in words a person who is not a postmaster
understands: the human part of a bounce or delay notice (`mta.dsn`).

Each explanation is built from what the spool recorded: the status code
(RFC 3463), the last attempt (its policy, rule, relay and TLS facts) and
the reason, which keeps the server's reply or the relay's own words and is
quoted after the plain sentence.
"""

from __future__ import annotations

import re

from mta.envelope import Attempt, Recipient

ENFORCED = ("enforce-tls", "enforce-secure")

# outcomes.expired_reply starts the reason of a recipient that ran out of
# time with these words, and keeps the last problem after "last problem: ".
_EXPIRED = "message expired after "
_LAST_PROBLEM = "; last problem: "
_SAID = re.compile(r"\bhost (?P<host>\S+) said: ")

# RFC 3463 subject.detail -> what it means for the person who sent it.
_MEANING = {
    "1.1": "the address does not exist there",
    "1.2": "the recipient's domain does not exist",
    "1.3": "the address is not written correctly",
    "1.10": "the recipient's domain says it takes no mail at all",
    "2.1": "the mailbox is disabled",
    "2.2": "the mailbox is full",
    "2.3": "the message is too big for that mailbox",
    "3.4": "the message is too big for that server",
    "4.1": "the recipient's mail server could not be reached",
    "4.2": "the connection to the recipient's mail server broke off",
    "4.3": "the recipient's domain could not be looked up in the DNS",
    "4.4": "no mail server could be found for the recipient's domain",
    "4.6": "the message was going round in a loop",
    "5.3": "the message has too many recipients for that server",
    "6.3": ("the message contains 8-bit text and that server accepts only "
            "7-bit"),
    "7.1": "the server refused it by its own rules (for instance as spam)",
}
_TRUST_WORDS = {
    "Anonymous": "it showed no certificate",
    "Untrusted": ("its certificate could not be verified (unknown issuer, "
                  "expired, or self-signed)"),
    "Trusted": ("its certificate is valid but does not name the "
                "destination"),
}


def explain(
    recipient: Recipient, max_lifetime: float, arrival: float
) -> list[str]:
    """Paragraphs about one recipient: what happened, then the details."""
    reason = recipient.reason or "no reason was recorded"
    last = recipient.history[-1] if recipient.history else None
    paragraphs = []
    if reason.startswith(_EXPIRED):
        tried = (last.time - arrival) if last else max_lifetime
        paragraphs.append(f"The relay tried to deliver it for {span(tried)} "
                          "and has given up.")
        reason = reason.split(_LAST_PROBLEM, 1)[-1]
    if last is not None and is_tls_enforcement(recipient.dsn, last):
        paragraphs.append(_tls_words(recipient.dsn or "", last))
    else:
        paragraphs.append(_plain_words(recipient.dsn or "", reason))
    paragraphs.append(f"Details: {reason}")
    return paragraphs


def is_tls_enforcement(dsn: str | None, last: Attempt) -> bool:
    """A recipient held back by a policy that demands TLS (4.7.x or,
    once expired, 5.7.x)."""
    return last.policy in ENFORCED and (dsn or "")[1:4] == ".7."


def _tls_words(dsn: str, last: Attempt) -> str:
    rule = f"rule {last.rule}" if last.rule else "the default policy"
    if last.policy == "enforce-secure":
        wanted = ("mail to this address must travel encrypted (TLS), to a "
                  "server whose certificate is verified and names the "
                  "destination")
    else:
        wanted = "mail to this address must travel encrypted (TLS)"
    host = _host(last.relay) or "the recipient's mail server"
    return (f"A security policy of this relay ({rule}, level {last.policy}) "
            f"says that {wanted}. {_offered(dsn, last, host)}, so the "
            "message was not sent to it, and never sent unencrypted.")


def _offered(dsn: str, last: Attempt, host: str) -> str:
    """What the server offered, in words."""
    if last.tls is not None:
        trust = _TRUST_WORDS.get(last.trust or "", "its certificate did not "
                                 "pass the policy's checks")
        return f"The server {host} offered encryption ({last.tls}), but {trust}"
    if dsn.endswith(".7.5"):
        return (f"The server {host} offered encryption, but the encrypted "
                "connection could not be set up (no protocol or cipher in "
                "common, or a broken handshake)")
    return f"The server {host} did not offer encryption (STARTTLS), or refused it"


def _plain_words(dsn: str, reason: str) -> str:
    meaning = _MEANING.get(dsn.split(".", 1)[-1])
    said = _SAID.search(reason)
    if said is not None:  # its reply follows, in the details
        server = f"The recipient's mail server {said['host']}"
        answer = "refused it" if dsn.startswith("5") else "asked to try later"
        return f"{server} {answer}" + (f": {meaning}." if meaning else ".")
    if meaning:
        return meaning[0].upper() + meaning[1:] + "."
    if dsn.startswith("4"):
        return "It could not be delivered yet; the relay is trying again."
    return "It could not be delivered."


def _host(relay: str | None) -> str | None:
    """``mx.example.com[192.0.2.1]`` of ``mx.example.com[192.0.2.1]:25``."""
    return relay.rsplit(":", 1)[0] if relay else None


def span(seconds: float) -> str:
    """A duration as a person says it: 5 days, 4 hours, 3 seconds."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = round(seconds / size, 1)
            text = f"{count:g}"
            return f"{text} {unit}{'' if text == '1' else 's'}"
    count = round(seconds)
    return f"{count} second{'' if count == 1 else 's'}"
