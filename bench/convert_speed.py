"""Images per second through the SD-IPC converter alone, and its share of one `vary` call.

    python bench/convert_speed.py [--labs tiny toy] [--batch 8]

Times are medians of repeated runs; compare the ratios within one run, not across machines.
Writes docs/results/convert_speed.md (replaced on every run; `common.record`).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import median_seconds, record, table, threads  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab.toyworld import sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--labs", nargs="+", default=["tiny", "toy"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with record("convert_speed", "The SD-IPC converter's speed, alone and as a share of `vary`"):
        rows = []
        for source in args.labs:
            lab = S.load_lab(source)
            lab.pipe.set_progress_bar_config(disable=True)
            images = [sample(i, "test").image for i in range(args.batch)]
            S.inverse_projection(lab)  # the SVD is computed once per lab and cutoff; not part of a call
            convert_s = median_seconds(lambda: S.image_prompt_embeds(lab, images), args.repeats)
            one = images[:1]
            convert_one_s = median_seconds(lambda: S.image_prompt_embeds(lab, one), args.repeats)
            vary_s = median_seconds(lambda: S.vary(lab, one, n=4, seed=0), max(1, args.repeats // 2))
            rows.append([lab.source, str(lab.device), args.batch, args.batch / convert_s, convert_one_s * 1e3,
                         lab.steps, vary_s, f"{100 * convert_one_s / vary_s:.2f} %"])
        print(table(["lab", "device", "batch", "images/s (converter)", "ms per image (batch 1)",
                     "steps", "vary(n=4) s", "converter share of vary"], rows))
        print(f"\ntorch {torch.__version__}, {threads()}")


if __name__ == "__main__":
    main()
