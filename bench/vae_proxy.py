"""VAE proxy runs: fine-tune the shipped lab's VAE for a few CPU-minutes with another GroupNorm grouping and/or a
penalty on extreme latent values, and judge its round trip as `bench/stage_quality.py` does (96 test images,
posterior means): PSNR, the judge's shape and colour, stray background pixels, and the largest |latent mean|.

    python bench/vae_proxy.py --groups 16 --minutes 25            # control: the same VAE, trained on
    python bench/vae_proxy.py --groups 4 --minutes 25             # 4 channels per GroupNorm group, not 1
    python bench/vae_proxy.py --groups 4 --outlier 1 --minutes 20 # ... and |mu| > 3 penalised

Why: the shipped VAE's GroupNorms have one channel per group at its 16-channel layers (norm_num_groups 16), so
its last normalisation removes every channel's mean and scale over the image; the encoder answers with a few
extreme latent values beside the object (|mu| up to 8) that set those statistics — and the decoder draws them
as a multicoloured speck (docs/results/toyworld_proxies.md). Run one proxy per core (OMP_NUM_THREADS=1); the
judged rows are printed every `--every` steps and as a table at the end. Writes only into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

from sdipc_lab.latents import pixels_of  # noqa: E402
from sdipc_lab.toyworld import samples  # noqa: E402
from sdipc_lab.toyworld.evaluate import psnr  # noqa: E402
from sdipc_lab.toyworld.judge import Judge, agreement, stray_pixels  # noqa: E402
from sdipc_lab.toyworld.data import render  # noqa: E402
from sdipc_lab.toyworld.exporting import LAB_DIR  # noqa: E402
from sdipc_lab.toyworld.models import VaeTrainer, regrouped  # noqa: E402


def judged(vae, x: torch.Tensor, truths: list[dict], judge: Judge) -> dict:
    """The round trip of x (N, 3, 64, 64) in [-1, 1] through posterior means, judged."""
    from PIL import Image

    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean  # (N, 4, 16, 16)
        y = vae.decode(mu).sample.clamp(-1, 1)
    to_uint8 = lambda t: ((t.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()  # noqa: E731
    recon, truth = to_uint8(y), to_uint8(x)
    images = [Image.fromarray(a) for a in recon]
    verdict = agreement(judge(images), truths)
    return dict(psnr=float(np.mean([psnr(a, b) for a, b in zip(recon, truth)])), shape=verdict["shape"],
                colour=verdict["colour"], stray=100 * float(stray_pixels(images).mean()),
                max_mu_median=float(mu.abs().amax(dim=(1, 2, 3)).median()), max_mu=float(mu.abs().max()))


def main() -> None:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=16, help="GroupNorm groups (the shipped VAE: 16)")
    parser.add_argument("--outlier", type=float, default=0.0, help="weight of mean(relu(|mu| - 3)^2)")
    parser.add_argument("--minutes", type=float, default=25)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--out", type=Path, help="save the fine-tuned VAE here (optional)")
    args = parser.parse_args()

    torch.manual_seed(0)
    vae = regrouped(AutoencoderKL.from_pretrained(LAB_DIR / "vae", torch_dtype=torch.float32), args.groups)
    trainer = VaeTrainer(vae, outlier_weight=args.outlier)
    test = samples(args.n, "test", two_objects=0)
    x_test = pixels_of([s.image for s in test], "cpu", 64)  # (n, 3, 64, 64) in [-1, 1]
    truths, judge = [s.attributes for s in test], Judge()
    world = render(20000, "train")
    rows = []

    def evaluate(step: int) -> None:
        vae.eval()
        rows.append(dict(step=step, **judged(vae, x_test, truths, judge)))
        vae.train()
        print(json.dumps(rows[-1]), flush=True)

    evaluate(0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    start, step = time.time(), 0
    while (elapsed := time.time() - start) < args.minutes * 60:  # warm-up, then cosine decay over the minutes
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * elapsed / (args.minutes * 60)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = trainer(world.pixels(torch.randint(0, len(world.images), (args.batch,), generator=g), "cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.every == 0:
            evaluate(step)
    if rows[-1]["step"] != step:
        evaluate(step)
    if args.out:
        vae.save_pretrained(args.out)
    print(f"\n## VAE proxy: groups {args.groups}, outlier weight {args.outlier}, {args.minutes:g} min, "
          f"batch {args.batch}, lr {args.lr:g} ({args.n} test images, posterior means)\n")
    print(table(["step", "PSNR dB", "judge shape %", "colour %", "stray %", "max |mu| (median image)", "max |mu|"],
                [[r["step"], f"{r['psnr']:.1f}", f"{100 * r['shape']:.0f}", f"{100 * r['colour']:.0f}",
                  f"{r['stray']:.2f}", f"{r['max_mu_median']:.1f}", f"{r['max_mu']:.1f}"] for r in rows]))


if __name__ == "__main__":
    main()
