"""Putting a bounce or delay notice into the spool as a new message.

Blocking (file reads, fsync): the queue runner calls `write_notice` in a
thread.  The notice is committed like a received message (`MessageWriter`),
so once this returns it survives a crash; the caller then marks the
original's recipients as notified.  A crash between the two makes the
notice again at the next run: at worst a duplicate, never a lost one.
"""

from __future__ import annotations

from mta.config import Config
from mta.dsn import HEADER_LIMIT, ReportContext, build_report, header_section
from mta.envelope import Envelope
from mta.notices import Notice, notice_envelope
from mta.spool import Spool


def read_headers(spool: Spool, original: Envelope) -> bytes:
    """The original's header section (with our Received header), from the
    start of its spool file (never past the message: its envelope follows
    it in the file)."""
    with open(spool.message_path(original.queue_id), "rb") as stream:
        return header_section(stream.read(min(HEADER_LIMIT, original.size)))


def write_notice(
    spool: Spool, original: Envelope, notice: Notice, config: Config,
    now: float,
) -> Envelope:
    """Commit the notice as a new message; its envelope.  Raises `OSError`
    (a full disk, an unreadable original) with nothing left behind."""
    headers = read_headers(spool, original)
    writer = spool.new_message()
    try:
        context = ReportContext(config.hostname, writer.queue_id, now,
                                config.delivery.max_lifetime)
        writer.write(build_report(notice, original, headers, context))
        envelope = notice_envelope(notice, original, writer.queue_id,
                                   writer.size, config.hostname, now)
        writer.commit(envelope)
    except BaseException:
        writer.abort()
        raise
    return envelope
