"""What the listener answers: its fixed replies, and how one is written.

The replies to MAIL and RCPT that depend on their arguments (syntax,
relaying, sizes) are with those rules in `mta.relaycontrol`; these are the
rest: command syntax and order, STARTTLS, QUIT, the end of DATA, and the
421 replies that end a session (timeouts, too many errors or connections).
"""

from __future__ import annotations

import errno

from mta.reply import Reply

# RFC 2034 puts an enhanced status code on every reply but the greeting and
# the replies to HELO and EHLO; 3xx replies have no class to put one in.

OK = Reply(250, "2.0.0", "Ok")
OK_SENDER = Reply(250, "2.1.0", "Ok")
OK_RECIPIENT = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
BYE = Reply(221, "2.0.0", "Bye")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user; try RCPT to attempt delivery")
HELP = Reply(
    214,
    "2.0.0",
    "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY STARTTLS",
)

BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BARE_NEWLINE_IN_COMMAND = Reply(
    500, "5.5.2", "Error: bare CR or LF in command; lines must end in CRLF"
)
UNKNOWN_COMMAND = Reply(502, "5.5.2", "Error: command not recognized")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available due to local problem")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")

BARE_NEWLINE_IN_DATA = Reply(
    550, "5.6.0", "Message contains bare CR or LF; lines must end in CRLF"
)
QUEUE_WRITE_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")


# Replies that end the session (RFC 5321 3.8: 421 may answer any command
# when the server must close); each names the relay, as Postfix's do.


def timeout_exceeded(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def too_many_errors(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors")


def too_many_connections_from(hostname: str, address: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many connections from {address}")


def too_many_connections(hostname: str) -> Reply:
    # RFC 3463 X.3.2: the system is not accepting network messages now.
    return Reply(
        421, "4.3.2", f"{hostname} Error: too many connections; try again later"
    )


def syntax(usage: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}")


def reply_text(reply: Reply) -> str:
    """``250 2.0.0 Ok``; a reply without an enhanced code has no gap."""
    words = (str(reply.code), reply.dsn, reply.text)
    return " ".join(word for word in words if word)


# A full disk and a full quota are "try later" conditions the client can
# wait out (RFC 3463 X.3.1); any other spool error is a local fault.
_OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def write_error_reply(error: OSError) -> Reply:
    return NO_STORAGE if error.errno in _OUT_OF_SPACE else QUEUE_WRITE_ERROR
