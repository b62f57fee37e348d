"""Certificates for the test peers, issued by throwaway CAs.

Two CAs live for the whole test session: `trusted_ca()`, the one the relay
under test is told to trust, and `untrusted_ca()`, a look-alike that nothing
trusts.  Both come from trustme; everything is generated in memory and only
written to disk when a peer or the relay needs files.

trustme always adds a subjectAltName extension (an empty one when only a
common name is given), so the legacy certificate that names its host only in
the subject CN is built here with cryptography's CertificateBuilder.
"""

from __future__ import annotations

import datetime
import functools
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ECDSA = trustme.KeyType.ECDSA
RSA = trustme.KeyType.RSA


@dataclass(frozen=True, slots=True)
class CertFiles:
    """A certificate chain (leaf first) and its private key, as PEM files."""

    chain: Path
    key: Path


@functools.cache
def trusted_ca() -> trustme.CA:
    """The CA the relay under test trusts; one per test session."""
    return trustme.CA(organization_name="MTA tests trusted CA")


@functools.cache
def untrusted_ca() -> trustme.CA:
    """A second CA that nothing trusts; one per test session."""
    return trustme.CA(organization_name="MTA tests untrusted CA")


def issue_server_cert(
    *names: str,
    ca: trustme.CA | None = None,
    key_type: trustme.KeyType = ECDSA,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> trustme.LeafCert:
    """Issue a server certificate with `names` as subjectAltNames.

    The first name is also the subject CN.  Names may be wildcards
    ("*.example.test") or IP addresses.  The issuer is the trusted CA unless
    `ca` says otherwise.
    """
    if not names:
        raise ValueError("issue_server_cert needs at least one name")

    return (ca or trusted_ca()).issue_cert(
        *names,
        common_name=names[0],
        key_type=key_type,
        not_before=not_before,
        not_after=not_after,
    )


def issue_expired_cert(
    *names: str,
    ca: trustme.CA | None = None,
    key_type: trustme.KeyType = ECDSA,
) -> trustme.LeafCert:
    """Issue a certificate for `names` that expired yesterday."""
    now = datetime.datetime.now(datetime.UTC)
    return issue_server_cert(
        *names,
        ca=ca,
        key_type=key_type,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )


def issue_wildcard_cert(
    domain: str,
    ca: trustme.CA | None = None,
    key_type: trustme.KeyType = ECDSA,
) -> trustme.LeafCert:
    """Issue a certificate whose only name is "*.`domain`"."""
    return issue_server_cert("*." + domain, ca=ca, key_type=key_type)


def issue_cn_only_cert(
    common_name: str,
    ca: trustme.CA | None = None,
    key_type: trustme.KeyType = ECDSA,
) -> trustme.LeafCert:
    """Issue a certificate naming its host only in the subject CN, no SAN.

    RFC 6125 section 6.4.4 lets a verifier fall back to the CN only when
    there is no DNS-ID at all; modern verifiers no longer do.
    """
    issuer = ca or trusted_ca()
    issuer_key = serialization.load_pem_private_key(
        issuer.private_key_pem.bytes(), password=None
    )
    issuer_cert = x509.load_pem_x509_certificate(issuer.cert_pem.bytes())
    key = _generate_key(key_type)
    now = datetime.datetime.now(datetime.UTC)

    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_cert.public_key()  # type: ignore[arg-type]
            ),
            False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    )
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]

    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return trustme.LeafCert(
        key_pem,
        cert.public_bytes(serialization.Encoding.PEM),
        [issuer.cert_pem.bytes()],
    )


def _generate_key(
    key_type: trustme.KeyType,
) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type is RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def write_cert_files(
    leaf: trustme.LeafCert, folder: Path | str, stem: str = "server"
) -> CertFiles:
    """Write `leaf`'s chain and key as FOLDER/STEM.crt and FOLDER/STEM.key."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chain = folder / f"{stem}.crt"
    key = folder / f"{stem}.key"

    chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    return CertFiles(chain=chain, key=key)


def write_ca_file(ca: trustme.CA, path: Path | str) -> Path:
    """Write `ca`'s certificate as a PEM trust anchor file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ca.cert_pem.bytes())
    return path


def server_context(
    leaf: trustme.LeafCert | CertFiles,
    *,
    minimum: ssl.TLSVersion | None = ssl.TLSVersion.TLSv1_2,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """An `ssl.SSLContext` for a server presenting `leaf`.

    `leaf` is a trustme certificate or files from `write_cert_files`.
    `minimum`/`maximum` bound the protocol versions (None: OpenSSL's
    default); `ciphers` is an OpenSSL cipher string for TLS 1.2 and older.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if isinstance(leaf, CertFiles):
        context.load_cert_chain(leaf.chain, leaf.key)
    else:
        leaf.configure_cert(context)

    # The cipher string comes first: "@SECLEVEL=0" is what lets OpenSSL 3
    # accept TLS 1.0 and 1.1 at all, and a version bound below the security
    # level's floor is otherwise refused at handshake time.
    if ciphers is not None:
        context.set_ciphers(ciphers)
    _bound_versions(context, minimum, maximum)
    return context


def client_context(ca: trustme.CA | None = None) -> ssl.SSLContext:
    """A verifying client context trusting only `ca` (default: trusted CA)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    (ca or trusted_ca()).configure_trust(context)
    return context


def permissive_client_context(
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str = "DEFAULT:@SECLEVEL=0",
) -> ssl.SSLContext:
    """A non-verifying client context that also allows old protocols."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers(ciphers)
    _bound_versions(context, minimum, maximum)
    return context


def _bound_versions(
    context: ssl.SSLContext,
    minimum: ssl.TLSVersion | None,
    maximum: ssl.TLSVersion | None,
) -> None:
    # Python deprecates naming TLS 1.0 and 1.1; these peers exist to use them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
