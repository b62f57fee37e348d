"""The queue runner's bounded schedule (mta.schedule), in memory."""

from __future__ import annotations

from mta.schedule import Schedule


def test_soonest_first_and_only_when_due() -> None:
    schedule = Schedule(10)
    for queue_id, due in (("B", 20.0), ("A", 10.0), ("C", 30.0)):
        assert schedule.add(queue_id, due)

    assert schedule.next_due() == 10.0
    assert schedule.pop_due(5.0) is None
    assert schedule.pop_due(25.0) == "A"
    assert schedule.pop_due(25.0) == "B"
    assert schedule.pop_due(25.0) is None
    assert schedule.next_due() == 30.0
    assert len(schedule) == 1 and "C" in schedule


def test_the_earlier_time_wins() -> None:
    schedule = Schedule(10)
    schedule.add("A", 50.0)
    schedule.add("A", 10.0)  # flushed, say
    schedule.add("A", 90.0)  # a later hint changes nothing
    assert schedule.pop_due(10.0) == "A"
    assert schedule.pop_due(100.0) is None  # its old entries are stale


def test_a_full_schedule_refuses_new_messages_but_not_known_ones() -> None:
    schedule = Schedule(2)
    assert schedule.add("A", 1.0) and schedule.add("B", 2.0)
    assert not schedule.add("C", 0.0)
    assert schedule.add("B", 0.5)
    assert len(schedule) == 2
    assert [schedule.pop_due(9.0), schedule.pop_due(9.0)] == ["B", "A"]


def test_stale_entries_do_not_pile_up() -> None:
    schedule = Schedule(10)
    for step in range(10_000):
        schedule.add("A", 10_000.0 - step)
    assert len(schedule._heap) <= 2 * len(schedule) + 64
    assert schedule.pop_due(1.0) == "A"
