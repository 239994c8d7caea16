"""Latent CLIP vs decode + pixel CLIP: the cost of scoring a generated latent, and of one ReNO step.

    python bench/latent_reward.py [--source toy] [--batch 16] [--iterations 10] [--repeats 5]

Companion paper 001 (Latent-CLIP): a reward that reads latents needs no VAE decode, saving 21 % per prompt
in ReNO at SDXL scale. Printed: milliseconds per scoring batch and the decode's share; seconds per ReNO
iteration with each reward, as a ratio. On the toy lab the shipped towers are used; for other sources
(tiny, sd-v1-4) towers of the same architecture are randomly initialised: speed needs no trained weights.
Writes docs/results/latent_reward.md (replaced on every run; `common.record`).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import record, table, threads  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab import latent_clip as LC  # noqa: E402


def towers_for(lab) -> dict:
    if lab.source == "toy":
        return LC.load_towers(device=lab.device, dtype=lab.dtype, lab=lab)
    return {k: LC.new_tower(lab, k).to(lab.device, lab.dtype).eval() for k in LC.KINDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="toy")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    title = "Latent CLIP against decode + pixel CLIP: scoring a latent, and one ReNO step"
    with record("latent_reward", title, lab=args.source):
        lab = S.load_lab(args.source)
        towers = towers_for(lab)
        side = lab.unet.config.sample_size
        latents = torch.randn(args.batch, lab.vae.config.latent_channels, side, side, device=lab.device,
                              dtype=lab.dtype)

        print(f"{lab.source} lab on {lab.device} ({threads()}), {lab.image_size}px images, "
              f"latents {tuple(latents.shape[1:])}, median of {args.repeats}\n")
        print(f"## Scoring a batch of {args.batch} latents\n")
        cost = LC.scoring_cost(lab, towers, latents, repeats=args.repeats)
        print(table(list(cost[0]), [list(row.values()) for row in cost]))

        prompt = "a large red circle on the left on a white background"
        rows = []
        for reward in ("pixel", "latent"):
            per_it = []
            for seed in range(args.repeats):
                history = LC.reno(lab, prompt, reward=reward, towers=towers, iterations=args.iterations,
                                  seed=seed).history
                per_it += [h["seconds"] for h in history[1:]]
            rows.append([f"{reward} reward", sorted(per_it)[len(per_it) // 2]])
        pixel_s = rows[0][1]
        for row in rows:
            row.append(row[1] / pixel_s)
        print(f"\n## One ReNO iteration (one-step generator + reward + backward), median of "
              f"{args.repeats} x {args.iterations}\n")
        print(table(["reward", "seconds / iteration", "ratio to pixel reward"], rows))
        print("\nThe paper: -21 % time per prompt (SDXL, 1024 px). GPU: run this script with --source sd-v1-4 "
              "on a machine with a GPU (random towers are fine for speed).")


if __name__ == "__main__":
    main()
