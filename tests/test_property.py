"""Random clients against the listener (hypothesis), in memory over a real
spool.

Each example is one session: random commands (known verbs with random
arguments, control and 8-bit bytes), addresses made of the characters that
hide routes (``@ % ! : " \\ . [ ]``, case), DATA bodies (dots, bare CR and
LF, binary), the whole cut into random reads, then a half-close or a lost
connection.  What must hold for every one:

- no exception, and nothing logged as a failure or an error;
- every reply line is ``^\\d{3}[ -]`` and printable ASCII, ending in CRLF;
- a 421 is the last thing said, and the connection is closed;
- every complete command line got exactly one reply, in order;
- the spool holds only complete messages: ``tmp/`` is empty once the
  connection is gone, each queued pair loads and its size matches;
- every message that got 250 holds exactly the bytes that were sent
  (dot-stuffing removed) after our Received header, and nothing else was
  queued.

The last two are checked against a reading of the input independent of the
server: a message starts where a command got 354 and ends at the first
CRLF.CRLF, whose CRLF may be the DATA line's own.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from tests.serverharness import Server, queued_id

REPLY_LINE = re.compile(rb"\d{3}[ -][\x20-\x7e]*")

# --- what a client may send ------------------------------------------------------

VERBS = [
    b"EHLO",
    b"HELO",
    b"MAIL",
    b"RCPT",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY",
    b"HELP",
    b"EXPN",
    b"AUTH",
    b"BDAT",
    b"STARTTLS",
    b"ehlo",
    b"Rcpt",
    b"MAIL FROM:",
    b"RCPT TO:",
]
NASTY_BYTES = st.binary(max_size=12) | st.sampled_from(
    [b"\x00", b"\r", b"\n", b"\x1b[0m", b"\xc3\xa9", b"\xff", b" ", b"\t", b"<", b">"]
)
ARGUMENT = st.lists(
    NASTY_BYTES | st.text("aZ09.-=<>@ ", max_size=10).map(str.encode), max_size=4
).map(b"".join)

LOCAL_PART = st.text('@%!:"\\.[]aAzZ0-_ ', max_size=12)
DOMAIN = st.sampled_from(
    [
        "example.com",
        "EXAMPLE.COM",
        "Example.Com.",
        "example.com.",
        "[127.0.0.1]",
        "[IPv6:::1]",
        "other.example",
        "sub.example.com",
        "",
        "[example.com]",
    ]
)
ADDRESS = st.one_of(
    st.builds("{}@{}".format, LOCAL_PART, DOMAIN),
    st.builds("@{}:{}@{}".format, DOMAIN, LOCAL_PART, DOMAIN),  # source route
    LOCAL_PART,
    st.sampled_from(
        [
            "a@example.com",
            "B@Example.COM",
            "postmaster",
            "Postmaster",
            '"a@b"@example.com',
            "a%b@example.com",
            "b!a@example.com",
            "",
        ]
    ),
).map(lambda address: address.encode("utf-8"))
PARAMETERS = st.sampled_from(
    [
        b"",
        b" SIZE=100",
        b" SIZE=99999999999",
        b" SIZE=",
        b" BODY=8BITMIME",
        b" BODY=7BIT",
        b" BODY=BINARYMIME",
        b" XFOO=1",
        b" NOTIFY=NEVER",
        b" SMTPUTF8",
        b"  SIZE=1 SIZE=2",
    ]
)
LINE_END = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b""])


@st.composite
def command(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["verb", "mail", "rcpt", "long"]))
    if kind == "verb":
        line = draw(st.sampled_from(VERBS)) + draw(ARGUMENT)
    elif kind == "mail":
        line = b"MAIL FROM:<" + draw(ADDRESS) + b">" + draw(PARAMETERS)
    elif kind == "rcpt":
        line = b"RCPT TO:<" + draw(ADDRESS) + b">" + draw(PARAMETERS)
    else:
        line = b"NOOP " + b"x" * draw(st.integers(2030, 2060))
    return line + draw(LINE_END)


BODY_LINE = st.one_of(
    st.binary(max_size=30),
    st.sampled_from(
        [
            b"",
            b".",
            b"..",
            b".x",
            b"\r",
            b"\n",
            b"\r\n.",
            b".\r",
            b"Received: from loop",
            b"\x00\xff",
            b"Subject: hi",
        ]
    ),
)


@st.composite
def message(draw: Any) -> bytes:
    """A transaction and its DATA, mostly well-formed, sometimes not."""
    start = b""
    if draw(st.integers(0, 4)):  # mostly with a transaction that can succeed
        start = (
            b"MAIL FROM:<s@client.example>\r\n"
            + b"".join(
                b"RCPT TO:<" + draw(ADDRESS) + b">\r\n"
                for _ in range(draw(st.integers(0, 2)))
            )
            + b"RCPT TO:<a@example.com>\r\n"
        )
    lines = draw(st.lists(BODY_LINE, max_size=8))
    stuff = draw(st.booleans())
    body = b"".join(
        (b"." + line if stuff and line.startswith(b".") else line) + b"\r\n"
        for line in lines
    )
    return start + b"DATA\r\n" + body + b".\r\n"


SESSION = st.tuples(
    st.integers(0, 4).map(bool),  # EHLO first, mostly
    st.lists(st.one_of(command(), message(), message()), max_size=10),
    st.booleans(),  # QUIT last
)


# --- the reading of the input the server must agree with -----------------------


def reply_groups(output: bytes) -> list[bytes]:
    """The final line of each reply; checks the form of every line."""
    assert output == b"" or output.endswith(b"\r\n"), output[-80:]
    lines = output.split(b"\r\n")[:-1]
    finals = []
    for line in lines:
        assert REPLY_LINE.fullmatch(line), line
        if line[3:4] == b" ":
            finals.append(line)
    assert not lines or lines[-1][3:4] == b" ", lines[-1]
    return finals


def is_our_header_then(message: bytes, body: bytes) -> bool:
    """Whether ``message`` is our Received header, then ``body`` exactly.
    The header is its first line and the lines folded onto it with a tab
    (a quoted recipient may hold "; "); a body whose own first line begins
    with a tab reads as folded too, so the body is cut from the end."""
    head = message[: len(message) - len(body)]
    lines = head.split(b"\r\n")
    return (
        message.endswith(body)
        and head.startswith(b"Received: from ")
        and lines[-1] == b""
        and all(line.startswith(b"\t") for line in lines[1:-1])
    )


def unstuffed(raw: bytes) -> bytes:
    lines = raw.split(b"\r\n")[:-1]
    return b"".join(
        (line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines
    )


def messages_sent(
    stream: bytes, read_ends: list[int], replies: list[bytes]
) -> list[tuple[bytes, bytes]]:
    """Pair each complete command line with its reply; for each command that
    got 354, the reply at its end and the message as sent."""
    position, index, messages = 0, 0, []
    while index < len(replies):
        end = stream.find(b"\r\n", position)
        if end < 0:
            break
        reply = replies[index]
        index += 1
        position = end + 2
        if reply.startswith(b"354"):
            stop = stream.find(b"\r\n.\r\n", end)
            assert stop >= 0 and index < len(replies), "no end of data"
            messages.append((replies[index], unstuffed(stream[position : stop + 2])))
            index += 1
            position = stop + 5
        elif reply.startswith(b"220"):
            # STARTTLS: whatever followed in the same read is discarded.
            position = min(edge for edge in read_ends if edge >= position)
        if reply[:3] in (b"221", b"421"):
            break
        if index < len(replies) and replies[index].startswith(b"421"):
            index += 1  # too many errors: the session ends here
            break
    assert index == len(replies), (index, replies)
    return messages


# --- the property ------------------------------------------------------------------


def cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({point % (len(stream) + 1) for point in cuts}), len(stream)]
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    session=SESSION,
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
    errors=st.sampled_from([3, 20, 10**6, 10**6]),
    message_size=st.sampled_from([60, 2 * 1024 * 1024, 2 * 1024 * 1024]),
    half_close=st.booleans(),
)
# A body whose first line begins with a tab reads as folded onto our
# Received header (found by this test).
@example(
    session=(True, [b"MAIL FROM:<s@client.example>\r\nRCPT TO:<a@example.com>\r\n"
                    b"DATA\r\n\t\r\n.\r\n"], False),
    cuts=[], errors=3, message_size=60, half_close=False,
)
def test_random_sessions(
    session: tuple[bool, list[bytes], bool],
    cuts: list[int],
    errors: int,
    message_size: int,
    half_close: bool,
) -> None:
    ehlo, steps, quit_ = session
    stream = (b"EHLO client.example\r\n" if ehlo else b"") + b"".join(steps)
    stream += b"QUIT\r\n" if quit_ else b""
    reads = cut(stream, cuts)

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        with tempfile.TemporaryDirectory() as folder:
            run_session(
                Path(folder), stream, reads, errors, message_size, half_close, events
            )
    finally:
        globalLogPublisher.removeObserver(events.append)


def run_session(
    folder: Path,
    stream: bytes,
    reads: list[bytes],
    errors: int,
    message_size: int,
    half_close: bool,
    events: list[dict[str, Any]],
) -> None:
    server = Server(folder)
    server.set_limits(errors=errors, message_size=message_size)
    session = server.connect()
    for read in reads:
        session.protocol.dataReceived(read)
    if half_close:
        session.protocol.readConnectionLost()
    output = session.transport.value()
    ended = session.transport.disconnecting
    session.close()

    assert not any(event.get("log_failure") for event in events)
    assert not {event["log_level"].name for event in events if "log_level" in event} & {
        "error",
        "critical",
    }

    replies = reply_groups(output)
    if any(reply.startswith(b"421") for reply in replies):
        assert replies[-1].startswith(b"421") and ended
    if half_close:
        assert ended

    read_ends = [sum(map(len, reads[: count + 1])) for count in range(len(reads))]
    sent = messages_sent(stream, read_ends, replies)
    queued = []
    for reply, body in sent:
        if reply.startswith(b"250"):
            queue_id = queued_id(reply.decode("ascii"))
            assert is_our_header_then(server.message(queue_id), body)
            queued.append(queue_id)

    # What the examples reached (pytest --hypothesis-show-statistics).
    event(f"messages queued: {min(len(queued), 3)}{'+' if len(queued) > 2 else ''}")
    event(f"messages refused: {min(len(sent) - len(queued), 2)}")
    for code in (b"421", b"220", b"221"):
        if any(reply.startswith(code) for reply in replies):
            event(f"a {code.decode()} reply")

    spool = server.spool
    assert list(spool.tmp.iterdir()) == []
    assert sorted(spool.queue_ids()) == sorted(queued)
    assert len(list(spool.queue.iterdir())) == len(queued)  # one file each
    for queue_id in queued:
        envelope = spool.load(queue_id)
        assert len(spool.read_message(envelope)) == envelope.size
