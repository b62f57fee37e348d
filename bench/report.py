"""The benchmark's figures: medians of the repetitions, and the table.

Pure: numbers in, lines of text out.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# (label, Sample attribute, format, higher is better)
FIGURES = (
    ("end-to-end msg/s", "end_to_end", "{:.0f}", True),
    ("acceptance msg/s", "acceptance", "{:.0f}", True),
    ("CPU ms/msg", "cpu_ms", "{:.2f}", False),
    ("peak RSS MiB", "peak_rss_mib", "{:.1f}", False),
    ("peak PSS MiB", "peak_pss_mib", "{:.1f}", False),
)


@dataclass(frozen=True, slots=True)
class Spread:
    median: float
    low: float
    high: float


def spread(values: Sequence[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values))


def cell(values: Sequence[float], form: str) -> str:
    """ "312 (301-320)": the median, then min and max when there are several."""
    summary = spread(values)
    text = form.format(summary.median)
    if len(values) > 1:
        text += f" ({form.format(summary.low)}-{form.format(summary.high)})"
    return text


def ratio(relay: Sequence[float], postfix: Sequence[float]) -> str:
    """The relay's median over Postfix's: above 1 is more of it."""
    base = spread(postfix).median
    if base == 0:
        return "-"
    return f"{spread(relay).median / base:.2f}x"


def table(
    title: str, relay: Sequence[object], postfix: Sequence[object] | None
) -> list[str]:
    """The block of one measurement: a line per figure, relay then Postfix
    and the ratio when Postfix ran."""
    lines = [title]
    header = f"  {'':18} {'relay':>22}"
    if postfix:
        header += f" {'postfix':>22} {'ratio':>7}"
    lines.append(header)
    for label, attribute, form, _ in FIGURES:
        ours = [getattr(sample, attribute) for sample in relay]
        line = f"  {label:18} {cell(ours, form):>22}"
        if postfix:
            theirs = [getattr(sample, attribute) for sample in postfix]
            line += f" {cell(theirs, form):>22} {ratio(ours, theirs):>7}"
        lines.append(line)
    return lines
