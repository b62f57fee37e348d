"""`mta queue list|show|flush|hold|release|delete`, run as an operator runs
it (a real process) against a real spool: first with no relay, on envelopes
written here; then beside the running relay (`twistd -n mta`), on messages
it received and could not deliver, to show that the commands never race
the queue runner and that it acts on what they change."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from mta import queuecli, queueops
from mta.envelope import (
    DEFERRED, DELIVERED, FAILED, PENDING, Attempt, Client, Envelope, Recipient,
    TLSFacts,
)
from mta.queue import SCAN_INTERVAL
from mta.spool import Spool
from tests.peers import smtppeer
from tests.peers.dnsserver import DNSServer
from tests.peers.smtppeer import Peer
from tests.relay import RelayProcess, base_config

MTA = [sys.executable, "-m", "mta"]

# Our loopback addresses (tests/peers: each helper's tests have a range).
DEAD_MX = "127.0.4.10"  # nothing listens until the test starts a peer
TARPIT_MX = "127.0.4.20"  # accepts connections and never says a word

HOUR = 3600.0


def mta(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTA, "--config", str(config), "queue", *args],
                          capture_output=True, text=True, timeout=60)


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


# --- the pure parts ------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("661C1A7127C29DD8B", "661C1A7127C29DD8B"),
    (" 661c1a7127c29dd8b\n", "661C1A7127C29DD8B"),
    ("../../etc/passwd", None),
    ("661C1A7127C29DD8B.env", None),
    ("ALL", None),
    ("", None),
])
def test_what_is_a_queue_id(text: str, expected: str | None) -> None:
    assert queueops.normal_queue_id(text) == expected


def test_header_fields_are_unfolded() -> None:
    head = "Received: from a\n\tby b\nSubject:  hi \nX-Empty:\nnot a field"

    assert queuecli.header_fields(head) == [
        ("Received", "from a by b"), ("Subject", "hi"), ("X-Empty", "")]


# --- a spool with no relay ---------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mta.yaml"
    path.write_text(
        "hostname: relay.test\n"
        "spool: spool\n"
        "tls: {certificate: tls/relay.crt, private_key: tls/relay.key}\n"
        "listeners: [{name: mx, address: 127.0.0.1, port: 2525, role: inbound}]\n"
    )
    return path


@pytest.fixture
def spool(config: Path) -> Spool:
    spool = Spool(config.parent / "spool")
    spool.create()
    return spool


VERIFIED = Attempt(
    time=1_800_000_000.0, status="deferred", dsn="4.2.0",
    reply="451 4.2.0 mailbox busy (in reply to RCPT TO)",
    policy="enforce-secure", relay="mx.dest.test[127.0.4.9]:25",
    tls=TLSFacts("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256), trust="Verified",
    matched="mx.dest.test", rule="partner", connected=True,
)


def enqueue(spool: Spool, *recipients: Recipient, hold: bool = False) -> str:
    """A committed message, as the listener leaves it, with these
    recipients' states."""
    writer = spool.new_message()
    writer.write(b"Received: from client.test\r\n"
                 b"Subject: a subject folded\r\n\tover two lines\r\n"
                 b"From: alice@org.test\r\n\r\nbody\r\n")
    envelope = Envelope(
        writer.queue_id, "alice@org.test", time.time(), writer.size,
        Client("client.test", "unknown", "127.0.0.1", "mx",
               TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256")),
        recipients, hold=hold,
    )
    writer.commit(envelope)
    return writer.queue_id


def deferred(address: str, due: float = HOUR) -> Recipient:
    return Recipient(address, DEFERRED, VERIFIED.reply, VERIFIED.dsn,
                     time.time() + due, (VERIFIED,))


@pytest.fixture
def queued(spool: Spool) -> dict[str, str]:
    """Four messages: name -> queue id."""
    return {
        "deferred": enqueue(spool, deferred("bob@dest.test"),
                            Recipient("carol@other.test", DELIVERED)),
        "failed": enqueue(spool, Recipient("dan@other.test", FAILED,
                                           "550 5.1.1 no such user", "5.1.1")),
        "held": enqueue(spool, Recipient("erin@dest.test", PENDING), hold=True),
        "pending": enqueue(spool, Recipient("fay@third.test", PENDING)),
    }


@pytest.mark.parametrize(("filters", "expected"), [
    ([], {"deferred", "failed", "held", "pending"}),
    (["--state", "deferred"], {"deferred"}),
    (["--state", "hold"], {"held"}),
    (["--state", "pending"], {"held", "pending"}),
    (["--state", "deferred", "--state", "failed"], {"deferred", "failed"}),
    (["--domain", "other.test"], {"deferred", "failed"}),
    (["--domain", "OTHER.test", "--state", "failed"], {"failed"}),
    # Both filters must hold for one recipient: carol is delivered, at
    # other.test; bob at dest.test is only deferred.
    (["--domain", "dest.test", "--state", "delivered"], set()),
    (["--domain", "dest.test", "--state", "hold"], {"held"}),
    (["--domain", "third.test", "--domain", "dest.test"],
     {"deferred", "held", "pending"}),
])
def test_list_filters_by_state_and_domain(
    config: Path, queued: dict[str, str], filters: list[str], expected: set[str]
) -> None:
    done = mta(config, "list", "--json", *filters)

    assert done.returncode == 0, done.stderr
    names = {name for name, queue_id in queued.items()
             if queue_id in {entry["queue_id"] for entry in as_json(done)}}
    assert names == expected


def test_a_reader_that_stops_early_is_no_spool_error(
    config: Path, queued: dict[str, str]
) -> None:
    # `mta queue list --json | head -c 1`: the pipe closes under the writer.
    reader, writer = os.pipe()
    os.close(reader)
    with os.fdopen(writer, "w") as closed:
        done = subprocess.run(
            [*MTA, "--config", str(config), "queue", "list", "--json"],
            stdout=closed, stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 141
    assert done.stderr == ""


def test_list_shows_each_recipient_its_state_and_reason(
    config: Path, queued: dict[str, str]
) -> None:
    done = mta(config, "list", "--state", "failed", "--state", "hold")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{queued['failed']}  ")
    assert lines[0].endswith("  <alice@org.test>")
    assert lines[1] == "    failed    <dan@other.test> (550 5.1.1 no such user)"
    assert lines[2].startswith(f"{queued['held']}! ")  # held, as mailq says
    assert lines[3] == "    pending   <erin@dest.test>"
    assert lines[4].startswith("-- 2 of 4 message(s) in ")


def test_list_refuses_an_unknown_state(config: Path, spool: Spool) -> None:
    done = mta(config, "list", "--state", "stuck")

    assert done.returncode == 2
    assert "invalid choice: 'stuck'" in done.stderr


@pytest.mark.parametrize("count", [0, 1, 3])
def test_list_json_is_one_array_with_an_envelope_a_line(
    config: Path, spool: Spool, count: int
) -> None:
    """Streamed as it is read, and still one JSON document: each envelope
    as `asdict` gives it (the same keys, values and order as before)."""
    ids = sorted(enqueue(spool, deferred(f"u{n}@dest.test"),
                         Recipient(f"v{n}@other.test", FAILED, "550 5.1.1 \u00e9",
                                   "5.1.1"), hold=n == 1)
                 for n in range(count))

    done = mta(config, "list", "--json")

    assert done.returncode == 0 and done.stderr == ""
    data = json.loads(done.stdout)
    assert json.dumps(data) == json.dumps(
        [asdict(spool.load(queue_id)) for queue_id in ids])
    lines = done.stdout.split("\n")
    if not count:
        assert done.stdout == "[]\n"
        return
    assert lines[0] == "[" and lines[-2:] == ["]", ""]
    objects = lines[1:-2]
    assert [json.loads(line.removesuffix(","))["queue_id"]
            for line in objects] == ids
    assert all(line.endswith(",") for line in objects[:-1])
    assert not objects[-1].endswith(",")


def test_list_json_says_which_are_unreadable_on_standard_error(
    config: Path, queued: dict[str, str], spool: Spool
) -> None:
    spool.envelope_path(queued["failed"]).write_bytes(b"{ half an envel")

    done = mta(config, "list", "--json", "--domain", "dest.test")

    assert done.returncode == 0
    assert {entry["queue_id"] for entry in json.loads(done.stdout)} == {
        queued["deferred"], queued["held"]}
    assert done.stderr.splitlines() == [
        (f"mta: {queued['failed']}: unreadable: {queued['failed']}: not a valid "
         "envelope: Expecting property name enclosed in double quotes: line 1 "
         "column 3 (char 2)")]


def test_list_counts_what_it_shows_and_the_unreadable_last(
    config: Path, queued: dict[str, str], spool: Spool
) -> None:
    short = queued["pending"]
    spool.message_path(short).write_bytes(b"x")

    done = mta(config, "list", "--state", "deferred", "--state", "failed")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line[:17] for line in lines if not line.startswith(" ")] == [
        queued["deferred"], queued["failed"], short, "-- 2 of 3 message"]
    assert lines[-2] == (f"{short}  unreadable: {short}: no envelope at the "
                         "end of the message file")
    assert lines[-1] == f"-- 2 of 3 message(s) in {spool.queue}, 1 unreadable"


@pytest.fixture
def crowded(spool: Spool, queued: dict[str, str]) -> Spool:
    """`queued`, more mail with control characters and an ID.env, and
    messages that cannot be read, among them."""
    enqueue(spool, Recipient("\x1b[2J@dest.test", PENDING))
    changed = enqueue(spool, Recipient("gus@dest.test", PENDING))
    spool.save(replace(spool.load(changed), hold=True))
    spool.envelope_path(queued["failed"]).write_bytes(b"{ half an envel")
    spool.message_path(queued["pending"]).write_bytes(b"x")
    for n in range(5):
        enqueue(spool, deferred(f"h{n}@dest.test"))
    return spool


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("filters", [(None, None), (["deferred", "hold"], None),
                                     (None, ["other.test"])])
def test_several_processes_list_what_one_lists(
    crowded: Spool, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], as_json: bool,
    filters: tuple[list[str] | None, list[str] | None],
) -> None:
    """A queue read in parts by forked workers (`queuecli._in_order`) prints,
    byte for byte, what it prints read whole in this process."""
    selection = queueops.Selection.of(*filters)
    assert queuecli.list_messages(crowded, selection, as_json, workers=1) == 0
    whole = capsys.readouterr()
    monkeypatch.setattr(queuecli, "PART", 2)
    for workers in (1, 2, 3):
        assert queuecli.list_messages(crowded, selection, as_json, workers) == 0
        assert capsys.readouterr() == whole

    assert "unreadable" in (whole.err if as_json else whole.out)
    if not as_json:
        assert "\x1b" not in whole.out


def test_a_reader_that_stops_early_leaves_no_worker(
    crowded: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `mta queue list | head`: the pipe closes under the writer.
    reader, writer = os.pipe()
    os.close(reader)
    closed = os.fdopen(writer, "w", buffering=1)
    forked: list[int] = []
    fork = os.fork

    def noted_fork() -> int:
        pid = fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", noted_fork)
    monkeypatch.setattr(queuecli, "PART", 1)
    monkeypatch.setattr(sys, "stdout", closed)
    with pytest.raises(BrokenPipeError):
        queuecli.list_messages(crowded, queueops.Selection(), False, 3)
    monkeypatch.undo()
    with contextlib.suppress(BrokenPipeError):
        closed.close()  # what it still holds cannot be written either

    assert len(forked) == 3
    for pid in forked:  # each ended and was waited for: not even a zombie
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_arrival_times_are_those_of_when() -> None:
    when = queuecli._Arrivals()
    for seconds in (1_800_000_000.0, 1_800_000_000.999, 1_800_000_001.0,
                    1_800_000_000.5, 1_800_000_000, -0.5, 0.0, 86_400.25):
        assert when(seconds) == queuecli._when(seconds)


def test_control_characters_from_clients_never_reach_the_terminal(
    config: Path, spool: Spool
) -> None:
    # A HELO name and a header with ESC, BEL and NUL, as a hostile client
    # sends them: shown as \\xNN, so they cannot retitle or clear the
    # operator's terminal.
    writer = spool.new_message()
    writer.write(b"Subject: \x1b[2Jcleared\x07\r\n\r\nbody\r\n")
    envelope = Envelope(
        writer.queue_id, "alice@org.test", time.time(), writer.size,
        Client("\x1b]0;pwned\x07\x1b[2J\x00", "unknown", "127.0.0.1", "mx",
               None),
        (Recipient("bob@dest.test"),),
    )
    writer.commit(envelope)

    for args in (("show", writer.queue_id), ("list",)):
        done = mta(config, *args)
        assert done.returncode == 0, done.stderr
        assert not any(char in done.stdout for char in "\x1b\x07\x00"), done.stdout
    shown = mta(config, "show", writer.queue_id).stdout
    assert "helo=\\x1b]0;pwned\\x07\\x1b[2J\\x00" in shown
    assert "Subject: \\x1b[2Jcleared\\x07" in shown


def test_show_has_the_envelope_history_tls_and_headers(
    config: Path, queued: dict[str, str]
) -> None:
    queue_id = queued["deferred"]

    text = mta(config, "show", queue_id.lower())  # a pasted id in lower case
    data = as_json(mta(config, "show", queue_id, "--json"))

    assert text.returncode == 0, text.stderr
    assert f"queue id: {queue_id}\n" in text.stdout
    assert "sender:   <alice@org.test>" in text.stdout
    assert "recipient <bob@dest.test>: deferred dsn=4.2.0, next attempt" in text.stdout
    assert (
        "deferred dsn=4.2.0 relay=mx.dest.test[127.0.4.9]:25 "
        "tls=TLSv1.3/TLS_AES_256_GCM_SHA384 trust=Verified matched=mx.dest.test "
        "policy=enforce-secure rule=partner" in text.stdout
    )
    assert "    (451 4.2.0 mailbox busy (in reply to RCPT TO))" in text.stdout
    assert "recipient <carol@other.test>: delivered" in text.stdout
    assert "Subject: a subject folded\n\tover two lines" in text.stdout

    [bob, carol] = data["recipients"]
    assert bob["history"][0]["tls"] == {
        "protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "bits": 256}
    assert bob["history"][0]["trust"] == "Verified"
    assert carol["state"] == "delivered"
    assert {"name": "Subject", "value": "a subject folded over two lines"} in (
        data["headers"])


# --- flush, hold, release, delete with no relay -----------------------------


def test_flush_makes_every_waiting_recipient_due_now(
    config: Path, spool: Spool, queued: dict[str, str]
) -> None:
    before = {queue_id: spool.load(queue_id) for queue_id in queued.values()}
    started = time.time()

    done = mta(config, "flush")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"{queued['deferred']}: flushed: 1 recipient(s) due now" in lines
    assert f"{queued['pending']}: flushed: 1 recipient(s) due now" in lines
    # The held message stays held and keeps its schedule, as postqueue -f;
    # the failed one has nothing to retry.
    assert lines[-1] == "-- flush: 2 message(s) changed, 2 left as they were"
    bob, carol = spool.load(queued["deferred"]).recipients
    assert started <= (bob.next_attempt or 0) <= time.time()
    assert bob == replace(before[queued["deferred"]].recipients[0],
                          next_attempt=bob.next_attempt)
    assert carol == before[queued["deferred"]].recipients[1]
    for name in ("held", "failed"):
        assert spool.load(queued[name]) == before[queued[name]]


def test_flush_of_a_held_message_is_refused(
    config: Path, spool: Spool, queued: dict[str, str]
) -> None:
    held = queued["held"]

    done = mta(config, "flush", held, queued["pending"], "--json")

    assert done.returncode == 1
    refused, flushed = as_json(done)
    assert refused == {"queue_id": held, "status": "refused", "ok": False,
                       "detail": "on hold, not flushed (mta queue release it first)"}
    assert flushed["status"] == "done"
    assert spool.load(held).recipients[0].next_attempt is None


def test_hold_and_release_change_nothing_else(
    config: Path, spool: Spool, queued: dict[str, str]
) -> None:
    queue_id = queued["deferred"]
    before = spool.load(queue_id)

    held = mta(config, "hold", queue_id)
    again = mta(config, "hold", queue_id, "--json")
    on_hold = spool.load(queue_id)
    released = mta(config, "release", queue_id)
    not_held = mta(config, "release", queue_id)

    assert (held.returncode, held.stdout) == (0, f"{queue_id}: on hold\n")
    assert as_json(again) == [{"queue_id": queue_id, "status": "unchanged",
                               "ok": True, "detail": "already on hold"}]
    assert on_hold == replace(before, hold=True)
    assert (released.returncode, released.stdout) == (0, f"{queue_id}: released\n")
    assert not_held.stdout == f"{queue_id}: not on hold\n"
    assert spool.load(queue_id) == before
    assert os.listdir(spool.tmp) == []  # no temporary file left behind


def test_hold_all_and_release_all(
    config: Path, spool: Spool, queued: dict[str, str]
) -> None:
    held = mta(config, "hold", "ALL", "--domain", "other.test")

    assert held.returncode == 0, held.stderr
    assert {e.queue_id for e in spool.envelopes() if e.hold} == {
        queued["deferred"], queued["failed"], queued["held"]}

    released = mta(config, "release", "ALL")

    assert released.stdout.splitlines()[-1] == (
        "-- release: 3 message(s) changed, 1 left as they were")
    assert not any(e.hold for e in spool.envelopes())


def test_delete_acts_on_each_id_and_fails_if_one_fails(
    config: Path, spool: Spool, queued: dict[str, str]
) -> None:
    first, second = queued["deferred"], queued["failed"]

    done = mta(config, "delete", first, "0123456789ABCDEF0", second, "../mta")

    assert done.returncode == 1
    assert done.stdout == f"{first}: deleted\n{second}: deleted\n"
    assert done.stderr == (
        f"mta: 0123456789ABCDEF0: no such message in {spool.queue}\n"
        "mta: ../mta: not a queue id\n")
    for queue_id in (first, second):
        assert not spool.envelope_path(queue_id).exists()
        assert not spool.message_path(queue_id).exists()
    assert set(spool.queue_ids()) == {queued["held"], queued["pending"]}


def test_delete_all_with_a_state(
    config: Path, spool: Spool, queued: dict[str, str]
) -> None:
    done = mta(config, "delete", "ALL", "--state", "pending", "--json")

    assert done.returncode == 0, done.stderr
    assert {entry["queue_id"] for entry in as_json(done)} == {
        queued["held"], queued["pending"]}
    assert set(spool.queue_ids()) == {queued["deferred"], queued["failed"]}
    assert sorted(os.listdir(spool.queue)) == sorted(
        f"{queued[name]}.msg" for name in ("deferred", "failed"))


@pytest.mark.parametrize("args", [
    ["delete", "ALL", "0123ABC"],
    ["hold", "0123ABC", "--state", "deferred"],
    ["flush", "0123ABC", "--domain", "dest.test"],
])
def test_ids_do_not_mix_with_all_or_filters(
    config: Path, spool: Spool, args: list[str]
) -> None:
    done = mta(config, *args)

    assert done.returncode == 2
    assert done.stderr.startswith("mta: ")


def test_a_locked_message_is_reported_and_left_alone(
    config: Path, spool: Spool, queued: dict[str, str]
) -> None:
    queue_id = queued["deferred"]
    before = spool.load(queue_id)

    with spool.lock(queue_id):  # as the queue runner holds it delivering
        deleted = mta(config, "delete", queue_id, "--wait", "0.3")
        held = mta(config, "hold", queue_id, queued["pending"], "--wait", "0")

    assert deleted.returncode == 1
    assert deleted.stderr == f"mta: {queue_id}: being delivered; try again\n"
    assert held.returncode == 1
    assert held.stdout == f"{queued['pending']}: on hold\n"
    assert spool.load(queue_id) == before
    assert spool.message_path(queue_id).exists()


def test_a_change_waits_for_the_lock(
    config: Path, spool: Spool, queued: dict[str, str]
) -> None:
    queue_id = queued["deferred"]
    lock = spool.lock(queue_id)
    try:
        waiting = subprocess.Popen(
            [*MTA, "--config", str(config), "queue", "hold", queue_id],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        still_waiting = waiting.poll() is None
    finally:
        lock.release()
    stdout, stderr = waiting.communicate(timeout=30)

    assert still_waiting, (stdout, stderr)
    assert (waiting.returncode, stdout) == (0, f"{queue_id}: on hold\n"), stderr
    assert spool.load(queue_id).hold


@pytest.fixture
def public_folder() -> Iterator[Path]:
    """A folder another user can reach (pytest's tmp_path is root's, 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="mta-queuecli-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")
def test_root_rewrites_envelopes_as_the_spool_owner(
    config: Path, public_folder: Path
) -> None:
    # The relay runs as its own user (twistd -u/-g); an envelope rewritten
    # by root would be root's, mode 0600, and unreadable to it.
    nobody = 65534
    spool = Spool(public_folder / "spool")
    spool.create()
    queue_id = enqueue(spool, deferred("bob@dest.test"))
    for folder in (spool.root, spool.tmp, spool.queue, spool.corrupt):
        os.chown(folder, nobody, nobody)
        for path in folder.iterdir():
            os.chown(path, nobody, nobody)
    config.write_text(config.read_text().replace(
        "spool: spool", f"spool: {spool.root}"))

    done = mta(config, "hold", queue_id)

    assert done.returncode == 0, done.stderr
    assert spool.envelope_path(queue_id).stat().st_uid == nobody
    assert spool.load(queue_id).hold


# --- beside the running relay ---------------------------------------------------


MESSAGE = b"From: alice@org.test\r\nSubject: %s\r\n\r\nHello.\r\n"


class Site:
    """The relay, its DNS, and peers at our loopback addresses."""

    def __init__(self, tmp_path: Path, relay_cert: Any, dns: DNSServer,
                 mx_port: int) -> None:
        self.tmp_path = tmp_path
        self.relay_cert = relay_cert
        self.dns = dns
        self.mx_port = mx_port
        self.peers: list[Peer] = []
        self.relay: RelayProcess | None = None

    def mx(self, domain: str, address: str) -> None:
        self.dns.set(domain, "MX", [f"10 mx.{domain}."])
        self.dns.set(f"mx.{domain}", "A", [address])

    def start(self, retry: str, **timeouts: str) -> RelayProcess:
        config = base_config(
            self.tmp_path, self.relay_cert.chain, self.relay_cert.key,
            dns={"nameservers": [f"127.0.0.1:{self.dns.port}"]},
            delivery={
                "retry_schedule": [retry],
                "port": self.mx_port,
                # A destination that keeps failing is suspended for minutes
                # (mta.destinations); these tests want every retry to try.
                "destination_failure_limit": 1000,
                "timeouts": {"connect": "5s", "command": "10s", "data": "20s",
                             **timeouts},
            },
        )
        self.relay = RelayProcess(self.tmp_path / "relay", config).start()
        return self.relay

    def peer(self, address: str) -> Peer:
        peer = smtppeer.plain(address, self.mx_port)
        self.peers.append(peer)
        return peer

    def queue(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.relay is not None
        return mta(self.relay.config_path, *args)

    def submit_deferred(self, subject: str, to: str = "bob@dest.test") -> str:
        """A message the relay tried once and could not deliver."""
        assert self.relay is not None
        queue_id = self.relay.submit("alice@org.test", [to],
                                     MESSAGE % subject.encode())
        self.relay.wait_for_envelope(
            lambda e: e.queue_id == queue_id and e.recipients[0].history)
        return queue_id

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        for peer in self.peers:
            peer.stop()


@pytest.fixture
def site(tmp_path: Path, relay_cert: Any, dns: DNSServer,
         mx_port: int) -> Iterator[Site]:
    site = Site(tmp_path, relay_cert, dns, mx_port)
    yield site
    site.close()


def subjects(peer: Peer) -> list[bytes]:
    return [line for message in peer.messages
            for line in message.content.split(b"\r\n")
            if line.startswith(b"Subject: ")]


def test_hold_release_and_delete_while_the_relay_retries(site: Site) -> None:
    site.mx("dest.test", DEAD_MX)
    relay = site.start(retry="1s")
    held = site.submit_deferred("held")
    other = site.submit_deferred("other")
    deleted = site.submit_deferred("deleted")

    # The relay retries each one every second: each change waits for the
    # lock between two attempts.
    assert site.queue("hold", held).returncode == 0
    assert site.queue("delete", deleted).returncode == 0
    on_hold = relay.spool.load(held)
    # Past its next attempt, a message that is not held would be tried
    # again (and delivered once the peer is up): this one must not be.
    while time.time() < max(r.next_attempt or 0 for r in on_hold.recipients) + 0.5:
        time.sleep(0.1)
    peer = site.peer(DEAD_MX)

    peer.wait_for(1, timeout=15)
    relay.wait_for_log(f"{other}: removed")

    assert subjects(peer) == [b"Subject: other"]
    assert relay.spool.load(held) == on_hold  # not one more attempt
    assert deleted not in relay.spool.queue_ids()
    assert not relay.spool.message_path(deleted).exists()

    released_at = time.monotonic()
    listed = as_json(site.queue("list", "--state", "hold", "--json"))
    assert [entry["queue_id"] for entry in listed] == [held]
    assert site.queue("release", held).returncode == 0

    # The relay's next spool scan finds it due, and it goes.
    peer.wait_for(2, timeout=SCAN_INTERVAL + 5)
    took = time.monotonic() - released_at
    relay.wait_for_log(f"{held}: removed")
    assert subjects(peer) == [b"Subject: other", b"Subject: held"]
    print(f"released message delivered {took:.1f}s after release")


def test_flush_while_the_relay_waits_an_hour(site: Site) -> None:
    site.mx("dest.test", DEAD_MX)
    relay = site.start(retry="1h")
    queue_id = site.submit_deferred("flushed")
    due = relay.spool.load(queue_id).recipients[0].next_attempt or 0
    assert due > time.time() + HOUR / 2
    peer = site.peer(DEAD_MX)
    flushed_at = time.monotonic()

    done = site.queue("flush", "--json")

    assert done.returncode == 0, done.stderr
    assert [entry["queue_id"] for entry in as_json(done)] == [queue_id]
    peer.wait_for(1, timeout=SCAN_INTERVAL + 5)
    took = time.monotonic() - flushed_at
    relay.wait_for_log(f"{queue_id}: removed")
    [sent] = [line for line in relay.log().splitlines()
              if f"{queue_id}: to=" in line and "status=sent" in line]
    assert subjects(peer) == [b"Subject: flushed"]
    print(f"flushed message delivered {took:.1f}s after flush")


def test_list_and_show_while_the_relay_runs(site: Site, mx_port: int) -> None:
    site.mx("dest.test", DEAD_MX)
    relay = site.start(retry="1h")
    queue_id = site.submit_deferred("looked at")
    # A second one, just in: its envelope is the listener's, never tried.
    held = site.submit_deferred("held", to="carol@dest.test")
    assert site.queue("hold", held).returncode == 0

    listing = site.queue("list")
    text = site.queue("show", queue_id)
    data = as_json(site.queue("show", queue_id, "--json"))

    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].startswith(f"{queue_id}  ")
    assert lines[0].endswith("  <alice@org.test>")
    refused = f"connect to mx.dest.test[{DEAD_MX}]:{mx_port}: Connection refused"
    assert lines[1] == f"    deferred  <bob@dest.test> ({refused})"
    assert lines[2].startswith(f"{held}! ")
    assert lines[4] == f"-- 2 message(s) in {relay.spool.queue}"

    assert text.returncode == 0, text.stderr
    assert f"queue id: {queue_id}\n" in text.stdout
    assert "client:   unknown[127.0.0.1] helo=client.test listener=" \
        "submission tls=TLSv1.3/" in text.stdout
    assert "recipient <bob@dest.test>: deferred dsn=4.4.1, next attempt " \
        in text.stdout
    assert (f"deferred dsn=4.4.1 relay=mx.dest.test[{DEAD_MX}]:{mx_port} "
            "tls=- trust=- policy=opportunistic") in text.stdout
    assert f"    ({refused})" in text.stdout
    assert "Subject: looked at" in text.stdout

    assert data["queue_id"] == queue_id and data["hold"] is False
    [bob] = data["recipients"]
    assert bob["state"] == "deferred" and bob["dsn"] == "4.4.1"
    [attempt] = bob["history"]
    assert attempt["relay"] == f"mx.dest.test[{DEAD_MX}]:{mx_port}"
    assert attempt["reply"] == refused
    assert data["headers"][0]["name"] == "Received"  # the relay's own
    assert {"name": "Subject", "value": "looked at"} in data["headers"]


def test_hold_release_and_delete_json_while_the_relay_runs(site: Site) -> None:
    site.mx("dest.test", DEAD_MX)
    relay = site.start(retry="1h")
    queue_id = site.submit_deferred("steered")

    def change(*args: str) -> list[dict[str, Any]]:
        done = site.queue(*args, "--json")
        assert done.returncode == 0, done.stderr
        return list(as_json(done))

    held = change("hold", queue_id)
    held_again = change("hold", queue_id)
    on_hold = relay.spool.load(queue_id).hold
    released = change("release", queue_id)
    deleted = change("delete", queue_id)

    assert held == [{"queue_id": queue_id, "status": "done", "ok": True,
                     "detail": "on hold"}]
    assert [(o["status"], o["ok"]) for o in held_again] == [("unchanged", True)]
    assert on_hold is True
    assert [(o["queue_id"], o["status"]) for o in released] == [
        (queue_id, "done")]
    assert [(o["queue_id"], o["status"]) for o in deleted] == [
        (queue_id, "done")]
    assert queue_id not in relay.spool.queue_ids()
    assert not relay.spool.message_path(queue_id).exists()
    # The relay goes on, and its next scan finds nothing amiss.
    time.sleep(SCAN_INTERVAL + 1)
    assert relay.process is not None and relay.process.poll() is None
    assert "Traceback" not in relay.log()
    assert f"{queue_id}: moved to" not in relay.log()
    assert as_json(site.queue("list", "--json")) == []


@pytest.fixture
def tarpit(mx_port: int) -> Iterator[threading.Event]:
    """A server at TARPIT_MX that accepts connections and never answers:
    the relay holds the message's lock until its greeting timeout."""
    server = socket.create_server((TARPIT_MX, mx_port))
    connected = threading.Event()
    clients: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            clients.append(client)
            connected.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield connected
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(timeout=5)
    for client in clients:
        client.close()


def test_a_message_being_delivered_waits_for_the_runner(
    site: Site, tarpit: threading.Event
) -> None:
    site.mx("slow.test", TARPIT_MX)
    relay = site.start(retry="1h", command="4s")
    queue_id = relay.submit("alice@org.test", ["bob@slow.test"], MESSAGE % b"slow")
    assert tarpit.wait(timeout=15)

    busy = site.queue("hold", queue_id, "--wait", "0.5")
    waited = site.queue("hold", queue_id, "--wait", "20")

    assert busy.returncode == 1
    assert busy.stderr == f"mta: {queue_id}: being delivered; try again\n"
    assert waited.returncode == 0, waited.stderr
    # Both changes are there: the runner's attempt, saved before it let go
    # of the lock, and the hold made after.
    envelope = relay.spool.load(queue_id)
    assert envelope.hold
    [attempt] = envelope.recipients[0].history
    assert "timed out while" in attempt.reply

    assert site.queue("delete", queue_id).returncode == 0
    assert queue_id not in relay.spool.queue_ids()
