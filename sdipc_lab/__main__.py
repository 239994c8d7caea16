"""Command line: `python -m sdipc_lab demo` (the workbook's main job) and `python -m sdipc_lab download SOURCE`."""

from __future__ import annotations

import argparse
import sys
import time


def demo(source: str, out: str, n: int, seed: int) -> None:
    """Convert a few reference images to prompts, and save their variations and an edit as one figure."""
    from . import edit, load_lab, show_images, vary
    from .toyworld import sample

    start = time.perf_counter()
    lab = load_lab(source)
    print(f"loaded {lab} in {time.perf_counter() - start:.1f} s")
    references = [sample(i, "test", two_objects=0).image for i in range(3)]
    start = time.perf_counter()
    rows, labels = [], []
    for i, ref in enumerate(references):
        rows += [ref, *vary(lab, ref, n=n, seed=seed)]
        labels.append(f"reference {i}")
    edit_text = "a huge star"
    rows += [references[0], *edit(lab, references[0], edit_text, n=n, seed=seed)]
    labels.append(f"+ '{edit_text}'")
    seconds = time.perf_counter() - start
    titles = ["reference"] + [f"variation {k}" for k in range(n)]
    fig = show_images(rows, titles * len(labels), ncols=n + 1, row_labels=labels,
                      suptitle=f"SD-IPC on the {lab.source!r} lab: variations (rows 1-3) and an edit (row 4)")
    fig.savefig(out, dpi=120)
    print(f"{len(references) * n} variations + {n} edits in {seconds:.1f} s on {lab.device}; figure: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdipc_lab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="image variation and editing on the default lab, saved as a figure")
    p.add_argument("--source", default="toy", help="toy (default), tiny, sd-v1-4, sd-v1-5, or a lab folder")
    p.add_argument("--out", default="sdipc_demo.png")
    p.add_argument("--n", type=int, default=4, help="variations per reference")
    p.add_argument("--seed", type=int, default=0)
    p = commands.add_parser("download", help="fetch a hub source's weights once, with internet")
    p.add_argument("source", choices=["sd-v1-4", "sd-v1-5"])
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.source, args.out, args.n, args.seed)
        else:
            from .lab import download
            download(args.source)
            print(f"{args.source}: weights are in the Hugging Face cache; load_lab({args.source!r}) now works offline")
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
