"""Where does a lab lose *position*? Two tables per lab, in one run so they compare.

    python bench/positions.py --source toy --source runs/toyworld/lab [--n 150]

1. The text tower: mean cosine between the end-token states (T-space) of captions that differ only in the
   position word (canonical wording, over `n` test references). Near 1 off the diagonal: the text tower does
   not tell those positions apart, so nothing conditioned on it (the U-Net, SD-IPC) can.
2. The U-Net: generated from each test caption, which position the judge sees (rows: truth; counts).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab.toyworld import POSITIONS, samples  # noqa: E402
from sdipc_lab.toyworld.evaluate import caption_with, text_features  # noqa: E402
from sdipc_lab.toyworld.judge import Judge  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", help="a lab (repeatable; default: toy)")
    parser.add_argument("--n", type=int, default=150, help="test references")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    positions = list(POSITIONS)
    data = samples(args.n, "test", two_objects=0)
    judge = Judge()
    for source in args.source or ["toy"]:
        lab = S.load_lab(source)
        cos = np.zeros((len(positions), len(positions)))
        for s in data:
            f = text_features(lab, [caption_with(s, "position", p) for p in positions], "t")  # (5, D), unit
            cos += (f @ f.T).cpu().numpy() / len(data)
        print(f"\n## {source}: text tower, cosine between captions that differ only in position ({args.n} references)\n")
        print(table(["", *positions], [[p, *row] for p, row in zip(positions, cos.tolist())]))
        images = S.generate(lab, [s.caption for s in data], n=1, seed=args.seed)
        counts = collections.Counter((s.attributes["position"], v["position"]) for s, v in zip(data, judge(images)))
        right = sum(counts[(p, p)] for p in positions) / len(data)
        print(f"\n## {source}: generated from the caption, position the judge sees (rows: truth; {100 * right:.0f} % right)\n")
        print(table(["truth \\ judged", *positions], [[p, *[counts[(p, q)] for q in positions]] for p in positions]))


if __name__ == "__main__":
    main()
