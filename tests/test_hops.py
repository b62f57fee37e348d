"""Counting Received headers in the header section, however it is split."""

from __future__ import annotations

import pytest

from mta.hops import HEAD_LIMIT, HopCounter

MESSAGE = (b"Received: from a\r\n\tby b\r\nRECEIVED : x\r\nX-Received: no\r\n"
           b"Subject: received: no\r\n\r\nReceived: in the body\r\n")


@pytest.mark.parametrize("split", range(1, len(MESSAGE)))
def test_count_is_the_same_wherever_the_data_is_split(split: int) -> None:
    counter = HopCounter()
    counter.feed(MESSAGE[:split])
    counter.feed(MESSAGE[split:])
    assert counter.count == 2


def test_no_header_section() -> None:
    counter = HopCounter()
    counter.feed(b"\r\nReceived: body\r\n")
    assert counter.count == 0


def test_a_huge_header_section_is_read_only_to_the_limit() -> None:
    counter = HopCounter()
    line = b"Received: x\r\n"
    for _ in range(HEAD_LIMIT // len(line) + 100):
        counter.feed(line)
    assert counter.count <= HEAD_LIMIT // len(line) + 1
