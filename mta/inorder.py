"""Work shared out to forked processes, its results taken back in order:
how `mta queue list` reads a big spool on every core.

One Python process reads, checks and formats some 30,000 envelopes a
second, and its threads would share one interpreter lock.  Forked
children share the parent's memory as it was at the fork (the queue's
listing, the selection) and send back only their results, each pickled
on a pipe of its own.  A child waits on its pipe until the parent has
read its last result, so each holds at most one result however long the
work: memory stays flat.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from typing import Any, BinaryIO, Callable, Generator, NamedTuple, TypeVar

Result = TypeVar("Result")

# A result is sent as its length in this many octets, then its pickle.
_LENGTH = 8


def workers_available(at_most: int) -> int:
    """The processors this process may run on, up to ``at_most``."""
    return max(1, min(at_most, len(os.sched_getaffinity(0))))


def in_order(
    work: Callable[[int], Result], count: int, workers: int
) -> Generator[Result, None, None]:
    """``work(0)``, ``work(1)`` ... ``work(count - 1)``, in that order.
    With more than one worker, each is worked out in one of ``workers``
    children forked at the first result asked for (child k does k,
    k + workers, ...): they go on while the caller uses the results
    before.  Results must pickle.  An exception in a child is raised here,
    at its turn; a caller that stops early leaves no child behind."""
    if workers <= 1 or count <= 1:
        yield from map(work, range(count))
        return
    workers = min(workers, count)
    # What is buffered now must not be written again by each child.
    sys.stdout.flush()
    sys.stderr.flush()
    children: list[_Child | None] = []
    try:
        for first in range(workers):
            children.append(_fork(work, range(first, count, workers), children))
        for index in range(count):
            child = children[index % workers]
            # A child that could not be forked (no process or descriptor
            # left): its share is done here, in turn.
            yield work(index) if child is None else _receive(child.results)
    finally:
        # A child still at work finds its pipe closed at its next result
        # (BrokenPipeError) and ends; each is waited for, by its pid.
        started = [child for child in children if child is not None]
        for child in started:
            child.results.close()
        for child in started:
            os.waitpid(child.pid, 0)


class _Child(NamedTuple):
    pid: int
    results: BinaryIO  # the read end of its pipe


def _fork(
    work: Callable[[int], object], indices: range, siblings: list[_Child | None]
) -> _Child | None:
    """A child that sends ``work(i)`` for each of ``indices``, or None
    when none can be started."""
    try:
        reader, writer = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(reader)
        os.close(writer)
        return None
    if pid == 0:
        os.close(reader)
        # The earlier children's pipes: only the parent may keep them open,
        # or those children would not see it close them.
        for sibling in siblings:
            if sibling is not None:
                sibling.results.close()
        _child(work, indices, writer)
    os.close(writer)
    return _Child(pid, open(reader, "rb"))


def _child(work: Callable[[int], object], indices: range, writer: int) -> None:
    """Never returns: the child ends here, without the parent's clean-up
    (atexit, buffered output), which is the parent's to do."""
    status = 1
    try:
        with open(writer, "wb") as out:
            for index in indices:
                try:
                    message = pickle.dumps((True, work(index)),
                                           pickle.HIGHEST_PROTOCOL)
                except Exception as error:
                    _send(out, _failure(error))
                    break
                _send(out, message)
        status = 0
    except BaseException:
        pass  # the parent stopped reading (or ^C): nobody to tell
    finally:
        os._exit(status)


def _failure(error: Exception) -> bytes:
    try:
        message = pickle.dumps((False, error), pickle.HIGHEST_PROTOCOL)
        pickle.loads(message)  # some exceptions cannot be made again
        return message
    except Exception:
        # Then its traceback, as text.
        text = "".join(traceback.format_exception(error))
        return pickle.dumps((False, RuntimeError(text)), pickle.HIGHEST_PROTOCOL)


def _send(out: BinaryIO, message: bytes) -> None:
    out.write(len(message).to_bytes(_LENGTH, "little"))
    out.write(message)
    out.flush()


def _receive(results: BinaryIO) -> Any:
    length = int.from_bytes(results.read(_LENGTH), "little")
    message = results.read(length)
    if not length or len(message) < length:
        raise RuntimeError("a worker process ended before its work was done")
    done, value = pickle.loads(message)
    if not done:
        raise value
    return value
