"""A learning curve of the teaching lab: judged quality against the CPU-hours a run has cost, from points that
`bench/toyworld_quality.py --curve --json POINT.json` wrote (one per checkpoint).

    python bench/learning_curve.py "step 1,500=1.9=p1500.json" "step 3,000=2.7=p3000.json" --out curve.png

Each point is LABEL=CPU_HOURS=FILE: CPU-hours as wall-clock hours of the 2-core machine since the run began
(CLIP, VAE and U-Net, stages side by side counted once). A LABEL "ROUTE: label" names the route (the run
and its ancestors) a point belongs to: points of one route are joined by a line, routes are not joined to
each other (a marker each), e.g. "from scratch: step 3,128=2.4=a.json" "shipped: lab=8.8=b.json".
Prints one table per split and draws shape and size along the chain caption -> [sos, EOS x 76] -> oracle ->
SD-IPC, with the lab's quality targets (the `target` column of bench/toyworld_quality.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

CHAIN = {"true caption": "caption", "[sos, true EOS x 76]": "[sos, EOS x 76]",
         "SD-IPC on the caption's embedding (oracle)": "oracle", "SD-IPC (vary)": "SD-IPC"}
TARGETS = {("test", "true caption"): 90, ("test", "SD-IPC (vary)"): 75,
           ("heldout", "true caption"): 70, ("heldout", "SD-IPC (vary)"): 50}  # shape targets
BUDGET_HOURS = 10  # the shipped lab's route must train in at most 10 hours on 2 cores


def point(text: str) -> tuple[str, float, dict]:
    try:
        label, hours, path = text.split("=", 2)
        return label, float(hours), json.loads(Path(path).read_text())
    except (ValueError, OSError) as error:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=CPU_HOURS=FILE.json ({error})") from None


def route(label: str) -> str:
    return label.split(":", 1)[0].strip() if ":" in label else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("points", nargs="+", type=point)
    parser.add_argument("--out", type=Path, default=Path("learning_curve.png"))
    args = parser.parse_args()
    from matplotlib.figure import Figure  # a figure for the file alone: no pyplot state, no backend chosen

    points = sorted(args.points, key=lambda p: p[1])
    for split in ("test", "heldout"):
        rows = [[label, f"{hours:.1f}", *(" / ".join(f"{100 * p[split][c][a]:.0f}" for a in ("shape", "size"))
                                          if c in p[split] else "" for c in CHAIN)]
                for label, hours, p in points]
        print(f"\n{split} (shape / size, judge agreement %, {points[0][2]['n']} references per row)\n")
        print(table(["point", "CPU-hours", *CHAIN.values()], rows))
    routes = list(dict.fromkeys(route(label) for label, _, _ in points))
    markers = dict(zip(routes, "osD^vP*X"))
    past_budget = points[-1][1] >= BUDGET_HOURS  # points are sorted by hours
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, split in zip(axes, ("test", "heldout")):
        for k, (condition, name) in enumerate(CHAIN.items()):
            colour = f"C{k}"
            for r in routes:  # one line per route: points of different routes are never joined
                xs = [h for label, h, p in points if condition in p[split] and route(label) == r]
                ys = [100 * p[split][condition]["shape"] for label, _, p in points
                      if condition in p[split] and route(label) == r]
                label = name if len(routes) == 1 else f"{name}, {r or 'unnamed'}"
                ax.plot(xs, ys, marker=markers[r], color=colour, label=label)
            if (split, condition) in TARGETS:
                ax.axhline(TARGETS[split, condition], color=colour, ls=":", lw=1)
        if past_budget:
            ax.axvline(BUDGET_HOURS, color="grey", ls="--", lw=1)
        ax.set(title=f"{'test' if split == 'test' else 'held-out combinations'}: shape drawn",
               xlabel="CPU-hours of the run (2 cores)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("judge agreement, shape %")
    budget = f", dashed: the {BUDGET_HOURS}-hour budget" if past_budget else ""
    fig.suptitle(f"judged shape against the run's CPU-hours (dotted: the targets{budget})", fontsize="medium")
    if len(routes) > 1:  # one line per (prompt, route): beside the panels, where it hides no point
        fig.set_size_inches(11 + 2.6, 4)
        axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    else:
        axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"\nfigure: {args.out}")


if __name__ == "__main__":
    main()
