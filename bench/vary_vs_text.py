"""SD-IPC variation vs plain text-to-image: same pipeline, steps, batch and noise. Wall-time ratio.

    python bench/vary_vs_text.py [--source toy] [--batch 4] [--repeats 5]

SD-IPC adds one CLIP image encoding and a (cached) matrix product to a text-to-image call; the
target is a ratio <= 1.05. Writes docs/results/vary_vs_text.md (replaced on every run; `common.record`).
"""

from __future__ import annotations

import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(__file__))
from common import median_seconds, record, table, threads  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab.toyworld import sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="toy")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with record("vary_vs_text", "SD-IPC variation and editing against plain text-to-image: the wall-time ratio", lab=args.source):
        lab = S.load_lab(args.source)
        lab.pipe.set_progress_bar_config(disable=True)
        ref = sample(0, "test", two_objects=0)
        S.inverse_projection(lab)
        rows = []
        text_s = median_seconds(lambda: S.generate(lab, ref.caption, n=args.batch), args.repeats)
        vary_s = median_seconds(lambda: S.vary(lab, ref.image, n=args.batch), args.repeats)
        edit_s = median_seconds(lambda: S.edit(lab, ref.image, "a blue disk", n=args.batch), args.repeats)
        for name, secs in (("text-to-image (true caption)", text_s), ("SD-IPC vary", vary_s), ("SD-IPC edit", edit_s)):
            rows.append([name, secs, secs / text_s])
        print(f"{lab.source} lab on {lab.device} ({threads()}), batch {args.batch}, "
              f"{lab.steps} steps, {lab.image_size}px, median of {args.repeats}\n")
        print(table(["call", "seconds", "ratio to text-to-image"], rows))


if __name__ == "__main__":
    main()
