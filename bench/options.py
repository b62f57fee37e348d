"""The benchmark's command line, parsed into one frozen value."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Options:
    messages: int
    concurrency: tuple[int, ...]
    size: int
    modes: tuple[str, ...]  # "plain", "tls"
    repeat: int
    postfix: bool
    workers: int  # the relay's worker processes
    cpu_affinity: str  # the relay's cpu_affinity: "spread" or "none"


def parse_size(text: str) -> int:
    """Octets: "4096", "4K" or "1M" (powers of 1024)."""
    units = {"K": 1024, "M": 1024**2}
    text = text.strip().upper().removesuffix("B")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        size = int(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if size < 2:
        raise argparse.ArgumentTypeError("the size must be at least 2 octets")
    return size


def parse_counts(text: str) -> tuple[int, ...]:
    """ "1,10" -> (1, 10): positive whole numbers."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"each must be 1 or more: {text!r}")
    return counts


def positive(text: str) -> int:
    value = parse_counts(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"one number, not {text!r}")
    return value[0]


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Relay N messages through the relay, and through a "
        "private Postfix when it is installed, and compare.",
    )
    parser.add_argument(
        "--messages",
        type=positive,
        default=1000,
        help="messages per repetition (default 1000)",
    )
    parser.add_argument(
        "--concurrency",
        type=parse_counts,
        default=(1, 10),
        help="concurrent client sessions, one message each;"
        " a comma-separated list (default 1,10)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=4096,
        help="message body in octets, K or M allowed (default 4096)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="only the run with STARTTLS on both legs"
    )
    parser.add_argument("--plain", action="store_true", help="only the plaintext run")
    parser.add_argument(
        "--repeat",
        type=positive,
        default=3,
        help="repetitions; the median is shown (default 3)",
    )
    parser.add_argument(
        "--no-postfix", action="store_true", help="do not run Postfix beside the relay"
    )
    parser.add_argument(
        "--workers",
        type=positive,
        default=os.cpu_count() or 1,
        help="the relay's worker processes (default: one per CPU)",
    )
    parser.add_argument(
        "--cpu-affinity",
        choices=("spread", "none"),
        default="spread",
        help="the relay's cpu_affinity setting (default spread: each worker"
        " on a CPU of its own)",
    )
    args = parser.parse_args(argv)

    modes = tuple(
        mode for mode, chosen in (("plain", args.plain), ("tls", args.tls)) if chosen
    )
    return Options(
        messages=args.messages,
        concurrency=args.concurrency,
        size=args.size,
        modes=modes or ("plain", "tls"),
        repeat=args.repeat,
        postfix=not args.no_postfix,
        workers=args.workers,
        cpu_affinity=args.cpu_affinity,
    )
