"""How good is the teaching-scale lab? One table: judge, CLIP, VAE, text-to-image, SD-IPC variation, speed.

    python bench/toyworld_quality.py [--source toy] [--n 96] [--pool 100]  # --pool: at least --n
    python bench/toyworld_quality.py --source runs/proxy/lab --quick    # a proxy run: true caption + SD-IPC only
    python bench/toyworld_quality.py --source LAB --curve --json p.json # caption -> EOS -> oracle -> SD-IPC, both splits
    python bench/toyworld_quality.py --cutoffs 0 lab 0.5 [--split heldout]  # what the cutoff does to the oracle, SD-IPC

The `target` column holds the lab's quality targets. The judge (analytic pixels + a shape CNN) is independent
of the CLIP studied.
"stray %" is the share of background pixels away from the object that differ from the background
(`judge.stray_pixels`): streaks, blotches and halos; drawn images are the reference. "in blobs" is the part of it
in regions of 30 pixels or more, with the share of images that have one (`judge.stray_parts`): in the images
looked at, a second object where the reference has one - a content error rather than an artefact.

Writes docs/results/toyworld_quality.md; with --cutoffs, docs/results/cutoff_oracle.md (cutoff_oracle_heldout.md
with --split heldout); replaced on every run (`common.record`). --quick and --curve write no results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import median_seconds, record, table, threads  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab.toyworld import samples  # noqa: E402
from sdipc_lab.toyworld.evaluate import (  # noqa: E402
    cutoff_conditions,
    diversity,
    judge_conditions,
    psnr,
    reconstruct,
    retrieval,
    stray_summary,
    zero_shot,
)
from sdipc_lab.toyworld.judge import Judge, agreement  # noqa: E402
from sdipc_lab.toyworld.world import draw  # noqa: E402

ATTRS = ("shape", "colour", "size", "position", "background")


def pct(scores: dict, keys=ATTRS) -> list[str]:
    return [f"{100 * scores[k]:.0f}" if k in scores else "" for k in keys]


def stray_cells(scores: dict) -> list[str]:
    """The "stray %" and "of which in blobs (images with one)" cells of a `stray_summary` row (or a generated one)."""
    blobs = f"{100 * scores['stray blobs']:.2f} ({100 * scores['second object']:.0f} %)"
    return [f"{100 * scores['stray']:.2f}", blobs]


DIVERSE, DIVERSE_REFS = 4, 16  # images per reference, references: the diversity table


def chunks(images: list) -> list[list]:
    return [images[i:i + DIVERSE] for i in range(0, len(images), DIVERSE)]


def _cutoff(text: str):
    if text == "lab":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cutoff: give a number >= 0, or 'lab'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a cutoff is a number >= 0, got {text}")
    return value


def cutoff_table(lab, judge, cutoffs: list[float], args, start: float) -> None:
    """How much the round trip W_t^+ W_t loses, and what the cutoff does to it. Rows: the true
    end-token state repeated, then the oracle and SD-IPC at each cutoff; the rank W_t^+ keeps; the cosine between
    each converted vector and the caption's true end-token state (what `exporting.measure_constants` chooses the
    cutoff by without a judge; with one, by the judged SD-IPC variations); and the share of the captions' end-token
    variance the round trip drops at that cutoff (`measure.dropped_share`: what the U-Net reads there, SD-IPC
    cannot give back)."""
    from sdipc_lab.convert import at_end, inverse_projection
    from sdipc_lab.measure import dropped_share

    refs = samples(args.n, args.split, two_objects=0)
    embeds = cutoff_conditions(lab, refs, cutoffs)
    judged = judge_conditions(lab, refs, judge, seed=args.seed, embeds=embeds)
    f_txt, eos = S.encode_text(lab, [s.caption for s in refs])
    f_eos = at_end(f_txt, eos).float()  # (N, D), encoded once: for the cosines and the dropped shares
    W, f_eos64 = lab.W_t.detach().double().cpu(), f_eos.double().cpu()  # (P, D), (N, D): as measure.dropped_variance
    rows = []
    for name, scores in judged.items():
        cutoff = next((c for c in cutoffs if name.endswith(f"cutoff {c:.4g}")), None)
        inverse = None if cutoff is None else inverse_projection(lab, cutoff)
        rank = "" if inverse is None else f"{inverse.rank}/{len(inverse.singular_values)}"
        cosine = torch.nn.functional.cosine_similarity(embeds[name][:, 1].float(), f_eos, dim=-1).mean().item()
        share = "" if inverse is None else f"{100 * dropped_share(f_eos64, W, inverse):.1f}"  # W_t^+ is float64
        rows.append([name, rank, share, f"{cosine:.3f}", *pct(scores, ATTRS[:4]), f"{100 * scores['stray']:.2f}"])
    print(f"## The round trip and the cutoff ({lab.source}, {args.n} {args.split} references, lab cutoff {lab.cutoff}, "
          f"norm {lab.norm}; judge agreement in %)\n")
    print(table(["prompt", "rank kept", "caption variance dropped %", "cos(f_cnvrt, true EOS)", *ATTRS[:4],
                 "stray %"], rows))
    print(f"\n(total {time.time() - start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="toy")
    parser.add_argument("--n", type=int, default=48, help="references per generation row")
    parser.add_argument("--pool", type=int, help="images for CLIP accuracy and retrieval, and where the generation "
                        "rows' references are drawn from (default: 100, or --n if larger)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", default=None, help="judge weights (default: the shipped ones)")
    parser.add_argument("--quick", action="store_true", help="only generation from the true caption and SD-IPC")
    parser.add_argument("--curve", action="store_true", help="only generation: the caption, [sos, EOS x 76], the "
                        "oracle and SD-IPC, test and held-out (a point of a learning curve: bench/learning_curve.py)")
    parser.add_argument("--json", type=Path, help="also write the generation rows' scores to this JSON file")
    parser.add_argument("--cutoffs", nargs="+", type=_cutoff, metavar="CUTOFF",
                        help="only the oracle and SD-IPC at these cutoffs ('lab': the lab's; 0.5: a number), then stop")
    parser.add_argument("--split", default="test", choices=["test", "heldout"], help="the references of --cutoffs")
    args = parser.parse_args()
    if args.pool is None:
        args.pool = max(100, args.n)
    elif args.pool < args.n:  # the generation rows' references are the pool's first n: fewer would be silently used
        parser.error(f"--n {args.n} references need --pool {args.n} or more (the generation rows draw them from "
                     f"the pool of --pool {args.pool}); leave --pool out to use max(100, --n)")
    if args.cutoffs:  # one file per split
        results = "cutoff_oracle" + ("_heldout" if args.split == "heldout" else "")
        title = f"What the cutoff does to the oracle and to SD-IPC ({args.split} references)"
    elif args.quick or args.curve:  # proxy runs, points of a learning curve: no results file
        results, title = None, None
    else:
        results, title = "toyworld_quality", "How good the teaching-scale lab is"
    with record(results, title, lab=args.source):
        measure(args)


def measure(args) -> None:
    start = time.time()
    lab = S.load_lab(args.source)
    lab.pipe.set_progress_bar_config(disable=True)
    judge = Judge(args.judge) if args.judge else Judge()
    if args.cutoffs:
        return cutoff_table(lab, judge, [lab.cutoff if c == "lab" else c for c in args.cutoffs], args, start)
    test = samples(args.pool, "test", two_objects=0)
    held = samples(args.pool, "heldout", two_objects=0)
    rows = []
    truth_t, truth_h = [s.attributes for s in test], [s.attributes for s in held]
    drawn = [s.image for s in test[: args.n]]
    rows.append(["judge on drawn images (test)", *pct(agreement(judge([s.image for s in test]), truth_t)), "",
                 *stray_cells(stray_summary(drawn)), "100 %"])
    if args.curve:
        args.quick = True
    if not args.quick:
        rows.append(["judge on drawn images (held-out combos)", *pct(agreement(judge([s.image for s in held]), truth_h)),
                     "", "", "", ""])
        for space in ("c", "t"):
            name = "C-space" if space == "c" else f"T-space (W_t^+, cutoff {lab.cutoff})"
            r = retrieval(lab, test, space)
            rows.append([f"CLIP zero-shot, {name}, test", *pct(zero_shot(lab, test, space)),
                         f"i2t {100 * r['i2t R@1']:.0f} / t2i {100 * r['t2i R@1']:.0f}", "", "",
                         "shape 92, colour/size/pos 98" if space == "c" else "~ C-space (Table 1)"])
        rows.append(["CLIP zero-shot, C-space, held-out combos", *pct(zero_shot(lab, held)), "", "", "", ""])
        recon = reconstruct(lab, [s.image for s in test])
        vae_psnr = np.mean([psnr(np.asarray(a), np.asarray(s.image)) for a, s in zip(recon, test)])
        rows.append([f"VAE reconstruction (PSNR {vae_psnr:.1f} dB)", *pct(agreement(judge(recon), truth_t)), "",
                     *stray_cells(stray_summary(recon[: args.n])), "shape 97, colour 98"])
    refs_t, refs_h = test[: args.n], held[: args.n]
    chain = ("true caption", "[sos, true EOS x 76]", "SD-IPC on the caption's embedding (oracle)", "SD-IPC (vary)")
    held_rows = chain if args.curve or not args.quick else ("true caption", "SD-IPC (vary)")
    gen_t = judge_conditions(lab, refs_t, judge, seed=args.seed,
                             conditions=held_rows if args.quick else None)  # --quick, --curve: no shuffled baseline
    gen_h = judge_conditions(lab, refs_h, judge, seed=args.seed, conditions=held_rows)
    if args.json:
        args.json.write_text(json.dumps({"source": str(args.source), "n": args.n, "test": gen_t, "heldout": gen_h},
                                        indent=1) + "\n")
    targets = {"true caption": "shape 90, colour 95, pos 95, size 90", "SD-IPC (vary)": "shape 75, colour 90, pos 90"}
    targets_h = {"true caption": "shape 70, colour 90", "SD-IPC (vary)": "shape 50, colour 85"}
    for name, scores in gen_t.items():
        rows.append([f"generated: {name}, test", *pct(scores), "", *stray_cells(scores), targets.get(name, "")])
    for name in held_rows:
        rows.append([f"generated: {name}, held-out combos", *pct(gen_h[name]), "", *stray_cells(gen_h[name]),
                     targets_h.get(name, "")])
    print(f"## Teaching-scale lab quality ({lab.source}, {args.pool} images for CLIP, {args.n} references per "
          f"generation row, {lab.steps} steps, guidance {lab.guidance_scale}, rescale {lab.guidance_rescale}, "
          f"{type(lab.scheduler).__name__}; judge agreement in %)\n")
    print(table(["measure", *ATTRS, "retrieval R@1 (pool %d)" % args.pool, "stray %",
                 "of which in blobs (images with one)", "target"], rows))
    if args.quick:
        print(f"\n(total {time.time() - start:.0f} s)")
        return
    cos = torch.nn.functional.cosine_similarity
    print(f"\nSpeed: 4 images at {lab.image_size}px, {lab.steps} steps, on {lab.device} "
          f"({threads()}): {median_seconds(lambda: S.vary(lab, test[0].image, n=4), 3):.2f} s "
          f"(target <= 2 s on 2 cores).")
    print(f"Padding states: cosine(end-token state, padding state at k) over {len(test)} test captions:")
    f_txt, eos = S.encode_text(lab, [s.caption for s in test])
    ks = [int(e) for e in eos]
    rows = []
    for offset in (1, 5, 10, 20, 40):
        vals = [cos(f_txt[i, ks[i]], f_txt[i, min(76, ks[i] + offset)], dim=0).item() for i in range(len(test))]
        rows.append([f"eos + {offset}", f"{np.mean(vals):.3f}"])
    rows.append(["k = 76", f"{np.mean([cos(f_txt[i, ks[i]], f_txt[i, 76], dim=0).item() for i in range(len(test))]):.3f}"])
    print(table(["position", "mean cosine"], rows))
    print(f"\nDiversity: {DIVERSE} images for each of {DIVERSE_REFS} test references, compared within each reference "
          "(mean RMS distance of the images shrunk to 16 px, x100; % of pairs judged another shape / size / position):")
    refs = test[:DIVERSE_REFS]
    groups = {"drawn (the caption's objects, other seeds)": [[draw(s.things, s.background, seed=k)
                                                              for k in range(DIVERSE)] for s in refs],
              "generated: true caption": chunks(S.generate(lab, [s.caption for s in refs], n=DIVERSE, seed=args.seed)),
              "generated: SD-IPC (vary)": chunks(S.vary(lab, [s.image for s in refs], n=DIVERSE, seed=args.seed))}
    rows = []
    for name, images in groups.items():
        d = diversity(images, judge)
        rows.append([name, f"{100 * d['distance']:.1f}", *(f"{100 * d[k]:.0f}" for k in ("shape", "size", "position"))])
    print(table(["images", "distance", "shape differs %", "size differs %", "position differs %"], rows))
    print(f"\n(total {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
