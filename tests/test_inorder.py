"""`mta.inorder`: work shared out to forked processes, taken back in
order; real forks, real pipes."""

from __future__ import annotations

import os

import pytest

from mta import inorder


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer exists (it ended and was waited for)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("count", [0, 1, 2, 7])
def test_results_come_in_order(workers: int, count: int) -> None:
    assert list(inorder.in_order(lambda n: n * n, count, workers)) == [
        n * n for n in range(count)]


def test_each_worker_is_a_child_and_each_child_ends() -> None:
    pids = list(inorder.in_order(lambda n: os.getpid(), 6, 2))

    assert os.getpid() not in pids
    assert pids[0::2] == [pids[0]] * 3 and pids[1::2] == [pids[1]] * 3
    assert pids[0] != pids[1]
    assert all(gone(pid) for pid in set(pids))


def test_one_worker_works_here() -> None:
    assert list(inorder.in_order(lambda n: os.getpid(), 3, 1)) == [os.getpid()] * 3


def test_an_exception_in_a_child_is_raised_at_its_turn() -> None:
    def work(n: int) -> int:
        if n == 3:
            raise FileNotFoundError(2, "No such file", f"file{n}")
        return n

    results = inorder.in_order(work, 6, 2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(FileNotFoundError) as raised:
        next(results)
    assert raised.value.filename == "file3"


def test_an_exception_that_does_not_pickle_comes_as_its_traceback() -> None:
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(a + b)

    def work(n: int) -> int:
        raise Odd(n, 1)

    with pytest.raises(RuntimeError, match="Odd"):
        list(inorder.in_order(work, 2, 2))


def test_a_child_that_dies_is_an_error_not_an_end() -> None:
    def work(n: int) -> int:
        if n == 1:
            os._exit(3)
        return n

    with pytest.raises(RuntimeError, match="ended before its work was done"):
        list(inorder.in_order(work, 4, 2))


def test_a_caller_that_stops_early_leaves_no_child() -> None:
    # Each result fills the pipe: the children are blocked writing when
    # the caller stops.
    results = inorder.in_order(lambda n: (os.getpid(), b"x" * 300_000), 20, 3)
    pids = {next(results)[0], next(results)[0], next(results)[0]}
    results.close()

    assert len(pids) == 3 and all(gone(pid) for pid in pids)


def test_without_processes_to_fork_the_work_is_done_here(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    assert list(inorder.in_order(lambda n: (n, os.getpid()), 4, 2)) == [
        (n, os.getpid()) for n in range(4)]


def test_workers_are_the_processors_there_are_at_most() -> None:
    processors = len(os.sched_getaffinity(0))
    assert inorder.workers_available(64) == min(64, processors)
    assert inorder.workers_available(1) == 1
