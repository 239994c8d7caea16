"""Notebook 01's masking experiment on any lab, as one table: which of shape, colour, size and position survive when
the word tokens are masked (after the softmax, as in the paper, or before it) and when the end and padding tokens
are (the control), judged by the independent judge, with the pixel change against the full prompt.

    python bench/masking.py runs/fs3c/lab6000          # a lab folder, or "toy"
    python bench/masking.py toy --n 64 --seed 1

Used to tell whether a U-Net reads the end token (SD v1.4's habit, the paper's Fig. 2) or the words
(docs/results/toyworld_v2_progress.md, sittings 15-17).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import table, threads  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab import experiments as E  # noqa: E402

KEYS = ["condition", "judge shape", "judge colour", "judge size", "judge position", "pixel change vs full"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", help='a lab folder, or "toy"')
    parser.add_argument("--n", type=int, default=32, help="test captions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lab = S.load_lab(args.lab)
    rows, _ = E.masking_experiment(lab, S.references(lab, args.n), seeds=(args.seed,), judge=S.judge_for(lab))
    print(f"## Masking experiment ({lab.source}, {args.n} test captions, seed {args.seed}, {threads()}; "
          "judge agreement 0-1)\n")
    print(table(KEYS, [[row.get(k) for k in KEYS] for row in rows]))


if __name__ == "__main__":
    main()
