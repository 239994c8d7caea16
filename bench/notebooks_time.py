"""Wall time of the whole notebook series, executed headless as CI does (nbconvert, one kernel each).

    python bench/notebooks_time.py [notebooks/*.ipynb]

Target (issue 4): notebooks 01-05 together in <= 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbconvert.preprocessors import ExecutePreprocessor

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path("notebooks").glob("*.ipynb"))
    rows, total = [], 0.0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        status = "ok"
        try:
            ExecutePreprocessor(timeout=1800, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(path.parent)}})
        except Exception as error:  # report every notebook, then fail
            status = "FAILED: " + str(error).strip().splitlines()[-1][:200]
        seconds = time.perf_counter() - start
        total += seconds
        rows.append([path.name, seconds, status])
    rows.append(["total", total, ""])
    print(f"{os.cpu_count()} CPU cores\n")
    print(table(["notebook", "seconds", "status"], rows))
    if any(r[2].startswith("FAILED") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
