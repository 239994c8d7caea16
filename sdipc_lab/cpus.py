"""How many CPUs this process may really use, and running a block on a set number of torch threads.

A kernel on a shared server (JupyterHub, a container, a Slurm job) is often allowed fewer CPUs than the machine
has; torch's default thread count does not know that. `load_lab` gives each lab `usable_cpus()` threads at most,
and the lab's heavy calls run inside `limit_threads(lab.threads)`.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch


def usable_cpus(root: str | os.PathLike = "/") -> int:
    """How many CPUs this process may really use: its CPU affinity (taskset, Slurm, `docker --cpuset-cpus`), capped
    by its cgroup's CPU quota (`docker --cpus`, Kubernetes and JupyterHub CPU limits), rounded up; at least 1.

    torch's default thread count follows the affinity but not the quota: a kernel limited to 2 CPUs on a 64-core
    server would run 64 threads that take turns on 2 CPUs. `root` is for tests (a fake /proc and /sys)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(Path(root))
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs allowed by this process's cgroups (v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), its own
    and its parents' up to the mount: the tightest, or None when nothing limits it (or this is not Linux)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:  # "hierarchy-id:controllers:path"; v2 has no controllers
        _, controllers, path = line.split(":", 2)
        if controllers and "cpu" not in controllers.split(","):
            continue
        mount = root / "sys/fs/cgroup" / ("" if not controllers else controllers)
        if controllers and not mount.is_dir():
            mount = root / "sys/fs/cgroup/cpu"
        folder = mount / path.lstrip("/")
        for place in (folder, *folder.parents):
            quotas.append(_quota_in(place, v2=not controllers))
            if place == mount:
                break
    quotas = [q for q in quotas if q]
    return min(quotas) if quotas else None


def _quota_in(folder: Path, *, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()[:2]  # "max 100000" or "150000 100000"
        else:
            quota, period = ((folder / f"cpu.cfs_{k}_us").read_text().strip() for k in ("quota", "period"))
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def limit_threads(threads: int):
    """Run the block on `threads` CPU threads (torch's intra-op pool), then put back the process's own setting:
    what a user set with `torch.set_num_threads` outside the lab's calls stays theirs."""
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
