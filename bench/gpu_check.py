"""The GPU path, checked in one go (about 8 minutes on one GPU, nothing downloaded).

    python bench/gpu_check.py            # on a machine with CUDA; elsewhere it says so and runs nothing
    python bench/gpu_check.py --quick    # the teaching lab only (no SD v1.4 sizes)

1. The teaching lab (`load_lab("toy")`) on CUDA in fp16: vary, edit and generate, and SD-IPC-FT / -CT a few steps,
   each finite and seeded (the same seed twice gives the same images), and the same images as the lab on the CPU in
   fp32 within a tolerance (the mean absolute pixel difference is printed against it).
2. SD v1.4 + CLIP ViT-L/14 with their real configurations and random full-size weights (bench/full_scale.py
   --random, a hub cache built in a temporary folder): seconds per U-Net call and peak memory at 256 and 512 px for
   inference, FT and CT, at batch 1 and 4; and one U-Net call with PyTorch's scaled-dot-product attention (diffusers'
   default) against the classic attention processor.
Exits 1 if a check fails, 0 otherwise (and on a machine without CUDA, having run nothing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PIXEL_TOLERANCE = 4.0  # mean absolute difference, in 0-255 pixel levels, between fp16 CUDA and fp32 CPU images


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def check_toy_lab() -> list[str]:
    """Part 1; returns the failures."""
    import torch

    import sdipc_lab as S
    from sdipc_lab import finetune as FT
    from sdipc_lab.toyworld import sample

    failures = []
    gpu = S.load_lab("toy", device="cuda", dtype=torch.float16)
    cpu = S.load_lab("toy", device="cpu", dtype=torch.float32)
    refs = [sample(i, "test", two_objects=0).image for i in range(4)]
    calls = {"vary": lambda lab, **k: S.vary(lab, refs[0], n=2, seed=3, **k),
             "edit": lambda lab, **k: S.edit(lab, refs[0], "a blue square", n=2, seed=3, **k),
             "generate": lambda lab, **k: S.generate(lab, "a red disk on the left", n=2, seed=3, **k)}
    for name, call in calls.items():
        start = time.perf_counter()
        first, again = _pixels(call(gpu)), _pixels(call(gpu))
        seconds = time.perf_counter() - start
        reference = _pixels(call(cpu))
        difference = float(np.abs(first - reference).mean())
        ok = np.isfinite(first).all() and np.array_equal(first, again) and difference <= PIXEL_TOLERANCE
        print(f"  toy {name}: cuda fp16 seeded {np.array_equal(first, again)}, vs cpu fp32 mean |diff| "
              f"{difference:.2f} levels (tolerance {PIXEL_TOLERANCE}), {seconds / 2:.2f} s per call  "
              f"{'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"toy {name}")
    concepts = FT.Concepts({"a": refs[:2], "b": refs[2:]})
    for mode in ("ft", "ct"):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            ft = FT.finetune(gpu, concepts, mode=mode, steps=5, batch=2, out=Path(tmp) / "run")
            seconds = time.perf_counter() - start
            finite = all(torch.isfinite(t).all().item() for t in ft.tensors().values())
            first = _pixels(S.vary(gpu, refs[0], n=2, seed=3, finetuned=ft))
            again = _pixels(S.vary(gpu, refs[0], n=2, seed=3, finetuned=ft))
            ok = finite and np.isfinite(first).all() and np.array_equal(first, again)
            print(f"  toy {mode.upper()}: 5 steps in {seconds:.1f} s, weights finite {finite}, vary seeded "
                  f"{np.array_equal(first, again)}  {'ok' if ok else 'FAILED'}")
            if not ok:
                failures.append(f"toy {mode}")
    return failures


def sdpa_case(size: int) -> None:
    """One SD v1.4 U-Net call at `size` px, batch 1, with SDPA and with the classic attention (in this process)."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    import sdipc_lab as S

    lab = S.load_lab("sd-v1-4", size=size)
    unet = lab.unet
    side = size // 8
    z = torch.randn(1, unet.config.in_channels, side, side, device=lab.device, dtype=lab.dtype)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, device=lab.device, dtype=lab.dtype)
    t = torch.tensor([500], device=lab.device)
    for name, processor in (("SDPA", AttnProcessor2_0()), ("classic", AttnProcessor())):
        unet.set_attn_processor(processor)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            unet(z, t, encoder_hidden_states=context)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(3):
                unet(z, t, encoder_hidden_states=context)
            torch.cuda.synchronize()
        print(f"  SD v1.4 U-Net {size} px batch 1, {name}: {(time.perf_counter() - start) / 3:.3f} s per call, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the teaching lab only")
    parser.add_argument("--sdpa-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no GPU here (CUDA is not available): nothing was run.")
        return 0
    if args.sdpa_case:
        sdpa_case(args.sdpa_case)
        return 0
    started = time.perf_counter()
    print(f"gpu_check on {torch.cuda.get_device_name(0)} (torch {torch.__version__})")
    print("1. the teaching lab, CUDA fp16 against CPU fp32")
    failures = check_toy_lab()
    if not args.quick:
        print("2. SD v1.4 real configurations, random full-size weights (bench/full_scale.py --random)")
        from sdipc_lab.build import hub_cache

        with tempfile.TemporaryDirectory(prefix="sdipc_gpu_check_") as cache:
            hub_cache(Path(cache), HERE.parent / "tests" / "data" / "hub_configs", shrink=None)
            env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
            for size in (256, 512):
                done = subprocess.run([sys.executable, __file__, "--sdpa-case", str(size)], env=env,
                                      capture_output=True, text=True)
                print(done.stdout.rstrip() or f"  SDPA case {size} px failed: {done.stderr.strip()[-300:]}")
                if done.returncode:
                    failures.append(f"SDPA {size} px")
            done = subprocess.run([sys.executable, str(HERE / "full_scale.py"), "--modes", "inference,ft,ct",
                                   "--sizes", "256,512", "--batches", "1,4", "--steps", "2"],
                                  env=env, capture_output=True, text=True)
            print("  (full_scale.py read this hub cache: random weights at the real widths)")
            print(done.stdout.rstrip())
            if done.returncode or "failed" in done.stdout:
                failures.append("full_scale")
                print(done.stderr.strip()[-1000:])
    print(f"gpu_check: {time.perf_counter() - started:.0f} s; " +
          (f"FAILED: {', '.join(failures)}" if failures else "every check passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
