"""What a delivery handshake means (SPEC.md section 2, RFC 6125): the
reference names, the trust words, and name matching on real certificates
(trustme, and one CN-only certificate built by hand)."""

from __future__ import annotations

import datetime

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mta.tlsverdict import (
    ANONYMOUS,
    DELIVER,
    ESTABLISHED,
    FALLBACK_CANDIDATE,
    HANDSHAKE_FAILED,
    NOT_OFFERED,
    PASS_OVER,
    REFUSED,
    TRUSTED,
    UNTRUSTED,
    VERIFIED,
    TrustVerdict,
    judge_trust,
    matching_name,
    reference_names,
    required_by,
    secure_refusal,
    verdict,
)

# --- reference names -------------------------------------------------------

REFERENCE_CASES = [
    # (domain, host connected to, configured names, match, reference names)
    ("example.com", "example.com", (), None, ("example.com",)),
    ("example.com", "mx1.example.com", (), None,
     ("example.com", "mx1.example.com")),
    ("example.com", "a.b.example.com", (), None,
     ("example.com", "a.b.example.com")),
    ("Example.COM.", "MX1.Example.com.", (), None,
     ("example.com", "mx1.example.com")),
    # an MX host outside the domain adds nothing: a forged MX never passes
    ("example.com", "mx.attacker.example", (), None, ("example.com",)),
    ("example.com", "mx.notexample.com", (), None, ("example.com",)),
    ("example.com", "example.com.evil.example", (), None, ("example.com",)),
    # names the operator wrote in routes or relay_to are trusted
    ("partner.example", "gw.hosting.example", ("gw.hosting.example",), None,
     ("partner.example", "gw.hosting.example")),
    ("partner.example", "192.0.2.7", ("GW.Hosting.Example.",), None,
     ("partner.example", "gw.hosting.example")),
    ("example.com", "mx1.example.com", ("mx1.example.com",), None,
     ("example.com", "mx1.example.com")),
    # a policy's match replaces every other name
    ("example.com", "mx1.example.com", ("gw.example.net",),
     ("MX.Provider.example.", "mx2.provider.example"),
     ("mx.provider.example", "mx2.provider.example")),
    ("example.com", "mx1.example.com", (), (), ()),
]


@pytest.mark.parametrize(
    "domain, host, configured, match, names", REFERENCE_CASES
)
def test_reference_names(
    domain: str,
    host: str,
    configured: tuple[str, ...],
    match: tuple[str, ...] | None,
    names: tuple[str, ...],
) -> None:
    assert reference_names(domain, host, configured, match) == names


# --- certificates ----------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def leaf(ca: trustme.CA, *names: str) -> x509.Certificate:
    issued = ca.issue_cert(*names)
    return x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())


def cn_only(common_name: str) -> x509.Certificate:
    """A legacy certificate naming its host only in the subject CN: no
    subjectAltName extension at all (trustme always adds one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


MATCH_CASES = [
    # (SAN names, reference names in order, the one matched)
    (("mx1.example.com",), ("example.com", "mx1.example.com"),
     "mx1.example.com"),
    (("example.com", "mx1.example.com"), ("example.com", "mx1.example.com"),
     "example.com"),
    (("mx1.example.com",), ("example.com", "mx2.example.com"), None),
    # a wildcard stands for exactly one whole left-most label
    (("*.example.com",), ("mx1.example.com",), "mx1.example.com"),
    (("*.example.com",), ("a.b.example.com",), None),
    (("*.example.com",), ("example.com",), None),
    (("*.mx.example.com",), ("example.com", "a.mx.example.com"),
     "a.mx.example.com"),
    # case does not matter, on either side
    (("mx1.example.com",), ("MX1.Example.COM",), "MX1.Example.COM"),
    (("MX1.EXAMPLE.COM",), ("mx1.example.com",), "mx1.example.com"),
    (("*.Example.Com",), ("mx1.example.com",), "mx1.example.com"),
    # an IP SAN is not a DNS name; a name that is no DNS-ID matches nothing
    (("192.0.2.7",), ("192.0.2.7", "example.com"), None),
    (("example.com",), ("[192.0.2.7]", "", "example.com"), "example.com"),
    # no reference names, no match
    (("example.com",), (), None),
]


@pytest.mark.parametrize("sans, names, matched", MATCH_CASES)
def test_matching_name(
    ca: trustme.CA,
    sans: tuple[str, ...],
    names: tuple[str, ...],
    matched: str | None,
) -> None:
    assert matching_name(leaf(ca, *sans), names) == matched


def test_a_certificate_without_san_never_matches() -> None:
    """RFC 6125 6.4.4 as service-identity applies it: the CN is ignored,
    and the CertificateError it raises is caught, not let through."""
    certificate = cn_only("mx1.example.com")
    assert len(certificate.extensions) == 0
    assert matching_name(certificate, ("mx1.example.com",)) is None
    assert judge_trust(certificate, None, ("mx1.example.com",)) == TrustVerdict(
        TRUSTED, None
    )


def test_a_certificate_with_only_a_cn_and_the_same_san_matches(
    ca: trustme.CA,
) -> None:
    """The counterpart of the test above: the SAN is what matches."""
    assert matching_name(leaf(ca, "mx1.example.com"),
                         ("mx1.example.com",)) == "mx1.example.com"


# --- trust -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mx_cert(ca: trustme.CA) -> x509.Certificate:
    return leaf(ca, "mx1.example.com")


TRUST_CASES = [
    # (certificate?, verify error, reference names, verdict)
    (False, None, ("example.com",), TrustVerdict(ANONYMOUS, None)),
    (False, 20, ("example.com",), TrustVerdict(ANONYMOUS, None)),
    # a chain that did not verify is Untrusted, even when the name matches
    (True, 20, ("mx1.example.com",), TrustVerdict(UNTRUSTED, None)),
    (True, 10, ("example.com",), TrustVerdict(UNTRUSTED, None)),
    (True, 18, ("mx1.example.com",), TrustVerdict(UNTRUSTED, None)),
    (True, None, ("example.com",), TrustVerdict(TRUSTED, None)),
    (True, None, (), TrustVerdict(TRUSTED, None)),
    (True, None, ("example.com", "mx1.example.com"),
     TrustVerdict(VERIFIED, "mx1.example.com")),
]


@pytest.mark.parametrize("has_cert, error, names, verdict", TRUST_CASES)
def test_judge_trust(
    mx_cert: x509.Certificate,
    has_cert: bool,
    error: int | None,
    names: tuple[str, ...],
    verdict: TrustVerdict,
) -> None:
    certificate = mx_cert if has_cert else None
    assert judge_trust(certificate, error, names) == verdict


REFUSAL_CASES = [
    # (verdict, verify reason, why enforce-secure refuses, or None)
    (TrustVerdict(VERIFIED, "mx1.example.com"), None, None),
    (TrustVerdict(ANONYMOUS, None), None,
     "mx1.example.com presented no certificate"),
    (TrustVerdict(UNTRUSTED, None), "certificate has expired",
     "certificate of mx1.example.com is not trusted: certificate has expired"),
    (TrustVerdict(UNTRUSTED, None), None,
     "certificate of mx1.example.com is not trusted: chain did not verify"),
    (TrustVerdict(TRUSTED, None), None,
     "certificate of mx1.example.com does not name example.com or "
     "mx.provider.example"),
]


@pytest.mark.parametrize("verdict, reason, refusal", REFUSAL_CASES)
def test_secure_refusal(
    verdict: TrustVerdict, reason: str | None, refusal: str | None
) -> None:
    names = ("example.com", "mx.provider.example")
    assert secure_refusal(verdict, "mx1.example.com", names, reason) == refusal


# --- the verdict table: every level against every kind of handshake outcome

_D, _P, _F = DELIVER, PASS_OVER, FALLBACK_CANDIDATE
# outcome (trust) ->     none opportunistic enforce-tls enforce-secure
VERDICTS = {
    (NOT_OFFERED, None): (_D, _D, _P, _P),
    (REFUSED, None): (_D, _F, _P, _P),
    (HANDSHAKE_FAILED, None): (_D, _F, _P, _P),
    (ESTABLISHED, "Anonymous"): (_D, _D, _D, _P),
    (ESTABLISHED, "Untrusted"): (_D, _D, _D, _P),
    (ESTABLISHED, "Trusted"): (_D, _D, _D, _P),
    (ESTABLISHED, "Verified"): (_D, _D, _D, _D),
}
LEVEL_ORDER = ("none", "opportunistic", "enforce-tls", "enforce-secure")


@pytest.mark.parametrize(
    "outcome, trust, level, expected",
    [(outcome, trust, level, row[i])
     for (outcome, trust), row in VERDICTS.items()
     for i, level in enumerate(LEVEL_ORDER)],
)
def test_verdict_table(outcome: str, trust: str | None, level: str,
                       expected: str) -> None:
    assert verdict(level, outcome, trust) == expected


def test_required_by_names_the_rule_or_the_default() -> None:
    assert required_by("enforce-tls", "partner") == (
        "TLS required by rule partner (enforce-tls)")
    assert required_by("enforce-secure", None) == (
        "a verified certificate required by the default policy (enforce-secure)")
