"""Logging to syslog: ``twistd --logger mta.syslogobserver.observer mta``.

twistd's own ``--syslog`` works with our events, but sends every line as
``user.info``: a warning or an error cannot be told apart by priority, and
mail logs are not where a postmaster looks for them.  This observer sends
each line as Postfix does: ident ``mta`` with the process id, facility
``mail``, and the priority of the event's level.  The text is the same
line the standard output shows, without the timestamp (syslog adds its own).
"""

from __future__ import annotations

import syslog
from typing import Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import provider

IDENT = "mta"

PRIORITIES = {
    LogLevel.debug: syslog.LOG_DEBUG,
    LogLevel.info: syslog.LOG_INFO,
    LogLevel.warn: syslog.LOG_WARNING,
    LogLevel.error: syslog.LOG_ERR,
    LogLevel.critical: syslog.LOG_CRIT,
}


def observer() -> ILogObserver:
    """The factory ``twistd --logger`` calls."""
    syslog.openlog(IDENT, syslog.LOG_PID, syslog.LOG_MAIL)
    return emit


@provider(ILogObserver)
def emit(event: dict[str, Any]) -> None:
    priority = PRIORITIES.get(event.get("log_level", LogLevel.info),
                              syslog.LOG_INFO)
    for line in event_lines(event):
        syslog.syslog(priority, line)


def event_lines(event: dict[str, Any]) -> list[str]:
    """What one event says, a line per syslog message: ours as they are,
    others (Twisted's) after their namespace, a traceback line by line."""
    text = event.get("mta_line")
    if text is None:
        text = f"[{event.get('log_namespace', '-')}] {formatEvent(event)}"
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[:1] + ["\t" + line for line in lines[1:]]
