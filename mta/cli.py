"""The ``mta`` command: check the configuration, make a certificate for a
test set-up, and look at the spool."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from mta.config import Config, ConfigError, default_config_path, load_config
from mta.envelope import Envelope
from mta.spool import Spool, SpoolError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = (getattr(args, "config_after", None) or args.config
                   or default_config_path())
    handler = {
        "check-config": check_config,
        "make-cert": make_cert,
        "queue": queue_command,
        "policy": policy_command,
    }[args.command]
    return handler(config_path, args)


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the command, as operators type it.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config", type=Path, dest="config_after", default=argparse.SUPPRESS,
        help="the configuration file (default: etc/mta.yaml)",
    )
    parser = argparse.ArgumentParser(prog="mta", description=__doc__)
    parser.add_argument(
        "--config", type=Path, default=None,
        help="the configuration file (default: etc/mta.yaml)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check-config", parents=[config],
                        help="check the configuration; prints ok or each problem")
    commands.add_parser(
        "make-cert", parents=[config],
        help="write a self-signed certificate and key where tls.certificate "
        "and tls.private_key point, when neither exists",
    )
    queue = commands.add_parser("queue", parents=[config], help="the spool")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)
    listing = queue_commands.add_parser("list", parents=[config],
                                        help="list queued messages")
    listing.add_argument("--json", action="store_true", help="JSON output")
    show = queue_commands.add_parser("show", parents=[config],
                                     help="one message, with its history")
    show.add_argument("queue_id")
    show.add_argument("--json", action="store_true", help="JSON output")
    policy = commands.add_parser("policy", parents=[config], help="TLS policy")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    explain = policy_commands.add_parser(
        "explain", parents=[config],
        help="which rule and level apply to a recipient, and what a "
        "certificate must name",
    )
    explain.add_argument("recipient")
    explain.add_argument(
        "--probe", action="store_true",
        help="also connect to each server now: what it offers, and whether "
        "each level would deliver to it (sends no mail)",
    )
    return parser


def check_config(path: Path, args: argparse.Namespace) -> int:
    try:
        load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem)
        return 1
    print("ok")
    return 0


def make_cert(path: Path, args: argparse.Namespace) -> int:
    from mta.selfsigned import write_self_signed

    config = _load(path, check_tls=False)
    if config is None:
        return 1
    tls = config.tls
    present = [p for p in (tls.certificate, tls.private_key) if p.exists()]
    if len(present) == 2:
        print(f"{tls.certificate}: exists, left as it is")
        return 0
    if present:
        # Half a pair is a mistake to look at, never something to overwrite.
        print(f"mta: {present[0]} exists but its pair does not; nothing "
              "written (move it away or fix tls.certificate/tls.private_key)",
              file=sys.stderr)
        return 1
    write_self_signed(config.hostname, tls.certificate, tls.private_key)
    print(f"{tls.certificate}: self-signed certificate for {config.hostname} "
          f"written (key: {tls.private_key})")
    return 0


def queue_command(path: Path, args: argparse.Namespace) -> int:
    config = _load(path, check_tls=False)
    if config is None:
        return 1
    spool = Spool(config.spool)
    if args.queue_command == "show":
        return _show(spool, args.queue_id, args.json)
    return _list(spool, args.json)


def policy_command(path: Path, args: argparse.Namespace) -> int:
    from mta.explain import explain, probe_lines

    config = _load(path, check_tls=True)
    if config is None:
        return 1
    if "@" not in args.recipient:
        print(f"mta: {args.recipient!r} is not an address (local@domain)",
              file=sys.stderr)
        return 1
    print("\n".join(explain(config, args.recipient)))
    if args.probe:
        print("\n".join(probe_lines(config, args.recipient)))
    return 0


def _load(path: Path, check_tls: bool) -> Config | None:
    try:
        return load_config(path, check_tls=check_tls)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return None


def _list(spool: Spool, as_json: bool) -> int:
    envelopes, bad = spool.scan()
    if as_json:
        print(json.dumps([asdict(envelope) for envelope in envelopes], indent=2))
        return 0
    for envelope in envelopes:
        hold = "!" if envelope.hold else " "
        print(f"{envelope.queue_id}{hold} {envelope.size:>9} "
              f"{_when(envelope.arrival)}  <{envelope.sender}>")
        for recipient in envelope.recipients:
            reason = f" ({recipient.reason})" if recipient.reason else ""
            print(f"    {recipient.state:<9} <{recipient.address}>{reason}")
    for problem in bad:
        print(f"{problem.queue_id}  unreadable: {problem}")
    print(f"-- {len(envelopes)} message(s) in {spool.queue}"
          + (f", {len(bad)} unreadable" if bad else ""))
    return 0


def _show(spool: Spool, queue_id: str, as_json: bool) -> int:
    try:
        envelope = spool.load(queue_id)
    except FileNotFoundError:
        print(f"mta: {queue_id}: no such message in {spool.queue}",
              file=sys.stderr)
        return 1
    except SpoolError as error:
        print(f"mta: {error}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(asdict(envelope), indent=2))
        return 0
    print("\n".join(_describe(envelope)))
    print("headers:")
    print(_headers(spool.message_path(queue_id)))
    return 0


def _describe(envelope: Envelope) -> list[str]:
    client = envelope.client
    lines = [
        f"queue id: {envelope.queue_id}{'  (on hold)' if envelope.hold else ''}",
        f"arrival:  {_when(envelope.arrival)}",
        f"sender:   <{envelope.sender}>",
        f"size:     {envelope.size} ({envelope.body})",
        f"client:   {client.host}[{client.address}] helo={client.helo} "
        f"listener={client.listener} tls={client.tls or 'none'}",
    ]
    for recipient in envelope.recipients:
        due = (f", next attempt {_when(recipient.next_attempt)}"
               if recipient.next_attempt else "")
        lines.append(f"recipient <{recipient.address}>: {recipient.state}{due}")
        for attempt in recipient.history:
            tls = attempt.tls or ("none" if attempt.connected else "-")
            lines.append(
                f"  {_when(attempt.time)} {attempt.status} dsn={attempt.dsn} "
                f"relay={attempt.relay or 'none'} tls={tls} "
                f"trust={attempt.trust or '-'} policy={attempt.policy}"
                + (f" rule={attempt.rule}" if attempt.rule else "")
                + (f" fallback={attempt.fallback}" if attempt.fallback else "")
            )
            lines.append(f"    ({attempt.reply})")
    return lines


def _headers(path: Path) -> str:
    try:
        with open(path, "rb") as stream:
            data = stream.read(64 * 1024)
    except OSError as error:
        return f"  (cannot read {path}: {error.strerror})"
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    return head.decode("utf-8", "replace").replace("\r\n", "\n")


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(seconds))
