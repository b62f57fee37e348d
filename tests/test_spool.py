"""The envelope's JSON form and the spool on disk: real files in tmp_path,
and a real second process for the lock (flock locks belong to an open file
description, so only another process shows what the CLI would meet)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mta import envelope as env
from mta import spool as spool_module
from mta.envelope import (
    Attempt,
    Client,
    Envelope,
    Recipient,
    TLSFacts,
    from_json,
    to_json,
)
from mta.spool import Locked, Spool, SpoolError, new_queue_id

REPOSITORY = Path(__file__).resolve().parent.parent

TLS13 = TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128)
TLS12 = TLSFacts("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")


def sample(queue_id: str = "0000000000001ABCD") -> Envelope:
    """An envelope with every kind of field filled in."""
    delivered = Recipient(
        "a@example.net",
        state=env.DELIVERED,
        reason="250 2.0.0 Ok",
        dsn="2.0.0",
        history=(
            Attempt(1000.0, "deferred", "4.7.0", "STARTTLS refused",
                    "opportunistic", relay="mx1.example.net[192.0.2.1]:25",
                    fallback="plaintext later"),
            Attempt(1060.0, "sent", "2.0.0", "250 2.0.0 Ok", "enforce-secure",
                    relay="mx2.example.net[192.0.2.2]:25", tls=TLS13,
                    trust="Verified", matched="mx2.example.net",
                    rule="partner"),
        ),
    )
    waiting = Recipient("b@example.org", state=env.DEFERRED, reason="busy",
                        dsn="4.2.0", next_attempt=1360.0)
    return Envelope(
        queue_id=queue_id,
        sender="",
        arrival=1000.0,
        size=1234,
        client=Client("client.example", "client.example", "192.0.2.9",
                      "submission", tls=TLS12),
        recipients=(delivered, waiting, Recipient("c@example.com")),
        body="8BITMIME",
        hold=True,
        extra={"notify": ["FAILURE"], "envid": "x1"},
    )


# --- the envelope ----------------------------------------------------------


def test_an_envelope_survives_json_with_history_and_tls_facts() -> None:
    original = sample()
    again = from_json(to_json(original))

    assert again == original
    sent = again.recipient("a@example.net").history[1]
    assert isinstance(sent.tls, TLSFacts) and str(sent.tls) == (
        "TLSv1.3/TLS_AES_128_GCM_SHA256")
    assert again.client.tls == TLS12
    assert again.recipient("c@example.com").history == ()


def test_the_json_form_carries_its_version() -> None:
    assert b'"version":1' in to_json(sample())


GARBAGE = [
    b"",
    b"not json",
    b"\xff\xfe\x00garbage",
    b"[]",
    b"null",
    b"42",
    b'"an envelope"',
    b"{}",
    to_json(sample()).replace(b'"version":1', b'"version":2'),
    to_json(sample()).replace(b'"client"', b'"customer"'),
    to_json(sample()).replace(b'"sender"', b'"colour"'),
    to_json(sample()).replace(b'"matched"', b'"colour"'),
    to_json(sample())[:200],
    b'{"version": 1, "client": 5, "recipients": []}',
    b'{"version": 1, "client": {}, "recipients": 7}',
]


@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_anything_but_an_envelope_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        from_json(data)


def test_an_envelope_knows_when_it_is_done() -> None:
    envelope = sample()
    assert not envelope.is_done
    assert envelope.recipient("b@example.org").deferrals() == 0
    assert envelope.recipient("a@example.net").deferrals() == 1

    done = envelope
    for recipient in envelope.recipients:
        done = done.with_recipient(
            Recipient(recipient.address, state=env.FAILED))

    assert done.is_done
    assert [r.address for r in done.recipients] == [
        r.address for r in envelope.recipients]
    with pytest.raises(KeyError):
        envelope.recipient("nobody@example.com")


# --- the spool -------------------------------------------------------------


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.create()
    return spool


BODY = b"Subject: hi\r\n\r\nhello\r\n"


def sample_of(queue_id: str, body: bytes = BODY) -> Envelope:
    """`sample` as committed with ``body``: its size is the body's."""
    return replace(sample(queue_id), size=len(body))


def commit(spool: Spool, body: bytes = BODY) -> str:
    writer = spool.new_message()
    writer.write(body[:5])
    writer.write(body[5:])
    assert writer.size == len(body)
    writer.commit(sample_of(writer.queue_id, body))
    return writer.queue_id


def test_commit_puts_one_queue_file_in_the_queue(spool: Spool) -> None:
    """The message, then the envelope it was committed with: one file."""
    body = b"Subject: hi\r\n\r\n.dotted\r\n"
    queue_id = commit(spool, body)

    assert os.listdir(spool.queue) == [f"{queue_id}.msg"]
    assert os.listdir(spool.tmp) == []
    assert spool.message_path(queue_id).read_bytes() == (
        body + b"\n" + to_json(sample_of(queue_id, body)))
    assert spool.read_message(spool.load(queue_id)) == body
    assert spool.load(queue_id) == sample_of(queue_id, body)
    assert spool.queue_ids() == [queue_id]


def test_a_commit_takes_only_the_envelope_of_its_message(spool: Spool) -> None:
    writer = spool.new_message()
    writer.write(BODY)
    for wrong in (sample(writer.queue_id), sample_of("0000000000009FFFF")):
        with pytest.raises(ValueError, match="not this message's"):
            writer.commit(wrong)
    assert os.listdir(spool.queue) == []


def test_a_queue_file_whose_envelope_does_not_fit_is_a_spool_error(
    spool: Spool,
) -> None:
    """The envelope at the end must say the message is what comes before
    it: a file cut short, or grown, is damaged."""
    grown, cut, headless = commit(spool), commit(spool), commit(spool)
    path = spool.message_path(grown)
    path.write_bytes(b"X" + path.read_bytes())
    path = spool.message_path(cut)
    path.write_bytes(path.read_bytes()[3:])
    spool.message_path(headless).write_bytes(BODY)

    for queue_id, why in ((grown, "bytes before its envelope"),
                          (cut, "bytes before its envelope"),
                          (headless, "not a valid envelope")):
        with pytest.raises(SpoolError, match=why):
            spool.load(queue_id)


def test_a_spool_of_the_first_layout_reads_the_same(spool: Spool) -> None:
    """Before: the message alone in ID.msg, its envelope in ID.env."""
    queue_id = new_queue_id()
    envelope = sample_of(queue_id)
    spool.message_path(queue_id).write_bytes(BODY)
    spool.envelope_path(queue_id).write_bytes(to_json(envelope))

    assert spool.load(queue_id) == envelope
    assert spool.read_message(envelope) == BODY
    assert spool.scan() == ([envelope], [])
    with spool.lock(queue_id):
        spool.save(replace(envelope, hold=False))
    assert spool.load(queue_id) == replace(envelope, hold=False)
    spool.remove(queue_id)
    assert os.listdir(spool.queue) == []


def test_a_message_being_written_is_only_in_tmp(spool: Spool) -> None:
    writer = spool.new_message()
    writer.write(b"partial")

    assert spool.queue_ids() == []
    assert os.listdir(spool.queue) == []

    writer.abort()
    assert os.listdir(spool.tmp) == []


def test_queue_ids_are_unique_and_sorted_by_arrival(spool: Spool) -> None:
    first = commit(spool)
    time.sleep(0.002)
    second = commit(spool)
    assert first != second
    assert spool.queue_ids() == [first, second]
    assert len({new_queue_id() for _ in range(1000)}) == 1000


def test_save_replaces_the_envelope_whole(spool: Spool) -> None:
    """The first save puts an envelope file beside the queue file, which
    never changes; a later one is a new file renamed over the old: a
    reader holding the old file still reads all of it, and nothing is left
    in tmp/."""
    queue_id = commit(spool)
    queue_file = spool.message_path(queue_id).read_bytes()
    first = sample_of(queue_id).with_recipient(
        Recipient("c@example.com", state=env.FAILED, dsn="5.1.1"))
    spool.save(first)
    assert spool.load(queue_id) == first
    path = spool.envelope_path(queue_id)
    old_inode = path.stat().st_ino
    changed = first.with_recipient(
        Recipient("b@example.org", state=env.DELIVERED, dsn="2.0.0"))

    with open(path, "rb") as reader:
        spool.save(changed)
        assert from_json(reader.read()) == first

    assert path.stat().st_ino != old_inode
    assert spool.load(queue_id) == changed
    assert spool.message_path(queue_id).read_bytes() == queue_file
    assert os.listdir(spool.tmp) == []


def test_remove_deletes_both_files(spool: Spool) -> None:
    keep = commit(spool)
    gone = commit(spool)

    spool.remove(gone)
    spool.remove(gone)  # twice is harmless

    assert spool.queue_ids() == [keep]
    assert not spool.message_path(gone).exists()
    with pytest.raises(FileNotFoundError):
        spool.load(gone)


def test_an_unreadable_envelope_is_a_spool_error_and_is_skipped(
    spool: Spool,
) -> None:
    good = commit(spool)
    bad = commit(spool)
    spool.envelope_path(bad).write_bytes(b"{ half an envel")

    with pytest.raises(SpoolError, match=bad):
        spool.load(bad)
    assert [envelope.queue_id for envelope in spool.envelopes()] == [good]


def test_quarantine_moves_both_files_aside(spool: Spool) -> None:
    queue_id = commit(spool)
    spool.envelope_path(queue_id).write_bytes(b"garbage")

    spool.quarantine(queue_id)

    assert spool.queue_ids() == []
    assert os.listdir(spool.queue) == []
    assert sorted(os.listdir(spool.corrupt)) == [f"{queue_id}.env",
                                                 f"{queue_id}.msg"]
    assert (spool.corrupt / f"{queue_id}.env").read_bytes() == b"garbage"


def test_clean_orphans_removes_only_old_orphans(spool: Spool) -> None:
    """Another process may be committing right now: young files stay, and
    a committed message stays whatever its age.  An orphan in the queue is
    an envelope file whose message was being removed."""
    old = time.time() - 7200
    committed = commit(spool)
    spool.save(sample_of(committed))  # it has an envelope file too
    paths = {
        "old tmp": spool.tmp / "OLDTMP.msg",
        "young tmp": spool.tmp / "YOUNGTMP.msg",
        "old orphan": spool.queue / "OLDORPHAN.env",
        "young orphan": spool.queue / "YOUNGORPHAN.env",
    }
    for path in paths.values():
        path.write_bytes(b"x")
    for name in ("old tmp", "old orphan"):
        os.utime(paths[name], (old, old))
    for path in (spool.message_path(committed),
                 spool.envelope_path(committed)):
        os.utime(path, (old, old))

    removed = spool.clean_orphans(older_than=3600)

    assert sorted(removed) == ["OLDORPHAN.env", "OLDTMP.msg"]
    assert not paths["old tmp"].exists()
    assert not paths["old orphan"].exists()
    assert paths["young tmp"].exists() and paths["young orphan"].exists()
    assert spool.queue_ids() == [committed]
    assert spool.message_path(committed).exists()


# --- the lock, across processes --------------------------------------------

LOCKER = """\
import sys
import threading
from pathlib import Path
from mta.spool import Locked, Spool
try:
    lock = Spool(Path(sys.argv[1])).lock(sys.argv[2])
except Locked:
    print("Locked", flush=True)
    sys.exit(0)
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


def other_process(spool: Spool, queue_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(spool.root), queue_id],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=REPOSITORY,
    )


def test_a_message_locked_by_another_process_raises_locked(
    spool: Spool,
) -> None:
    queue_id = commit(spool)
    holder = other_process(spool, queue_id)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "locked\n"

        with pytest.raises(Locked):
            spool.lock(queue_id)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=10)

    # Its lock went with it.
    with spool.lock(queue_id) as lock:
        assert lock.descriptor >= 0
    assert lock.descriptor == -1


def test_our_lock_keeps_another_process_out_until_released(
    spool: Spool,
) -> None:
    queue_id = commit(spool)

    with spool.lock(queue_id):
        # An envelope rewrite does not loosen the lock (it is on ID.msg).
        spool.save(sample_of(queue_id))
        refused = other_process(spool, queue_id)
        out, _ = refused.communicate(timeout=10)
        assert out == "Locked\n"

    taken = other_process(spool, queue_id)
    out, _ = taken.communicate("", timeout=10)
    assert out == "locked\n"


def test_a_removed_message_cannot_be_locked(spool: Spool) -> None:
    queue_id = commit(spool)
    spool.remove(queue_id)
    with pytest.raises(FileNotFoundError):
        spool.lock(queue_id)


def test_a_message_removed_while_we_waited_cannot_be_locked(
    spool: Spool,
) -> None:
    """The lock is on the queue file, which a removal unlinks first: a
    process that got the lock after the removal holds a file that is gone."""
    queue_id = commit(spool)
    holder = other_process(spool, queue_id)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "locked\n"
        waiting: list[BaseException] = []

        def wait_for_it() -> None:
            try:
                spool.lock(queue_id, wait=True)
            except BaseException as error:
                waiting.append(error)

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.2)  # it waits for the lock now
        spool.unlink(queue_id)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=10)
    waiter.join(timeout=10)
    assert [type(error) for error in waiting] == [FileNotFoundError]


BAD_FIELDS = [
    # (path into the JSON form, bad value)
    (("arrival",), "yesterday"),
    (("arrival",), None),
    (("size",), -1),
    (("size",), "12"),
    (("hold",), "no"),
    (("body",), "BINARYMIME"),
    (("recipients",), []),
    (("recipients", 0, "state"), "sent"),
    (("recipients", 0, "next_attempt"), "soon"),
    (("recipients", 0, "address"), 7),
    (("client", "tls"), "TLSv1.3"),
    (("client", "unknown"), 1),
]


@pytest.mark.parametrize("where, value", BAD_FIELDS,
                         ids=["/".join(map(str, w)) + f"={v!r}"
                              for w, v in BAD_FIELDS])
def test_an_envelope_with_a_bad_field_is_refused_whole(
    where: tuple[object, ...], value: object
) -> None:
    """A wrong type must never reach the queue runner, where it would fail
    after the delivery, before the result is saved."""
    import json

    data = json.loads(env.to_json(sample()))
    target = data
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = value

    with pytest.raises(ValueError, match="not a valid envelope"):
        env.from_json(json.dumps(data).encode())


def committed(spool: Spool) -> str:
    writer = spool.new_message()
    writer.write(b"Subject: hi\r\n\r\nhello\r\n")
    writer.commit(replace(sample(writer.queue_id), size=writer.size))
    return writer.queue_id


def test_scan_reports_unreadable_and_short_messages(spool: Spool) -> None:
    good = committed(spool)
    garbage = committed(spool)
    spool.envelope_path(garbage).write_bytes(b"\x00\xff not json")
    short = committed(spool)
    spool.save(spool.load(short))  # its envelope in a file of its own
    path = spool.message_path(short)
    path.write_bytes(path.read_bytes()[:5])
    removing = committed(spool)
    spool.save(spool.load(removing))
    spool.message_path(removing).unlink()  # a removal half done

    envelopes, bad = spool.scan()

    assert [e.queue_id for e in envelopes] == [good]
    assert sorted(problem.queue_id for problem in bad) == sorted(
        [garbage, short])
    assert any("message file has 5 bytes" in str(p) for p in bad)



def test_scan_checked_is_scan_one_message_at_a_time(spool: Spool) -> None:
    """The listing's reader: the same messages, the same checks and the
    same words for the unreadable ones, in the same order, as `scan`."""
    good = committed(spool)
    garbage = committed(spool)
    spool.envelope_path(garbage).write_bytes(b"{ half an envel")
    short = committed(spool)
    spool.message_path(short).write_bytes(b"x")
    other = committed(spool)
    spool.envelope_path(other).write_bytes(
        to_json(spool.load(good)))  # names another message
    fifo = committed(spool)
    os.mkfifo(spool.envelope_path(fifo))
    link = committed(spool)
    spool.envelope_path(link).symlink_to(spool.message_path(good))
    (spool.queue / "lower.msg").write_bytes(b"{}")
    last = committed(spool)

    envelopes, bad = spool.scan()
    items = list(spool.scan_checked())

    forms = [item for item in items if not isinstance(item, SpoolError)]
    errors = [item for item in items if isinstance(item, SpoolError)]
    assert [env.from_checked(item) for item in forms] == envelopes
    assert [e.queue_id for e in envelopes] == [good, last]
    assert [str(e) for e in errors] == [str(e) for e in bad]
    assert [e.queue_id for e in errors] == [garbage, short, other, fifo, link,
                                            "lower"]
    assert f"{fifo}: {fifo}.env is not a regular file" in map(str, errors)
    assert f"{link}: {link}.env is not a regular file" in map(str, errors)


def _seen(item: dict[str, Any] | SpoolError) -> Any:
    """An item of a scan, comparable: an error by its kind and words."""
    if isinstance(item, SpoolError):
        return type(item), item.queue_id, str(item)
    return item


def test_scan_listed_is_scan_checked_a_stretch_at_a_time(spool: Spool) -> None:
    """`mta queue list`'s reader: the same items as `scan_checked`, the
    unreadable ones with the same words, in the same order, whatever
    stretches of the listing are read."""
    good = committed(spool)
    changed = committed(spool)
    spool.save(replace(spool.load(changed), hold=False))  # an ID.env of its own
    garbage = committed(spool)
    spool.envelope_path(garbage).write_bytes(b"{ half an envel")
    short = committed(spool)
    spool.message_path(short).write_bytes(b"x")
    fifo = committed(spool)
    os.mkfifo(spool.envelope_path(fifo))
    orphan = committed(spool)
    spool.save(spool.load(orphan))
    spool.message_path(orphan).unlink()  # a removal half done
    (spool.queue / "lower.msg").write_bytes(b"{}")
    committed(spool)

    whole = [_seen(item) for item in spool.scan_checked()]
    listing = spool.listing()

    assert [item["queue_id"] for item in whole if isinstance(item, dict)] == [
        good, changed, listing.queue_ids[-2]]
    assert [item[1] for item in whole if isinstance(item, tuple)] == [
        garbage, short, fifo, "lower"]
    for stretch in (1, 2, 3, len(listing.queue_ids)):
        read = [_seen(item)
                for start in range(0, len(listing.queue_ids), stretch)
                for item in spool.scan_listed(listing, start, start + stretch)]
        assert read == whole


def test_a_listing_is_read_as_it_was_when_it_was_made(spool: Spool) -> None:
    # An envelope file written since the listing is not looked for: the
    # queue file says what was true then.  A message removed since is
    # left out, as a scan leaves it out.
    released = committed(spool)  # on hold, as `sample` is
    removed = committed(spool)
    listing = spool.listing()
    spool.save(replace(spool.load(released), hold=False))
    spool.remove(removed)

    assert [(raw["queue_id"], raw["hold"])
            for raw in spool.scan_listed(listing)] == [(released, True)]
    assert [raw["hold"] for raw in spool.scan_listed(spool.listing())] == [False]


def test_a_folder_for_an_envelope_cannot_be_read_now(spool: Spool) -> None:
    # As before: an OSError (try again later), not a damaged envelope.
    queue_id = committed(spool)
    spool.envelope_path(queue_id).mkdir()

    with pytest.raises(IsADirectoryError):
        spool.load(queue_id)
    _, [problem] = spool.scan()
    assert isinstance(problem, spool_module.Unreadable)
    assert str(problem) == f"{queue_id}: cannot read: Is a directory"


def test_a_long_envelope_is_read_whole(spool: Spool) -> None:
    queue_id = committed(spool)
    attempt = Attempt(1000.0, "deferred", "4.2.0", "451 busy " + "x" * 200,
                      "opportunistic", relay="mx.example.net[192.0.2.1]:25")
    envelope = spool.load(queue_id)
    long = envelope.with_recipient(replace(
        envelope.recipients[1], history=(attempt,) * 1000))
    spool.save(long)
    assert spool.envelope_path(queue_id).stat().st_size > 256 * 1024

    assert spool.load(queue_id) == long
    assert [item["queue_id"] for item in spool.scan_checked()] == [queue_id]


def test_an_empty_or_missing_queue_scans_as_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "nowhere")
    assert list(spool.scan_checked()) == []
    assert spool.scan() == ([], [])


def test_clean_orphans_leaves_all_but_old_orphan_files(spool: Spool) -> None:
    """Whatever else is there: folders, links, names that are no queue id;
    and a big queue whose messages all stay, with or without an envelope
    file."""
    old = time.time() - 7200
    kept = [committed(spool) for _ in range(200)]
    for queue_id in kept[::2]:
        spool.save(spool.load(queue_id))
    (spool.queue / "odd name.msg").write_bytes(b"{}")
    made = {
        spool.queue / "odd name.env": "file",  # has its "message"
        spool.queue / "ORPHAN.env": "file",
        spool.queue / ".hidden.env": "file",
        spool.queue / ".env": "file",
        spool.queue / "FOLDER.env": "folder",
        spool.queue / "LINK.env": "link",
        spool.queue / "NOTAMESSAGE": "file",
        spool.tmp / "OLD.env": "file",
        spool.tmp / "olddir": "folder",
        spool.tmp / "oldlink": "link",
    }
    for path, kind in made.items():
        if kind == "file":
            path.write_bytes(b"x")
        elif kind == "folder":
            path.mkdir()
        else:
            path.symlink_to(spool.message_path(kept[0]))
        os.utime(path, (old, old), follow_symlinks=kind != "link")
    for queue_id in kept:
        for path in (spool.message_path(queue_id), spool.envelope_path(queue_id)):
            if path.exists():
                os.utime(path, (old, old))

    removed = spool.clean_orphans(older_than=3600)

    assert sorted(removed) == [".env", ".hidden.env", "OLD.env", "ORPHAN.env"]
    assert spool.queue_ids() == sorted([*kept, "odd name"])
    assert all(spool.message_path(queue_id).exists() for queue_id in kept)
    assert all(spool.envelope_path(queue_id).exists() for queue_id in kept[::2])
    for path in made:
        assert path.exists() or path.is_symlink() or path.name in removed
    assert spool.clean_orphans(older_than=3600) == []


def test_clean_orphans_without_a_queue_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.tmp.mkdir(parents=True)
    old = time.time() - 7200
    (spool.tmp / "OLD.msg").write_bytes(b"x")
    os.utime(spool.tmp / "OLD.msg", (old, old))

    assert spool.clean_orphans(older_than=3600) == ["OLD.msg"]

class TestFolderSync:
    """Group commit: one fsync of the queue folder serves every commit
    waiting for it, and none returns before an fsync that began after it
    asked."""

    def test_one_fsync_serves_the_callers_that_wait_together(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real = spool_module._fsync_folder
        rounds: list[tuple[float, float]] = []

        def slow_fsync(path: Path) -> None:
            began = time.monotonic()
            time.sleep(0.05)  # long enough for the others to pile up
            real(path)
            rounds.append((began, time.monotonic()))

        monkeypatch.setattr(spool_module, "_fsync_folder", slow_fsync)
        sync = spool_module.FolderSync(tmp_path)
        calls: list[tuple[float, float]] = []

        def call() -> None:
            asked = time.monotonic()
            sync.sync()
            calls.append((asked, time.monotonic()))

        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert len(calls) == 8
        assert len(rounds) < 8
        for asked, returned in calls:
            assert any(asked <= began and ended <= returned
                       for began, ended in rounds), (asked, rounds)

    def test_an_fsync_error_reaches_the_caller_and_the_next_try_works(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real = spool_module._fsync_folder
        failures = [OSError(5, "Input/output error")]

        def failing_once(path: Path) -> None:
            if failures:
                raise failures.pop()
            real(path)

        monkeypatch.setattr(spool_module, "_fsync_folder", failing_once)
        sync = spool_module.FolderSync(tmp_path)
        with pytest.raises(OSError):
            sync.sync()
        sync.sync()


class TestDueStamps:
    """Each envelope file's time is the moment its message is next due, so
    the queue runner finds due mail without reading every envelope."""

    def put(self, spool: Spool, envelope: Envelope) -> None:
        writer = spool.new_message()
        writer.write(b"x" * envelope.size)
        writer.commit(replace(envelope, queue_id=writer.queue_id))
        # Stamped again under the id the test chose.
        spool.remove(writer.queue_id)
        spool.message_path(envelope.queue_id).write_bytes(b"x" * envelope.size)
        spool.save(envelope)

    def test_saved_envelopes_carry_their_due_time(self, spool: Spool) -> None:
        base = replace(sample(), hold=False)
        later = replace(base.recipients[1], next_attempt=2_000_000_000.0)
        cases = [
            replace(base, queue_id="0000000000001AAAA",
                    recipients=(base.recipients[0], later)),
            replace(base, queue_id="0000000000002BBBB", hold=True),
            replace(base, queue_id="0000000000003CCCC",
                    recipients=(Recipient("n@example.com"),)),
            replace(base, queue_id="0000000000004DDDD",
                    recipients=(base.recipients[0],)),  # every one final
        ]
        for envelope in cases:
            self.put(spool, envelope)

        stamps = {queue_id: due for due, queue_id in spool.earliest_due(10)}
        assert stamps == {
            "0000000000001AAAA": 2_000_000_000.0,
            "0000000000002BBBB": env.HELD_DUE,
            "0000000000003CCCC": base.arrival,  # not tried yet: due at once
            "0000000000004DDDD": base.arrival,  # its removal is left to do
        }

    def test_earliest_due_takes_the_soonest_only(self, spool: Spool) -> None:
        base = replace(sample(), hold=False, recipients=(Recipient("n@x.test"),))
        for n in range(20):
            self.put(spool, replace(base, queue_id=f"00000000000{n:02d}AAAA",
                                    arrival=1_000_000.0 + n))
        soonest = spool.earliest_due(5)
        assert [queue_id for _, queue_id in soonest] == [
            f"00000000000{n:02d}AAAA" for n in range(5)]
