"""What does the teaching lab make of an image a user brings? CLIP zero-shot and SD-IPC, on drawings the world's
renderer did not make (`sdipc_lab.toyworld.freehand`), beside the world's own test renderings.

    python bench/any_image.py [--source toy] [--n 480] [--world-n 96] [--sheet sheet.png]

Each drawing has its truth (shape, colour word, object width). "clip" columns: zero-shot, the image's C-space
embedding against captions that differ in that attribute alone. "sd-ipc" columns: one variation (`S.vary`) read by
the world's judge. Size is scored only outside the fair band (object width 33-45 % of the image, between the
world's small and large objects). Rows per part of the set: "dev" may inform tuning; "heldout" (disjoint seeds)
informs nothing and gives the headline. Writes docs/results/any_image.md (replaced on every run; `common.record`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS as RESULTS_DIR, record, table, threads  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab.toyworld import freehand, samples  # noqa: E402
from sdipc_lab.toyworld.evaluate import read_drawings  # noqa: E402

COLUMNS = ("clip shape", "clip colour", "sd-ipc shape", "sd-ipc colour", "sd-ipc size")
TARGETS = {"sd-ipc shape": 0.85, "sd-ipc shape, every size bucket": 0.75, "sd-ipc colour": 0.95, "clip shape": 0.95}
RESULTS = RESULTS_DIR / "any_image.md"


def summary(rows: list[dict]) -> list:
    """N, then each column's percentage over the rows that score it (size: outside the fair band)."""
    out = [len(rows)]
    for column in COLUMNS:
        scored = [r[column] for r in rows if r[column] is not None]
        out.append(f"{100 * np.mean(scored):.0f}" + (f" (of {len(scored)})" if len(scored) < len(rows) else "")
                   if scored else "")
    return out


def grouped(name: str, rows: list[dict], data, key) -> str:
    groups = {}
    for row, d in zip(rows, data):
        groups.setdefault(key(d), []).append(row)
    return table([name, "N", *COLUMNS], [[g, *summary(groups[g])] for g in sorted(groups)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="toy", help="the lab: 'toy' or a lab folder")
    parser.add_argument("--n", type=int, default=480, help="drawings per part")
    parser.add_argument("--world-n", type=int, default=96, help="world renderings per split (test, heldout)")
    parser.add_argument("--parts", default="dev,heldout", help="which parts of the set: dev, heldout or both")
    parser.add_argument("--sheet", type=Path, help="also save a contact sheet: held-out drawings and their variations")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the results file (default {RESULTS})")
    args = parser.parse_args()
    if args.n < 1 or args.world_n < 1:
        parser.error("--n and --world-n must be at least 1")
    parts = args.parts.split(",")
    if set(parts) - set(freehand.PARTS):
        parser.error(f"--parts: name {', '.join(freehand.PARTS)}, comma-separated; got {args.parts!r}")
    with record(args.out, "What the teaching lab makes of images it was not drawn by", lab=args.source):
        start = time.time()
        lab = S.load_lab(args.source, device="cpu")
        judge = S.judge_for(lab)
        if judge is None:
            raise SystemExit(f"{args.source} is not a toy-world lab: this bench judges with the world's judge")
        lines = [f"Lab: `{args.source}`, {threads()}.\n"]
        overall = []
        world_rows = {}
        for split in ("test", "heldout"):
            data = samples(args.world_n, split, two_objects=0)
            world_rows[split] = read_drawings(lab, data, judge)
            overall.append([f"world's own renderings, {split} split", *summary(world_rows[split])])
        results = {}
        for part in parts:
            data = freehand.drawings(args.n, part)
            rows = read_drawings(lab, data, judge)
            results[part] = (data, rows)
            overall.append([f"drawings, {part} part", *summary(rows)])
        head = table(["images", "N", *COLUMNS], overall)
        lines += ["## Overall (%)\n", head, ""]
        for part, (data, rows) in results.items():
            lines += [f"## Drawings, {part} part: by object width (share of the image)\n",
                      grouped("width", rows, data, lambda d: d.bucket), "",
                      f"## Drawings, {part} part: by kind of drawing\n",
                      grouped("kind", rows, data, lambda d: d.kind), "",
                      f"## Drawings, {part} part: by input format\n",
                      grouped("format", rows, data, lambda d: d.format), "",
                      f"## Drawings, {part} part: by shape\n", grouped("shape", rows, data, lambda d: d.shape), ""]
        if "heldout" in results:
            data, rows = results["heldout"]
            buckets = {}
            for row, d in zip(rows, data):
                buckets.setdefault(d.bucket, []).append(row["sd-ipc shape"])
            measured = {"sd-ipc shape": np.mean([r["sd-ipc shape"] for r in rows]),
                        "sd-ipc shape, every size bucket": min(np.mean(v) for v in buckets.values()),
                        "sd-ipc colour": np.mean([r["sd-ipc colour"] for r in rows]),
                        "clip shape": np.mean([r["clip shape"] for r in rows])}
            lines += ["## Targets, on the held-out part\n",
                      table(["measure", "measured %", "target %", "met"],
                            [[k, f"{100 * measured[k]:.0f}", f"{100 * TARGETS[k]:.0f}",
                              "yes" if measured[k] >= TARGETS[k] else "no"] for k in TARGETS]), ""]
            if args.sheet:
                sheet(data[:24], rows[:24], args.sheet)
        lines.append(f"{time.time() - start:.0f} s in all.")
        print("\n".join(lines))


def sheet(data, rows, path: Path) -> None:
    """Pairs: each drawing (at 64 px, as the lab sees it) above its SD-IPC variation."""
    from PIL import Image

    cols = 12
    out = Image.new("RGB", (cols * 68, ((len(data) + cols - 1) // cols) * 136), "white")
    for k, (d, r) in enumerate(zip(data, rows)):
        x, y = (k % cols) * 68, (k // cols) * 136
        side = min(d.image.size)
        left, top = (d.image.width - side) // 2, (d.image.height - side) // 2
        out.paste(d.image.crop((left, top, left + side, top + side)).resize((64, 64), Image.BICUBIC), (x, y))
        out.paste(r["image"].resize((64, 64)), (x, y + 66))
    out.resize((out.width * 2, out.height * 2), Image.NEAREST).save(path)


if __name__ == "__main__":
    main()
