"""Each worker process on a CPU of its own (``cpu_affinity: spread``).

A Python process works through a large interpreter and heap; moved from
CPU to CPU, or sharing one with its sibling while another CPU idles, it
finds cold caches each time and spends more time per message.  Pinned,
worker N stays on the N-th of the CPUs the relay was started with (round
robin when there are more workers than CPUs), as nginx's
``worker_cpu_affinity auto`` does.  Every thread a process starts after
pinning (the spool's, Twisted's pool) stays on its CPU too.

Off by default: on a machine that runs other busy services, letting the
kernel place the workers is the better guess.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

NONE = "none"
SPREAD = "spread"
CHOICES = (NONE, SPREAD)


def usable_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on, in order (all of them where the
    system cannot say)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return tuple(range(os.cpu_count() or 1))


def cpu_for(number: int, cpus: Sequence[int]) -> int:
    """Worker ``number``'s CPU (workers count from 1) (pure)."""
    return cpus[(number - 1) % len(cpus)]


def pin(number: int, cpus: Sequence[int]) -> int | None:
    """Keep the calling thread, and every thread it starts from now on, on
    worker ``number``'s CPU; that CPU, or None where the system refuses
    (then the kernel places the process, as without the setting)."""
    cpu = cpu_for(number, cpus)
    try:
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        return None
    return cpu


def parse_cpus(text: str) -> tuple[int, ...]:
    """The worker's ``--cpus 0,1`` argument (what `format_cpus` wrote)."""
    cpus = tuple(int(part) for part in text.split(","))
    if not cpus or min(cpus) < 0:
        raise ValueError(f"--cpus {text!r}: expected CPU numbers")
    return cpus


def format_cpus(cpus: Sequence[int]) -> str:
    return ",".join(str(cpu) for cpu in cpus)
