"""What a delivery handshake means: pure functions, no sockets.

The trust words are Postfix's: Anonymous (no certificate), Untrusted (the
chain did not verify), Trusted (chain verified, no reference name matched),
Verified (chain verified and a reference name matched).

Reference names (SPEC.md section 2, RFC 6125): the recipient domain; the
host name connected to when it is the domain or lies under it (so a forged
MX answer pointing elsewhere never passes); host names the operator wrote in
``routes`` or ``relay_to``; or, when a policy gives ``match``, exactly
those names.  Only SAN DNS names count, never the subject CN: the check is
service-identity's, on the leaf certificate, catching both its errors
(Twisted's own check lets a certificate without SAN through).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from cryptography import x509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname

ANONYMOUS = "Anonymous"
UNTRUSTED = "Untrusted"
TRUSTED = "Trusted"
VERIFIED = "Verified"


@dataclass(frozen=True, slots=True)
class TrustVerdict:
    trust: str
    matched: str | None  # the reference name the certificate carries


def reference_names(
    domain: str,
    host_name: str,
    configured: Iterable[str] = (),
    match: Iterable[str] | None = None,
) -> tuple[str, ...]:
    if match is not None:
        return _unique(name.lower().rstrip(".") for name in match)
    domain = domain.lower().rstrip(".")
    host = host_name.lower().rstrip(".")
    names = [domain]
    if host == domain or host.endswith("." + domain):
        names.append(host)
    names.extend(name.lower().rstrip(".") for name in configured)
    return _unique(names)


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def matching_name(
    certificate: x509.Certificate, names: Iterable[str]
) -> str | None:
    for name in names:
        try:
            verify_certificate_hostname(certificate, name)
        except (VerificationError, CertificateError):
            continue
        except ValueError:
            # Not a DNS-ID at all (an address literal such as a recipient
            # domain "[192.0.2.1]", an empty name): it names nothing.
            continue
        return name
    return None


def judge_trust(
    certificate: x509.Certificate | None,
    verify_error: int | None,
    names: Iterable[str],
) -> TrustVerdict:
    if certificate is None:
        return TrustVerdict(ANONYMOUS, None)
    if verify_error is not None:
        return TrustVerdict(UNTRUSTED, None)
    matched = matching_name(certificate, names)
    return TrustVerdict(VERIFIED if matched else TRUSTED, matched)


def secure_refusal(
    verdict: TrustVerdict,
    host_name: str,
    names: tuple[str, ...],
    verify_reason: str | None,
) -> str | None:
    """Why ``enforce-secure`` refuses this host, or None when it passes."""
    if verdict.trust == VERIFIED:
        return None
    if verdict.trust == ANONYMOUS:
        return f"{host_name} presented no certificate"
    if verdict.trust == UNTRUSTED:
        return (f"certificate of {host_name} is not trusted: "
                f"{verify_reason or 'chain did not verify'}")
    return (f"certificate of {host_name} does not name "
            + " or ".join(names))


# --- the verdict on one host -------------------------------------------------

# What the TLS part of a session came to.
NOT_OFFERED = "not-offered"  # the server's EHLO has no STARTTLS
REFUSED = "refused"  # STARTTLS answered with something other than 220
HANDSHAKE_FAILED = "handshake-failed"
ESTABLISHED = "established"

# What the relay does with that host.
DELIVER = "deliver"
PASS_OVER = "pass-over"  # try the next host; never plaintext here
FALLBACK_CANDIDATE = "fallback-candidate"  # pass over; plaintext may follow


def verdict(level: str, outcome: str, trust: str | None = None) -> str:
    """SPEC.md section 2's table: the level against what the host showed.

    ``none`` never tries STARTTLS, so every host it reaches is delivered
    to.  ``opportunistic`` delivers in plaintext when STARTTLS is not
    offered, and passes over a host whose STARTTLS or handshake fails (the
    plaintext fallback may come back to it).  The enforce levels pass over
    any host without a TLS session; ``enforce-secure`` also any host whose
    certificate is not Verified."""
    if level == "none":
        return DELIVER
    if outcome == NOT_OFFERED:
        return DELIVER if level == "opportunistic" else PASS_OVER
    if outcome in (REFUSED, HANDSHAKE_FAILED):
        return FALLBACK_CANDIDATE if level == "opportunistic" else PASS_OVER
    if level == "enforce-secure" and trust != VERIFIED:
        return PASS_OVER
    return DELIVER


def required_by(level: str, rule: str | None) -> str:
    """Who asked for TLS, for the operator: ``TLS required by rule partner``
    or ``... by the default outbound policy``."""
    words = {"enforce-tls": "TLS", "enforce-secure": "a verified certificate"}
    who = f"rule {rule}" if rule else "the default policy"
    return f"{words.get(level, 'TLS')} required by {who} ({level})"
