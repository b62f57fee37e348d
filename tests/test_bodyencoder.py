"""The streaming body encoder: tables, every split point, random bodies."""

from __future__ import annotations

import random
import re

import pytest

from mta.bodyencoder import BodyEncoder, encode_body


def encode_in_chunks(body: bytes, cuts: list[int]) -> bytes:
    encoder = BodyEncoder()
    edges = [0, *sorted(cuts), len(body)]
    wire = b"".join(encoder.encode(body[a:b]) for a, b in zip(edges, edges[1:]))
    return wire + encoder.finish()


def unstuff(wire: bytes) -> bytes:
    """A reference receiver (RFC 5321 4.5.2): lines up to the "." line,
    each with one leading dot removed; the wire must be clean CRLF."""
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None, "bare CR or LF"
    assert wire.endswith(b".\r\n")
    lines = wire.split(b"\r\n")
    end = lines.index(b".")
    assert end == len(lines) - 2, "the message ends early"
    body = [line[1:] if line.startswith(b".") else line for line in lines[:end]]
    return b"".join(line + b"\r\n" for line in body)


def canonical(body: bytes) -> bytes:
    """What a message should arrive as: CRLF line ends, a last line end."""
    text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text.replace(b"\n", b"\r\n")


TABLE = [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"..\r\n", b"...\r\n.\r\n"),
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b".a\r\n.b", b"..a\r\n..b\r\n.\r\n"),
    (b"a.b\r\n", b"a.b\r\n.\r\n"),
    (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    (b"a\rb\r", b"a\r\nb\r\n.\r\n"),
    (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
    (b"a\n\rb", b"a\r\n\r\nb\r\n.\r\n"),
    (b"\n.\n", b"\r\n..\r\n.\r\n"),
    (b"\r.\r", b"\r\n..\r\n.\r\n"),
]


@pytest.mark.parametrize("body, wire", TABLE)
def test_table(body: bytes, wire: bytes) -> None:
    assert encode_body(body) == wire


@pytest.mark.parametrize("body, wire", TABLE)
def test_every_split_of_table_bodies(body: bytes, wire: bytes) -> None:
    """A CRLF, a CR, a dot: none depends on where a chunk ends."""
    for first in range(len(body) + 1):
        for second in range(first, len(body) + 1):
            assert encode_in_chunks(body, [first, second]) == wire, (first, second)


def test_empty_chunks_change_nothing() -> None:
    encoder = BodyEncoder()
    pieces = [b"a\r", b"", b"\n", b"", b".", b""]
    wire = b"".join(encoder.encode(piece) for piece in pieces) + encoder.finish()
    assert wire == b"a\r\n..\r\n.\r\n"


def test_lf_after_split_crlf_is_eaten_once() -> None:
    """The LF that completes a CR is dropped once, not every LF after."""
    encoder = BodyEncoder()
    wire = b"".join(encoder.encode(piece) for piece in [b"a\r", b"\n", b"\n"])
    assert wire + encoder.finish() == b"a\r\n\r\n.\r\n"


STOCK_CHUNK = 16384  # twisted.protocols.basic.FileSender.CHUNK_SIZE


def dots_at_chunk_starts(line_end: bytes, chunks: int) -> bytes:
    """A body of ``chunks`` pieces of 16384 bytes, each beginning with a
    lone "." line: at offset 0 (the first line) and at every offset where
    Twisted's FileSender starts a chunk, and so at each 64 KiB too."""
    dot = b"." + line_end
    width = 64  # filler lines, line end included
    room = STOCK_CHUNK - len(dot)
    filler = (b"y" * (width - len(line_end)) + line_end) * (room // width)
    rest = room % width
    if rest:
        filler += b"y" * (rest - len(line_end)) + line_end
    body = (dot + filler) * chunks
    for k in range(chunks):
        start = k * STOCK_CHUNK
        assert body[start:start + len(dot)] == dot
        assert k == 0 or body[start - len(line_end):start] == line_end
    return body


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_dots_at_chunk_boundaries(line_end: bytes) -> None:
    """The stock client's fault (TWISTED-NOTES): a "." line that starts a
    16 KiB chunk goes out unstuffed and ends the message early.  Here each
    chunk the body is cut into starts with one, the first line too."""
    body = dots_at_chunk_starts(line_end, 5)
    cuts = list(range(0, len(body), STOCK_CHUNK))

    wire = encode_in_chunks(body, cuts)

    assert unstuff(wire) == canonical(body)
    assert wire == encode_body(body)
    assert wire.count(b"\r\n.\r\n") == 1  # the terminator, at the end


def test_crlf_body_round_trips() -> None:
    body = b"Subject: x\r\n\r\n.\r\n..\r\n. \r\nend\r\n"
    assert unstuff(encode_body(body)) == body


ALPHABET = b".\r\nab"


@pytest.mark.parametrize("seed", range(40))
def test_random_bodies_any_chunking(seed: int) -> None:
    """Property: any chunking gives the one-go result, and a receiver
    that unstuffs gets the body back with CRLF line ends."""
    rng = random.Random(seed)
    body = bytes(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 300)))
    whole = encode_body(body)
    assert unstuff(whole) == canonical(body)
    assert b"\r\r\n" not in whole

    for _ in range(20):
        cuts = [rng.randrange(0, len(body) + 1) for _ in range(rng.randrange(1, 8))]
        assert encode_in_chunks(body, cuts) == whole, cuts


def test_every_single_split_of_a_random_body() -> None:
    rng = random.Random(7)
    body = bytes(rng.choice(ALPHABET) for _ in range(400))
    whole = encode_body(body)
    for cut in range(len(body) + 1):
        assert encode_in_chunks(body, [cut]) == whole, cut
