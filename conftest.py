"""The test session shares the machine: `-n auto` (pyproject.toml) runs pytest-xdist workers, as many as this
process may really use (`usable_cpus`: CPU affinity and cgroup quota), at most 4, and each worker -- with every
notebook kernel and subprocess it starts -- runs torch on its share of those CPUs, not on all of them.
`--dist loadscope` keeps each notebook's cells, and each test module, on one worker, in order (nbval needs it).
`pytest -n 0` runs everything in this one process, on torch's own thread count."""

from __future__ import annotations

import os

pytest_plugins = ["tests.notebook_checks"]  # what nbval runs is checked for what a reader sees, too

MAX_WORKERS = 4  # each worker holds a lab or two and, for tests/test_hub_cache.py, SD v1.4's random weights


def pytest_xdist_auto_num_workers(config) -> int:
    from sdipc_lab.cpus import usable_cpus

    return min(usable_cpus(), MAX_WORKERS)


def pytest_configure(config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:  # the controller, or `-n 0`
        return
    import torch

    from sdipc_lab.cpus import usable_cpus

    threads = max(1, usable_cpus() // int(workers))
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # a limit someone set stays if it is tighter
        threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by notebook kernels and subprocesses
    torch.set_num_threads(threads)
