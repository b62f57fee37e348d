"""``mta queue ...``: the spool for an operator, as mailq, postqueue and
postsuper show and steer Postfix's queue.  The parser and the printing;
what the commands do to the spool is in `mta.queueops`."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterable

from mta import queueops
from mta.envelope import Envelope, in_field_order
from mta.queueops import ALL, Operations, Outcome, Selection
from mta.spool import Spool, SpoolError

CHANGES = {
    "flush": "retry now: every recipient not yet delivered or failed is due "
    "at once (held messages stay held); no ID: every message",
    "hold": "put on hold: the relay leaves the message alone until released",
    "release": "take off hold; it goes at its next attempt, at once if that "
    "has passed",
    "delete": "remove from the spool without telling anyone",
}


def add_parser(
    commands: Any, parents: list[argparse.ArgumentParser]
) -> None:
    """``queue`` and its commands, under the ``mta`` parser's commands."""
    queue = commands.add_parser("queue", parents=parents, help="the spool")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)

    listing = queue_commands.add_parser("list", parents=parents,
                                        help="list queued messages")
    _add_filters(listing)
    _add_json(listing)

    show = queue_commands.add_parser("show", parents=parents,
                                     help="one message, with its history")
    show.add_argument("queue_id")
    _add_json(show)

    for name, text in CHANGES.items():
        change = queue_commands.add_parser(name, parents=parents, help=text)
        change.add_argument(
            "queue_ids", metavar="ID", nargs="*" if name == "flush" else "+",
            help=f"queue ids, or {ALL} for every message (with the filters)",
        )
        _add_filters(change, f" (with {ALL} only)")
        change.add_argument(
            "--wait", type=_seconds, default=queueops.DEFAULT_WAIT,
            metavar="SECONDS",
            help="how long to wait for a message being delivered "
            f"(default {queueops.DEFAULT_WAIT:g})",
        )
        _add_json(change)


def _add_filters(parser: argparse.ArgumentParser, scope: str = "") -> None:
    parser.add_argument(
        "--state", action="append", choices=queueops.STATES,
        help="messages with a recipient in this state, or on hold; "
        f"repeat for several{scope}",
    )
    parser.add_argument(
        "--domain", action="append", metavar="DOMAIN",
        help=f"messages with a recipient at this domain; repeat for several{scope}",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON output")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def run(spool: Spool, args: argparse.Namespace) -> int:
    try:
        missing = _not_a_spool(spool)
        if missing is not None:
            print(f"mta: spool {spool.root}: {missing}", file=sys.stderr)
            return 1
        return _run(spool, args)
    except BrokenPipeError:
        raise  # the reader went away (| head): not the spool's fault
    except OSError as error:
        print(f"mta: spool {spool.root}: {error}", file=sys.stderr)
        return 1


def _not_a_spool(spool: Spool) -> str | None:
    """Why ``spool`` is no spool to read, or None.  A wrong spool setting
    must not look like an empty queue."""
    if not spool.root.is_dir():
        return ("no such folder; check the spool setting (the relay creates "
                "it at its first start)")
    if not spool.queue.is_dir():
        return (f"no {spool.queue.name}/ folder in it: not a spool the relay "
                "has used; check the spool setting")
    return None


def _run(spool: Spool, args: argparse.Namespace) -> int:
    command = args.queue_command
    if command == "list":
        selection = Selection.of(args.state, args.domain)
        return list_messages(spool, selection, args.json)
    if command == "show":
        return show_message(spool, args.queue_id, args.json)
    return change_messages(spool, command, args)


# --- list ------------------------------------------------------------------------


def list_messages(
    spool: Spool, selection: Selection, as_json: bool, workers: int | None = None
) -> int:
    """The messages printed as they are read, a `PART` at a time (oldest
    first, as the spool lists them), the unreadable ones after them:
    memory stays flat whatever the size of the queue.  What is printed is
    the envelope's checked JSON form (`Spool.scan_listed`): the checks are
    `load`'s, and no `Envelope` is made.  A queue of more than one part is
    read by ``workers`` processes at once (default: one a processor, up to
    `LIST_WORKERS`), its parts printed in order (`_in_order`)."""
    # Closed at once when printing fails (`| head`): no worker is left.
    with closing(_parts(spool, selection, as_json, workers)) as parts:
        if as_json:
            _list_json(parts)
        else:
            _list_text(spool, parts, selection.is_everything)
    return 0


# Messages read and formatted at a time: some 30 ms of work, and what a
# worker holds while it waits for its turn to print.
PART = 1000
# At most this many: a listing on a big server should leave the relay
# beside it processors of its own.
LIST_WORKERS = 4


@dataclass(frozen=True, slots=True)
class _Part:
    """What `PART` messages of the listing come to."""

    text: str  # the selected messages, as standard output shows them
    readable: int
    chosen: int
    unreadable: list[tuple[str, str]]  # (queue id, what is wrong)


def _parts(spool: Spool, selection: Selection, as_json: bool,
           workers: int | None) -> Generator[_Part, None, None]:
    listing = spool.listing()
    count = (len(listing.queue_ids) + PART - 1) // PART
    if workers is None:
        workers = min(LIST_WORKERS, len(os.sched_getaffinity(0)))

    def part(number: int) -> _Part:
        items = spool.scan_listed(listing, number * PART, (number + 1) * PART)
        return _read_part(items, selection, as_json)

    return _in_order(part, count, workers)


# The work of `_in_order`'s pool: its processes are forked, and find it here.
_work: Callable[[int], _Part] | None = None


def _worker_signals() -> None:
    # A forked process keeps its parent's handlers (a test's reactor
    # catches SIGTERM): the pool's terminate() must end it, and ^C is
    # the parent's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _do_work(number: int) -> _Part:
    assert _work is not None
    return _work(number)


def _in_order(work: Callable[[int], _Part], count: int,
              workers: int) -> Generator[_Part, None, None]:
    """``work(0)`` ... ``work(count - 1)``, in order, worked out by
    ``workers`` forked processes while the caller prints those before.
    Forked, they share the listing and the selection as they are, and
    ``work`` need not pickle; a caller that stops early (``| head``)
    closes this generator, and the pool is ended then."""
    global _work
    if workers <= 1 or count <= 1:
        yield from map(work, range(count))
        return
    # What is buffered now must not be written again by each process.
    sys.stdout.flush()
    sys.stderr.flush()
    _work = work
    try:
        pool = multiprocessing.get_context("fork").Pool(min(workers, count),
                                                    _worker_signals)
    except OSError:
        # No process left to fork: the work is done here.
        yield from map(work, range(count))
        return
    with pool:
        yield from pool.imap(_do_work, range(count))


def _read_part(items: Iterable[dict[str, Any] | SpoolError],
               selection: Selection, as_json: bool) -> _Part:
    """The `_Part` of ``items``: for the text, each selected message's
    lines (control characters shown once for the part), or its JSON
    object, one a line."""
    everything = selection.is_everything
    when = _Arrivals()
    pieces = []
    unreadable = []
    readable = 0
    for item in items:
        if isinstance(item, SpoolError):
            unreadable.append((item.queue_id, str(item)))
            continue
        readable += 1
        if everything or queueops.selects_checked(selection, item):
            # As `dataclasses.asdict` of its Envelope has it.
            pieces.append(_dumps(in_field_order(item)) if as_json
                          else _summary(item, when))
    text = ",\n".join(pieces) if as_json else shown("".join(pieces))
    return _Part(text, readable, len(pieces), unreadable)


# json.dumps (without indent: the C encoder's work), but one encoder for
# every envelope, and no search for cycles, which JSON just read cannot have.
_dumps = json.JSONEncoder(check_circular=False).encode


def _list_json(parts: Iterable[_Part]) -> None:
    # One JSON array, an envelope a line.
    write = sys.stdout.write
    unreadable: list[tuple[str, str]] = []
    separator = "[\n"
    for part in parts:
        if part.chosen:
            write(separator)
            write(part.text)
            separator = ",\n"
        unreadable += part.unreadable
    write("[]\n" if separator == "[\n" else "\n]\n")
    for queue_id, problem in unreadable:
        print(f"mta: {queue_id}: unreadable: {problem}", file=sys.stderr)


# Control characters a client or a server put into the envelope (a HELO
# name, a reply) or the headers, shown as \xNN: printed raw, ESC and its
# friends would retitle or clear the operator's terminal.  Tab and line
# feed stay, for the header block.
_SHOWN = {code: f"\\x{code:02x}"
          for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))
          if code not in (0x09, 0x0A)}
# Any of them, to find in one search that a text (most) has none.
_UNSHOWN = re.compile("[%s]" % "".join(re.escape(chr(code)) for code in _SHOWN))


def shown(text: str) -> str:
    return text.translate(_SHOWN) if _UNSHOWN.search(text) else text


def _list_text(spool: Spool, parts: Iterable[_Part], everything: bool) -> None:
    write = sys.stdout.write
    unreadable: list[tuple[str, str]] = []
    readable = chosen = 0
    for part in parts:
        write(part.text)
        readable += part.readable
        chosen += part.chosen
        unreadable += part.unreadable
    for queue_id, problem in unreadable:
        print(shown(f"{queue_id}  unreadable: {problem}"))
    counted = (f"{chosen} message(s)" if everything
               else f"{chosen} of {readable} message(s)")
    print(f"-- {counted} in {spool.queue}"
          + (f", {len(unreadable)} unreadable" if unreadable else ""))


def _summary(envelope: dict[str, Any], when: Callable[[float], str]) -> str:
    """A message's lines in `list`, from its checked JSON form."""
    # As mailq: "!" after the id marks a message on hold.
    hold = "!" if envelope["hold"] else " "
    lines = [(f"{envelope['queue_id']}{hold} {envelope['size']:>9} "
              f"{when(envelope['arrival'])}  <{envelope['sender']}>\n")]
    for recipient in envelope["recipients"]:
        reason = f" ({recipient['reason']})" if recipient["reason"] else ""
        lines.append(f"    {recipient['state']:<9} <{recipient['address']}>"
                     f"{reason}\n")
    return "".join(lines)


class _Arrivals:
    """`_when` for one second after another: messages listed in arrival
    order mostly share their second with the one before."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, seconds: float) -> str:
        # time.localtime takes the floor of a fraction.
        second = math.floor(seconds)
        if second != self._second:
            self._text = _when(second)
            self._second = second
        return self._text


# --- show ------------------------------------------------------------------------


def show_message(spool: Spool, text: str, as_json: bool) -> int:
    queue_id = queueops.normal_queue_id(text)
    if queue_id is None:
        print(f"mta: {text}: not a queue id", file=sys.stderr)
        return 1
    try:
        envelope = spool.load(queue_id)
    except FileNotFoundError:
        print(f"mta: {queue_id}: no such message in {spool.queue}",
              file=sys.stderr)
        return 1
    except SpoolError as error:
        print(f"mta: {error}", file=sys.stderr)
        return 1

    head = _head(spool.message_path(queue_id), envelope.size)
    if as_json:
        fields = [{"name": name, "value": value}
                  for name, value in header_fields(head)]
        print(json.dumps({**asdict(envelope), "headers": fields}, indent=2))
        return 0
    print(shown("\n".join(describe(envelope))))
    print("headers:")
    print(shown(head))
    return 0


def describe(envelope: Envelope) -> list[str]:
    client = envelope.client
    lines = [
        f"queue id: {envelope.queue_id}{'  (on hold)' if envelope.hold else ''}",
        f"arrival:  {_when(envelope.arrival)}",
        f"sender:   <{envelope.sender}>",
        f"size:     {envelope.size} ({envelope.body})",
        f"client:   {client.host}[{client.address}] helo={client.helo} "
        f"listener={client.listener} tls={client.tls or 'none'}"
        + (f" sasl_username={client.user}" if client.user else ""),
    ]
    for recipient in envelope.recipients:
        dsn = f" dsn={recipient.dsn}" if recipient.dsn else ""
        due = (f", next attempt {_when(recipient.next_attempt)}"
               if recipient.next_attempt and not recipient.is_final else "")
        lines.append(f"recipient <{recipient.address}>: "
                     f"{recipient.state}{dsn}{due}")
        for attempt in recipient.history:
            tls = attempt.tls or ("none" if attempt.connected else "-")
            lines.append(
                f"  {_when(attempt.time)} {attempt.status} dsn={attempt.dsn} "
                f"relay={attempt.relay or 'none'} tls={tls} "
                f"trust={attempt.trust or '-'}"
                + (f" matched={attempt.matched}" if attempt.matched else "")
                + f" policy={attempt.policy}"
                + (f" rule={attempt.rule}" if attempt.rule else "")
                + (f" fallback={attempt.fallback}" if attempt.fallback else "")
            )
            lines.append(f"    ({attempt.reply})")
    return lines


def _head(path: Path, size: int) -> str:
    """The message's header section, with newlines for CRLF (read from the
    first ``size`` octets of its file: the envelope follows them)."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(min(64 * 1024, size))
    except OSError as error:
        return f"  (cannot read {path}: {error.strerror})"
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    return head.decode("utf-8", "replace").replace("\r\n", "\n")


def header_fields(head: str) -> list[tuple[str, str]]:
    """(name, value) for each header field, folded lines unfolded
    (RFC 5322 2.2.3: a line starting with white space continues one)."""
    fields: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}")
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return fields


# --- flush, hold, release, delete ------------------------------------------------


def change_messages(spool: Spool, operation: str, args: argparse.Namespace) -> int:
    ids = list(args.queue_ids)
    every = not ids or ids == [ALL]
    selection = Selection.of(args.state, args.domain)
    if ALL in ids and not every:
        return _usage(f"{ALL} stands alone, without queue ids")
    if not every and not selection.is_everything:
        return _usage(f"--state and --domain choose messages only with {ALL}")

    queueops.act_as_spool_owner(spool)
    operations = Operations(spool, wait=args.wait, selection=selection)
    if every:
        outcomes, left_alone = operations.apply_to_all(operation)
    else:
        outcomes = [operations.apply(operation, text) for text in ids]
        left_alone = 0

    _report(operation, outcomes, left_alone, every, args.json)
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def _usage(text: str) -> int:
    print(f"mta: {text}", file=sys.stderr)
    return 2


def _report(operation: str, outcomes: list[Outcome], left_alone: int,
            every: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"queue_id": o.queue_id, "status": o.status,
                           "ok": o.ok, "detail": o.detail} for o in outcomes],
                         indent=2))
        return
    for outcome in outcomes:
        if outcome.ok:
            print(f"{outcome.queue_id}: {outcome.detail}")
        else:
            print(f"mta: {outcome.queue_id}: {outcome.detail}", file=sys.stderr)
    if every:
        done = sum(1 for outcome in outcomes if outcome.status == queueops.DONE)
        failed = sum(1 for outcome in outcomes if not outcome.ok)
        print(f"-- {operation}: {done} message(s) changed"
              + (f", {failed} failed" if failed else "")
              + (f", {left_alone} left as they were" if left_alone else ""))


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(seconds))
