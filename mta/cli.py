"""The ``mta`` command: check the configuration, make a certificate for a
test set-up, and look at the spool."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from mta.config import ConfigError, default_config_path, load_config
from mta.spool import Spool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mta", description=__doc__)
    parser.add_argument(
        "--config", type=Path, default=None,
        help="the configuration file (default etc/mta.yaml)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check-config", help="check the configuration")
    commands.add_parser(
        "make-cert",
        help="write a self-signed certificate and key where tls.certificate "
        "and tls.private_key point, unless they exist",
    )
    queue = commands.add_parser("queue", help="look at the spool")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)
    listing = queue_commands.add_parser("list", help="list queued messages")
    listing.add_argument("--json", action="store_true", help="JSON output")
    show = queue_commands.add_parser("show", help="show one message")
    show.add_argument("queue_id")

    args = parser.parse_args(argv)
    config_path = args.config or default_config_path()
    handler = {
        "check-config": check_config,
        "make-cert": make_cert,
        "queue": queue_command,
    }[args.command]
    return handler(config_path, args)


def check_config(path: Path, args: argparse.Namespace) -> int:
    try:
        load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem)
        return 1
    print(f"{path}: ok")
    return 0


def make_cert(path: Path, args: argparse.Namespace) -> int:
    from mta.selfsigned import write_self_signed

    try:
        config = load_config(path, check_tls=False)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    tls = config.tls
    if tls.certificate.exists() and tls.private_key.exists():
        print(f"{tls.certificate}: exists, left as it is")
        return 0
    write_self_signed(config.hostname, tls.certificate, tls.private_key)
    print(f"{tls.certificate}: self-signed certificate for {config.hostname} "
          f"written (key: {tls.private_key})")
    return 0


def queue_command(path: Path, args: argparse.Namespace) -> int:
    try:
        config = load_config(path, check_tls=False)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    spool = Spool(config.spool)
    if args.queue_command == "show":
        try:
            envelope = spool.load(args.queue_id)
        except FileNotFoundError:
            print(f"mta: {args.queue_id}: no such message in {spool.queue}",
                  file=sys.stderr)
            return 1
        print(json.dumps(asdict(envelope), indent=2))
        return 0

    envelopes = list(spool.envelopes())
    if args.json:
        print(json.dumps([asdict(envelope) for envelope in envelopes], indent=2))
        return 0
    for envelope in envelopes:
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(
            envelope.arrival))
        hold = "!" if envelope.hold else " "
        print(f"{envelope.queue_id}{hold} {envelope.size:>9} {arrival}  "
              f"<{envelope.sender}>")
        for recipient in envelope.recipients:
            reason = f" ({recipient.reason})" if recipient.reason else ""
            print(f"    {recipient.state:<9} <{recipient.address}>{reason}")
    print(f"-- {len(envelopes)} message(s) in {spool.queue}")
    return 0
