"""Small helpers to summarise samples and print aligned tables and target checks."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence

import zmq


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows under headers, the first column left-aligned and the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def check(
    label: str, value: float, target: float, *, at_least: bool, unit: str = "x", digits: int = 2
) -> str:
    """One line saying whether a measured figure meets its target, and by how much."""
    met = value >= target if at_least else value < target
    sign = ">=" if at_least else "<"
    margin = value / target
    verdict = "met" if met else "MISSED"
    return (
        f"  {label}: {value:.{digits}f}{unit} (target {sign} {target:g}{unit}) {verdict}, "
        f"at {margin:.2f} of the target"
    )


def machine() -> str:
    """What the figures were measured on, including how busy the machine was."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, pyzmq {zmq.__version__}, "
        f"libzmq {zmq.zmq_version()}; load average {load}"
    )
