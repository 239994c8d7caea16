"""Samples per second of one trainer on 1 and on 2 processes (1 thread each), on the same global batch.

    python bench/scaling.py                                  # the toy-world VAE stage at --size test
    python bench/scaling.py --stage clip --batch 256 --steps 40

Each count runs `python -m sdipc_lab.toyworld.train STAGE --size test` (2 processes: `accelerate launch --multi_gpu
--num_processes 2`, on the CPU where there is no GPU) for k and for 2k steps in fresh folders, so that start-up
(imports, drawing the world, joining the processes) cancels: seconds per step = (t(2k) - t(k)) / k. Every process
trains on its half of the global batch, so on two free cores the ratio is near 2 when a step is dominated by compute.
Writes docs/results/scaling.md (replaced on every run; `common.record`), headed by the command, the date and the
machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, record, table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULT = RESULTS / "scaling.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, stage: str, steps: int, batch: int, out: Path) -> float:
    """Wall-clock seconds of one training run of `steps` steps."""
    args = ["-m", "sdipc_lab.toyworld.train", stage, "--size", "test", "--steps", str(steps), "--batch", str(batch),
            "--out", str(out)]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="vae", choices=["clip", "vae", "judge"],
                        help="a toy-world stage that needs no other stage first")
    parser.add_argument("--batch", type=int, default=64, help="the global batch (even)")
    parser.add_argument("--steps", type=int, default=40, help="k: runs of k and 2k steps are timed")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.batch % 2 or args.steps < 1:
        parser.error("--batch must be even (2 processes share it) and --steps positive")
    seconds = {}
    with record(args.out, f"Scaling: the toy-world `{args.stage}` stage (--size test) on 1 and 2 processes"):
        with tempfile.TemporaryDirectory(prefix="sdipc_scaling_") as tmp:
            for processes in (1, 2):
                short = run(processes, args.stage, args.steps, args.batch, Path(tmp) / f"{processes}_short")
                long = run(processes, args.stage, 2 * args.steps, args.batch, Path(tmp) / f"{processes}_long")
                if long <= short:
                    raise SystemExit(f"{processes} process(es): {2 * args.steps} steps took no longer than "
                                     f"{args.steps} ({long:.1f} s against {short:.1f} s): start-up and noise swamp "
                                     "the steps. Raise --steps or --batch, on a machine that is not busy.")
                seconds[processes] = (long - short) / args.steps
                print(f"  {processes} process(es): {seconds[processes]:.3f} s per step "
                      f"({short:.1f} s for {args.steps} steps, {long:.1f} s for {2 * args.steps})", file=sys.stderr)
        rate = {p: args.batch / s for p, s in seconds.items()}
        rows = [[p, 1, args.batch, args.batch // p, seconds[p], rate[p], rate[p] / rate[1]] for p in (1, 2)]
        load = os.getloadavg()[0]
        print(f"Seconds per step from runs of {args.steps} and {2 * args.steps} steps (start-up cancels); CPU "
              f"processes over gloo, OMP_NUM_THREADS=1; load average {load:.2f} when it ended."
              + (" The load average was above the 2 cores these runs need: other jobs shared them, so the times "
                 "are noisy and the ratio is a lower bound." if load > 2 else "") + "\n")
        print(table(["processes", "threads each", "global batch", "per process", "s / step", "samples / s",
                     "ratio to 1"], rows))


if __name__ == "__main__":
    main()
