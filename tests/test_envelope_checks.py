"""The envelope's checks, made once (`mta.envelope.checked_json`) for both
`from_json` and the readers that need no `Envelope` (`mta queue list`):
what is refused and the words for it, what is filled in for an older
file, and the JSON form that `queue list --json` prints."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pytest

from mta import envelope as env
from mta.envelope import checked_json, from_checked, from_json, in_field_order, to_json
from tests.test_spool import sample


def form() -> dict[str, Any]:
    """The JSON form of `sample`, as a spool file holds it."""
    return json.loads(to_json(sample()))


def refused(data: dict[str, Any]) -> str:
    """The error of both readers, which must agree."""
    text = json.dumps(data).encode()
    with pytest.raises(ValueError) as by_envelope:
        from_json(text)
    with pytest.raises(ValueError) as by_form:
        checked_json(text)
    assert str(by_envelope.value) == str(by_form.value)
    return str(by_envelope.value)


def changed(*steps: tuple[tuple[Any, ...], Any]) -> dict[str, Any]:
    data = form()
    for path, value in steps:
        target = data
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return data


# The words are those of the checks before they were made fast (each
# field in turn): a listing shows them for each unreadable message.
REFUSALS = [
    ((("arrival",), True), "envelope.arrival has a bad value True"),
    ((("arrival",), float("nan")), "envelope.arrival has a bad value nan"),
    ((("size",), False), "envelope.size has a bad value False"),
    ((("size",), 1.0), "envelope.size has a bad value 1.0"),
    ((("queue_id",), "0000000000001abcd"),
     "envelope.queue_id has a bad value '0000000000001abcd'"),
    ((("sender",), "a\r\nRSET"), "envelope.sender has a bad value 'a\\r\\nRSET'"),
    ((("client",), None), "client is not an object"),
    ((("client",), []), "client is not an object"),
    ((("client", "tls"), "TLSv1.3"), "tls is not an object"),
    ((("client", "tls", "bits"), True), "tls.bits has a bad value True"),
    ((("client", "tls", "bits"), -1), "tls.bits has a bad value -1"),
    ((("client", "helo"), None), "client.helo has a bad value None"),
    ((("recipients",), {}), "envelope.recipients has a bad value {}"),
    ((("recipients",), []), "envelope.recipients has a bad value []"),
    ((("recipients", 0), "a@b"), "recipient is not an object"),
    ((("recipients", 0, "address"), "<a@b>"),
     "recipient.address has a bad value '<a@b>'"),
    ((("recipients", 0, "address"), "a\x00b"),
     "recipient.address has a bad value 'a\\x00b'"),
    ((("recipients", 0, "state"), ["pending"]),
     "recipient.state has a bad value ['pending']"),
    ((("recipients", 0, "history"), {}), "recipient.history has a bad value {}"),
    ((("recipients", 0, "history", 0), None), "attempt is not an object"),
    ((("recipients", 0, "history", 0, "status"), "queued"),
     "attempt.status has a bad value 'queued'"),
    ((("recipients", 0, "history", 0, "tls"), {"protocol": "x"}),
     "'tls lacks cipher'"),
    ((("recipients", 0, "history", 0, "connected"), 0),
     "attempt.connected has a bad value 0"),
    ((("recipients", 0, "extra_field"), 1),
     "\"recipient has unknown fields ['extra_field']\""),
    ((("recipients", 1, "next_attempt"), float("inf")),
     "recipient.next_attempt has a bad value inf"),
    ((("extra",), []), "envelope.extra has a bad value []"),
    ((("body",), None), "envelope.body has a bad value None"),
    ((("hold",), 1), "envelope.hold has a bad value 1"),
    ((("delay_notified",), None), "envelope.delay_notified has a bad value None"),
]


@pytest.mark.parametrize(("step", "words"), REFUSALS,
                         ids=[words for _, words in REFUSALS])
def test_a_bad_field_is_refused_with_its_name(
    step: tuple[tuple[Any, ...], Any], words: str
) -> None:
    assert refused(changed(step)) == f"not a valid envelope: {words}"


def test_of_several_bad_fields_the_first_is_named() -> None:
    # sender comes before size in the envelope's fields.
    data = changed((("size",), -5), (("sender",), "<x>"))
    assert refused(data) == ("not a valid envelope: envelope.sender has a bad "
                             "value '<x>'")


def test_a_missing_field_and_a_version_are_named() -> None:
    data = form()
    del data["version"]
    assert refused(data) == "not a valid envelope: 'envelope lacks version'"
    data = form()
    del data["recipients"][0]["state"]
    assert refused(data) == "not a valid envelope: 'recipient lacks state'"
    assert refused(changed((("version",), 2))) == (
        "unknown envelope format version 2")


def test_a_number_too_big_for_a_float_is_refused_not_a_crash() -> None:
    assert refused(changed((("arrival",), 10 ** 400))) == (
        "not a valid envelope: int too large to convert to float")


@pytest.mark.parametrize("char", ["<", ">", "\r", "\n", "\x00", "\x1f", "\x7f"])
def test_an_address_with_a_forbidden_character_is_refused(char: str) -> None:
    for path in (("sender",), ("recipients", 2, "address")):
        assert "has a bad value" in refused(changed((path, f"a{char}b@c")))


@pytest.mark.parametrize("char", ["\x80", "\x85", "\u2028", "é", "\U0001F600"])
def test_other_characters_are_let_through(char: str) -> None:
    # The rule is the listener's: only "<", ">", C0 controls and DEL, and a
    # space outside quotes (it would split the RCPT argument).
    data = changed((("sender",), f"a{char}b@c"),
                   (("recipients", 2, "address"), f"d{char}e@f"))
    envelope = from_json(json.dumps(data).encode())
    assert envelope.sender == f"a{char}b@c"
    assert envelope.recipients[2].address == f"d{char}e@f"


@pytest.mark.parametrize("address", [
    "nobody", "x@", "@example.com", "x@outside.test NOTIFY=NEVER",
    "a b@c", "a@b c", '"unclosed@c', "a@b@c",
])
def test_what_no_listener_writes_is_refused(address: str) -> None:
    # A hand-edited envelope must not put a parameter, or no domain, into
    # the RCPT command the relay sends.
    for path in (("sender",), ("recipients", 2, "address")):
        assert "has a bad value" in refused(changed((path, address)))


@pytest.mark.parametrize("address", [
    '"john smith"@example.com', '"a@b"@example.com', "u@[127.0.0.1]",
    "u@[IPv6:2001:db8::1]", "postmaster@example.com",
])
def test_what_a_listener_writes_is_read(address: str) -> None:
    data = changed((("recipients", 2, "address"), address))
    assert from_json(json.dumps(data).encode()).recipients[2].address == address


def test_the_null_sender_is_read() -> None:
    assert from_json(json.dumps(changed((("sender",), ""))).encode()).sender == ""


@pytest.mark.parametrize(("path", "value"), [
    (("arrival",), 1e300), (("arrival",), -1.0),
    (("recipients", 0, "next_attempt"), 1e300),
])
def test_a_time_no_calendar_can_show_is_refused(
    path: tuple[Any, ...], value: float
) -> None:
    # Hand-edited to 1e300, it used to crash the queue runner and every
    # `mta queue list`: now the envelope is damaged, and moved aside.
    assert "has a bad value" in refused(changed((path, value)))


def test_any_encoding_json_reads_is_read_the_same() -> None:
    text = json.dumps(form(), ensure_ascii=False)
    for data in (text.encode("utf-8"), text.encode("utf-8-sig"),
                 text.encode("utf-16"), to_json(sample())):
        assert from_json(data) == sample()


def test_a_file_before_the_later_fields_has_them_filled_in() -> None:
    data = form()
    del data["delay_notified"]
    del data["client"]["user"]
    for recipient in data["recipients"]:
        del recipient["notified"]
    raw = checked_json(json.dumps(data).encode())

    assert raw["delay_notified"] is False
    assert raw["client"]["user"] is None
    assert [r["notified"] for r in raw["recipients"]] == [False] * 3
    assert from_checked(raw) == sample()


def test_the_checked_form_is_the_envelope_as_asdict_has_it() -> None:
    """What `queue list --json` prints, without an Envelope: the same
    keys, values and key order as `asdict` of the Envelope."""
    data = to_json(sample())
    ordered = in_field_order(checked_json(data))

    assert "version" not in ordered
    assert json.dumps(ordered) == json.dumps(asdict(from_json(data)))


def test_checked_json_and_from_json_agree_on_a_damaged_file() -> None:
    data = to_json(sample())
    for end in range(0, len(data) - 2, 7):
        with pytest.raises(ValueError) as whole:
            from_json(data[:end])
        with pytest.raises(ValueError) as checked:
            checked_json(data[:end])
        assert str(checked.value) == str(whole.value)


def test_is_queue_id_is_unchanged() -> None:
    assert env.is_queue_id("0000000000001ABCD")
    assert not env.is_queue_id("0000000000001abcd")
    assert not env.is_queue_id(17)
    assert not env.is_queue_id("")


def test_the_envelope_is_parsed_as_json_loads_parses_it() -> None:
    """`checked_json` calls the decoder itself: the same values, and for a
    damaged file the same words, as json.loads."""
    data = to_json(sample())
    texts = [data, data.rstrip(b"\n"), data + b"\r\n", data + b" \t",
             data + b"{}", data.rstrip(b"\n") + b" 1\n",
             *(data[:end] for end in range(1, len(data), 11))]
    for text in texts:
        try:
            expected = json.loads(text)
        except json.JSONDecodeError as error:
            with pytest.raises(ValueError) as refusal:
                checked_json(text)
            assert str(refusal.value) == f"not a valid envelope: {error}"
        else:
            del expected["version"]
            assert checked_json(text) == expected


def test_an_unknown_field_is_named_though_a_later_one_is_missing() -> None:
    # As many fields as there should be, one of them unknown; and one
    # more than there should be once the missing later one is filled in.
    data = form()
    del data["client"]["user"]
    data["client"]["nickname"] = "x"
    assert refused(data) == (
        "not a valid envelope: \"client has unknown fields ['nickname']\"")
    data = form()
    del data["delay_notified"]
    data["bogus"] = 1
    assert refused(data) == (
        "not a valid envelope: \"envelope has unknown fields ['bogus']\"")
