"""Certificates for the benchmark's TLS servers: one throwaway CA (trustme)
and an ECDSA P-256 certificate for each server, written as PEM files.

Every server (the relay, Postfix, the sink) presents the same kind of key,
so that both subjects pay the same for their handshakes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True, slots=True)
class CertFiles:
    chain: Path  # PEM, leaf first
    key: Path


def write_server_certs(folder: Path, *names: str) -> dict[str, CertFiles]:
    """A certificate for each host name, in `folder`; readable by Postfix's
    daemons, which read them after dropping privileges."""
    ca = trustme.CA(organization_name="mta bench CA")
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        leaf = ca.issue_cert(name, key_type=trustme.KeyType.ECDSA)
        files = CertFiles(folder / f"{name}.crt", folder / f"{name}.key")
        files.chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        files.key.write_bytes(leaf.private_key_pem.bytes())
        os.chmod(files.key, 0o600)
        written[name] = files
    return written
