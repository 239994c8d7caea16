"""Helpers shared by the bench/ scripts: medians of repeated runs, tables in Markdown, and `record`, which keeps
what a bench prints as its results file.

    with record("masking", "The masking experiment: which tokens a U-Net reads"):
        print(table(...))        # shown as usual, and kept

`record(name)` writes docs/results/<name>.md when its block ends without an exception, replacing the file
atomically (a temporary file, then os.replace): a first line `# <title>`, a line with the command (as typed from
the repository's root), the date (UTC), the run's length and the machine, then everything the block printed to
stdout (tables are Markdown already). Progress belongs on stderr, which is not kept. A bench that fails or is
interrupted (an exception, SystemExit, Ctrl+C) leaves the previous file as it was. `name=None` writes nothing (a
mode of a bench that has no results file); `BENCH_NO_RESULTS=1` in the environment writes nothing either, for
trial runs:

    BENCH_NO_RESULTS=1 python bench/masking.py toy --n 4
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
NO_RESULTS = "BENCH_NO_RESULTS"  # set (to anything but "" or "0"): `record` writes nothing


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


class _Tee:
    """stdout as it was, keeping a copy of what is written to it."""

    def __init__(self, out):
        self.out, self.kept = out, []

    def write(self, text: str) -> int:
        self.kept.append(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def __getattr__(self, name):  # encoding, isatty, fileno, ... of the real stdout
        return getattr(self.out, name)


def command() -> str:
    """This process's command line as typed from the repository's root: `python bench/x.py ARGS` (shell-quoted,
    the repository's own path left out of arguments), after OMP_NUM_THREADS=N when that is set."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    args = [arg.replace(str(ROOT) + os.sep, "") for arg in sys.argv[1:]]
    threads_set = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    return threads_set + shlex.join(["python", script, *args])


def machine(load: tuple[float, float, float]) -> str:
    """CPU model and count, the load average `load` (taken at the start), the platform and torch's threads."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    torch_threads = f"; torch {threads()}" if "torch" in sys.modules else ""
    return (f"{cpu}, {os.cpu_count()} CPUs, load average {', '.join(f'{x:.2f}' for x in load)} at the start; "
            f"{platform.platform()}{torch_threads}")


def _first_sentence(doc: str | None) -> str:
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    return re.split(r"(?<=[.?!])\s", paragraph)[0].rstrip(".") or "Results"


@contextlib.contextmanager
def record(name: str | Path | None, title: str | None = None, *, lab: str = "toy"):
    """Keep what the block prints to stdout, and write it as docs/results/<name>.md (or to the path `name`) when
    the block ends without an exception; see this module's docstring. `title` defaults to the first sentence of
    the running script's docstring. A results file records the shipped lab: with another `lab` (a bench's
    --source) it is not written, so judging a candidate never replaces the shipped lab's numbers. Yields the path
    it will write, or None when it writes nothing."""
    if name is not None and str(lab) != "toy":
        print(f"(results file not written: the lab is {lab}, not the shipped one)", file=sys.stderr)
        name = None
    if name is None or os.environ.get(NO_RESULTS, "") not in ("", "0"):
        yield None
        return
    path = Path(name) if isinstance(name, Path) else RESULTS / f"{name}.md"
    title = title or _first_sentence(getattr(sys.modules.get("__main__"), "__doc__", None))
    started, load, start = datetime.datetime.now(datetime.UTC), os.getloadavg(), time.perf_counter()
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield path
    finally:
        tee.flush()
        sys.stdout = tee.out
    printed = re.sub(r"[^\n]*\r(?!\n)", "", "".join(tee.kept))  # a line redrawn with "\r": its last state
    text = (f"# {title}\n\n`{command()}`, {started:%Y-%m-%d %H:%M} UTC, {time.perf_counter() - start:.0f} s; "
            f"{machine(load)}.\n\n{printed.strip()}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    print(f"wrote {shown}", file=sys.stderr)
