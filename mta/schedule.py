"""The queue runner's memory of what is due when: at most a fixed number of
messages, soonest first.

It is a hint, never the truth: the spool is.  A message left out (the
schedule was full of messages due sooner) or pushed out (by one due
sooner) is found again by the runner's next scan of the spool, which takes
the messages due soonest; so the runner's memory does not grow with the
number of messages queued, and mail deferred for hours never keeps mail
that is due now out of it.
"""

from __future__ import annotations

import heapq


class Schedule:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._due: dict[str, float] = {}
        # (due, queue id); an entry whose time no longer matches `_due` is
        # stale and skipped.
        self._heap: list[tuple[float, str]] = []
        # (-due, queue id): the same entries latest first, to find the one
        # to push out when the schedule is full.
        self._late: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._due

    def add(self, queue_id: str, due: float) -> bool:
        """Remember that ``queue_id`` is due at ``due`` (the earlier time
        wins when it is known already).  When the schedule is full, the
        message due latest is forgotten to make room, or, if none is due
        later than this one, this one is not remembered: False."""
        known = self._due.get(queue_id)
        if known is not None and known <= due:
            return True
        if known is None and len(self._due) >= self._limit:
            latest = self._latest()
            if latest is None or latest[0] <= due:
                return False
            del self._due[latest[1]]
        self._due[queue_id] = due
        heapq.heappush(self._heap, (due, queue_id))
        heapq.heappush(self._late, (-due, queue_id))
        self._compact()
        return True

    def pop_due(self, now: float) -> str | None:
        """The message due soonest, if it is due by ``now``; forgotten."""
        self._drop_stale()
        if not self._heap or self._heap[0][0] > now:
            return None
        _, queue_id = heapq.heappop(self._heap)
        del self._due[queue_id]
        return queue_id

    def next_due(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def _latest(self) -> tuple[float, str] | None:
        late = self._late
        while late and self._due.get(late[0][1]) != -late[0][0]:
            heapq.heappop(late)
        return (-late[0][0], late[0][1]) if late else None

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def _compact(self) -> None:
        # Stale entries pile up when times move earlier: rebuild now and
        # then, so the heap stays within twice the messages remembered.
        if max(len(self._heap), len(self._late)) > 2 * len(self._due) + 64:
            self._heap = [(due, queue_id) for queue_id, due in self._due.items()]
            heapq.heapify(self._heap)
            self._late = [(-due, queue_id) for due, queue_id in self._heap]
            heapq.heapify(self._late)
