"""Why TLS failed in a delivery attempt, as one word from a small fixed set:
a pure function of the recorded `Attempt`, for the metrics.

The set is closed so that it can be a Prometheus label: no host name,
address or server text ever becomes a reason.

- ``starttls-not-offered``: an enforce level met a server whose EHLO had no
  STARTTLS.
- ``starttls-refused``: STARTTLS was answered with something other than 220.
- ``handshake-failed``: the handshake broke, timed out or found nothing in
  common (TLS 1.0/1.1-only peers, no shared cipher).
- ``no-certificate``, ``certificate-untrusted``, ``name-mismatch``:
  ``enforce-secure`` refused the session because the certificate was
  Anonymous, Untrusted or only Trusted (tlsverdict's trust words).
- ``other``: a TLS failure none of the above describes.

An attempt records the outcome of the last host tried and its reply text,
not the session's stage; where the fields alone cannot tell two reasons
apart, the phrases mta.smtpclient writes decide (``(in reply to STARTTLS
command)``, ``was not offered``, a server's ``said:``).  A plaintext
delivery after a TLS failure (``fallback=``) counts as that failure.
"""

from __future__ import annotations

from mta.envelope import Attempt
from mta.tlsverdict import ANONYMOUS, TRUSTED, UNTRUSTED

NO_STARTTLS = "starttls-not-offered"
STARTTLS_REFUSED = "starttls-refused"
HANDSHAKE_FAILED = "handshake-failed"
NO_CERTIFICATE = "no-certificate"
CERTIFICATE_UNTRUSTED = "certificate-untrusted"
NAME_MISMATCH = "name-mismatch"
OTHER = "other"
REASONS = (NO_STARTTLS, STARTTLS_REFUSED, HANDSHAKE_FAILED, NO_CERTIFICATE,
           CERTIFICATE_UNTRUSTED, NAME_MISMATCH, OTHER)

# mta.delivery's fallback= words.
_FALLBACKS = {"starttls-refused": STARTTLS_REFUSED,
              "tls-handshake-failed": HANDSHAKE_FAILED}
_CERTIFICATES = {ANONYMOUS: NO_CERTIFICATE, UNTRUSTED: CERTIFICATE_UNTRUSTED,
                 TRUSTED: NAME_MISMATCH}

# The phrases of mta.smtpclient and mta.clientsession.said().
_REFUSED_TEXT = "(in reply to STARTTLS command)"
_NOT_OFFERED_TEXT = "TLS is required, but was not offered"
_SERVER_TEXT = " said: "


def failure_reason(attempt: Attempt) -> str | None:
    """The reason TLS failed in this attempt, or None when it did not."""
    if attempt.fallback is not None:
        return _FALLBACKS.get(attempt.fallback, OTHER)
    if attempt.status == "sent" or attempt.policy == "none":
        return None
    if attempt.tls is not None:
        return _certificate_reason(attempt)
    return _session_reason(attempt)


def _certificate_reason(attempt: Attempt) -> str | None:
    # A session was made: only enforce-secure refuses one, and it refuses
    # every certificate that is not Verified, before EHLO.
    if attempt.policy != "enforce-secure" or attempt.trust is None:
        return None
    return _CERTIFICATES.get(attempt.trust)


def _session_reason(attempt: Attempt) -> str | None:
    if _REFUSED_TEXT in attempt.reply:
        return STARTTLS_REFUSED
    if _NOT_OFFERED_TEXT in attempt.reply:
        return NO_STARTTLS
    if _SERVER_TEXT in attempt.reply:
        return None  # the server's own words, even with a 4.7.x code

    # X.7.4 and X.7.5 (RFC 3463: security features not supported,
    # cryptographic failure) are what mta.delivery gives TLS deferrals; a
    # deferral past max_lifetime keeps the 7.
    detail = attempt.dsn.split(".", 1)[-1]
    if detail == "7.5":
        return HANDSHAKE_FAILED
    return OTHER if detail == "7.4" else None
