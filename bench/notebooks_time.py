"""Wall time of the whole notebook series, executed headless as CI does (nbconvert, one kernel each).

    python bench/notebooks_time.py [notebooks/*.ipynb] [--set SOURCE='"tiny"' --set N=4] [--executed DIR]

`--set NAME=VALUE` appends to each notebook's `parameters` cell, as papermill does: the same series on
another lab (`SOURCE="sd-v1-4"` on a GPU; `SOURCE="tiny"` checks that nothing depends on the toy lab).

Target: notebooks 01-05 together in <= 10 minutes on 2 CPU cores.

A run of the whole series writes docs/results/notebooks_time.md (notebooks/solutions/*.ipynb:
notebooks_time_solutions.md), replaced on every run (`common.record`); a run of some notebooks writes none, nor
does a run where a notebook fails.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbconvert.preprocessors import ExecutePreprocessor

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT, record, table  # noqa: E402


def with_parameters(nb, assignments: list[str]):
    """Append `NAME = VALUE` lines to the cell tagged `parameters` (papermill's convention)."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "".join(f"\n{a.split('=', 1)[0].strip()} = {a.split('=', 1)[1].strip()}" for a in assignments)
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--executed", type=Path, help="also write the executed notebooks (with outputs) here")
    args = parser.parse_args()
    paths = args.notebooks or sorted(Path("notebooks").glob("*.ipynb"))
    series = {"notebooks": "notebooks_time", "notebooks/solutions": "notebooks_time_solutions"}
    folder = next((folder for folder in series  # a whole series; some notebooks only: no results file
                   if paths and {p.resolve() for p in paths} == set((ROOT / folder).glob("*.ipynb"))), None)
    with record(series.get(folder), f"Wall time of the notebooks in {folder}/, executed headless"):
        measure(args, paths)


def measure(args, paths: list[Path]) -> None:
    rows, total = [], 0.0
    for path in paths:
        nb = with_parameters(nbformat.read(path, as_version=4), args.set)
        start = time.perf_counter()
        status = "ok"
        try:
            ExecutePreprocessor(timeout=1800, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(path.parent)}})
        except Exception as error:  # report every notebook, then fail
            last = re.sub(r"\x1b\[[0-9;]*m", "", str(error).strip().splitlines()[-1])  # without the colour codes
            status = "FAILED: " + last[:200]
        seconds = time.perf_counter() - start
        if args.executed:
            args.executed.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.executed / path.name)
        total += seconds
        rows.append([path.name, seconds, status])
    rows.append(["total", total, ""])
    print(f"{os.cpu_count()} CPU cores" + (f", parameters {args.set}" if args.set else "") + "\n")
    print(table(["notebook", "seconds", "status"], rows))
    if any(r[2].startswith("FAILED") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
