"""The kill test in the suite (issue 4, item 5): 500 messages over six
connections while the relay is killed with SIGKILL three times at random
moments; every message that got 250 arrives, and duplicates come only from
messages in flight at a kill.  See `tests/killload.py`; the same run with
its figures: `.venv/bin/python bench/killtest.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.killload import run


def test_sigkill_under_load_loses_no_accepted_message(tmp_path: Path) -> None:
    seed = os.environ.get("MTA_KILL_SEED")
    report = run(tmp_path, messages=500, clients=6, kills=3,
                 seed=int(seed) if seed else None)
    print("\n" + "\n".join(report.lines()) + "\n(MTA_KILL_SEED repeats a run)")
    assert report.accepted == 500
    assert report.lost == []
