"""The ``mta`` command: check the configuration, make a certificate for a
test set-up, look at and steer the spool (mta.queuecli), explain the
TLS policy, keep the users of authenticated submission (mta.userscli)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from mta import queuecli, userscli
from mta.config import (
    Config,
    ConfigError,
    default_config_path,
    load_config,
    spool_setting,
)
from mta.spool import Spool


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = (getattr(args, "config_after", None) or args.config
                   or default_config_path())
    handler = {
        "check-config": check_config,
        "make-cert": make_cert,
        "queue": queue_command,
        "policy": policy_command,
        "users": users_command,
    }[args.command]
    try:
        return handler(config_path, args)
    except BrokenPipeError:
        # The reader stopped early (`mta queue list | head`): as other Unix
        # tools do, stop quietly.  Standard output is pointed at /dev/null
        # so that Python's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


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
    queuecli.add_parser(commands, parents=[config])
    userscli.add_parser(commands, parents=[config])
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
    """Every problem of the file, exit status 1; or "ok", exit status 0,
    then a line "warning: ..." for each thing that works but will not for
    long, or not for every client (mta.certcheck)."""
    # Imported here: cryptography takes a tenth of a second to load, which
    # `mta queue list` need not wait for.
    from mta.certcheck import certificate_warnings

    try:
        config = load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem)
        return 1
    print("ok")
    now = datetime.datetime.now(datetime.UTC)
    for warning in certificate_warnings(config.tls.certificate,
                                        config.hostname, now):
        print(f"warning: {config.path}: {warning}")
    return 0


def make_cert(path: Path, args: argparse.Namespace) -> int:
    from mta.selfsigned import write_self_signed

    config = _load(path, check_tls=False, read_users=False)
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
    # Only the spool setting must be sound: after a typo elsewhere the
    # running relay keeps its old configuration, and its queue must still
    # be seen and steered (as mailq works after a typo in main.cf).
    try:
        spool, problems = spool_setting(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    if problems:
        print(f"mta: warning: {path} has problems (a reload would refuse it; "
              f"the queue commands use only its spool setting, {spool}):",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    return queuecli.run(Spool(spool), args)


def users_command(path: Path, args: argparse.Namespace) -> int:
    # The users file is what this command makes: it need not exist yet.
    config = _load(path, check_tls=False, read_users=False)
    if config is None:
        return 1
    return userscli.run(config, args)


def policy_command(path: Path, args: argparse.Namespace) -> int:
    from mta.explain import explain, probe_lines

    from mta.relaycontrol import canonical_address

    config = _load(path, check_tls=True)
    if config is None:
        return 1
    # As the log writes it (<bob@example.com>) or as typed; the listener's
    # own form, so that the answer is the one the relay would give.
    written = args.recipient.strip()
    if written.startswith("<") and written.endswith(">"):
        written = written[1:-1]
    if "@" not in written or any(char in written for char in "<> \t"):
        print(f"mta: {args.recipient!r} is not an address (local@domain)",
              file=sys.stderr)
        return 1
    recipient = canonical_address(written)
    print("\n".join(explain(config, recipient)))
    if args.probe:
        print("\n".join(probe_lines(config, recipient)))
    return 0


def _load(path: Path, check_tls: bool, read_users: bool = True) -> Config | None:
    try:
        return load_config(path, check_tls=check_tls, read_users=read_users)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return None
