"""Warnings about the relay's own certificate, for `check-config` and the
log at start and at each reload: it runs out within `EXPIRY_WARNING`, or
it does not carry the relay's ``hostname``.

Neither stops the relay: an expiring certificate still works until it
runs out, and most SMTP clients do not check the server's name at all
(opportunistic TLS).  Those that do (an enforce-secure or DANE sender, a
submission client) refuse a certificate without the name they dialled,
and that name is normally ``hostname``, the MX host's name.

The decisions are pure (certificate, name and clock in, words out);
`certificate_warnings` reads the file.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509

from mta.tlsverdict import matching_name

# Warn this long before the relay's own certificate runs out.
EXPIRY_WARNING = datetime.timedelta(days=14)


def expiry_warning(
    path: Path, expires: datetime.datetime, now: datetime.datetime
) -> str | None:
    """The warning for the relay's own certificate, or None while it has
    more than `EXPIRY_WARNING` left."""
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    left = expires - now
    if left <= datetime.timedelta(0):
        return (f"tls.certificate {path} expired on {when}: clients that "
                "check it refuse STARTTLS with us; renew it, then reload "
                "(SIGHUP)")
    if left <= EXPIRY_WARNING:
        return (f"tls.certificate {path} expires on {when} "
                f"({time_left(left)}); renew it, then reload (SIGHUP)")
    return None


def time_left(left: datetime.timedelta) -> str:
    """``in 2 days and 23 hours``: whole days and hours, never rounded up,
    so "in 3 days" is never said of 2 days and 23 hours."""
    hours = int(left.total_seconds() // 3600)
    days, hours = divmod(hours, 24)
    if days == 0 and hours == 0:
        return "in less than an hour"
    parts = [_count(days, "day"), _count(hours, "hour")]
    return "in " + " and ".join(part for part in parts if part)


def _count(number: int, unit: str) -> str:
    if number == 0:
        return ""
    return f"{number} {unit}{'' if number == 1 else 's'}"


def hostname_warning(
    path: Path, hostname: str, certificate: x509.Certificate
) -> str | None:
    """The warning when ``hostname`` is not a name on the certificate
    (RFC 6125: SAN DNS names only, a wildcard for one left-most label),
    or None when it is."""
    if matching_name(certificate, [hostname]) is not None:
        return None
    names = ", ".join(dns_names(certificate)) or "no DNS name at all"
    return (f"hostname {hostname} is not a name on tls.certificate {path} "
            f"(it names {names}): a client that checks the relay's name "
            "refuses it; use a certificate for that name, or set hostname "
            "to one of its names (the relay runs with it anyway)")


def dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        extension = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return extension.value.get_values_for_type(x509.DNSName)


def leaf_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM chain: the relay's own.  Raises
    `OSError` or `ValueError` when the file cannot be read as one."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def warnings_for(
    path: Path,
    hostname: str,
    certificate: x509.Certificate,
    now: datetime.datetime,
) -> list[str]:
    """Both warnings for the relay's certificate, read from ``path``."""
    warnings = [
        expiry_warning(path, certificate.not_valid_after_utc, now),
        hostname_warning(path, hostname, certificate),
    ]
    return [warning for warning in warnings if warning is not None]


def certificate_warnings(
    path: Path, hostname: str, now: datetime.datetime
) -> list[str]:
    """`warnings_for` the certificate in ``path``; [] when it cannot be
    read (that is an error of its own, reported elsewhere)."""
    try:
        certificate = leaf_certificate(path)
    except (OSError, ValueError, IndexError):
        return []
    return warnings_for(path, hostname, certificate, now)
