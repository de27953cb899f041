"""Interleaved timing for the speed benchmarks: variants run A B A B ... so that load from
other processes on a shared machine hits every variant alike; ratios are per round."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``rounds`` interleaved rounds (after ``warmup``
    untimed rounds)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def ratio_row(label: str, times: dict[str, list[float]], base: str, other: str) -> str:
    """``| label | base s | other s | median ratio | spread |``: the ratio other/base per round,
    its median and min-max."""
    ratios = [o / b for o, b in zip(times[other], times[base])]
    return (
        f"| {label} | {statistics.median(times[base]):.4f} | "
        f"{statistics.median(times[other]):.4f} | {statistics.median(ratios):.2f}x | "
        f"{min(ratios):.2f}-{max(ratios):.2f} |"
    )


def table_header(base: str, other: str) -> str:
    return (
        f"| case | {base} (s, median) | {other} (s, median) | {other}/{base} | spread |\n"
        "| --- | ---: | ---: | ---: | ---: |"
    )


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
