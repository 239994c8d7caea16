"""Choose a lab's sampler settings by the judge and the artefact measure: guidance scale, guidance_rescale,
scheduler (DDIM vs DPM-Solver++) and steps.

    python bench/sampler_sweep.py [--source toy] [--n 48] [--split heldout]

Two passes on the test split (or the held-out combinations, where SD-IPC draws most of its second objects),
generating from the true caption and by SD-IPC (vary): first guidance x rescale
with the lab's scheduler and steps, then scheduler x steps at the best of those. "score" is the mean judge
agreement on shape, colour and position over both conditions, in %, less the % of images with a second object
(a stray region of 30 pixels or more: the artefact a student sees; an image with one costs as much as one wrong
attribute). Stray pixels, a share of the background under 1 %, are shown beside it, not scored: subtracted as
a percentage they could double unseen. "s / 4 images" is the wall time of one 4-image call. Progress goes to
stderr. Prints both tables and the settings to export with
(`python -m sdipc_lab.toyworld.train export --sampler scheduler=...,steps=...` takes the same names).
Writes docs/results/sampler_sweep.md (sampler_sweep_heldout.md with --split heldout), replaced on every run
(`common.record`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import median_seconds, record, table  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab.toyworld import samples  # noqa: E402
from sdipc_lab.toyworld.evaluate import judge_conditions  # noqa: E402
from sdipc_lab.toyworld.judge import Judge, stray_pixels  # noqa: E402

CONDITIONS = ("true caption", "SD-IPC (vary)")


def score(rows: dict) -> float:
    accuracy = np.mean([rows[c][a] for c in CONDITIONS for a in ("shape", "colour", "position")])
    second = np.mean([rows[c]["second object"] for c in CONDITIONS])
    return 100 * accuracy - 100 * second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="toy")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--guidance", default="2,3.5,5,7.5")
    parser.add_argument("--rescale", default="0,0.7")
    parser.add_argument("--steps", default="10,20,30")
    parser.add_argument("--split", default="test", choices=["test", "heldout"],
                        help="where the references come from")
    args = parser.parse_args()
    results = "sampler_sweep" + ("_heldout" if args.split == "heldout" else "")  # one file per split
    with record(results, f"Sampler settings by the judge and the artefact measure ({args.split} references)", lab=args.source):
        measure(args)


def measure(args) -> None:
    start = time.time()
    lab = S.load_lab(args.source)
    lab.pipe.set_progress_bar_config(disable=True)
    judge = Judge()
    refs = samples(args.n, args.split, two_objects=0)
    print(f"drawn references: stray {100 * stray_pixels([s.image for s in refs]).mean():.2f} %")

    def run(**sampler):  # the lab's own settings, changed for this run: what `export --sampler` would store
        for key, value in sampler.items():
            setattr(lab, key, value)
        rows = judge_conditions(lab, refs, judge, conditions=CONDITIONS)
        seconds = median_seconds(lambda: S.vary(lab, refs[0].image, n=4), repeats=2)
        cells = [f"{100 * rows[c][a]:.0f}" for c in CONDITIONS for a in ("shape", "colour", "position")]
        stray = [f"{100 * rows[c]['stray']:.2f}" for c in CONDITIONS]
        second_object = [f"{100 * rows[c]['second object']:.0f}" for c in CONDITIONS]
        return score(rows), cells + stray + second_object + [f"{seconds:.2f}"]

    headers = [f"{c}: {a}" for c in ("caption", "SD-IPC") for a in ("shape", "colour", "pos")]
    headers += ["caption stray %", "SD-IPC stray %", "caption: 2nd object %", "SD-IPC: 2nd object %",
                "s / 4 images", "score"]
    first, best = [], None
    for g in (float(x) for x in args.guidance.split(",")):
        for r in (float(x) for x in args.rescale.split(",")):
            value, cells = run(guidance_scale=g, guidance_rescale=r)
            first.append([g, r, *cells, f"{value:.1f}"])
            print(*first[-1], file=sys.stderr, flush=True)
            if best is None or value > best[0]:
                best = (value, g, r)
    _, g, r = best
    print(f"\n## Guidance x rescale ({type(lab.scheduler).__name__}, {lab.steps} steps; "
          f"{args.n} {args.split} references)\n")
    print(table(["guidance", "rescale", *headers], first))
    second, choice, steps_before = [], None, lab.steps
    for name in ("ddim", "dpm++"):
        lab.use_scheduler(name)
        for steps in (int(x) for x in args.steps.split(",")):
            value, cells = run(guidance_scale=g, guidance_rescale=r, steps=steps)
            second.append([name, steps, *cells, f"{value:.1f}"])
            print(*second[-1], file=sys.stderr, flush=True)
            if choice is None or value > choice[0] + 1.0:  # a point better, or keep the cheaper/first
                choice = (value, name, steps)
    lab.steps = steps_before
    print(f"\n## Scheduler x steps (guidance {g}, rescale {r})\n")
    print(table(["scheduler", "steps", *headers], second))
    print(f"\nchosen: scheduler={choice[1]} steps={choice[2]} guidance_scale={g} guidance_rescale={r} "
          f"(score {choice[0]:.1f}; a later row must beat an earlier one by a point)")
    print(f"(total {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
