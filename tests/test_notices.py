"""Which notices a message needs (mta.notices), the envelope fields that
record them (old spools still load), and the `notices:` configuration."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mta.config import ConfigError, Notices, load_config
from mta.envelope import (
    DEFERRED,
    DELIVERED,
    FAILED,
    PENDING,
    Client,
    Envelope,
    Recipient,
    from_json,
    to_json,
)
from mta.notices import (
    BOUNCE_LISTENER,
    DELAY,
    FAILURE,
    POSTMASTER_LISTENER,
    discarded_line,
    is_finished,
    mark_notified,
    notice_envelope,
    notices_due,
    notified_line,
)

ARRIVAL = 1_800_000_000.0
OFF = Notices()
WARN_AFTER_4H = Notices(delay_warning=4 * 3600)
POSTMASTER = Notices(postmaster="postmaster@org.test")


def envelope(*states: str, sender: str = "alice@org.test",
             listener: str = "submission") -> Envelope:
    recipients = tuple(
        Recipient(f"r{index}@dest.test", state=state,
                  dsn="5.1.1" if state == FAILED else None,
                  reason="no such user" if state == FAILED else None)
        for index, state in enumerate(states)
    )
    client = Client("client.test", "unknown", "127.0.0.1", listener)
    return Envelope("0ABC", sender, ARRIVAL, 100, client, recipients)


def addresses(recipients: tuple[Recipient, ...]) -> list[str]:
    return [recipient.address for recipient in recipients]


# --- what needs a notice -------------------------------------------------------

def test_failed_recipients_get_one_bounce_to_the_sender() -> None:
    message = envelope(DELIVERED, FAILED, DEFERRED, FAILED)

    [notice] = notices_due(message, ARRIVAL + 60, OFF)

    assert notice.kind == FAILURE and notice.to == "alice@org.test"
    assert addresses(notice.recipients) == ["r1@dest.test", "r3@dest.test"]
    assert not notice.to_postmaster and notice.listener == BOUNCE_LISTENER


def test_a_reported_failure_is_not_reported_again() -> None:
    message = envelope(FAILED, DEFERRED)
    [notice] = notices_due(message, ARRIVAL, OFF)
    marked = mark_notified(message, notice)

    assert notices_due(marked, ARRIVAL + 60, OFF) == []
    # A later failure of another recipient is a bounce of its own.
    later = marked.with_recipient(replace(marked.recipients[1], state=FAILED))
    [second] = notices_due(later, ARRIVAL + 120, OFF)
    assert addresses(second.recipients) == ["r1@dest.test"]


def test_nothing_to_report_when_all_went_well() -> None:
    assert notices_due(envelope(DELIVERED, DEFERRED, PENDING), ARRIVAL, OFF) == []


def test_mail_from_the_null_sender_never_gets_a_bounce() -> None:
    [notice] = notices_due(envelope(FAILED, sender=""), ARRIVAL, OFF)

    assert notice.to is None
    line = discarded_line(envelope(FAILED, sender=""), notice)
    assert line.startswith("0ABC: bounce discarded: undeliverable mail from "
                           "the null sender <>")
    assert "notices.postmaster is not set" in line
    assert "<r0@dest.test> dsn=5.1.1 (no such user)" in line


def test_mail_from_the_null_sender_goes_to_the_postmaster_when_set() -> None:
    [notice] = notices_due(envelope(FAILED, sender=""), ARRIVAL, POSTMASTER)

    assert notice.to == "postmaster@org.test" and notice.to_postmaster
    assert notice.listener == POSTMASTER_LISTENER


def test_a_failed_notice_to_the_postmaster_is_dropped_never_looped() -> None:
    message = envelope(FAILED, sender="", listener=POSTMASTER_LISTENER)

    [notice] = notices_due(message, ARRIVAL, POSTMASTER)

    assert notice.to is None
    assert "itself a notice to the postmaster" in discarded_line(message, notice)


def test_a_failed_bounce_goes_to_the_postmaster() -> None:
    message = envelope(FAILED, sender="", listener=BOUNCE_LISTENER)

    [notice] = notices_due(message, ARRIVAL, POSTMASTER)

    assert notice.to == "postmaster@org.test"


@pytest.mark.parametrize("settings, age, states, sender, due", [
    (OFF, 5 * 86400, (DEFERRED,), "alice@org.test", False),
    (WARN_AFTER_4H, 4 * 3600 - 1, (DEFERRED,), "alice@org.test", False),
    (WARN_AFTER_4H, 4 * 3600, (DEFERRED,), "alice@org.test", True),
    (WARN_AFTER_4H, 4 * 3600, (PENDING,), "alice@org.test", True),
    (WARN_AFTER_4H, 5 * 3600, (DELIVERED,), "alice@org.test", False),
    (WARN_AFTER_4H, 5 * 3600, (DEFERRED,), "", False),
])
def test_delay_notice(settings: Notices, age: float, states: tuple[str, ...],
                      sender: str, due: bool) -> None:
    message = envelope(*states, sender=sender)

    notices = notices_due(message, ARRIVAL + age, settings)

    assert [n.kind for n in notices] == ([DELAY] if due else [])


def test_one_delay_notice_per_message_for_the_waiting_recipients() -> None:
    message = envelope(DELIVERED, DEFERRED, FAILED)

    bounce, delay = notices_due(message, ARRIVAL + 5 * 3600, WARN_AFTER_4H)
    assert addresses(delay.recipients) == ["r1@dest.test"]
    assert delay.to == "alice@org.test"

    marked = mark_notified(mark_notified(message, bounce), delay)
    assert marked.delay_notified
    assert notices_due(marked, ARRIVAL + 9 * 3600, WARN_AFTER_4H) == []


def test_a_message_is_finished_when_final_and_every_failure_reported() -> None:
    message = envelope(DELIVERED, FAILED)
    [notice] = notices_due(message, ARRIVAL, OFF)

    assert not is_finished(message)
    assert is_finished(mark_notified(message, notice))
    assert is_finished(envelope(DELIVERED))
    assert not is_finished(envelope(DELIVERED, DEFERRED))


def test_the_notice_envelope_is_from_the_null_sender_to_the_sender() -> None:
    message = envelope(FAILED)
    [notice] = notices_due(message, ARRIVAL, OFF)

    made = notice_envelope(notice, message, "0BEEF", 2048, "relay.test",
                           ARRIVAL + 9)

    assert made.sender == "" and made.queue_id == "0BEEF" and made.size == 2048
    assert [r.address for r in made.recipients] == ["alice@org.test"]
    assert made.client.listener == BOUNCE_LISTENER
    assert made.extra == {"notice": FAILURE, "about": "0ABC"}
    assert from_json(to_json(made)) == made


def test_log_lines() -> None:
    [notice] = notices_due(envelope(FAILED), ARRIVAL, OFF)
    assert notified_line("0ABC", notice, "0BEEF") == (
        "0ABC: sender non-delivery notification: 0BEEF")


# --- the envelope: new fields, old spools ---------------------------------------

def test_new_fields_round_trip() -> None:
    message = mark_notified(envelope(FAILED), notices_due(
        envelope(FAILED), ARRIVAL, OFF)[0])
    message = replace(message, delay_notified=True)

    assert from_json(to_json(message)) == message


def test_an_envelope_written_before_the_notice_fields_still_loads() -> None:
    raw = json.loads(to_json(envelope(FAILED, DEFERRED)))
    del raw["delay_notified"]
    for item in raw["recipients"]:
        del item["notified"]

    loaded = from_json(json.dumps(raw).encode())

    assert not loaded.delay_notified
    assert [r.notified for r in loaded.recipients] == [False, False]
    assert loaded.recipients[0].state == FAILED


def test_a_bad_notified_value_is_refused() -> None:
    raw = json.loads(to_json(envelope(FAILED)))
    raw["recipients"][0]["notified"] = "yes"

    with pytest.raises(ValueError, match="notified"):
        from_json(json.dumps(raw).encode())


# --- configuration ---------------------------------------------------------------

def write_config(tmp_path: Path, notices: Any) -> Path:
    config = {
        "hostname": "relay.test",
        "spool": "spool",
        "tls": {"certificate": "relay.crt", "private_key": "relay.key"},
        "listeners": [{"name": "mx", "address": "127.0.0.1", "port": 2525,
                       "role": "inbound"}],
        "notices": notices,
    }
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_notices_default_off_without_postmaster(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, None), check_tls=False)

    assert config.notices == Notices(delay_warning=0.0, postmaster=None)


def test_notices_settings(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"delay_warning": "4h",
                                   "postmaster": "PostMaster@Org.Test"})

    notices = load_config(path, check_tls=False).notices

    assert notices == Notices(4 * 3600.0, "PostMaster@org.test")


@pytest.mark.parametrize("notices, message", [
    ({"delay_warning": "soon"}, "notices.delay_warning: expected a duration"),
    ({"delay_warning": "-1h"}, "notices.delay_warning: expected a duration"),
    ({"postmaster": "postmaster"}, "notices.postmaster: expected an address"),
    ({"postmaster": "a b@org.test"}, "notices.postmaster: expected an address"),
    ({"postmaster": "pm@bad..domain"}, "notices.postmaster:"),
    ({"bounce": True}, "notices.bounce: unknown key; expected one of "
     "delay_warning, postmaster"),
    ("yes", "notices: expected a mapping"),
])
def test_bad_notices_settings(tmp_path: Path, notices: Any, message: str) -> None:
    path = write_config(tmp_path, notices)

    with pytest.raises(ConfigError) as raised:
        load_config(path, check_tls=False)

    assert any(problem.startswith(f"{path.resolve()}: {message}")
               for problem in raised.value.problems), raised.value.problems
