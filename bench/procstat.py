"""CPU time and peak memory of a process and its descendants, from /proc.

A subject under test is a tree of processes: the relay (one twistd process
today, a few workers later) or Postfix (a master and the daemons it forks).
Its CPU is the user and system time of every live member plus what their
reaped children used (cutime, cstime).  A member that exits between two
readings is counted once: first as itself, then inside its parent's
cutime, so a difference of two readings is the CPU spent between them.

The parsers are pure; only `read_tree` touches /proc.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcessStat:
    """What /proc/PID/stat and /proc/PID/status say about one process."""

    pid: int
    ppid: int
    ticks: int  # utime + stime + cutime + cstime
    peak_rss_kib: int  # VmHWM: the most resident memory it ever had


def parse_stat(text: str) -> tuple[int, int]:
    """(ppid, CPU ticks) from the text of /proc/PID/stat."""
    # The command name is in parentheses and may hold spaces and ")".
    fields = text.rpartition(")")[2].split()
    # After the name: state, ppid, ... utime (14th field of the line),
    # stime, cutime, cstime; here counted from the state, at index 0.
    ppid = int(fields[1])
    ticks = sum(int(value) for value in fields[11:15])
    return ppid, ticks


def parse_peak_rss(status: str) -> int:
    """VmHWM in KiB from /proc/PID/status; 0 for a kernel thread."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """`root` and every process below it, from a pid -> ppid table."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)

    tree = {root}
    waiting = [root]
    while waiting:
        for child in children.get(waiting.pop(), []):
            if child not in tree:
                tree.add(child)
                waiting.append(child)
    return tree


def cpu_seconds(members: Iterable[ProcessStat]) -> float:
    return sum(member.ticks for member in members) / CLOCK_TICKS


def peak_rss_mib(members: Iterable[ProcessStat]) -> float:
    """The sum of each member's VmHWM, in MiB.

    For one process this is its true peak.  For several (Postfix) it adds
    peaks that may not have happened at the same moment, and counts shared
    library pages once per process: an upper bound.
    """
    return sum(member.peak_rss_kib for member in members) / 1024


def parse_pss(smaps_rollup: str) -> int:
    """Pss in KiB from /proc/PID/smaps_rollup: resident memory with each
    shared page divided among the processes that map it."""
    for line in smaps_rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def tree_pss_mib(root: int) -> float:
    """The tree's proportional set size now, in MiB: memory that several
    members share counts once, unlike the sum of their RSS."""
    total = 0
    for member in read_tree(root):
        try:
            rollup = (PROC / str(member.pid) / "smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += parse_pss(rollup)
    return total / 1024


def read_tree(root: int) -> list[ProcessStat]:
    """Every live process in the tree under `root` (root included)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = parse_stat((entry / "stat").read_text())
            except (FileNotFoundError, ProcessLookupError):
                continue  # it exited while we looked

    members = []
    for pid in descendants(root, {pid: s[0] for pid, s in stats.items()}):
        if pid not in stats:
            continue
        try:
            status = (PROC / str(pid) / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            status = ""
        ppid, ticks = stats[pid]
        members.append(ProcessStat(pid, ppid, ticks, parse_peak_rss(status)))
    return members
