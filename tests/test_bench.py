"""The benchmark still runs: bench/run.py with tiny numbers, and its pure
parts.  Nothing here is timed; the figures themselves are only checked to
be printed (README.md, "Benchmark", has real ones)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import procstat, report
from bench.loadclient import message_body
from bench.options import parse_options

REPO = Path(__file__).resolve().parent.parent
FIGURE_LABELS = [label for label, *_ in report.FIGURES]


def run_bench(*args: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--no-postfix",
            "--repeat",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def figure_lines(output: str) -> dict[str, list[str]]:
    """Each figure label -> the numbers printed after it, once per block."""
    found: dict[str, list[str]] = {label: [] for label in FIGURE_LABELS}
    for line in output.splitlines():
        for label in FIGURE_LABELS:
            match = re.fullmatch(rf"\s+{re.escape(label)}\s+([0-9.]+)", line)
            if match:
                found[label].append(match[1])
    return found


def test_plain_bench_runs_at_1_and_10_sessions() -> None:
    output = run_bench("--plain", "--messages", "20", "--concurrency", "1,10")

    assert "plaintext, 1 concurrent session(s), 20 messages" in output
    assert "plaintext, 10 concurrent session(s), 20 messages" in output
    for label, numbers in figure_lines(output).items():
        assert len(numbers) == 2, (label, output)
        assert all(float(number) > 0 for number in numbers), (label, output)


def test_tls_bench_runs_with_starttls_on_both_legs() -> None:
    output = run_bench("--tls", "--messages", "10", "--concurrency", "2")

    assert "STARTTLS on both legs, 2 concurrent session(s)" in output
    assert all(len(numbers) == 1 for numbers in figure_lines(output).values())
    assert re.search(
        r"client->relay TLSv1\.[23] \S+, relay->sink TLSv1\.[23]", output
    ), output


# --- the pure parts ---------------------------------------------------------

STAT = (
    "1234 (twistd (mta) x) S 1 1234 1234 0 -1 4194560 100 0 0 0"
    " 250 50 7 3 20 0 3 0 100 1000000 5000"
)


def test_stat_gives_parent_and_cpu_with_reaped_children() -> None:
    # A name with spaces and ")" must not shift the fields.
    assert procstat.parse_stat(STAT) == (1, 250 + 50 + 7 + 3)


def test_peak_rss_and_pss_come_from_their_lines() -> None:
    assert procstat.parse_peak_rss("VmPeak:\t 9 kB\nVmHWM:\t  61440 kB\n") == 61440
    assert procstat.parse_peak_rss("Name:\tkthreadd\n") == 0
    assert procstat.parse_pss("Rss:  100 kB\nPss:  40 kB\n") == 40


def test_the_tree_holds_descendants_only() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1, 21: 20}
    assert procstat.descendants(10, parents) == {10, 11, 12}


def test_cells_show_median_min_and_max_and_ratio_is_relay_over_postfix() -> None:
    assert report.cell([3.0, 1.0, 2.0], "{:.0f}") == "2 (1-3)"
    assert report.cell([2.5], "{:.1f}") == "2.5"
    assert report.ratio([300.0], [400.0, 500.0, 450.0]) == "0.67x"


@pytest.mark.parametrize("size", [2, 3, 79, 80, 81, 161, 4096])
def test_message_body_is_exactly_the_size_in_crlf_lines(size: int) -> None:
    body = message_body(size)
    assert len(body) == size
    assert body.endswith(b"\r\n") and b"\r\n." not in body
    assert b"\r" not in body.replace(b"\r\n", b"")


def test_options_default_to_both_modes_and_parse_sizes() -> None:
    options = parse_options([])
    assert (
        options.modes,
        options.concurrency,
        options.size,
        options.repeat,
        options.postfix,
    ) == (("plain", "tls"), (1, 10), 4096, 3, True)
    options = parse_options(
        ["--tls", "--size", "64K", "--concurrency", "5", "--no-postfix"]
    )
    assert (options.modes, options.size, options.concurrency, options.postfix) == (
        ("tls",),
        65536,
        (5,),
        False,
    )


def test_a_bad_size_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_options(["--size", "lots"])
