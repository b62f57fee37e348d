"""SMTP replies as values: a table of what a peer said -> code, enhanced
status code (RFC 3463) and text."""

from __future__ import annotations

import pytest

from mta.reply import Reply

PARSE_CASES = [
    # (code, text as received, enhanced code, text kept)
    (250, "2.0.0 Ok: queued as 4F2A", "2.0.0", "Ok: queued as 4F2A"),
    (550, "5.7.1 <a@example.com>: Relay access denied", "5.7.1",
     "<a@example.com>: Relay access denied"),
    (452, "4.2.2 Mailbox full", "4.2.2", "Mailbox full"),
    (250, "2.1.5", "2.1.5", ""),
    (250, "2.10.100 Ok", "2.10.100", "Ok"),
    # without an enhanced code: derived from the basic code's class
    (250, "Ok", "2.0.0", "Ok"),
    (421, "mx.example.net closing connection", "4.0.0",
     "mx.example.net closing connection"),
    (554, "", "5.0.0", ""),
    (354, "End data with <CR><LF>.<CR><LF>", "3.0.0",
     "End data with <CR><LF>.<CR><LF>"),
    # an enhanced code of another class than the reply's is not one
    (550, "4.7.1 try later", "5.0.0", "4.7.1 try later"),
    (250, "5.0.0 odd", "2.0.0", "5.0.0 odd"),
    # only a whole code counts, and only at the start
    (250, "2.0.0Ok", "2.0.0", "2.0.0Ok"),
    (250, "2.1000.1 Ok", "2.0.0", "2.1000.1 Ok"),
    (550, "Rejected: 5.7.1 policy", "5.0.0", "Rejected: 5.7.1 policy"),
    # white space is folded, as lines of a multi-line reply are joined
    (451, "  4.3.0   Try\r\n  again   later ", "4.3.0", "Try again later"),
]


@pytest.mark.parametrize("code, text, dsn, kept", PARSE_CASES)
def test_parse(code: int, text: str, dsn: str, kept: str) -> None:
    stated = text.split()[:1] == [dsn]
    assert Reply.parse(code, text) == Reply(code, dsn, kept, stated=stated)


@pytest.mark.parametrize(
    "code, text, line",
    [
        (250, "2.0.0 Ok: queued as 4F2A", "250 2.0.0 Ok: queued as 4F2A"),
        # The log and the bounce carry the server's words: a code it did
        # not send is not put in its mouth (the derived one is still the
        # dsn= field).
        (250, "OK queued", "250 OK queued"),
        (550, "no such user", "550 no such user"),
        (550, "Rejected: 5.7.1 policy", "550 Rejected: 5.7.1 policy"),
        (554, "", "554"),
    ],
)
def test_a_parsed_reply_is_logged_as_the_server_said_it(
    code: int, text: str, line: str
) -> None:
    assert Reply.parse(code, text).line() == line


@pytest.mark.parametrize(
    "code, success, temporary, permanent",
    [
        (220, True, False, False),
        (250, True, False, False),
        (354, False, False, False),
        (421, False, True, False),
        (499, False, True, False),
        (500, False, False, True),
        (554, False, False, True),
    ],
)
def test_reply_classes(
    code: int, success: bool, temporary: bool, permanent: bool
) -> None:
    reply = Reply(code, "0.0.0", "")
    assert (reply.is_success, reply.is_temporary, reply.is_permanent) == (
        success, temporary, permanent
    )


@pytest.mark.parametrize(
    "reply, line",
    [
        (Reply(250, "2.0.0", "Ok: queued as 4F2A"), "250 2.0.0 Ok: queued as 4F2A"),
        (Reply(250, "2.1.5", ""), "250 2.1.5"),
    ],
)
def test_a_reply_is_written_as_the_log_shows_it(reply: Reply, line: str) -> None:
    assert reply.line() == line
    assert str(reply) == line


def test_multiline_reply_keeps_the_enhanced_code_once() -> None:
    """RFC 2034 repeats the code on each line; the text keeps it once."""
    reply = Reply.parse_lines(
        550, ["5.7.1 Service unavailable;", "5.7.1 client blocked", "see log"]
    )
    assert reply == Reply(550, "5.7.1",
                          "Service unavailable; client blocked see log")


def test_multiline_reply_without_enhanced_codes() -> None:
    reply = Reply.parse_lines(421, ["mx.example busy", "try later"])
    assert reply == Reply(421, "4.0.0", "mx.example busy try later",
                          stated=False)
    assert reply.line() == "421 mx.example busy try later"
