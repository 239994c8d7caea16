"""Many kernels on one machine: how long `S.edit(n=4)` takes when K of them run at once, by thread setting.

    python bench/shared_cpu.py [--kernels 4] [--repeats 3]

Course labs run on JupyterHub servers and lab VMs where many kernels share the cores. Each "kernel" here is
its own Python process that loads the toy lab and times `S.edit(lab, image, text, n=4)`; K of them start
together. Rows: one kernel alone (the reference), then K at once with
- torch's default thread count (every kernel spins on every core it may use),
- one thread per kernel (what `load_lab` picks under a cgroup quota of <= 1 CPU, e.g. a JupyterHub
  `cpu_limit`; or `load_lab(threads=1)` / `lab.threads = 1`),
- each of those with `OMP_WAIT_POLICY=PASSIVE` (idle OpenMP threads sleep instead of spinning; it must be
  set before Python starts, e.g. in the kernel's environment: sdipc_lab never sets it for you).
Ratios are against the kernel alone, within this one run. Writes docs/results/shared_cpu.md (replaced on every run;
`common.record`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import record, table  # noqa: E402


def worker(threads: int | None, repeats: int, start_at: float) -> None:
    import sdipc_lab as S
    from sdipc_lab.toyworld import sample

    lab = S.load_lab("toy", device="cpu", threads=threads)
    ref = sample(0, "test", two_objects=0)
    S.edit(lab, ref.image, "a big star", n=4)  # warm-up
    while time.time() < start_at:  # every kernel times the same contended stretch
        time.sleep(0.05)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        S.edit(lab, ref.image, "a big star", n=4)
        times.append(time.perf_counter() - t)
    print(json.dumps({"threads": lab.threads, "seconds": times}))


def run(kernels: int, threads: int | None, passive: bool, repeats: int) -> tuple[list[float], int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    start_at = time.time() + 40  # after every kernel has loaded and warmed up
    cmd = [sys.executable, __file__, "--worker", str(threads or 0), "--repeats", str(repeats), "--start-at", str(start_at)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(kernels)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return [s for r in results for s in r["seconds"]], results[0]["threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker or None, args.repeats, args.start_at)
    import sdipc_lab as S

    with record("shared_cpu", "Many kernels on one machine: `S.edit(n=4)` with K of them at once, by thread setting"):
        cases = [("1 kernel alone, default threads", 1, None, False)]
        cases += [(f"{args.kernels} kernels, {what}", args.kernels, threads, passive)
                  for threads, what0 in ((None, "default threads"), (1, "1 thread each"))
                  for passive, what in ((False, what0), (True, what0 + ", OMP_WAIT_POLICY=PASSIVE"))]
        rows, alone = [], None
        for name, kernels, threads, passive in cases:
            seconds, used = run(kernels, threads, passive, args.repeats)
            median = statistics.median(seconds)
            alone = alone or median
            rows.append([name, used, median, max(seconds), median / alone])
            print(f"  {name}: {median:.2f} s", file=sys.stderr)
        print(f"{os.cpu_count()} CPUs on the machine; this process may use {S.usable_cpus()} "
              f"(affinity {len(os.sched_getaffinity(0))}, cgroup quota {S.cpus.cgroup_cpu_quota() or 'none'}); "
              f"S.edit(n=4) on the toy lab, {args.repeats} timed calls per kernel\n")
        print(table(["case", "threads per kernel", "median s per edit", "slowest s", "x alone"], rows))


if __name__ == "__main__":
    main()
