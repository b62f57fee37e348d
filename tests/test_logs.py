"""The relay's text log is Twisted's, byte for byte, only cheaper to make;
and a worker's lines reach the first process as the same events."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.logger import (
    LogLevel,
    Logger,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from mta import logs


def emitted(emit: Any) -> list[dict[str, Any]]:
    """The events a call of ``emit(logger)`` makes, as observers get them."""
    events: list[dict[str, Any]] = []
    publisher = LogPublisher(events.append)
    emit(Logger(namespace="mta", observer=publisher))
    return events


def line_event(text: str, level: str = "info", **fields: Any) -> dict[str, Any]:
    def emit(logger: Logger) -> None:
        getattr(logger, level)(logs.LINE_FORMAT, mta_line=text,
                               mta_event="test", **fields)

    [event] = emitted(emit)
    return event


def failure_event() -> dict[str, Any]:
    def emit(logger: Logger) -> None:
        try:
            raise ValueError("broken {braces}")
        except ValueError:
            logger.failure("{mta_line}", Failure(), mta_line="it failed")

    [event] = emitted(emit)
    return event


def as_text(observer_factory: Any, events: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    observer = observer_factory(out)
    for event in events:
        observer(dict(event))
    return out.getvalue()


EVENTS = [
    ("a plain line", lambda: line_event("0123ABCD: accepted from=<a@b.test>")),
    ("braces and a newline", lambda: line_event("x {not a field}\nsecond", "warn")),
    ("an error", lambda: line_event("spool: cannot scan", "error",
                                    mta_queue_id="0123")),
    ("a system name", lambda: {**line_event("with a system"),
                               "log_system": "RelayServer,1,127.0.0.1"}),
    ("flattened for JSON", lambda: eventFromJSON(eventAsJSON(line_event("json")))),
    ("Twisted's own", lambda: emitted(lambda logger: logger.info(
        "Starting factory {f!r}", f=object))[0]),
    ("a traceback", failure_event),
    ("no time", lambda: {key: value for key, value in line_event("t").items()
                         if key != "log_time"}),
]


@pytest.mark.parametrize("make", [make for _, make in EVENTS],
                         ids=[name for name, _ in EVENTS])
def test_lines_are_twisteds(make: Any) -> None:
    events = [make(), make()]
    ours = as_text(logs.text_observer, events)

    assert ours == as_text(textFileLogObserver, events)
    assert ours  # something was written


def test_the_time_is_formatted_again_at_each_second() -> None:
    first = line_event("one")
    later = {**first, "log_time": first["log_time"] + 1.0}
    same = {**first, "log_time": int(first["log_time"]) + 0.999}
    events = [first, same, later, first]

    assert as_text(logs.text_observer, events) == as_text(
        textFileLogObserver, events)


def test_use_text_observer_makes_it_twistds_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import twisted.logger

    monkeypatch.setattr(twisted.logger, "textFileLogObserver",
                        twisted.logger.textFileLogObserver)
    logs.use_text_observer()

    assert twisted.logger.textFileLogObserver is logs.text_observer


def test_a_relayed_line_is_the_same_event() -> None:
    event = line_event("0123: to=<b@c.test> status=sent", "warn",
                       mta_queue_id="0123", mta_worker=2)
    text = logs.line_as_json(event)
    assert text is not None

    back = logs.line_from_json(json.loads(text))

    assert back is not None
    assert back["log_level"] is LogLevel.warn
    assert {key: back[key] for key in back if key.startswith("mta_")} == {
        "mta_line": "0123: to=<b@c.test> status=sent", "mta_event": "test",
        "mta_queue_id": "0123", "mta_worker": 2}
    assert as_text(logs.text_observer, [back]) == as_text(
        textFileLogObserver, [event])


def test_other_events_are_not_relayed_as_lines() -> None:
    assert logs.line_as_json(failure_event()) is None
    assert logs.line_as_json(emitted(lambda logger: logger.info("x"))[0]) is None
    # A field JSON cannot hold: Twisted's form is used instead.
    assert logs.line_as_json(line_event("x", mta_thing=object())) is None
    # Twisted's JSON form is no relayed line.
    assert logs.line_from_json(json.loads(eventAsJSON(line_event("x")))) is None


def test_the_json_log_is_one_json_object_a_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    observer = logs.json_observer()
    observer(line_event("661D1AA4EBFB50000: removed", mta_queue_id="661D1AA4EBFB50000"))
    observer(line_event("second"))

    lines = out.getvalue().splitlines()
    assert [json.loads(line)["mta_line"] for line in lines] == [
        "661D1AA4EBFB50000: removed", "second"]
