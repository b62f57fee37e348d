"""What a listener accepts: addresses, MAIL and RCPT parameters, and which
recipients a client may send to.

Pure functions only: each takes text or configuration values and returns a
value, or the `Reply` to send instead.  The SMTP protocol in
`mta.smtpserver` gathers the facts and acts on the answer.

The relay rules (SPEC.md section 6, "No open relay"):

- an ``inbound`` listener takes a recipient only when its domain is one of
  ``domains``; when that domain has a recipient list, only the listed
  addresses and postmaster@ (RFC 5321 4.5.1);
- an ``outbound`` listener takes any recipient, but only from a client
  that logged in with SMTP AUTH or whose address is inside the listener's
  ``networks``.  A recipient in one of our own
  domains must still pass that domain's recipient list, as Postfix does
  with ``smtpd_reject_unlisted_recipient`` even for ``mynetworks``.

Addresses are put in one canonical form as they are parsed (see
`canonical_address`), so the duplicate check, the recipient lists and the
policy rules all compare the same string.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mta.config import Config, Limits, Listener
from mta.reply import Reply

# --- RFC 5321 4.1.2 address syntax -------------------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"

_PATH = re.compile(
    rf"<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?"  # a source route, ignored
    rf"(?P<local>{_DOT_STRING}|{_QUOTED_STRING})"
    rf"@(?P<domain>{_DOMAIN}|{_LITERAL})>"
)
_PLAIN_LOCAL = re.compile(_DOT_STRING)
# RFC 5321 4.1.1.3: the one path that needs no domain.
_BARE_POSTMASTER = re.compile(r"<postmaster>", re.IGNORECASE)
# Valid only with SMTPUTF8, which we do not offer, or never valid at all.
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
_PARAMETER = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")

# RFC 5321 4.5.3.1: the limits a server must accept, and may enforce.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

BODY_TYPES = ("7BIT", "8BITMIME")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """An address in canonical form, source route dropped: ``local``
    keeps its case, and its quotes only when it needs them; ``domain`` is
    lower-case unless it is an address literal."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True, slots=True)
class MailRequest:
    """What a valid ``MAIL FROM:`` asked for."""

    sender: Mailbox | None  # None: the null reverse-path <>
    size: int | None  # declared with SIZE=, RFC 1870
    body: str  # "7BIT" or "8BITMIME", RFC 6152


# --- replies -------------------------------------------------------------

MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
# RFC 3463: X.1.7 is a bad sender address, X.1.3 a bad recipient address.
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
UNRELAYABLE_SENDER = Reply(
    501,
    "5.1.7",
    "Bad sender address: <, >, control and non-ASCII characters cannot be relayed",
)
UNRELAYABLE_RECIPIENT = Reply(
    501,
    "5.1.3",
    "Bad recipient address: <, >, control and non-ASCII characters cannot be relayed",
)
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter syntax")
BAD_BODY = Reply(501, "5.5.4", "Bad BODY parameter: expected 7BIT or 8BITMIME")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")


def unsupported_parameter(keyword: str) -> Reply:
    return Reply(555, "5.5.4", f"Unsupported option: {_printable(keyword)}")


def duplicate_parameter(keyword: str) -> Reply:
    return Reply(501, "5.5.4", f"Parameter given twice: {keyword}")


def _printable(text: str) -> str:
    # The client's own word goes back in a reply: ASCII only, and short.
    return re.sub(r"[^\x21-\x7e]", "?", text[:64])


# --- parsing MAIL and RCPT -------------------------------------------------


def parse_mail(
    argument: str, limits: Limits, auth_offered: bool = False
) -> MailRequest | Reply:
    """``FROM:<address> [parameters]`` -> the request, or the error reply.
    ``auth_offered``: the AUTH extension was advertised, so its MAIL
    parameter is taken."""
    path = _after_keyword(argument, "FROM:")
    if path is None:
        return MAIL_SYNTAX
    if path == "<>" or path.startswith("<> "):
        sender, rest = None, path[2:]
    else:
        parsed = _relayable_path(path, BAD_SENDER, UNRELAYABLE_SENDER)
        if isinstance(parsed, Reply):
            return parsed
        sender, rest = parsed
    return _mail_parameters(sender, rest, limits, auth_offered)


def parse_rcpt(argument: str, postmaster_domain: str | None = None) -> Mailbox | Reply:
    """``TO:<address> [parameters]`` -> the recipient, or the error reply.
    A bare ``<Postmaster>`` is qualified with ``postmaster_domain``, and
    refused when there is none.  No RCPT parameter is supported yet (no
    DSN): any is refused."""
    path = _after_keyword(argument, "TO:")
    if path is None:
        return RCPT_SYNTAX
    parsed = _bare_postmaster(path, postmaster_domain) or _relayable_path(
        path, BAD_RECIPIENT, UNRELAYABLE_RECIPIENT
    )
    if isinstance(parsed, Reply):
        return parsed
    recipient, rest = parsed
    for keyword, _ in _parameters(rest):
        return unsupported_parameter(keyword)
    return recipient


def _after_keyword(argument: str, keyword: str) -> str | None:
    # RFC 5321 has no space after the colon; Postfix, like most servers,
    # takes one anyway, since common clients send it.
    if argument[: len(keyword)].upper() != keyword:
        return None
    return argument[len(keyword) :].lstrip(" ")


def _relayable_path(
    text: str, bad: Reply, unrelayable: Reply
) -> tuple[Mailbox, str] | Reply:
    """`_split_path`, or ``unrelayable`` for an address the relay could
    not hand on, or ``bad`` for one that is not an address."""
    parsed = _split_path(text)
    if parsed is None:
        # Control and non-ASCII characters are never valid without
        # SMTPUTF8: say what is wrong rather than just "syntax".
        return unrelayable if _NOT_PRINTABLE_ASCII.search(text) else bad
    # "<" and ">" are valid in a quoted local part, but mta.smtpclient
    # refuses to send them on: the message would stay in the queue for
    # ever, so it is refused while the client can still be told.
    if "<" in parsed[0].local or ">" in parsed[0].local:
        return unrelayable
    return parsed


def _split_path(text: str) -> tuple[Mailbox, str] | None:
    """A path at the start of ``text`` and what follows it (parameters)."""
    match = _PATH.match(text)
    if match is None:
        return None
    rest = _parameters_after(text, match.end())
    if rest is None:
        return None
    local, domain = match.group("local"), match.group("domain")
    if not _within_limits(local, domain) or not _valid_domain(domain):
        return None
    return Mailbox(_unquoted(local), _canonical_domain(domain)), rest


def _bare_postmaster(text: str, domain: str | None) -> tuple[Mailbox, str] | None:
    """RFC 5321 4.5.1: ``<Postmaster>`` without a domain must be taken;
    it is the postmaster of ``domain``."""
    match = _BARE_POSTMASTER.match(text)
    if match is None or domain is None:
        return None
    rest = _parameters_after(text, match.end())
    return None if rest is None else (Mailbox("postmaster", domain), rest)


def _parameters_after(text: str, end: int) -> str | None:
    """What follows a path that ends at ``end``: nothing, or parameters
    after a space; None when the path runs on into other text."""
    rest = text[end:]
    return rest if not rest or rest.startswith(" ") else None


def _within_limits(local: str, domain: str) -> bool:
    if len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
        return False
    if len(local) + len(domain) + 3 > MAX_PATH:  # "<" local "@" domain ">"
        return False
    return domain.startswith("[") or all(
        len(label) <= 63 for label in domain.split(".")
    )


def _valid_domain(domain: str) -> bool:
    """A name whose last label is not all digits, or a valid literal.

    ``u@192.0.2.1`` matches the RFC 5321 Domain grammar, but no top-level
    domain is numeric (RFC 1123 2.1, RFC 3696 2): it is an address written
    without its brackets, refused as Postfix refuses it (its
    ``resolve_numeric_domain = no``) rather than looked up as a name."""
    if domain.startswith("["):
        return _valid_literal(domain[1:-1])
    return not domain.rpartition(".")[2].isdigit()


def _valid_literal(inner: str) -> bool:
    """RFC 5321 4.1.3: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``.  The
    general form (a registered tag) has no registered tags, so it is
    refused; so is an IPv6 zone (``fe80::1%eth0``), which the grammar does
    not have and which would name one of our own interfaces."""
    try:
        if inner[:5].upper() == "IPV6:":
            return "%" not in inner and bool(ipaddress.IPv6Address(inner[5:]))
        ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def _parameters(text: str) -> list[tuple[str, str | None]]:
    """``KEY[=VALUE]`` words, keywords upper-cased; a word that is not one
    comes back as its own keyword with an empty value, so it is refused as
    an unknown parameter."""
    words: list[tuple[str, str | None]] = []
    for word in text.split():
        match = _PARAMETER.fullmatch(word)
        if match is None:
            words.append((word, ""))
        else:
            words.append((match.group(1).upper(), match.group(2)))
    return words


def _mail_parameters(
    sender: Mailbox | None, text: str, limits: Limits, auth_offered: bool
) -> MailRequest | Reply:
    size: int | None = None
    body = "7BIT"
    seen: set[str] = set()
    for keyword, value in _parameters(text):
        if keyword in seen:
            return duplicate_parameter(keyword)
        seen.add(keyword)
        if keyword == "SIZE":
            # RFC 1870: up to 20 digits; a larger declared size is refused
            # now, so the client does not send a body we would throw away.
            if value is None or not value.isdigit() or len(value) > 20:
                return BAD_SIZE
            size = int(value)
            if size > limits.message_size:
                return TOO_BIG
        elif keyword == "BODY":
            if value is None or value.upper() not in BODY_TYPES:
                return BAD_BODY
            body = value.upper()
        elif keyword == "AUTH" and auth_offered and value:
            # RFC 4954 5: who first submitted the message.  Taken, and
            # treated as AUTH=<>: the relay does not vouch for it, nor
            # pass it on.
            continue
        else:
            return unsupported_parameter(keyword)
    return MailRequest(sender=sender, size=size, body=body)


# --- which recipients a listener accepts ---------------------------------


def recipient_verdict(
    config: Config,
    listener: Listener,
    client_address: str,
    recipient: str,
    authenticated: bool = False,
) -> Reply | None:
    """None when ``listener`` may take ``recipient`` (a syntactically valid
    ``local@domain``) from a client at ``client_address``, logged in with
    AUTH or not; otherwise the reply that refuses it."""
    if (
        listener.role == "outbound"
        and not authenticated
        and not listener.allows_client(client_address)
    ):
        return Reply(554, "5.7.1", f"<{recipient}>: Relay access denied")

    local, _, domain = recipient.rpartition("@")
    known = config.domains.get(domain.lower())
    if known is None:
        if listener.role == "outbound":
            return None
        return Reply(
            550,
            "5.7.1",
            f"<{recipient}>: Recipient address rejected: "
            "not a domain we accept mail for",
        )
    if listener.role == "inbound" and _routes_elsewhere(local):
        return Reply(
            550,
            "5.7.1",
            f"<{recipient}>: Relay access denied: "
            "sender-specified routing is not accepted",
        )
    if known.recipients is None or _is_listed(local, known.name, known.recipients):
        return None
    return Reply(
        550,
        "5.1.1",
        f"<{recipient}>: Recipient address rejected: "
        "User unknown in relay recipient table",
    )


def _is_listed(local: str, domain: str, listed: frozenset[str]) -> bool:
    # The configuration lower-cases its lists: compare the same way, and a
    # quoted local part that needs no quotes is the same mailbox unquoted.
    plain = _unquoted(local).lower()
    # RFC 5321 4.5.1: postmaster must be accepted, whatever its case.
    return plain == "postmaster" or f"{plain}@{domain}" in listed


def _routes_elsewhere(local: str) -> bool:
    """``user%site``, ``site!user`` or ``"user@site"``: the sender asks the
    server that takes the mail to relay it on.  Postfix refuses this from
    untrusted clients (``allow_untrusted_routing = no``); we would send it
    as it is to ``relay_to``, whose own rules might relay it anywhere."""
    return any(char in _local_content(local) for char in "%!@")


def postmaster_domain(config: Config) -> str | None:
    """The domain that qualifies a bare ``<Postmaster>``: the first of
    ``domains``.  Postfix appends $myorigin, but our ``hostname`` is no
    domain we accept mail for, so its postmaster would be refused; the first
    domain's postmaster is one an inbound listener always takes."""
    return next(iter(config.domains), None)


# --- one form for one mailbox ----------------------------------------------


def canonical_address(address: str) -> str:
    """The one form of ``address`` that every comparison uses.

    RFC 5321 4.1.2: a quoted local part and its unquoted form are the same
    mailbox, so ``"ceo"`` and ``"c\\eo"`` are written ``ceo``; quotes stay
    only where they are needed.  The local part keeps its case (2.4); the
    domain is lower-case and without a trailing dot."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{_unquoted(local)}@{_canonical_domain(domain)}"


def _canonical_domain(domain: str) -> str:
    # An address literal is kept as written: its tag reads "IPv6".
    return domain if domain.startswith("[") else domain.lower().rstrip(".")


def _unquoted(local: str) -> str:
    inner = _local_content(local)
    return inner if _PLAIN_LOCAL.fullmatch(inner) else local


def _local_content(local: str) -> str:
    """A quoted local part without its quotes and backslashes."""
    if len(local) < 2 or not local.startswith('"') or not local.endswith('"'):
        return local
    return re.sub(r"\\(.)", r"\1", local[1:-1])


def recipient_limit(limits: Limits, accepted: int) -> Reply | None:
    """A refusal when ``accepted`` recipients already fill the transaction."""
    return TOO_MANY_RECIPIENTS if accepted >= limits.recipients else None
