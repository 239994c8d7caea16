"""The quality of a run's CLIP and VAE before its U-Net exists: zero-shot and retrieval of the CLIP, and the
reconstruction of the VAE judged by the independent judge, beside the shipped lab's (100 test images); and how
much of the captions' end-token variance the SD-IPC round trip W_t^+ W_t would drop at the 5th / 10th / 20th
percentile of W_t's singular values (`measure.dropped_variance`): a text tower that keeps caption information there
makes a U-Net that learns to read them, and whose oracle row then falls short of its end-token row.

    python bench/stage_quality.py runs/toy          # a run folder with tokenizer/, text_encoder/, image_encoder/, vae/

The run's parts are put in a lab with the shipped U-Net only to reuse the lab-level measures; nothing is generated.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab.measure import dropped_variance, singular_value_quantiles  # noqa: E402
from sdipc_lab.toyworld import samples  # noqa: E402
from sdipc_lab.toyworld.evaluate import psnr, reconstruct, retrieval, zero_shot  # noqa: E402
from sdipc_lab.toyworld.judge import Judge, agreement  # noqa: E402
from sdipc_lab.toyworld.exporting import load_parts  # noqa: E402


def run_lab(out: Path, shipped: S.Lab) -> S.Lab:
    return S.assemble(load_parts(out, unet=shipped.unet), dict(cutoff=0.0, norm=1.0, norm_t=1.0), source=str(out),
                      device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    shipped = S.load_lab("toy", device="cpu")
    test = samples(args.n, "test", two_objects=0)
    truths = [s.attributes for s in test]
    judge = Judge()
    rows = []
    for name, lab in (("shipped", shipped), (str(args.run), run_lab(args.run, shipped))):
        shot, r = zero_shot(lab, test), retrieval(lab, test)
        recon = reconstruct(lab, [s.image for s in test])
        judged = agreement(judge(recon), truths)
        rows.append([name, *(f"{100 * shot[k]:.0f}" for k in ("shape", "colour", "size", "position", "background")),
                     f"{100 * r['i2t R@1']:.0f} / {100 * r['t2i R@1']:.0f}",
                     f"{np.mean([psnr(np.asarray(a), np.asarray(s.image)) for a, s in zip(recon, test)]):.1f}",
                     f"{100 * judged['shape']:.0f}", f"{100 * judged['colour']:.0f}",
                     " / ".join(f"{100 * share:.1f}" for share in dropped_variance(
                         lab, [s.caption for s in test], singular_value_quantiles(lab, (0.0, 0.05, 0.1, 0.2))[1:]))])
    print(f"## CLIP and VAE of a run ({args.n} test images; judge agreement in %)\n")
    print(table(["CLIP + VAE", "zero-shot shape", "colour", "size", "position", "background", "R@1 i2t / t2i",
                 "VAE PSNR dB", "VAE judge shape", "VAE judge colour",
                 "caption variance dropped % (5th / 10th / 20th pct)"], rows))


if __name__ == "__main__":
    main()
