"""SD v1.4 + CLIP ViT-L/14 at full size, on whatever device is here: what a course must size its machines for.

    python bench/full_scale.py                    # the real weights, from the Hugging Face cache
    python bench/full_scale.py --random           # no weights here: real configs, random weights (~5.5 GB on disk)
    python bench/full_scale.py --random --shrunk  # the same path at reduced widths: a quick check of the script

For inference and for each fine-tuning mode (SD-IPC-FT, SD-IPC-CT, Custom Diffusion), at 256 and 512 px and at
batch 1 and the CLI's default batch (4): seconds per U-Net call (inference: timed around each call; training:
seconds per step, from runs of k and 2k steps so that set-up cancels) and the peak memory of the process
(CUDA: `max_memory_allocated`; CPU: peak resident set size). Each case runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "hub_configs"
MODES = ("inference", "ft", "ct", "custom-diffusion")


def case(mode: str, size: int, batch: int, steps: int) -> dict:
    """One measurement, in this process."""
    import torch

    import sdipc_lab as S
    from sdipc_lab import finetune as FT
    from sdipc_lab.toyworld import sample

    lab = S.load_lab("sd-v1-4", size=size)
    refs = [sample(i, "test", two_objects=0).image for i in range(max(2, batch))]
    cuda = lab.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if mode == "inference":
        times = []

        def started(module, args):  # hooks return None: they must not replace the call's inputs or outputs
            sync()
            times.append(-time.perf_counter())

        def ended(module, args, output):
            sync()
            times[-1] += time.perf_counter()

        hooks = [lab.unet.register_forward_pre_hook(started), lab.unet.register_forward_hook(ended)]
        S.vary(lab, refs[0], n=batch, steps=steps + 1)
        for hook in hooks:
            hook.remove()
        seconds = sorted(times[1:])[len(times[1:]) // 2]  # the median call after the first
    else:
        def train(k, out):
            start = time.perf_counter()
            if mode == "custom-diffusion":
                FT.custom_diffusion(lab, refs, class_word="star", steps=k, batch=batch, out=out)
            else:
                FT.finetune(lab, FT.Concepts({"a": refs[:2], "b": refs[-2:]}), mode=mode, steps=k, batch=batch, out=out)
            sync()
            return time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            seconds = (train(2 * steps, Path(tmp) / "b") - train(steps, Path(tmp) / "a")) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"device": str(lab.device), "dtype": str(lab.dtype).replace("torch.", ""), "seconds": seconds, "peak GB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", action="store_true", help="build a hub cache with random weights from the real configs")
    parser.add_argument("--shrunk", action="store_true", help="with --random: reduced widths (a quick check)")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=3, help="U-Net calls / training steps timed per case")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        mode, size, batch = args.case.split(":")
        print("RESULT " + json.dumps(case(mode, int(size), int(batch), args.steps)))
        return
    env = dict(os.environ)
    if args.random:
        from sdipc_lab.build import SHRUNK, hub_cache

        cache = Path(tempfile.mkdtemp(prefix="sdipc_full_scale_"))
        print(f"building a hub cache with random weights in {cache} ...", file=sys.stderr)
        hub_cache(cache, CONFIGS, shrink=SHRUNK if args.shrunk else None)
        env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    rows = []
    for mode in args.modes.split(","):
        for size in map(int, args.sizes.split(",")):
            for batch in map(int, args.batches.split(",")):
                run = subprocess.run([sys.executable, __file__, "--case", f"{mode}:{size}:{batch}", "--steps",
                                      str(args.steps)], env=env, capture_output=True, text=True)
                lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
                if run.returncode or not lines:
                    rows.append([mode, size, batch, "-", "-", "-", "failed: " + run.stderr.strip().splitlines()[-1][:80]])
                    continue
                r = json.loads(lines[0][7:])
                rows.append([mode, size, batch, r["device"], r["dtype"], r["seconds"], r["peak GB"]])
                print(f"  {mode} {size}px batch {batch}: {r['seconds']:.2f} s, {r['peak GB']:.1f} GB", file=sys.stderr)
    weights = "random weights at reduced widths" if args.shrunk else "random weights" if args.random else "the real weights"
    print(f"SD v1.4 + CLIP ViT-L/14 ({weights}); seconds per U-Net call (inference) or per training step\n")
    print(table(["mode", "px", "batch", "device", "dtype", "seconds", "peak GB"], rows))


if __name__ == "__main__":
    main()
