"""Password hashes for the users file: scrypt (RFC 7914), from the standard
library's `hashlib.scrypt`.

A hash is written as one self-describing string, in the shape of the PHC
string format that passlib and others use:

    $scrypt$ln=15,r=8,p=1$SALT$HASH

``ln`` is log2 of scrypt's cost N, ``r`` its block size, ``p`` its
parallelism; SALT (16 random bytes) and HASH (32 bytes) are base64 without
padding.  The parameters travel with each hash, so they can be raised later
without invalidating older entries.

Only `hashlib.scrypt` does the work, and `hmac.compare_digest` compares:
nothing here is a home-made scheme.  A hash read from a file is bounded
(`MAX_MEMORY`), so an edited file cannot make one login take gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

SCHEME = "scrypt"
SALT_BYTES = 16
DIGEST_BYTES = 32

# One login holds 128 * r * N bytes for the time of the hash (32 MiB at
# the default): keep what a hand-edited file may ask for within reason.
MAX_MEMORY = 256 * 1024 * 1024
MAX_LN = 24
MAX_P = 16

_HASH = re.compile(
    r"^\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,2})"
    r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$"
)


@dataclass(frozen=True, slots=True)
class ScryptParameters:
    ln: int  # log2 of the cost N
    r: int
    p: int

    @property
    def memory(self) -> int:
        """What OpenSSL reserves for one hash with these parameters."""
        return 128 * self.r * ((1 << self.ln) + self.p + 2)

    def __str__(self) -> str:
        return f"ln={self.ln},r={self.r},p={self.p}"


# 32 MiB and about a third of a second per hash on the machine this was
# measured on: slow enough to make guessing dear, quick enough for a login.
# Each hash names its own parameters, so they may be raised later.
DEFAULT_PARAMETERS = ScryptParameters(ln=15, r=8, p=1)


@dataclass(frozen=True, slots=True)
class PasswordHash:
    parameters: ScryptParameters
    salt: bytes
    digest: bytes

    def __str__(self) -> str:
        return (f"${SCHEME}${self.parameters}${_b64(self.salt)}"
                f"${_b64(self.digest)}")

    def __repr__(self) -> str:
        # Never the digest in a traceback or a log line.
        return f"PasswordHash({SCHEME}, {self.parameters})"


def parse_hash(text: object) -> PasswordHash:
    """The hash written in ``text``; ValueError otherwise.  The error never
    repeats the value: a password typed where its hash belongs would
    otherwise end up in a log."""
    if not isinstance(text, str):
        raise ValueError("expected a $scrypt$ password hash string")
    match = _HASH.match(text)
    if match is None:
        raise ValueError(
            "is not a $scrypt$ password hash (the value is not shown, as it "
            "may be a password)"
        )
    ln, r, p = (int(group) for group in match.groups()[:3])
    parameters = ScryptParameters(ln=ln, r=r, p=p)
    _check_parameters(parameters)
    try:
        salt, digest = (_unb64(group) for group in match.groups()[3:])
    except binascii.Error:
        raise ValueError("the salt or the hash is not valid base64") from None
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("the salt or the hash is too short")
    return PasswordHash(parameters, salt, digest)


def _check_parameters(parameters: ScryptParameters) -> None:
    if not 1 <= parameters.ln <= MAX_LN or parameters.r < 1:
        raise ValueError(f"scrypt parameters {parameters} are out of range")
    if not 1 <= parameters.p <= MAX_P:
        raise ValueError(f"scrypt parameters {parameters} are out of range")
    if parameters.memory > MAX_MEMORY:
        raise ValueError(
            f"scrypt parameters {parameters} need "
            f"{parameters.memory // 2**20} MiB per login; at most "
            f"{MAX_MEMORY // 2**20} MiB"
        )


def hash_password(
    password: bytes, parameters: ScryptParameters = DEFAULT_PARAMETERS
) -> PasswordHash:
    """A new hash of ``password`` with a fresh random salt.  Blocking: it
    takes as long as a verification."""
    _check_parameters(parameters)
    salt = os.urandom(SALT_BYTES)
    return PasswordHash(parameters, salt, _derive(password, salt, parameters,
                                                  DIGEST_BYTES))


def verify_password(password: bytes, stored: PasswordHash) -> bool:
    """Whether ``password`` is the one ``stored`` was made from.  Blocking:
    run it off the reactor thread."""
    derived = _derive(password, stored.salt, stored.parameters, len(stored.digest))
    return hmac.compare_digest(derived, stored.digest)


def decoy(parameters: ScryptParameters = DEFAULT_PARAMETERS) -> PasswordHash:
    """A hash no password matches, to check an unknown user against: the
    same work as for a real one, so the time taken does not tell which
    names exist."""
    return PasswordHash(parameters, os.urandom(SALT_BYTES),
                        os.urandom(DIGEST_BYTES))


def _derive(
    password: bytes, salt: bytes, parameters: ScryptParameters, length: int
) -> bytes:
    return hashlib.scrypt(
        password,
        salt=salt,
        n=1 << parameters.ln,
        r=parameters.r,
        p=parameters.p,
        maxmem=parameters.memory + 2**20,
        dklen=length,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
