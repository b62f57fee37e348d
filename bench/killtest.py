"""The kill test as a benchmark: clients send mail over several connections
to the relay while it is killed with SIGKILL at random moments and started
again; every message that got 250 must arrive.  Prints its figures.

    .venv/bin/python bench/killtest.py [--messages 500] [--clients 6]
        [--kills 4] [--seed N] [--keep]

Run it from the checkout, as root or not (the peer listens on a free port
of 127.0.7.31).  The work is in `tests/killload.py`; `--seed` repeats a
run's kill points.  Exits 1 when a message is lost or a duplicate is not
explained by a kill.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from tests.killload import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (spool, relay log)")
    options = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="mta-killtest-"))
    try:
        report = run(folder, messages=options.messages, clients=options.clients,
                     kills=options.kills, seed=options.seed)
    except AssertionError as error:
        print(f"FAILED: {error}\nwork folder kept: {folder}")
        return 1
    for line in report.lines():
        print(line)
    print(f"{report.accepted / report.seconds:.0f} messages/s accepted "
          "end to end, restarts included")
    if options.keep:
        print(f"work folder: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
