"""The spool's batched commits and removals (mta.spoolworker), on real
files with the real reactor: one folder fsync serves every item that
waited together, nothing is told before its fsync, a failed fsync fails
its whole batch and leaves nothing, and a kept lock keeps another
process out."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from mta import spool as spool_module
from mta.envelope import Client, Envelope, Recipient
from mta.spool import MessageLock, Spool
from mta.spoolworker import SpoolWorker

REPOSITORY = Path(__file__).resolve().parent.parent
BODY = b"Subject: batch\r\n\r\nhello\r\n"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.create()
    return spool


@pytest.fixture
def worker(spool: Spool) -> Iterator[SpoolWorker]:
    worker = SpoolWorker(reactor, spool)
    worker.start()
    yield worker
    worker.stop()


class FolderFsyncs:
    """The folder fsyncs made, each as (began, ended, queue files then),
    slowed down so that commits asked meanwhile pile up."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        self.rounds: list[tuple[float, float, set[str]]] = []
        self.fail = fail  # every fsync fails while this is true
        real = spool_module._fsync_folder

        def fsync(path: Path) -> None:
            began = time.monotonic()
            time.sleep(0.05)
            if self.fail:
                raise OSError(5, "Input/output error")
            real(path)
            self.rounds.append((began, time.monotonic(), set(os.listdir(path))))

        monkeypatch.setattr(spool_module, "_fsync_folder", fsync)


def envelope_for(queue_id: str, size: int) -> Envelope:
    return Envelope(
        queue_id=queue_id, sender="alice@org.test", arrival=time.time(),
        size=size, client=Client("client.test", "unknown", "127.0.0.1", "mx"),
        recipients=(Recipient("bob@dest.test"),),
    )


def new_message(spool: Spool) -> tuple[Any, Envelope]:
    writer = spool.new_message()
    writer.write(BODY)
    return writer, envelope_for(writer.queue_id, writer.size)


@pytest_twisted.ensureDeferred
async def test_commits_asked_together_share_one_folder_fsync(
    spool: Spool, worker: SpoolWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FolderFsyncs(monkeypatch)
    told: list[tuple[float, str]] = []

    def told_of(_: object, queue_id: str) -> None:
        told.append((time.monotonic(), queue_id))

    # One first, then eight while its fsync runs: they wait together.
    first, envelope = new_message(spool)
    waiting = [worker.commit(first, envelope).addCallback(told_of, first.queue_id)]
    await deferLater(0.01)
    messages = [new_message(spool) for _ in range(8)]
    waiting += [worker.commit(writer, envelope).addCallback(told_of, writer.queue_id)
                for writer, envelope in messages]
    await defer.gatherResults(waiting)

    assert len(fsyncs.rounds) in (1, 2)  # not one for each of the nine
    # Each was told only after an fsync that began after its rename.
    for moment, queue_id in told:
        assert any(f"{queue_id}.msg" in names and ended <= moment
                   for _, ended, names in fsyncs.rounds), queue_id
    assert len(spool.queue_ids()) == 9
    assert [envelope.queue_id for envelope in spool.envelopes()] == sorted(
        queue_id for _, queue_id in told)


@pytest_twisted.ensureDeferred
async def test_a_failed_folder_fsync_fails_its_batch_and_leaves_nothing(
    spool: Spool, worker: SpoolWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FolderFsyncs(monkeypatch, fail=True)
    messages = [new_message(spool) for _ in range(3)]

    results = await defer.DeferredList(
        [worker.commit(writer, envelope, keep_lock=True)
         for writer, envelope in messages], consumeErrors=True)

    assert [ok for ok, _ in results] == [False] * 3
    assert all(isinstance(failure.value, OSError) for _, failure in results)
    assert os.listdir(spool.queue) == [] and os.listdir(spool.tmp) == []

    # The next batch works.
    fsyncs.fail = False
    writer, envelope = new_message(spool)
    assert await worker.commit(writer, envelope) is None
    assert spool.queue_ids() == [writer.queue_id]


LOCKER = """\
import sys
from pathlib import Path
from mta.spool import Locked, Spool
try:
    Spool(Path(sys.argv[1])).lock(sys.argv[2]).release()
except Locked:
    print("Locked")
else:
    print("locked")
"""


def lock_elsewhere(spool: Spool, queue_id: str) -> str:
    done = subprocess.run([sys.executable, "-c", LOCKER, str(spool.root), queue_id],
                          capture_output=True, text=True, cwd=REPOSITORY,
                          timeout=30, check=True)
    return done.stdout.strip()


@pytest_twisted.ensureDeferred
async def test_a_kept_lock_keeps_other_processes_out_until_released(
    spool: Spool, worker: SpoolWorker
) -> None:
    writer, envelope = new_message(spool)

    lock = await worker.commit(writer, envelope, keep_lock=True)

    assert isinstance(lock, MessageLock)
    assert spool.load(writer.queue_id) == envelope
    assert await deferToThread(lock_elsewhere, spool, writer.queue_id) == "Locked"
    lock.release()
    assert await deferToThread(lock_elsewhere, spool, writer.queue_id) == "locked"


@pytest_twisted.ensureDeferred
async def test_a_removal_is_durable_before_its_lock_is_released(
    spool: Spool, worker: SpoolWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FolderFsyncs(monkeypatch)
    writer, envelope = new_message(spool)
    lock = await worker.commit(writer, envelope, keep_lock=True)
    assert lock is not None
    with lock:
        spool.save(replace(envelope, hold=False))  # it has an envelope file

    lock = spool.lock(writer.queue_id)
    await worker.remove(writer.queue_id, lock)

    assert lock.descriptor == -1
    assert os.listdir(spool.queue) == []
    # The last folder fsync saw the queue file gone.
    assert f"{writer.queue_id}.msg" not in fsyncs.rounds[-1][2]


def test_a_stopped_worker_does_the_work_at_once(spool: Spool) -> None:
    worker = SpoolWorker(reactor, spool)  # never started, as after stop
    writer, envelope = new_message(spool)
    results: list[object] = []

    worker.commit(writer, envelope).addBoth(results.append)
    worker.remove(writer.queue_id).addBoth(results.append)

    assert results == [None, None]
    assert os.listdir(spool.queue) == []


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


def deferToThread(function: Any, *args: Any) -> defer.Deferred[Any]:
    from twisted.internet import threads

    return threads.deferToThread(function, *args)


@pytest_twisted.ensureDeferred
async def test_a_removal_shares_the_next_commits_folder_fsync(
    spool: Spool, worker: SpoolWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, envelope = new_message(spool)
    await worker.commit(writer, envelope)
    fsyncs = FolderFsyncs(monkeypatch)

    removing = worker.remove(writer.queue_id, spool.lock(writer.queue_id))
    await deferLater(0.01)
    assert not removing.called  # waits for a commit to share an fsync with
    assert os.listdir(spool.queue) == []  # but is unlinked already
    second, envelope = new_message(spool)
    await defer.gatherResults([worker.commit(second, envelope), removing])

    assert len(fsyncs.rounds) == 1
    assert fsyncs.rounds[0][2] == {f"{second.queue_id}.msg"}


@pytest_twisted.ensureDeferred
async def test_a_removal_alone_waits_no_longer_than_its_bound(
    spool: Spool, worker: SpoolWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mta import spoolworker

    writer, envelope = new_message(spool)
    await worker.commit(writer, envelope)
    fsyncs = FolderFsyncs(monkeypatch)
    lock = spool.lock(writer.queue_id)

    began = time.monotonic()
    await worker.remove(writer.queue_id, lock)
    waited = time.monotonic() - began

    assert spoolworker.REMOVAL_WAIT <= waited < spoolworker.REMOVAL_WAIT + 1.0
    assert len(fsyncs.rounds) == 1 and lock.descriptor == -1


def test_a_stop_makes_waiting_removals_durable(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = SpoolWorker(reactor, spool)
    worker.start()
    writer, envelope = new_message(spool)
    writer.commit(envelope)
    fsyncs = FolderFsyncs(monkeypatch)
    lock = spool.lock(writer.queue_id)

    worker.remove(writer.queue_id, lock)
    worker.stop()  # at once, well within REMOVAL_WAIT

    assert len(fsyncs.rounds) == 1 and lock.descriptor == -1
