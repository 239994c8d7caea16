"""The teaching lab's contact sheets, for its guide (docs/guide/teaching_lab.md): every (shape, colour) pair
from its caption, and SD-IPC variations of 12 random test references (`sdipc_lab.toyworld.evaluate.contact_sheet`).

    python bench/contact_sheet.py [--source toy] [--seed 0] [--out docs/toyworld]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sdipc_lab as S
from sdipc_lab.toyworld.evaluate import contact_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/toyworld"))
    args = parser.parse_args()
    lab = S.load_lab(args.source)
    lab.pipe.set_progress_bar_config(disable=True)
    pairs, varied = contact_sheet(lab, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fig in (("contact_pairs.png", pairs), ("contact_variations.png", varied)):
        fig.savefig(args.out / name, dpi=110)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
