"""pyOpenSSL contexts for both directions, built from `TLSConfig`.

Both sides share the floor (TLS 1.2 or the configured minimum) and the exact,
ordered cipher lists.  The server side picks in our order (server
preference); the client side offers in our order and sends SNI.  A Context
cannot change once a Connection used it, so a new configuration gets new
contexts.

The certificate, key and trust bundle are read by us (`read_regular`),
never by OpenSSL from their paths: a FIFO or a device put in their place
is refused without blocking, at a check or a reload alike.
"""

from __future__ import annotations

import errno
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from zope.interface import implementer
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)

from mta.config import TLSConfig
from mta.configfiles import read_regular

_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

# Options every context gets: no compression (CRIME), no renegotiation,
# and a fresh ECDHE key per handshake.
_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_SINGLE_ECDH_USE
)


def _base_context(tls: TLSConfig) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(_VERSIONS[tls.min_version])
    context.set_options(_OPTIONS)
    context.set_cipher_list(":".join(tls.ciphers).encode("ascii"))
    context.set_tls13_ciphersuites(":".join(tls.ciphersuites).encode("ascii"))
    return context


def server_context(tls: TLSConfig) -> SSL.Context:
    context = _base_context(tls)
    context.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    _use_chain(context, read_regular(tls.certificate))
    _use_key(context, read_regular(tls.private_key))
    context.check_privatekey()
    # A client certificate is neither asked for nor checked on SMTP.
    context.set_verify(SSL.VERIFY_NONE)
    context.set_session_id(b"mta")
    return context


def client_context(tls: TLSConfig) -> SSL.Context:
    """A context that completes the handshake whatever the certificate, and
    lets `ClientTLSFacts` record the chain verdict: the policy decides what a
    bad chain means, not OpenSSL."""
    context = _base_context(tls)
    if tls.trust is None:
        context.set_default_verify_paths()
    else:
        _use_trust(context, read_regular(tls.trust))
    # Each connection gets a verify callback bound to its own facts (see
    # `ClientCreator`); this one only stands in until then.
    context.set_verify(SSL.VERIFY_PEER, lambda *args: True)
    return context


def _use_chain(context: SSL.Context, data: bytes) -> None:
    """The PEM chain in ``data``, the relay's own certificate first, as
    `SSL_CTX_use_certificate_chain_file` takes it (other PEM blocks, such
    as a key in the same file, are passed over).  ValueError when it holds
    no certificate."""
    own, *chain = x509.load_pem_x509_certificates(data)
    context.use_certificate(own)
    for certificate in chain:
        context.add_extra_chain_cert(certificate)


def _use_key(context: SSL.Context, data: bytes) -> None:
    """The PEM private key in ``data`` (not encrypted: the relay asks for
    no passphrase); ValueError or TypeError when there is none."""
    key = serialization.load_pem_private_key(data, password=None)
    context.use_privatekey(key)  # type: ignore[arg-type]


def _use_trust(context: SSL.Context, data: bytes) -> None:
    """Each PEM certificate in ``data`` as a trust anchor, as
    `load_verify_locations` takes a bundle; ValueError when none is."""
    store = context.get_cert_store()
    assert store is not None
    for certificate in x509.load_pem_x509_certificates(data):
        store.add_cert(crypto.X509.from_cryptography(certificate))


# The X509_V_ERR numbers a delivery meets in practice, in OpenSSL's words.
VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}


class ClientTLSFacts:
    """The chain verdict of one client handshake, from the verify callback."""

    def __init__(self) -> None:
        self.verify_error: int | None = None
        self.verify_reason: str | None = None
        # False after a handshake: no certificate was checked, so the
        # session was resumed (a full handshake always shows one).
        self.checked = False


@implementer(IOpenSSLClientConnectionCreator)
@dataclass
class ClientCreator:
    """Client connections from one context, with SNI for ``server_name``."""

    context: SSL.Context
    server_name: str | None
    session: SSL.Session | None = None  # offered for resumption
    facts: ClientTLSFacts = field(default_factory=ClientTLSFacts)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        # Twisted sets the app data to its protocol after we return, so the
        # verify callback is bound to our facts instead of reading them there.
        connection.set_verify(SSL.VERIFY_PEER, self._record_verify_error)
        connection.set_app_data(tlsProtocol)
        if self.server_name:
            connection.set_tlsext_host_name(self.server_name.encode("idna"))
        if self.session is not None:
            connection.set_session(self.session)
        connection.set_connect_state()
        return connection

    def _record_verify_error(
        self, connection: SSL.Connection, cert: Any, errno: int, depth: int,
        ok: int,
    ) -> bool:
        # Chain errors arrive here as numbers (10 expired, 18 self-signed, 20
        # unknown issuer).  Keep the first one for the log; the handshake
        # goes on and the policy decides what the error means.
        self.facts.checked = True
        if not ok and self.facts.verify_error is None:
            self.facts.verify_error = errno
            self.facts.verify_reason = VERIFY_ERRORS.get(
                errno, f"verify error {errno}"
            )
        return True


@implementer(IOpenSSLServerConnectionCreator)
@dataclass
class ServerCreator:
    context: SSL.Context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


def check_tls_config(tls: TLSConfig) -> list[str]:
    """Problems that keep ``tls`` from working: unreadable or mismatched
    certificate and key, an unreadable trust bundle, and cipher names this
    OpenSSL would silently drop (`set_cipher_list` keeps the names it knows
    when one is valid)."""
    problems = _check_files(tls)
    if not problems:
        problems.extend(_check_key_pair(tls))
    problems.extend(_check_trust(tls))
    problems.extend(_check_ciphers(tls))
    return problems


def _check_files(tls: TLSConfig) -> list[str]:
    problems = []
    files = {"certificate": tls.certificate, "private_key": tls.private_key}
    for key, path in files.items():
        try:
            data = read_regular(path)  # never blocks on a FIFO or a device
        except OSError as error:
            problems.append(f"tls.{key}: cannot read {path}: {error.strerror}; "
                            + _unreadable_hint(key, error, files))
            continue
        try:
            if key == "certificate":
                crypto.load_certificate(crypto.FILETYPE_PEM, data)
            else:
                crypto.load_privatekey(crypto.FILETYPE_PEM, data)
        except crypto.Error:
            problems.append(f"tls.{key}: {path} holds no PEM "
                            f"{'certificate' if key == 'certificate' else 'key'}")
    return problems


def _unreadable_hint(key: str, error: OSError, files: dict[str, Path]) -> str:
    """What to do about a file that cannot be read: it depends on why."""
    if error.errno in (errno.EACCES, errno.EPERM):
        user = _user_name()
        return (f"this check runs as {user} (uid {os.getuid()}): let the user "
                "that starts the relay read it, and the one it runs as "
                "(twistd -u) for a reload: chown that user: the file, chmod "
                "600 (README, \"Running as an unprivileged user\")")
    if error.errno != errno.ENOENT:
        return "fix the path"
    [(other_key, other)] = [(k, p) for k, p in files.items() if k != key]
    if _exists(other):
        what = "key" if key == "private_key" else "certificate"
        return (f"tls.{other_key} {other} exists: put its {what} here, or fix "
                "the path (`mta make-cert` writes a pair only when neither "
                "file exists)")
    return ("fix the path, or run `mta make-cert` for a self-signed pair to "
            "try the relay with")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def _check_key_pair(tls: TLSConfig) -> list[str]:
    # A bare context: the cipher lists are checked on their own, so that a
    # bad list is never reported as a key that does not match.
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        _use_chain(context, read_regular(tls.certificate))
    except OSError as error:
        return [f"tls.certificate: cannot read {tls.certificate}: "
                f"{error.strerror}"]
    except (SSL.Error, ValueError) as error:
        return [f"tls.certificate: {tls.certificate} cannot be used "
                f"({_ssl_reason(error)})"]
    try:
        _use_key(context, read_regular(tls.private_key))
        context.check_privatekey()
    except OSError as error:
        return [f"tls.private_key: cannot read {tls.private_key}: "
                f"{error.strerror}"]
    except (ValueError, TypeError):
        return [f"tls.private_key: {tls.private_key} holds no usable PEM key "
                "(one without a passphrase)"]
    except SSL.Error as error:
        return [f"tls.private_key: {tls.private_key} does not match "
                f"tls.certificate {tls.certificate} ({_ssl_reason(error)})"]
    return []


def _check_trust(tls: TLSConfig) -> list[str]:
    if tls.trust is None:
        return []
    try:
        _use_trust(SSL.Context(SSL.TLS_METHOD), read_regular(tls.trust))
    except OSError as error:
        return [f"tls.trust: cannot read {tls.trust}: {error.strerror}"]
    except (SSL.Error, crypto.Error, ValueError) as error:
        return [f"tls.trust: {tls.trust} holds no usable CA certificates "
                f"({_ssl_reason(error)})"]
    return []


def _kept_names(ciphers: str | None, ciphersuites: str | None) -> list[str]:
    """The names OpenSSL keeps from a list, in its order; [] when it keeps
    none (`set_cipher_list` then raises "no cipher match")."""
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        if ciphers is not None:
            context.set_cipher_list(ciphers.encode("ascii"))
        if ciphersuites is not None:
            context.set_tls13_ciphersuites(ciphersuites.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        return []
    return SSL.Connection(context).get_cipher_list()


def _check_ciphers(tls: TLSConfig) -> list[str]:
    # Each list is tried on its own: the TLS 1.2 list with no TLS 1.3
    # suites, and the TLS 1.3 list minus OpenSSL's default TLS 1.2 list, so
    # a name is only found in the list it was written in.
    default_tls12 = _kept_names(None, "")
    kept = {
        "ciphers": _kept_names(":".join(tls.ciphers), ""),
        "ciphersuites": [
            name
            for name in _kept_names(None, ":".join(tls.ciphersuites))
            if name not in default_tls12
        ],
    }
    problems = []
    for key, names in (("ciphers", tls.ciphers),
                       ("ciphersuites", tls.ciphersuites)):
        dropped = [name for name in names if name not in kept[key]]
        if dropped:
            problems.append(
                f"tls.{key}: not supported by this OpenSSL "
                f"({SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()}): "
                + ", ".join(dropped) + _cipher_hint(key, dropped)
            )
    if not problems:
        offered = SSL.Connection(_base_context(tls)).get_cipher_list()
        expected = [*tls.ciphersuites, *tls.ciphers]
        if offered != expected:
            problems.append(
                "tls.ciphers: OpenSSL would offer "
                + ":".join(offered) + " instead of the configured "
                + ":".join(expected)
            )
    return problems


def _cipher_hint(key: str, dropped: list[str]) -> str:
    # The two lists use different name spaces: OpenSSL's names for TLS 1.2
    # ("ECDHE-RSA-AES128-GCM-SHA256"), the RFC's for TLS 1.3 ("TLS_AES_...").
    if key == "ciphers" and any(name.startswith("TLS_") for name in dropped):
        return ("; TLS 1.3 names (TLS_AES_128_GCM_SHA256...) belong in "
                "tls.ciphersuites, and TLS 1.2 ones are OpenSSL's names "
                "(ECDHE-RSA-AES128-GCM-SHA256), one per entry")
    if key == "ciphersuites" and any(not name.startswith("TLS_")
                                     for name in dropped):
        return ("; only TLS 1.3 names (TLS_AES_128_GCM_SHA256...) belong "
                "here; TLS 1.2 names go in tls.ciphers")
    return "; write OpenSSL's names, one per entry, not a cipher string"


def _ssl_reason(error: Exception) -> str:
    if isinstance(error, ValueError):  # from cryptography's PEM reader
        return "no PEM certificate in it"
    try:
        return str(error.args[0][0][2])
    except (IndexError, TypeError):
        return str(error)
