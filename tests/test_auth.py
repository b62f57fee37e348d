"""Authenticated submission (issue 5, item 2): SMTP AUTH PLAIN and LOGIN
after TLS, the users file and `mta users`, failed logins slowed down.

First the pure parts (password hashes, SASL steps, the slowdown rules),
then the listener in memory (`StringTransport`, a fake clock, a password
check run at once), then the real relay (`twistd mta`) with swaks and
Python's smtplib, delivering to a peer on loopback.

Peers listen on 127.0.12.1-9: addresses no other test file uses.
"""

from __future__ import annotations

import base64
import os
import pty
import select
import signal
import smtplib
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from mta import sasl
from mta.authcheck import Verifier
from mta.authfailures import FORGET_AFTER, FailureTable, failure_delay
from mta.config import ConfigError, Limits, load_config
from mta.envelope import from_json, to_json
from mta.filemodes import users_file_warning
from mta.passwords import (
    DEFAULT_PARAMETERS,
    PasswordHash,
    ScryptParameters,
    hash_password,
    parse_hash,
    verify_password,
)
from mta.smtpserver import RelayServerFactory
from mta.spool import Spool
from mta.users import UsersFileError, load_users, update_users, users_text
from tests.peers import certs, smtppeer
from tests.peers.smtppeer import Peer
from tests.relay import REPO, RelayProcess, base_config, free_port
from tests.serverharness import Session, codes, commit_at_once, queued_id

# Cheap hashes for the tests that are not about the cost: the parameters
# travel with each hash, so the relay checks them as they are.
QUICK = ScryptParameters(ln=4, r=1, p=1)
PASSWORD = "correct horse"
MTA = Path(sys.executable).parent / "mta"
PEER = "127.0.12.1"


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def write_users(path: Path, users: dict[str, str],
                parameters: ScryptParameters = QUICK) -> Path:
    path.write_text(users_text({
        name: hash_password(password.encode(), parameters)
        for name, password in users.items()
    }))
    path.chmod(0o600)
    return path


# --- password hashes ----------------------------------------------------------


def test_hash_format_and_verification() -> None:
    stored = hash_password(b"s3cret", QUICK)
    text = str(stored)
    assert text.startswith("$scrypt$ln=4,r=1,p=1$")
    salt, digest = text.split("$")[3:]
    assert len(base64.b64decode(salt + "==")) == 16
    assert len(base64.b64decode(digest + "=")) == 32

    again = parse_hash(text)
    assert again == stored
    assert verify_password(b"s3cret", again)
    assert not verify_password(b"s3cret ", again)
    assert not verify_password(b"", again)
    # A fresh salt each time: the same password, another hash.
    assert hash_password(b"s3cret", QUICK).digest != stored.digest


def test_default_parameters_are_slow_ones() -> None:
    assert DEFAULT_PARAMETERS == ScryptParameters(ln=15, r=8, p=1)
    assert DEFAULT_PARAMETERS.memory >= 32 * 1024 * 1024
    assert str(hash_password(b"x")).startswith("$scrypt$ln=15,r=8,p=1$")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("hunter2", "is not a $scrypt$ password hash"),
        ("$2b$12$abcdefghijklmnopqrstuv", "is not a $scrypt$ password hash"),
        ("$scrypt$ln=15,r=8,p=1$AAAA$BBBB", "too short"),
        ("$scrypt$ln=30,r=8,p=1$" + "A" * 22 + "$" + "B" * 43, "out of range"),
        ("$scrypt$ln=20,r=64,p=1$" + "A" * 22 + "$" + "B" * 43, "MiB per login"),
        ("$scrypt$ln=15,r=8,p=1$A$" + "B" * 43, "not valid base64"),
        (12345, "expected a $scrypt$ password hash string"),
    ],
)
def test_bad_hashes_are_refused_without_showing_them(text: Any, error: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_hash(text)
    assert error in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_a_hash_never_shows_its_digest_in_repr() -> None:
    stored = hash_password(b"x", QUICK)
    assert repr(stored) == "PasswordHash(scrypt, ln=4,r=1,p=1)"


# --- the users file ------------------------------------------------------------


def test_users_file_round_trip(tmp_path: Path) -> None:
    path = write_users(tmp_path / "users.yaml", {"alice@example.com": "a",
                                                 "bob": "b"})
    assert path.read_text().startswith("# Users of authenticated submission")
    users = load_users(path)
    assert sorted(users.hashes) == ["alice@example.com", "bob"]
    stored, known = users.lookup("bob")
    assert known and verify_password(b"b", stored)


def test_unknown_user_is_checked_against_a_decoy_of_equal_cost(
    tmp_path: Path,
) -> None:
    users = load_users(write_users(tmp_path / "users.yaml", {"alice": "a"}))
    stored, known = users.lookup("mallory")
    assert not known
    assert stored is users.decoy
    assert stored.parameters == users.hashes["alice"].parameters
    assert len(stored.digest) == len(users.hashes["alice"].digest)
    assert not verify_password(b"a", stored)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("users:\n  alice: hunter2\n",
         "users.alice: is not a $scrypt$ password hash (the value is not "
         "shown, as it may be a password)"),
        ("users:\n  'a b': $scrypt$x\n", "users.a b: a user name is 1 to 255"),
        ("users: [alice]\n", "users: expected a mapping of user name: hash"),
        ("people: {}\n", "people: unknown key; expected one of users"),
        ("users:\n  alice: x\n  alice: y\n", "users.alice: is given twice (line 2 and line 3)"),
        ("users: {alice: [\n", "not valid YAML"),
    ],
)
def test_users_file_problems_name_file_and_key(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(text)
    with pytest.raises(UsersFileError) as raised:
        load_users(path)
    assert any(line.startswith(f"{path}: ") and problem in line
               for line in raised.value.problems), raised.value.problems
    assert "hunter2" not in str(raised.value)


def test_update_is_atomic_and_private(tmp_path: Path) -> None:
    path = write_users(tmp_path / "users.yaml", {"alice": "a"})
    path.chmod(0o644)
    inode = path.stat().st_ino
    old_umask = os.umask(0)
    try:
        update_users(path, lambda hashes: hashes.update(
            bob=hash_password(b"b", QUICK)))
    finally:
        os.umask(old_umask)

    # A new file renamed over the old one: a reader sees one or the other.
    assert path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(load_users(path).hashes) == ["alice", "bob"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.yaml"]


def test_a_failed_update_leaves_the_file_alone(tmp_path: Path) -> None:
    path = write_users(tmp_path / "users.yaml", {"alice": "a"})
    before = path.read_bytes()

    def refuse(hashes: dict[str, PasswordHash]) -> None:
        hashes.clear()
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        update_users(path, refuse)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.yaml"]


@pytest.mark.parametrize(
    ("mode", "group", "expected"),
    [
        (0o600, "mta", None),
        (0o400, "mta", None),
        (0o640, "mta", "readable by group mta (mode 0640)"),
        (0o644, "mta", "readable by group and others (mode 0644)"),
        (0o604, "mta", "readable by others (mode 0604)"),
    ],
)
def test_users_file_mode_warning(mode: int, group: str, expected: str | None) -> None:
    warning = users_file_warning("submission", Path("/etc/mta/users.yaml"),
                                 stat.S_IFREG | mode, group)
    if expected is None:
        assert warning is None
        return
    assert warning == (
        f"auth: users file /etc/mta/users.yaml is {expected}; chmod 600 it "
        "(auth of listener submission; the relay runs with it anyway)"
    )


# --- the configuration -----------------------------------------------------------


CONFIG = """
hostname: relay.test
spool: spool
tls: {certificate: none.crt, private_key: none.key}
listeners:
  - {name: mx, address: 127.0.0.1, port: 2525, role: inbound}
  - {name: submission, address: 127.0.0.1, port: 2587, role: outbound,
     auth: users.yaml, networks: [192.0.2.0/24]}
  - {name: smtps, address: 127.0.0.1, port: 2465, role: outbound,
     tls: implicit, auth: users.yaml}
  - {name: internal, address: 127.0.0.1, port: 2588, role: outbound,
     networks: [192.0.2.0/24]}
limits: {auth_failure_delay: 1s, auth_failure_max_delay: 3s,
         auth_failure_limit: 3}
domains:
  example.com: {relay_to: ["mail.example.com"]}
"""


def config_problems(folder: Path, text: str) -> list[str]:
    path = folder / "mta.yaml"
    path.write_text(text)
    try:
        load_config(path, check_tls=False)
    except ConfigError as error:
        return list(error.problems)
    return []


def test_configuration_of_auth_and_implicit_tls(tmp_path: Path) -> None:
    write_users(tmp_path / "users.yaml", {"alice": "a"})
    (tmp_path / "mta.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "mta.yaml", check_tls=False)
    mx, submission, smtps, _ = config.listeners

    assert (mx.auth, mx.users, mx.tls) == (None, None, "starttls")
    assert submission.auth == tmp_path / "users.yaml"
    assert submission.users is not None
    assert list(submission.users.hashes) == ["alice"]
    assert (smtps.tls, smtps.require_tls) == ("implicit", True)
    assert config.limits.auth_failure_delay == 1.0
    assert config.limits.auth_failure_max_delay == 3.0
    assert config.limits.auth_failure_limit == 3


def test_auth_limits_default(tmp_path: Path) -> None:
    limits = Limits(message_size=1, recipients=1, idle_timeout=1)
    assert (limits.auth_failure_delay, limits.auth_failure_max_delay,
            limits.auth_failure_limit) == (1.0, 30.0, 3)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("role: inbound}", "listeners[0].auth: is for outbound listeners"),
        ("tls: implicit, require_tls: false}",
         "listeners[0].require_tls: cannot be false with tls: implicit"),
        ("tls: wrapped}", "listeners[0].tls: expected one of starttls, implicit"),
    ],
)
def test_listener_problems(tmp_path: Path, change: str, problem: str) -> None:
    write_users(tmp_path / "users.yaml", {"alice": "a"})
    listener = ("listeners:\n  - {name: l, address: 127.0.0.1, port: 2587, "
                "auth: users.yaml, " + (change if "role" in change
                                        else "role: outbound, " + change))
    text = CONFIG.split("listeners:")[0] + listener + "\n"
    problems = config_problems(tmp_path, text)
    assert any(problem in line for line in problems), problems


def test_missing_users_file_is_a_configuration_error(tmp_path: Path) -> None:
    problems = config_problems(tmp_path, CONFIG)
    # Two listeners name it: one problem.
    assert problems == [
        f"{tmp_path / 'mta.yaml'}: listeners[1].auth: no such file; create "
        f"it with `mta users add NAME` (got '{tmp_path / 'users.yaml'}')"
    ]


def test_bad_users_file_is_reported_once(tmp_path: Path) -> None:
    (tmp_path / "users.yaml").write_text("users:\n  alice: hunter2\n")
    problems = config_problems(tmp_path, CONFIG)
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'users.yaml'}: users.alice: ")


def test_auth_limit_problems(tmp_path: Path) -> None:
    write_users(tmp_path / "users.yaml", {"alice": "a"})
    text = CONFIG.replace("auth_failure_max_delay: 3s", "auth_failure_max_delay:"
                          " 500ms").replace("auth_failure_limit: 3",
                                            "auth_failure_limit: 0")
    problems = config_problems(tmp_path, text)
    assert any("limits.auth_failure_max_delay: must not be shorter than "
               "limits.auth_failure_delay (1s) (got '500ms')" in line
               for line in problems), problems
    assert any("limits.auth_failure_limit:" in line for line in problems)


def test_an_envelope_written_before_user_loads(tmp_path: Path) -> None:
    old = {
        "version": 1, "queue_id": "A", "sender": "", "arrival": 1.0, "size": 1,
        "client": {"helo": "h", "host": "unknown", "address": "192.0.2.1",
                   "listener": "mx", "tls": None},
        "recipients": [{"address": "a@example.com", "state": "pending",
                        "reason": None, "dsn": None, "next_attempt": None,
                        "history": []}],
        "body": "7BIT", "hold": False, "extra": {},
    }
    import json

    envelope = from_json(json.dumps(old).encode())
    assert envelope.client.user is None
    assert b'"user":null' in to_json(envelope)


# --- SASL steps -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("PLAIN " + plain("alice", "pw"),
         sasl.Credentials("PLAIN", "alice", b"pw")),
        ("plain " + plain("alice", "pw", authzid="alice"),
         sasl.Credentials("PLAIN", "alice", b"pw")),
        ("PLAIN " + plain("alice", "pw", authzid="bob"),
         sasl.Denied("PLAIN", "alice", "authorization identity differs")),
        ("PLAIN", sasl.Challenge("", sasl.AwaitingPlain())),
        ("PLAIN =", sasl.Refusal(sasl.Reply(501, "5.5.2",
                                            "Invalid PLAIN response"))),
        ("PLAIN " + b64("alice\0pw"),
         sasl.Refusal(sasl.Reply(501, "5.5.2", "Invalid PLAIN response"))),
        ("PLAIN " + plain("", "pw"),
         sasl.Refusal(sasl.Reply(501, "5.5.2", "Invalid PLAIN response"))),
        ("PLAIN " + plain("alice", ""),
         sasl.Denied("PLAIN", "alice", "empty or over-long password")),
        ("PLAIN " + plain("alice", "x" * 256),
         sasl.Refusal(sasl.Reply(501, "5.5.2", "Invalid PLAIN response"))),
        ("PLAIN !!!!", sasl.Refusal(sasl.CANNOT_DECODE)),
        ("PLAIN *", sasl.Refusal(sasl.CANNOT_DECODE)),
        ("LOGIN", sasl.Challenge(sasl.USERNAME_PROMPT, sasl.AwaitingUser())),
        ("LOGIN " + b64("alice"),
         sasl.Challenge(sasl.PASSWORD_PROMPT, sasl.AwaitingPassword("alice"))),
        ("CRAM-MD5", sasl.Refusal(sasl.UNKNOWN_MECHANISM)),
        ("", sasl.Refusal(sasl.SYNTAX)),
        ("PLAIN a b", sasl.Refusal(sasl.SYNTAX)),
    ],
)
def test_begin(argument: str, expected: sasl.Step) -> None:
    assert sasl.begin(argument) == expected


@pytest.mark.parametrize(
    ("state", "line", "expected"),
    [
        (sasl.AwaitingPlain(), plain("alice", "pw"),
         sasl.Credentials("PLAIN", "alice", b"pw")),
        (sasl.AwaitingPlain(), "*", sasl.Refusal(sasl.CANCELLED)),
        (sasl.AwaitingPlain(), "%%%", sasl.Refusal(sasl.CANNOT_DECODE)),
        (sasl.AwaitingUser(), b64("alice"),
         sasl.Challenge(sasl.PASSWORD_PROMPT, sasl.AwaitingPassword("alice"))),
        (sasl.AwaitingUser(), "*", sasl.Refusal(sasl.CANCELLED)),
        (sasl.AwaitingUser(), "=",
         sasl.Refusal(sasl.Reply(501, "5.5.2", "Invalid user name"))),
        (sasl.AwaitingUser(), "not base64!", sasl.Refusal(sasl.CANNOT_DECODE)),
        (sasl.AwaitingPassword("alice"), b64("pw"),
         sasl.Credentials("LOGIN", "alice", b"pw")),
        (sasl.AwaitingPassword("alice"), " * ", sasl.Refusal(sasl.CANCELLED)),
        (sasl.AwaitingPassword("alice"), "=",
         sasl.Denied("LOGIN", "alice", "empty or over-long password")),
    ],
)
def test_respond(state: sasl.State, line: str, expected: sasl.Step) -> None:
    assert sasl.respond(state, line) == expected


def test_credentials_never_show_the_password() -> None:
    assert "pw" not in repr(sasl.Credentials("PLAIN", "alice", b"pw"))


# --- the slowdown rules ------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "delay", "longest", "expected"),
    [
        (1, 1.0, 30.0, 1.0),
        (2, 1.0, 30.0, 2.0),
        (3, 1.0, 30.0, 4.0),
        (6, 1.0, 30.0, 30.0),
        (10_000, 1.0, 30.0, 30.0),
        (1, 0.0, 30.0, 0.0),
        (5, 0.25, 1.0, 1.0),
    ],
)
def test_failure_delay(failures: int, delay: float, longest: float,
                       expected: float) -> None:
    limits = Limits(message_size=1, recipients=1, idle_timeout=1,
                    auth_failure_delay=delay, auth_failure_max_delay=longest)
    assert failure_delay(failures, limits) == expected


def test_failure_table_forgets() -> None:
    clock = task.Clock()
    table = FailureTable(clock)
    assert [table.record("192.0.2.1") for _ in range(3)] == [1, 2, 3]
    assert table.record("192.0.2.2") == 1
    clock.advance(FORGET_AFTER - 1)
    assert table.count("192.0.2.1") == 3
    table.record("192.0.2.2")
    clock.advance(1)
    assert table.count("192.0.2.1") == 0  # its last failure is 15 min old
    assert table.count("192.0.2.2") == 2
    table.succeeded("192.0.2.2")
    assert table.count("192.0.2.2") == 0


# --- the listener in memory ------------------------------------------------------


class RecordingVerifier(Verifier):
    """The real `Verifier`, its check run at once instead of in a thread;
    ``checked`` records each hash a password was checked against."""

    def __init__(self, clock: task.Clock, hold: bool = False, **bounds: Any) -> None:
        self.checked: list[PasswordHash] = []
        self.held: list[defer.Deferred[bool]] = []
        self.hold = hold
        super().__init__(clock, run=self._now, **bounds)

    def _now(self, function: Any, password: bytes,
             stored: PasswordHash) -> defer.Deferred[bool]:
        self.checked.append(stored)
        if self.hold:
            waiting: defer.Deferred[bool] = defer.Deferred()
            self.held.append(waiting)
            return waiting
        return defer.maybeDeferred(function, password, stored)


class AuthServer:
    """The listener over a real spool and users file, a fake clock, a
    fake TLS creator."""

    def __init__(self, folder: Path, **verifier: Any) -> None:
        write_users(folder / "users.yaml", {"alice@example.com": PASSWORD,
                                            "bob": "bobs password"})
        (folder / "mta.yaml").write_text(CONFIG)
        self.config = load_config(folder / "mta.yaml", check_tls=False)
        self.spool = Spool(folder / "spool")
        self.spool.create()
        self.clock = task.Clock()
        self.verifier = RecordingVerifier(self.clock, **verifier)
        self.failures = FailureTable(self.clock)
        self.creator = object()

    def connect(self, listener: str = "submission",
                peer: str = "203.0.113.5") -> Session:
        factory = RelayServerFactory(
            listener,
            lambda: self.config,
            self.spool,
            lambda: self.creator,  # type: ignore[arg-type,return-value]
            lambda envelope, lock: None,
            reactor=self.clock,
            verifier=self.verifier,
            auth_failures=self.failures,
        )
        factory.commit = commit_at_once
        return Session(factory, peer)

    def tls(self, listener: str = "submission", peer: str = "203.0.113.5",
            ehlo: bool = True) -> Session:
        """A session after STARTTLS and a new EHLO."""
        session = self.connect(listener, peer)
        session.send("EHLO client.example\r\n")
        assert session.send("STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
        session.protocol.handshakeCompleted()
        if ehlo:
            session.send("EHLO client.example\r\n")
        return session


@pytest.fixture
def server(tmp_path: Path) -> AuthServer:
    return AuthServer(tmp_path)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def lines_of(events: list[dict[str, Any]]) -> list[str]:
    return [event["mta_line"] for event in events if "mta_line" in event]


OK = "235 2.7.0 Authentication successful"
INVALID = "535 5.7.8 Authentication credentials invalid"


class TestAdvertising:
    def test_auth_only_after_starttls(self, server: AuthServer) -> None:
        session = server.connect()
        before = session.send("EHLO client.example\r\n")
        assert before[-1] == "250 STARTTLS"
        assert not any("AUTH" in line for line in before)

        session.send("STARTTLS\r\n")
        session.protocol.handshakeCompleted()
        after = session.send("EHLO client.example\r\n")
        assert after == [
            "250-relay.test", "250-PIPELINING", "250-SIZE 52428800",
            "250-8BITMIME", "250-ENHANCEDSTATUSCODES", "250 AUTH PLAIN LOGIN",
        ]

    def test_before_tls_auth_is_538(
        self, server: AuthServer, events: list[dict[str, Any]]
    ) -> None:
        session = server.connect()
        session.send("EHLO client.example\r\n")
        reply = ("538 5.7.11 Encryption required for requested "
                 "authentication mechanism")
        assert session.send("AUTH PLAIN " + plain("bob", "x") + "\r\n") == [reply]
        assert session.send("AUTH LOGIN\r\n") == [reply]
        assert f"reject: AUTH from unknown[203.0.113.5]: {reply}" in lines_of(events)
        assert not server.verifier.checked

    @pytest.mark.parametrize("listener", ["internal", "mx"])
    def test_a_listener_without_auth_does_as_before(
        self, server: AuthServer, listener: str
    ) -> None:
        session = server.tls(listener, peer="192.0.2.7", ehlo=False)
        ehlo = session.send("EHLO client.example\r\n")
        assert ehlo[-1] == "250 ENHANCEDSTATUSCODES"
        assert session.send("AUTH PLAIN " + plain("bob", "x") + "\r\n") == [
            "502 5.5.2 Error: command not recognized"
        ]
        # And its command lines stay at 2048 octets.
        assert codes(session.send("AUTH PLAIN " + "A" * 3000 + "\r\n")) == [
            "500 5.5.2"
        ]


class TestPlainAndLogin:
    def test_plain_with_an_initial_response(self, server: AuthServer) -> None:
        session = server.tls()
        line = "AUTH PLAIN " + plain("alice@example.com", PASSWORD) + "\r\n"
        assert session.send(line) == [OK]
        assert session.protocol._user() == "alice@example.com"

    def test_plain_after_an_empty_challenge(self, server: AuthServer) -> None:
        session = server.tls()
        # RFC 4954 4: "334" and a space, the empty challenge.
        assert session.send("AUTH PLAIN\r\n") == ["334 "]
        assert session.send(plain("bob", "bobs password") + "\r\n") == [OK]

    def test_plain_authzid_equal_to_the_user(self, server: AuthServer) -> None:
        session = server.tls()
        response = plain("bob", "bobs password", authzid="bob")
        assert session.send(f"AUTH PLAIN {response}\r\n") == [OK]

    def test_plain_authzid_of_another_is_refused(
        self, server: AuthServer, events: list[dict[str, Any]]
    ) -> None:
        session = server.tls()
        response = plain("bob", "bobs password", authzid="alice@example.com")
        assert session.send(f"AUTH PLAIN {response}\r\n") == []
        server.clock.advance(1)
        assert session.take() == [INVALID]
        assert session.protocol._user() is None
        assert not server.verifier.checked  # refused without a check
        assert any("(authorization identity differs)" in line
                   for line in lines_of(events))

    def test_login_with_its_two_prompts(self, server: AuthServer) -> None:
        session = server.tls()
        assert session.send("AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
        assert session.send(b64("alice@example.com") + "\r\n") == [
            "334 UGFzc3dvcmQ6"
        ]
        assert session.send(b64(PASSWORD) + "\r\n") == [OK]
        assert session.protocol._user() == "alice@example.com"

    def test_login_with_the_user_name_first(self, server: AuthServer) -> None:
        session = server.tls()
        assert session.send(f"auth login {b64('bob')}\r\n") == ["334 UGFzc3dvcmQ6"]
        assert session.send(b64("bobs password") + "\r\n") == [OK]

    @pytest.mark.parametrize("prompts", [0, 1])
    def test_a_star_cancels(self, server: AuthServer, prompts: int) -> None:
        session = server.tls()
        session.send("AUTH LOGIN\r\n")
        if prompts:
            session.send(b64("bob") + "\r\n")
        assert session.send("*\r\n") == ["501 5.7.0 Authentication aborted"]
        # The exchange is over: the next line is a command again.
        assert session.send("NOOP\r\n") == ["250 2.0.0 Ok"]
        assert not server.verifier.checked

    def test_bad_base64(self, server: AuthServer) -> None:
        session = server.tls()
        assert session.send("AUTH PLAIN not-base64!\r\n") == [
            "501 5.5.2 Cannot decode response"
        ]
        session.send("AUTH LOGIN\r\n")
        assert session.send("@@@@\r\n") == ["501 5.5.2 Cannot decode response"]

    def test_unknown_mechanism_and_syntax(self, server: AuthServer) -> None:
        session = server.tls()
        assert session.send("AUTH CRAM-MD5\r\n") == [
            "504 5.5.4 Unrecognized authentication type"
        ]
        assert session.send("AUTH\r\n") == [
            "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
        ]

    def test_auth_needs_ehlo_first(self, server: AuthServer) -> None:
        session = server.tls(ehlo=False)
        assert session.send("AUTH PLAIN " + plain("bob", "x") + "\r\n") == [
            "503 5.5.1 Error: send HELO/EHLO first"
        ]

    def test_auth_twice_is_503(self, server: AuthServer) -> None:
        session = server.tls()
        session.send("AUTH PLAIN " + plain("bob", "bobs password") + "\r\n")
        assert session.send("AUTH PLAIN " + plain("bob", "x") + "\r\n") == [
            "503 5.5.1 Error: already authenticated"
        ]

    def test_auth_inside_a_transaction_is_503(self, server: AuthServer) -> None:
        session = server.tls("submission", peer="192.0.2.7")
        session.send("MAIL FROM:<s@client.example>\r\n")
        assert session.send("AUTH PLAIN " + plain("bob", "x") + "\r\n") == [
            "503 5.5.1 Error: MAIL transaction in progress"
        ]

    def test_auth_lines_up_to_12288_octets(self, server: AuthServer) -> None:
        session = server.tls()
        # Valid base64, but too big a PLAIN message: read whole, then refused.
        blob = b64(b"x" * 9000)
        line = f"AUTH PLAIN {blob}\r\n"
        assert 2048 < len(line) <= 12288
        assert session.send(line) == ["501 5.5.2 Invalid PLAIN response"]

        padded = "AUTH PLAIN " + "A" * (12288 - 13) + "\r\n"
        assert len(padded) == 12288
        assert codes(session.send(padded)) == ["501 5.5.2"]
        assert session.send("AUTH PLAIN " + "A" * 12288 + "\r\n") == [
            "500 5.5.2 Error: line too long"
        ]
        # Another command stays at 2048.
        assert codes(session.send("NOOP " + "x" * 3000 + "\r\n")) == ["500 5.5.2"]

    def test_an_over_long_response_ends_the_exchange(
        self, server: AuthServer
    ) -> None:
        session = server.tls()
        session.send("AUTH PLAIN\r\n")
        assert session.send("A" * 13000 + "\r\nNOOP\r\n") == [
            "500 5.5.2 Error: line too long",
            "250 2.0.0 Ok",
        ]
        session.send("AUTH LOGIN\r\n")
        assert codes(session.send(b"YWxp\rY2U=\r\n")) == ["500 5.5.2"]

    def test_pipelined_commands_wait_for_the_check(self, server: AuthServer) -> None:
        server.verifier.hold = True
        session = server.tls()
        replies = session.send(
            "AUTH PLAIN " + plain("bob", "bobs password") + "\r\n"
            "MAIL FROM:<bob@client.example>\r\nRCPT TO:<x@far.example>\r\n"
        )
        assert replies == []
        # Kept, not read into the check; reading stops only past
        # WAITING_INPUT (tests/test_smtpserver.py).
        assert session.transport.producerState == "producing"
        server.verifier.held[0].callback(True)
        assert codes(session.take()) == ["235 2.7.0", "250 2.1.0", "250 2.1.5"]

    def test_the_auth_mail_parameter_where_auth_is_offered(
        self, server: AuthServer
    ) -> None:
        # RFC 4954 5: taken (and not vouched for) where AUTH is advertised.
        session = server.tls()
        session.send("AUTH PLAIN " + plain("bob", "bobs password") + "\r\n")
        assert session.send("MAIL FROM:<bob@client.example> AUTH=<>\r\n") == [
            "250 2.1.0 Ok"
        ]
        session.send("RSET\r\n")
        assert codes(session.send(
            "MAIL FROM:<bob@client.example> AUTH=bob+40client.example\r\n"
        )) == ["250 2.1.0"]
        plaintext = server.connect(peer="192.0.2.7")
        plaintext.send("EHLO client.example\r\n")
        assert codes(plaintext.send("MAIL FROM:<a@client.example> AUTH=<>\r\n")) \
            == ["555 5.5.4"]

    def test_starttls_forgets_the_login(self, server: AuthServer) -> None:
        session = server.connect()
        session.send("EHLO client.example\r\n")
        auth = session.protocol._auth
        assert auth is not None
        auth.user = "left over"  # what a login before TLS would have left
        session.send("STARTTLS\r\n")
        assert session.protocol._user() is None


class TestRelaying:
    def send_message(self, session: Session) -> list[str]:
        return session.send(
            "MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@far.example>\r\n"
            "DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"
        )

    def test_a_stranger_may_not_relay(self, server: AuthServer) -> None:
        session = server.tls()
        replies = session.send(
            "MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@far.example>\r\n"
        )
        assert replies == ["250 2.1.0 Ok",
                           "554 5.7.1 <x@far.example>: Relay access denied"]

    def test_after_auth_a_stranger_may_relay(self, server: AuthServer) -> None:
        session = server.tls()
        session.send("AUTH PLAIN " + plain("alice@example.com", PASSWORD) + "\r\n")
        replies = self.send_message(session)
        assert codes(replies) == ["250 2.1.0", "250 2.1.5", "354 End",
                                  "250 2.0.0"]

        queue_id = queued_id(replies[-1])
        envelope = server.spool.load(queue_id)
        assert envelope.client.user == "alice@example.com"
        message = server.spool.read_message(envelope)
        assert f"with ESMTPSA id {queue_id}\r\n".encode() in message
        # The header travels to the recipient: no user name in it.
        assert b"alice@example.com" not in message.split(b"\r\n\r\n")[0]

    def test_a_failed_login_does_not_open_the_relay(
        self, server: AuthServer
    ) -> None:
        session = server.tls()
        session.send("AUTH PLAIN " + plain("alice@example.com", "wrong") + "\r\n")
        server.clock.advance(1)
        assert session.take() == [INVALID]
        assert codes(self.send_message(session))[1] == "554 5.7.1"

    def test_networks_still_relay_without_auth(self, server: AuthServer) -> None:
        session = server.tls(peer="192.0.2.7")
        replies = self.send_message(session)
        assert codes(replies)[-1] == "250 2.0.0"
        envelope = server.spool.load(queued_id(replies[-1]))
        assert envelope.client.user is None
        message = server.spool.read_message(envelope)
        assert f"with ESMTPS id {envelope.queue_id}\r\n".encode() in message


class TestFailures:
    def fail_once(self, session: Session, user: str = "alice@example.com") -> None:
        assert session.send(f"AUTH PLAIN {plain(user, 'wrong')}\r\n") == []

    def test_unknown_user_and_wrong_password_look_the_same(
        self, server: AuthServer, events: list[dict[str, Any]]
    ) -> None:
        session = server.tls()
        self.fail_once(session, "mallory")
        server.clock.advance(1)
        unknown = session.take()
        self.fail_once(session, "bob")
        server.clock.advance(2)
        wrong = session.take()
        assert unknown == wrong == [INVALID]
        # Both cost a check, the unknown one against the decoy.
        users = server.config.listeners[1].users
        assert users is not None
        assert server.verifier.checked == [users.decoy, users.hashes["bob"]]
        lines = [line for line in lines_of(events) if "SASL" in line]
        assert lines == [
            "warning: unknown[203.0.113.5]: SASL PLAIN authentication failed: "
            "sasl_username=mallory listener=submission failures=1 delay=1s "
            "(unknown user)",
            "warning: unknown[203.0.113.5]: SASL PLAIN authentication failed: "
            "sasl_username=bob listener=submission failures=2 delay=2s "
            "(wrong password)",
        ]

    def test_the_delay_grows_then_421(
        self, server: AuthServer, events: list[dict[str, Any]]
    ) -> None:
        session = server.tls()
        # 1s, then 2s, then (at the limit of 3) 3s, the longest: then 421.
        for delay, reply in ((1, INVALID), (2, INVALID)):
            self.fail_once(session)
            server.clock.advance(delay - 0.001)
            assert session.take() == []
            server.clock.advance(0.001)
            assert session.take() == [reply]

        session.send(f"AUTH PLAIN {plain('alice@example.com', 'wrong')}\r\n"
                     "NOOP\r\n")
        server.clock.advance(2.999)
        assert session.take() == []
        server.clock.advance(0.001)
        closing = ("421 4.7.0 relay.test Error: too many failed "
                   "authentications (3); closing connection")
        assert session.take() == [closing]  # the NOOP is never answered
        assert session.transport.disconnecting
        # Reading goes on, so the close (TLS's and the client's) is seen.
        assert session.transport.producerState == "producing"
        assert lines_of(events)[-1] == (
            f"reject: AUTH from unknown[203.0.113.5]: {closing}"
        )

    def test_reconnecting_does_not_start_afresh(self, server: AuthServer) -> None:
        first = server.tls()
        self.fail_once(first)
        server.clock.advance(1)
        first.send("QUIT\r\n")

        second = server.tls()
        self.fail_once(second)
        server.clock.advance(1)
        assert second.take() == []  # the address's second failure: 2s
        server.clock.advance(1)
        assert second.take() == [INVALID]

        other = server.tls(peer="198.51.100.9")
        self.fail_once(other)
        server.clock.advance(1)
        assert other.take() == [INVALID]

    def test_a_success_clears_the_address(self, server: AuthServer) -> None:
        session = server.tls()
        self.fail_once(session)
        server.clock.advance(1)
        session.take()
        session.send(f"AUTH PLAIN {plain('bob', 'bobs password')}\r\n")
        assert server.failures.count("203.0.113.5") == 0

    def test_a_client_gone_during_the_delay_leaves_no_timer(
        self, server: AuthServer
    ) -> None:
        session = server.tls()
        self.fail_once(session)
        assert server.clock.getDelayedCalls()
        session.protocol.connectionLost()
        pending = [call for call in server.clock.getDelayedCalls()
                   if call.active()]
        assert pending == []

    def test_too_many_checks_at_once_is_454(self, tmp_path: Path,
                                            events: list[dict[str, Any]]) -> None:
        server = AuthServer(tmp_path, hold=True, threads=1, waiting=1)
        busy = [server.tls(peer=f"203.0.113.{n}") for n in (1, 2, 3)]
        replies = [
            session.send(f"AUTH PLAIN {plain('bob', 'bobs password')}\r\n")
            for session in busy
        ]
        assert replies == [
            [], [], ["454 4.7.0 Temporary authentication failure"]
        ]
        assert any("authentication not checked" in line and "454 4.7.0" in line
                   for line in lines_of(events))
        server.verifier.held[0].callback(True)
        assert busy[0].take() == [OK]
        # Not a failed login: the third client may try again at once.
        assert server.failures.count("203.0.113.3") == 0


def test_credentials_never_reach_the_log(
    server: AuthServer, events: list[dict[str, Any]]
) -> None:
    secrets = ["bobs password", "hunter2-secret"]
    session = server.tls()
    assert session.send(
        "AUTH LOGIN\r\n" + b64("bob") + "\r\n" + b64(secrets[1]) + "\r\n"
    ) == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"]
    server.clock.advance(1)
    assert session.send("AUTH PLAIN " + plain("bob", secrets[0]) + "\r\n") == [
        INVALID, OK
    ]

    text = repr(events)
    for secret in secrets:
        for form in (secret, b64(secret), plain("bob", secret)):
            assert form not in text
    assert "sasl_username=bob" in text


# --- the real relay -------------------------------------------------------------


def start_relay(tmp_path: Path, relay_cert: certs.CertFiles, peer: Peer,
                users: dict[str, str] | None = None, **overrides: Any
                ) -> RelayProcess:
    """The relay with a submission listener (STARTTLS, AUTH, no trusted
    network around 127.0.0.1) and an implicit-TLS one, relaying everything
    to ``peer``."""
    folder = tmp_path / "relay"
    folder.mkdir()
    write_users(folder / "users.yaml",
                users if users is not None else {"alice@example.org": PASSWORD})
    config = base_config(
        folder, relay_cert.chain, relay_cert.key,
        listeners=[
            {"name": "submission", "address": "127.0.0.1", "port": free_port(),
             "role": "outbound", "auth": "users.yaml",
             "networks": ["192.0.2.0/24"]},
            {"name": "smtps", "address": "127.0.0.1", "port": free_port(),
             "role": "outbound", "tls": "implicit", "auth": "users.yaml"},
        ],
        routes={"*": f"[{peer.address}]:{peer.port}"},
        limits={"auth_failure_delay": "20ms", "auth_failure_max_delay": "1s",
                "auth_failure_limit": 3},
        **overrides,
    )
    return RelayProcess(folder, config).start()


@pytest.fixture
def peer() -> Iterator[Peer]:
    with smtppeer.plain(PEER, 0) as running:
        yield running


@pytest.fixture
def relay(tmp_path: Path, relay_cert: certs.CertFiles,
          peer: Peer) -> Iterator[RelayProcess]:
    process = start_relay(tmp_path, relay_cert, peer)
    try:
        yield process
    finally:
        process.stop()


def permissive() -> ssl.SSLContext:
    return certs.permissive_client_context(minimum=ssl.TLSVersion.TLSv1_2)


def swaks(
    relay: RelayProcess, listener: str, *options: str
) -> subprocess.CompletedProcess[str]:
    address, port = relay.listener(listener)
    return subprocess.run(
        ["swaks", "--server", f"{address}:{port}", "--from", "alice@example.org",
         "--to", "bob@far.example", "--helo", "client.test", *options],
        capture_output=True, text=True, timeout=30,
    )


MESSAGE = b"From: alice@example.org\r\nSubject: auth\r\n\r\nSent after AUTH.\r\n"


class TestWithSwaks:
    def test_login_over_starttls(self, relay: RelayProcess, peer: Peer) -> None:
        result = swaks(relay, "submission", "--tls", "--auth", "LOGIN",
                       "--auth-user", "alice@example.org",
                       "--auth-password", PASSWORD)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "250 AUTH PLAIN LOGIN" in result.stdout
        assert "334 VXNlcm5hbWU6" in result.stdout
        assert "235 2.7.0 Authentication successful" in result.stdout

        (message,) = peer.wait_for(1, timeout=15)
        assert message.rcpt_tos == ("bob@far.example",)
        assert b"with ESMTPSA id" in message.content
        line = relay.wait_for_log("accepted from=<alice@example.org>")
        assert line.endswith("listener=submission tls=TLSv1.3/"
                             "TLS_AES_128_GCM_SHA256 "
                             "sasl_username=alice@example.org")
        assert ("SASL LOGIN authentication succeeded: "
                "sasl_username=alice@example.org listener=submission"
                in relay.log())

    def test_plain_over_implicit_tls(self, relay: RelayProcess, peer: Peer) -> None:
        result = swaks(relay, "smtps", "--tls-on-connect", "--auth", "PLAIN",
                       "--auth-user", "alice@example.org",
                       "--auth-password", PASSWORD)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "STARTTLS" not in result.stdout
        assert "235 2.7.0" in result.stdout
        peer.wait_for(1, timeout=15)
        line = relay.wait_for_log("listener=smtps")
        assert "sasl_username=alice@example.org" in line

    def test_plain_without_tls_is_not_offered(self, relay: RelayProcess,
                                             peer: Peer) -> None:
        result = swaks(relay, "submission", "--auth", "PLAIN",
                       "--auth-user", "alice@example.org",
                       "--auth-password", PASSWORD)
        assert result.returncode != 0
        assert "Host did not advertise authentication" in result.stderr
        assert PASSWORD not in relay.log()
        assert not relay.envelopes()

    def test_a_wrong_password(self, relay: RelayProcess) -> None:
        result = swaks(relay, "submission", "--tls", "--auth", "PLAIN",
                       "--auth-user", "alice@example.org",
                       "--auth-password", "guess")
        assert result.returncode != 0
        assert "535 5.7.8 Authentication credentials invalid" in result.stdout
        relay.wait_for_log("SASL PLAIN authentication failed")
        assert not relay.envelopes()


class TestWithSmtplib:
    def test_starttls_then_login(self, relay: RelayProcess, peer: Peer) -> None:
        with smtplib.SMTP(*relay.listener("submission"), timeout=30) as client:
            client.starttls(context=permissive())
            assert client.login("alice@example.org", PASSWORD)[0] == 235
            client.sendmail("alice@example.org", ["bob@far.example"], MESSAGE)
        (message,) = peer.wait_for(1, timeout=15)
        assert message.content.endswith(b"Sent after AUTH.\r\n")
        relay.wait_for_log("sasl_username=alice@example.org")

    def test_login_mechanism_chosen_by_the_client(self, relay: RelayProcess) -> None:
        with smtplib.SMTP(*relay.listener("submission"), timeout=30) as client:
            client.starttls(context=permissive())
            client.ehlo()
            client.user, client.password = "alice@example.org", PASSWORD
            code, _ = client.auth("LOGIN", client.auth_login)
            assert code == 235

    def test_smtp_ssl_on_the_implicit_listener(self, relay: RelayProcess,
                                              peer: Peer) -> None:
        address, port = relay.listener("smtps")
        with smtplib.SMTP_SSL(address, port, context=permissive(),
                              timeout=30) as client:
            client.ehlo()
            assert not client.has_extn("starttls")
            assert client.login("alice@example.org", PASSWORD)[0] == 235
            client.sendmail("alice@example.org", ["bob@far.example"], MESSAGE)
        (message,) = peer.wait_for(1, timeout=15)
        assert message.rcpt_tos == ("bob@far.example",)

    def test_before_starttls_538(self, relay: RelayProcess) -> None:
        with smtplib.SMTP(*relay.listener("submission"), timeout=30) as client:
            client.ehlo()
            assert not client.has_extn("auth")
            code, text = client.docmd("AUTH", "PLAIN " + plain(
                "alice@example.org", PASSWORD))
        assert (code, text) == (538, b"5.7.11 Encryption required for "
                                     b"requested authentication mechanism")

    def test_no_relaying_without_auth(self, relay: RelayProcess, peer: Peer) -> None:
        with smtplib.SMTP(*relay.listener("submission"), timeout=30) as client:
            client.starttls(context=permissive())
            client.ehlo()
            client.mail("alice@example.org")
            code, text = client.rcpt("bob@far.example")
        assert (code, text) == (554, b"5.7.1 <bob@far.example>: Relay access "
                                     b"denied")
        assert not relay.envelopes()
        assert peer.messages == []


def test_failed_logins_are_logged_slowed_and_cut_off(
    relay: RelayProcess,
) -> None:
    with smtplib.SMTP(*relay.listener("submission"), timeout=30) as client:
        client.starttls(context=permissive())
        client.ehlo()
        replies = [client.docmd("AUTH", "PLAIN " + plain("alice@example.org",
                                                         f"guess{n}"))
                   for n in range(3)]
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()

    assert [code for code, _ in replies] == [535, 535, 421]
    assert replies[2][1].startswith(b"4.7.0 relay.test Error: too many failed")
    lines = [line.split("] ", 1)[1] for line in relay.log().splitlines()
             if "SASL PLAIN authentication failed" in line
             or "reject: AUTH" in line]
    assert lines == [
        "warning: unknown[127.0.0.1]: SASL PLAIN authentication failed: "
        f"sasl_username=alice@example.org listener=submission failures={n} "
        f"delay={delay} (wrong password)"
        for n, delay in ((1, "0.02s"), (2, "0.04s"), (3, "0.08s"))
    ] + [
        "reject: AUTH from unknown[127.0.0.1]: 421 4.7.0 relay.test Error: "
        "too many failed authentications (3); closing connection"
    ]
    for n in range(3):
        assert f"guess{n}" not in relay.log()
    # The connection it closed is gone: a stop has nothing to wait for.
    relay.stop()
    assert "stop: done, nothing left under way" in relay.log()


def test_credentials_absent_from_the_log_with_transcripts(
    tmp_path: Path, relay_cert: certs.CertFiles, peer: Peer
) -> None:
    secret = "very-secret-passphrase"
    relay = start_relay(tmp_path, relay_cert, peer, users={"carol": secret},
                        log_transcript=True)
    try:
        with smtplib.SMTP(*relay.listener("submission"), timeout=30) as client:
            client.starttls(context=permissive())
            client.ehlo()
            client.user, client.password = "carol", secret
            assert client.auth("LOGIN", client.auth_login)[0] == 235
            client.sendmail("carol@example.org", ["bob@far.example"], MESSAGE)
        with smtplib.SMTP(*relay.listener("submission"), timeout=30) as client:
            client.starttls(context=permissive())
            client.ehlo()
            client.docmd("AUTH", "PLAIN " + plain("carol", secret + "x"))
        peer.wait_for(1, timeout=15)
        relay.wait_for_log("status=sent")
        relay.wait_for_log("SASL PLAIN authentication failed")
    finally:
        relay.stop()

    log = relay.log()
    assert "DATA" in log  # the delivery's transcript is there
    for form in (secret, b64(secret), b64(secret + "x"),
                 plain("carol", secret), plain("carol", secret + "x")):
        assert form not in log


# --- the users file and the relay -----------------------------------------------


def mta(*args: str, stdin: str | None = None,
        **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MTA), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, **options)


def test_a_users_file_others_can_read_is_warned_about(
    tmp_path: Path, relay_cert: certs.CertFiles, peer: Peer
) -> None:
    folder = tmp_path / "relay"
    relay = start_relay(tmp_path, relay_cert, peer)
    relay.stop()
    (folder / "users.yaml").chmod(0o644)
    relay = RelayProcess(folder, relay.config).start()
    try:
        line = relay.wait_for_log("auth: users file")
    finally:
        relay.stop()
    assert "[mta#warn]" in line
    assert line.endswith(
        f"auth: users file {folder / 'users.yaml'} is readable by group and "
        "others (mode 0644); chmod 600 it (auth of listener submission; the "
        "relay runs with it anyway)"
    )


def login(relay: RelayProcess, user: str, password: str) -> int:
    with smtplib.SMTP(*relay.listener("submission"), timeout=30) as client:
        client.starttls(context=permissive())
        client.ehlo()
        code, _ = client.docmd("AUTH", "PLAIN " + plain(user, password))
    return code


def reload(relay: RelayProcess) -> None:
    before = relay.log().count("reload: ok")
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while relay.log().count("reload: ok") == before:
        assert time.monotonic() < deadline, relay.log()
        assert "reload: refused" not in relay.log(), relay.log()
        time.sleep(0.05)


def test_a_reload_reads_the_users_file_again(
    relay: RelayProcess,
) -> None:
    assert login(relay, "dave", "daves password") == 535
    result = mta("users", "add", "dave", "--password-stdin",
                 "--config", str(relay.config_path), stdin="daves password\n")
    assert result.returncode == 0, result.stderr
    assert login(relay, "dave", "daves password") == 535  # until the reload

    reload(relay)
    assert login(relay, "dave", "daves password") == 235

    assert mta("users", "remove", "dave", "--config",
               str(relay.config_path)).returncode == 0
    reload(relay)
    assert login(relay, "dave", "daves password") == 535


def test_a_broken_users_file_is_refused_at_reload(relay: RelayProcess) -> None:
    users = relay.folder / "users.yaml"
    users.write_text("users:\n  alice@example.org: hunter2\n")
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    line = relay.wait_for_log("reload: refused")
    assert (f"{users}: users.alice@example.org: is not a $scrypt$ password "
            "hash" in line)
    assert "hunter2" not in relay.log()
    # The running users stay.
    assert login(relay, "alice@example.org", PASSWORD) == 235


def test_check_config_reports_the_users_file(tmp_path: Path,
                                             relay_cert: certs.CertFiles) -> None:
    config = base_config(tmp_path, relay_cert.chain, relay_cert.key)
    config["listeners"][1]["auth"] = "users.yaml"
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "users.yaml").write_text("users:\n  alice: nope\n")
    result = mta("check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout == (
        f"{tmp_path / 'users.yaml'}: users.alice: is not a $scrypt$ password "
        "hash (the value is not shown, as it may be a password)\n"
    )


# --- mta users ----------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path, relay_cert: certs.CertFiles) -> Path:
    config = base_config(tmp_path, relay_cert.chain, relay_cert.key)
    config["listeners"][1]["auth"] = "users.yaml"
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_users_commands(config_file: Path) -> None:
    users = config_file.parent / "users.yaml"
    add = mta("users", "add", "erin@example.org", "--password-stdin",
              "--config", str(config_file), stdin="first\n", umask=0)
    assert add.returncode == 0, add.stderr
    assert add.stdout == (f"erin@example.org: added to {users}; reload the "
                          "relay (SIGHUP) to apply\n")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert "first" not in users.read_text()
    stored = load_users(users).hashes["erin@example.org"]
    assert stored.parameters == DEFAULT_PARAMETERS
    assert verify_password(b"first", stored)

    again = mta("users", "add", "erin@example.org", "--password-stdin",
                "--config", str(config_file), stdin="other\n")
    assert again.returncode == 1
    assert "already in" in again.stderr and "mta users passwd" in again.stderr

    changed = mta("--config", str(config_file), "users", "passwd",
                  "erin@example.org", "--password-stdin", stdin="second\n")
    assert changed.returncode == 0, changed.stderr
    assert verify_password(b"second", load_users(users).hashes["erin@example.org"])

    listed = mta("users", "list", "--config", str(config_file))
    assert listed.stdout == "erin@example.org  scrypt ln=15,r=8,p=1\n"

    removed = mta("users", "remove", "erin@example.org", "--config",
                  str(config_file))
    assert removed.returncode == 0
    assert load_users(users).hashes == {}
    missing = mta("users", "remove", "erin@example.org", "--config",
                  str(config_file))
    assert missing.returncode == 1
    assert "no such user" in missing.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "error"),
    [
        (("add", "a b", "--password-stdin"), "x\n", "a user name is 1 to 255"),
        (("add", "frank", "--password-stdin"), "\n", "empty password"),
        (("add", "frank", "--password-stdin"), "x" * 256 + "\n", "at most 255"),
        (("passwd", "nobody", "--password-stdin"), "x\n", "no such user"),
    ],
)
def test_users_command_errors(config_file: Path, args: tuple[str, ...],
                              stdin: str, error: str) -> None:
    result = mta("users", *args, "--config", str(config_file), stdin=stdin)
    assert result.returncode == 1
    assert error in result.stderr
    assert not (config_file.parent / "users.yaml").exists()


def test_no_password_on_the_command_line(config_file: Path) -> None:
    result = mta("users", "add", "frank", "--password", "x", "--config",
                 str(config_file))
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_users_file_from_the_configuration_or_file(
    tmp_path: Path, relay_cert: certs.CertFiles
) -> None:
    config = base_config(tmp_path, relay_cert.chain, relay_cert.key)
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(config))
    none = mta("users", "list", "--config", str(path))
    assert none.returncode == 1
    assert "no listener has auth: set" in none.stderr

    config["listeners"][0]["role"] = "outbound"
    config["listeners"][0]["auth"] = "one.yaml"
    config["listeners"][1]["auth"] = "two.yaml"
    path.write_text(yaml.safe_dump(config))
    several = mta("users", "list", "--config", str(path))
    assert "the listeners name 2 users files" in several.stderr

    chosen = mta("users", "add", "gina", "--password-stdin", "--file",
                 str(tmp_path / "two.yaml"), "--config", str(path), stdin="g\n")
    assert chosen.returncode == 0, chosen.stderr
    assert list(load_users(tmp_path / "two.yaml").hashes) == ["gina"]


def _read_until(descriptor: int, wanted: bytes, deadline: float) -> bytes:
    output = b""
    while wanted not in output:
        left = deadline - time.monotonic()
        assert left > 0, output
        ready, _, _ = select.select([descriptor], [], [], left)
        if ready:
            try:
                chunk = os.read(descriptor, 1024)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    return output


@pytest.mark.parametrize("second", ["s3cret-pw", "typo"])
def test_users_add_asks_twice_on_the_terminal(config_file: Path,
                                              second: str) -> None:
    """A real terminal (a pty): the password is asked for twice, never
    echoed, and must match."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        os.execv(str(MTA), [str(MTA), "users", "add", "henry", "--config",
                            str(config_file)])
    deadline = time.monotonic() + 30
    try:
        output = _read_until(terminal, b"Password for henry: ", deadline)
        os.write(terminal, b"s3cret-pw\n")
        output += _read_until(terminal, b"Again: ", deadline)
        os.write(terminal, second.encode() + b"\n")
        output += _read_until(terminal, b"\n", deadline)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(terminal)

    assert b"s3cret-pw" not in output  # not echoed
    users = config_file.parent / "users.yaml"
    if second == "typo":
        assert os.waitstatus_to_exitcode(status) == 1
        assert not users.exists()
    else:
        assert os.waitstatus_to_exitcode(status) == 0
        assert verify_password(b"s3cret-pw", load_users(users).hashes["henry"])


def test_users_commands_wait_for_the_lock(config_file: Path) -> None:
    """A second writer waits for the first: the folder's lock is held, the
    command blocks; released, it goes on and nothing is lost."""
    import fcntl

    users = write_users(config_file.parent / "users.yaml", {"kate": "k"})
    folder = os.open(users.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        waiting = subprocess.Popen(
            [str(MTA), "users", "add", "liam", "--password-stdin", "--config",
             str(config_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert waiting.stdin is not None
        waiting.stdin.write("l\n")
        waiting.stdin.flush()
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=3)  # hashing takes well under that
        # Meanwhile another change, made under the lock.
        users.write_text(users_text({**load_users(users).hashes,
                                     "mia": hash_password(b"m", QUICK)}))
    finally:
        os.close(folder)  # releases the lock
    _, errors = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, errors
    assert sorted(load_users(users).hashes) == ["kate", "liam", "mia"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_root_leaves_the_file_to_its_owner(config_file: Path) -> None:
    users = write_users(config_file.parent / "users.yaml", {"ivy": "i"})
    os.chown(users, 65534, 65534)
    result = mta("users", "add", "jack", "--password-stdin", "--config",
                 str(config_file), stdin="j\n")
    assert result.returncode == 0, result.stderr
    status = users.stat()
    assert (status.st_uid, status.st_gid) == (65534, 65534)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert sorted(load_users(users).hashes) == ["ivy", "jack"]


def test_repo_example_configuration_still_loads() -> None:
    load_config(REPO / "etc" / "mta.yaml", check_tls=False)


def test_queue_show_names_the_user() -> None:
    from mta.envelope import Client, Envelope, Recipient
    from mta.queuecli import describe

    envelope = Envelope(
        queue_id="661C83C43815B031A", sender="alice@example.org", arrival=0.0,
        size=10, recipients=(Recipient("bob@far.example"),),
        client=Client(helo="client.test", host="unknown", address="192.0.2.9",
                      listener="submission", user="alice@example.org"),
    )
    client_line = describe(envelope)[4]
    assert client_line == (
        "client:   unknown[192.0.2.9] helo=client.test listener=submission "
        "tls=none sasl_username=alice@example.org"
    )


@pytest.mark.parametrize(
    ("esmtp", "tls", "authenticated", "expected"),
    [
        (False, False, False, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (False, True, False, "ESMTPS"),
        (True, True, True, "ESMTPSA"),
        (True, False, True, "ESMTPA"),
    ],
)
def test_received_protocol_names(esmtp: bool, tls: bool, authenticated: bool,
                                 expected: str) -> None:
    """RFC 3848's "with" words."""
    from mta.envelope import TLSFacts
    from mta.received import protocol_name

    facts = TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256") if tls else None
    assert protocol_name(esmtp, facts, authenticated) == expected


# --- a users file that is hostile or not a file -----------------------------------


def _laughs(levels: int) -> str:
    lines = ["l1: &l1 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(2, levels + 1):
        lines.append(f"l{level}: &l{level} [" + ", ".join(
            [f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("users: {alice: " + "[" * 600 + "]" * 600 + "}\n",
         "nesting too deep: more than 64 levels of lists and mappings (line 1"),
        ("users: &u {alice: *u}\n",
         "nesting too deep: an alias inside its own anchor never ends"),
        (_laughs(7) + "users: *l7\n", "too big: its aliases stand for more "
         "than 1,000,000 values"),
        (_laughs(5) + "users: *l5\n",
         "users: expected a mapping of user name: hash (got [[[...], [...], "),
        ("users: {alice: 2024-13-45}\n", "not valid YAML: a value cannot be "
         "read: month must be in 1..12"),
    ],
    ids=["deep", "cycle", "laughs", "few-laughs", "bad-date"],
)
def test_a_hostile_users_file_is_one_short_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(text)
    with pytest.raises(UsersFileError) as raised:
        load_users(path)
    problems = [line for line in raised.value.problems
                if not line.startswith(f"{path}: l")]  # the anchors' own keys
    assert len(problems) == 1, raised.value.problems
    assert problems[0].startswith(f"{path}: ") and problem in problems[0], \
        problems
    assert all(len(line) < 600 for line in raised.value.problems)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_users_file_that_is_not_a_file_is_refused_at_once(
    config_file: Path, kind: str
) -> None:
    users = config_file.parent / "users.yaml"
    if kind == "fifo":
        os.mkfifo(users)
        words = "not a regular file but a FIFO (named pipe)"
    else:
        users.mkdir()
        words = "Is a directory"
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError("load_users is blocked on the file")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(5)  # opening a FIFO waits for a writer: fail, not hang
    try:
        with pytest.raises(UsersFileError) as raised:
            load_users(users)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert raised.value.problems == (f"{users}: cannot read: {words}",)

    started = time.monotonic()
    listed = mta("users", "list", "--config", str(config_file))
    assert listed.returncode == 1
    assert f"{users}: cannot read: {words}" in listed.stderr
    checked = mta("check-config", "--config", str(config_file))
    assert checked.returncode == 1
    assert f"listeners[1].auth: cannot read: {words} (got '{users}')" \
        in checked.stdout
    assert time.monotonic() - started < 30
