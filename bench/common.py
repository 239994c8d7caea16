"""Timing helpers shared by the bench/ scripts: medians of repeated runs, tables in Markdown."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (the package's own writer, `sdipc_lab.plots.Table`), numbers as bench tables show them."""
    from sdipc_lab.plots import Table

    def fmt(x):
        if isinstance(x, float):
            return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
        return str(x)

    return str(Table([dict(zip(headers, map(fmt, row))) for row in rows]))


def threads() -> str:
    """"1 thread" or "2 threads": the intra-op threads torch computes with in this process."""
    import torch

    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}"
