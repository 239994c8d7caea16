"""Command line: `python -m sdipc_lab demo` (the workbook's main job) and `python -m sdipc_lab download SOURCE`."""

from __future__ import annotations

import argparse
import sys
import time

from . import edit, example_edit, load_lab, references, show_images, vary
from .hub import download


def demo(source: str, out: str, n: int, seed: int, **settings) -> None:
    """Convert three randomly drawn references (test images of the world, or photographs on SD) to prompts, and
    save their variations and an edit as one figure."""
    from pathlib import Path

    out = Path(out).expanduser()
    if out.is_dir() or out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise ValueError(f"--out must name an image file such as sdipc_demo.png, got {str(out)!r}")
    if not out.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: the folder {str(out.parent)!r} does not exist")
    start = time.perf_counter()
    lab = load_lab(source)
    print(f"loaded {lab} in {time.perf_counter() - start:.1f} s")
    refs = references(lab, 3, seed=seed)  # drawn at random by the seed: no hand-picked examples
    start = time.perf_counter()
    rows, labels = [], []
    for s in refs:
        rows += [s.image, *vary(lab, s.image, n=n, seed=seed, **settings)]
        labels.append(_wrap(s.caption))
    edit_text = example_edit(lab)
    rows += [refs[0].image, *edit(lab, refs[0].image, edit_text, n=n, seed=seed, **settings)]
    labels.append(f"EDIT of row 1\n+ '{edit_text}'\n(alpha 0.9, Eq. 8)")
    seconds = time.perf_counter() - start
    titles = (["reference"] + [f"variation {k}" for k in range(n)]) * 3 + ["reference"] + [f"edit {k}" for k in range(n)]
    fig = show_images(rows, titles, ncols=n + 1, row_labels=labels,
                      suptitle=f"SD-IPC on the {lab.source!r} lab: variations from the image alone (rows 1-3;\n"
                               f"the captions are shown for reference, never used), and an edit with text (row 4)")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"{len(refs) * n} variations + {n} edits in {seconds:.1f} s on {lab.device}; figure: {out.resolve()}")


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdipc_lab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="image variation and editing on the default lab, saved as a figure")
    p.add_argument("--source", default="toy", help="toy (default), tiny, sd-v1-4, sd-v1-5, or a lab folder")
    p.add_argument("--out", default="sdipc_demo.png")
    p.add_argument("--n", type=int, default=4, help="variations per reference")
    p.add_argument("--seed", type=int, default=0, help="picks the references and the noise")
    p.add_argument("--steps", type=int, help="denoising steps (default: the lab's)")
    p.add_argument("--size", type=int, help="image height and width in pixels (default: the lab's; SD v1.4: 512, "
                   "256 is ~4x cheaper)")
    p = commands.add_parser("download", help="fetch a hub source's weights once, with internet")
    p.add_argument("source", choices=["sd-v1-4", "sd-v1-5"])
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.source, args.out, args.n, args.seed, steps=args.steps, height=args.size, width=args.size)
        else:
            download(args.source)
            print(f"{args.source}: weights are in the Hugging Face cache; load_lab({args.source!r}) now works offline")
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
