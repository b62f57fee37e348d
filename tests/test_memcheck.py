"""bench/memcheck.py still works: the spool it writes is one the relay's
own code reads, its log counting is right, and a tiny run prints every
figure.  Nothing here is timed (README.md, "Benchmark", has the figures)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from bench import memcheck
from mta.envelope import PENDING, due_time
from mta.spool import Spool

REPO = Path(__file__).resolve().parent.parent


def test_the_filled_spool_reads_as_the_relays_own(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    memcheck.fill_spool(spool, 5)

    envelopes, bad = spool.scan()  # loads every envelope, checks every size
    assert bad == []
    assert len(envelopes) == 5
    assert len({envelope.queue_id for envelope in envelopes}) == 5
    for envelope in envelopes:
        assert [r.state for r in envelope.recipients] == [PENDING]
        mtime = spool.message_path(envelope.queue_id).stat().st_mtime
        assert abs(mtime - due_time(envelope)) < 1e-3
    assert os.listdir(spool.tmp) == []
    # All due now: the queue runner's scan takes every one.
    assert len(spool.earliest_due(10)) == 5


def test_attempts_are_counted_by_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "mta.log"
    log.write_bytes(
        b"x [mta#warn] A: to=<a@b> relay=h[1.2.3.4]:25 status=deferred (refused)\n"
        b"x [mta#info] started\n"
        b"x [mta#warn] B: to=<c@d> relay=none delay=1 status=deferred (suspended)\n"
        b"x [mta#warn] C: to=<e@f> relay=none delay=1 status=def"
    )
    attempts, not_connected, offset = memcheck._count_attempts(log, 0)
    assert (attempts, not_connected) == (2, 1)

    with open(log, "ab") as stream:
        stream.write(b"erred (suspended)\n")
    assert memcheck._count_attempts(log, offset)[:2] == (1, 1)


def test_status_fields() -> None:
    text = "Name:\ttwistd\nVmHWM:\t  130304 kB\nVmRSS:\t   68480 kB\nThreads:\t3\n"
    fields = memcheck._status_fields(text)
    assert fields["VmHWM"] == 130304
    assert fields["VmRSS"] == 68480
    assert "Threads" not in fields


def test_a_tiny_run_prints_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "memcheck.py"),
         "--counts", "30", "--repeat", "1", "--seconds", "20"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    row = re.search(r"^\s+30 \| +([0-9.]+) \| +([0-9.]+) \| +(\d+) \| "
                    r"+[0-9.]+ / [0-9.]+ \| +[0-9.]+ / [0-9.]+$",
                    done.stdout, re.MULTILINE)
    assert row is not None, done.stdout
    assert float(row[1]) > 0 and float(row[2]) > 0
    assert int(row[3]) == 30  # every message was tried once
    assert "no fsync" in done.stdout
    assert "STALLED" not in done.stdout
