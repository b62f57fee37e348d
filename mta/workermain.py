"""``python -m mta.workermain``: one worker process started by the first
(mta.workers).  Not a command for people: it needs the sockets it inherits.

It reads the same configuration file, serves the inherited listening
sockets, runs a queue runner on the same spool, and writes its log events
as JSON lines to standard output, which is a pipe to the first process.
It stops gracefully on SIGTERM or SIGINT, and when its standard input (the
other end held by the first process) closes.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

from twisted.logger import globalLogBeginner, jsonFileLogObserver

from mta.config import ConfigError, load_config
from mta.cpuaffinity import parse_cpus
from mta.logs import line_as_json
from mta.workers import parse_listen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mta.workermain")
    parser.add_argument("--config", required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[],
                        type=parse_listen)
    parser.add_argument("--cpus", type=parse_cpus, default=None)
    options = parser.parse_args(argv)
    try:
        config = load_config(options.config)
    except ConfigError as error:
        sys.stderr.write(f"mta: worker {options.number} not started: bad "
                         f"configuration\n{error}\n")
        return 1

    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([_observer(options.number)],
                                     redirectStandardIO=False)
    from mta.service import RelayService

    relay = RelayService(config, reactor, inherited=tuple(options.listen),
                         number=options.number, cpus=options.cpus)
    relay.privilegedStartService()
    relay.startService()
    reactor.addSystemEventTrigger("before", "shutdown", relay.stopService)
    _stop_when_orphaned(reactor)
    reactor.run()
    return 0


def _observer(number: int) -> Any:
    """Every event as one JSON line (the first process splits on
    newlines), marked with the worker's number: the JSON log
    (``--logger mta.logs.json_observer``) shows which process it was.

    Each line goes to the pipe as it is made: held back to the end of the
    reactor's turn, the lines of a worker killed meanwhile were lost, an
    "accepted" line among them for a client already told 250."""
    write = jsonFileLogObserver(sys.stdout, recordSeparator="")

    def observe(event: dict[str, Any]) -> None:
        event["mta_worker"] = number
        line = line_as_json(event)
        if line is None:
            write(event)  # Twisted's JSON form, for any other event
            return
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    return observe


def _stop_when_orphaned(reactor: Any) -> None:
    """The first process holds the other end of our standard input: when
    it is gone (even by SIGKILL) the read ends, and so do we."""

    def wait() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        reactor.callFromThread(_stop, reactor)

    threading.Thread(target=wait, name="mta-parent-watch", daemon=True).start()


def _stop(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


if __name__ == "__main__":
    raise SystemExit(main())
