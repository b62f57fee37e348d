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


def test_a_full_schedule_refuses_what_is_due_later_but_not_known_ones() -> None:
    schedule = Schedule(2)
    assert schedule.add("A", 1.0) and schedule.add("B", 2.0)
    assert not schedule.add("C", 3.0)
    assert not schedule.add("C", 2.0)
    assert schedule.add("B", 0.5)
    assert len(schedule) == 2
    assert [schedule.pop_due(9.0), schedule.pop_due(9.0)] == ["B", "A"]


def test_what_is_due_sooner_pushes_out_what_is_due_latest() -> None:
    # A schedule full of mail deferred for an hour must still take mail
    # that is due now (the pushed-out message is in the spool, and the
    # next scan finds it again when it comes due).
    schedule = Schedule(3)
    for queue_id, due in (("A", 3600.0), ("B", 7200.0), ("C", 5400.0)):
        assert schedule.add(queue_id, due)

    assert schedule.add("NEW", 0.0)
    assert len(schedule) == 3 and "B" not in schedule
    assert schedule.add("NEWER", 1.0)
    assert "C" not in schedule
    assert [schedule.pop_due(10.0), schedule.pop_due(10.0)] == ["NEW", "NEWER"]
    assert schedule.pop_due(10.0) is None and schedule.next_due() == 3600.0
    # A pushed-out message can come back, once.
    assert schedule.add("B", 60.0)
    assert schedule.pop_due(100.0) == "B" and schedule.pop_due(100.0) is None


def test_stale_entries_do_not_pile_up() -> None:
    schedule = Schedule(10)
    for step in range(10_000):
        schedule.add("A", 10_000.0 - step)
    assert len(schedule._heap) <= 2 * len(schedule) + 64
    assert len(schedule._late) <= 2 * len(schedule) + 64
    assert schedule.pop_due(1.0) == "A"
