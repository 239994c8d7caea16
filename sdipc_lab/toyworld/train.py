"""Train the teaching-scale lab: CLIP, VAE, U-Net and the judge's shape classifier, then export the lab.

    python -m sdipc_lab.toyworld.train all   --out runs/toyworld     # everything, then export
    python -m sdipc_lab.toyworld.train clip  --out runs/toyworld     # one model (clip, vae, unet, judge)
    python -m sdipc_lab.toyworld.train vision --out runs/toyworld    # more image-tower training, text frozen
    python -m sdipc_lab.toyworld.train vision --variety 0.5 ...      # ... half of it on varied drawings (variety.py)
    python -m sdipc_lab.toyworld.train shape --variety 0.5 ...       # a new image tower reads shape first; then vision
    python -m sdipc_lab.toyworld.train decoder --out runs/toyworld   # more decoder training, latents unchanged
    python -m sdipc_lab.toyworld.train export --out runs/toyworld    # the lab, into runs/toyworld/lab
    python -m sdipc_lab.toyworld.train export --out runs/toyworld --from-checkpoint  # U-Net still training
    python -m sdipc_lab.toyworld.train recipe sdipc_lab/toyworld/recipe.toml --out runs/route   # the shipped route
    accelerate launch -m sdipc_lab.toyworld.train all ...             # several GPUs, same command
    accelerate launch --multi_gpu --num_processes 2 -m sdipc_lab.toyworld.train ...   # 2 processes, also on a CPU

With several processes `--batch` is the global batch: each step draws it (images, captions, noise, timesteps) as
one process would and each process trains on its contiguous share, so N processes train the same weights as one
(up to float rounding); only the main process writes and prints.

Every stage is seeded, shows a progress bar, writes an atomic checkpoint every few hundred steps and
resumes from it when run again (`--steps` is the total to reach), and saves its loss curve as a PNG.
`--minutes` stops a stage early (checkpointed) so a run fits a time budget, its learning rate decaying by the
clock (interrupted, it resumes on that clock); `--budget-steps N` is such a budget counted in steps, the same on
every machine; `--stop-at STEP` stops one stage at a step of its `--steps` schedule.
`--size test` trains tiny models for a few steps: what the unit tests run.

Design choices, each answering a finding of a pilot study of this world (tiny models, a few CPU-hours):
- The text tower is trained at the full 77 positions, and its contrastive loss is taken both at the
  end token and at a random padding position after it, so the padding states carry the caption the
  way SD v1's do. The U-Net never sees pseudo-prompts or anything else derived from SD-IPC.
- The noise schedule is SD v1's scaled-linear betas rescaled to zero terminal SNR, with v-prediction
  and trailing timesteps (Lin et al. 2024): SD v1's own schedule cannot produce flat backgrounds.
- A VAE (latents 16x16x4, scaling factor measured on the data) as in SD.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..cpus import usable_cpus
from ..lab import check_save_target
from ..training import MAX_LR, TrainingStopped, new_accelerator
from . import recipe
from . import stages as stage_functions
from .data import render, with_variety
from .exporting import LAB_DIR, SAMPLER, export, init_from_lab, unet_from_checkpoint
from .models import ALL, BUDGETS, MODEL_SIZES, STAGES
from .world import SIZE, TWO_OBJECTS


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["recipe"]:
        return recipe_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", help=f"all, export, recipe, or one or more of {','.join(STAGES)} (comma-separated)")
    parser.add_argument("--out", type=Path, default=Path("runs/toyworld"))
    parser.add_argument("--size", choices=list(MODEL_SIZES), default="full")
    parser.add_argument("--steps", type=int, help="total steps for the stage (default: the size's budget)")
    parser.add_argument("--minutes", help="time budget per stage, e.g. 8 or clip=4,vae=2 (the lr decays by it; "
                        "an interrupted stage resumes on its budget's clock, a finished one starts a new budget)")
    parser.add_argument("--budget-steps", type=int, metavar="N", help="a budget of N steps from where the stage "
                        "is, the lr decaying over them as over --minutes (a finished one run again: a new budget); "
                        "the same on every machine, where --minutes is not. One stage only, not with --minutes")
    parser.add_argument("--stop-at", type=int, metavar="STEP", help="stop (checkpointed) at this step of the "
                        "--steps schedule; one stage only. Run again without it to go on along the same schedule")
    parser.add_argument("--lr", type=float, help="learning rate (default: the size's budget)")
    parser.add_argument("--batch", type=int, help="batch size (default: the size's budget)")
    parser.add_argument("--unet-channels", help="override the size's U-Net channels, e.g. 64,128,128")
    parser.add_argument("--unet-layers", type=int, help="override the size's U-Net layers per block")
    parser.add_argument("--unet-heads", type=int, help="override the size's U-Net attention heads, e.g. 8")
    parser.add_argument("--vae-channels", help="override the size's VAE channels, e.g. 32,64,64")
    parser.add_argument("--vae-norm-groups", type=int, help="override the size's VAE GroupNorm groups, e.g. 4")
    parser.add_argument("--two-objects", type=float, metavar="SHARE",
                        help=f"share of training images with a second object (default {TWO_OBJECTS}, the world's)")
    parser.add_argument("--variety", type=float, metavar="SHARE",
                        help="vision, shape: a SHARE of the image tower's training images drawn with the variety of "
                             "users' images (continuous sizes, rotations, styles, shades, backgrounds, JPEG; "
                             "sdipc_lab.toyworld.variety), each drawn anew for its batch, e.g. 0.5")
    parser.add_argument("--hard-negatives", type=float, metavar="WEIGHT",
                        help="vision: add the attribute loss at this weight (each image against its caption with one "
                             "attribute changed; ClipTrainer), e.g. 1")
    parser.add_argument("--align", type=float, metavar="WEIGHT",
                        help="vision: add the alignment loss at this weight (1 - cosine of each image's embedding "
                             "and its caption's: closes the gap SD-IPC converts; ClipTrainer), e.g. 5")
    parser.add_argument("--grey-shape", type=float, metavar="WEIGHT",
                        help="vision: add the grey-shape loss at this weight (each image's shape read as its grey "
                             "copy's is: colour cannot stand in for shape; ClipTrainer), e.g. 3")
    parser.add_argument("--grey-share", type=float, metavar="SHARE",
                        help="vision, with --grey-shape: the loss reads the grey copies of this SHARE of each batch's "
                             "images (a second pass of the image tower over them; default 1), e.g. 0.25")
    parser.add_argument("--end-token-only", action="store_true",
                        help="vision: the contrastive loss at each caption's end token alone, not also at a padding "
                             "position after it (the frozen text tower then runs only up to the last end token)")
    parser.add_argument("--fresh-vision", type=int, metavar="PATCH",
                        help="vision: train a new image tower with this patch size (e.g. 4) against the frozen text "
                             "tower, instead of continuing the one in OUT/image_encoder; shape: the new tower's patch "
                             "size (default: the size's)")
    parser.add_argument("--snr-gamma", type=float, help="min-SNR-gamma weighting of the U-Net loss (e.g. 5)")
    parser.add_argument("--init-from-lab", type=Path, metavar="LAB",
                        help="continue from a lab's weights ('toy': the shipped one) where --out has none")
    parser.add_argument("--parallel", action="store_true",
                        help="with 'all' on a CPU: run clip beside vae, then vision beside decoder, one core each "
                             "(bench/train_speed.py: 1.3-1.6x the throughput of one after the other), then the rest")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", help="export's sampler settings, e.g. scheduler=dpm++,steps=20,guidance_scale=5,"
                        f"guidance_rescale=0.7 (default {SAMPLER})")
    parser.add_argument("--from-checkpoint", action="store_true",
                        help="export: take the U-Net from the run's latest checkpoint (EMA weights), to judge a run "
                             "that is still training")
    parser.add_argument("--lab-dir", type=Path, help="where export writes the lab (default: OUT/lab; 'toy' names "
                        "the package's own lab, which is only ever written when asked by that name)")
    args = parser.parse_args(argv)

    for name in ("steps", "batch", "stop_at", "budget_steps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and 0 < args.lr <= MAX_LR):
        parser.error(f"--lr must be a positive number at most {MAX_LR:g} (0 < lr <= {MAX_LR:g}; AdamW rates are "
                     f"around 1e-5 to 1e-3), got {args.lr!r}")
    if not 0 <= args.seed <= 2**63 - 1:
        parser.error(f"--seed must be a whole number between 0 and 2**63 - 1, got {args.seed}")
    exports = args.stage in ("all", "export")
    sampler = {}
    for item in args.sampler.split(",") if args.sampler else []:
        key, equals, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or key not in SAMPLER:
            parser.error(f"--sampler takes NAME=VALUE items separated by commas, NAME one of {', '.join(SAMPLER)}; "
                         f"got {item!r}")
        sampler[key] = value
    try:
        checked = {"scheduler": sampler.get("scheduler", SAMPLER["scheduler"]),
                   "steps": int(sampler.get("steps", SAMPLER["steps"])),
                   "guidance_scale": float(sampler.get("guidance_scale", SAMPLER["guidance_scale"])),
                   "guidance_rescale": float(sampler.get("guidance_rescale", SAMPLER["guidance_rescale"]))}
    except ValueError:
        parser.error(f"--sampler {args.sampler}: steps is a whole number, guidance_scale and guidance_rescale are "
                     "numbers")
    for bad, what in ((checked["scheduler"] not in ("ddim", "dpm++"), "scheduler is ddim or dpm++"),
                      (not 1 <= checked["steps"] <= 1000, "steps is a whole number from 1 to 1000"),
                      (not (math.isfinite(checked["guidance_scale"]) and checked["guidance_scale"] >= 0),
                       "guidance_scale is a number >= 0 (1: no guidance)"),
                      (not 0 <= checked["guidance_rescale"] <= 1, "guidance_rescale is between 0 and 1")):
        if bad:
            parser.error(f"--sampler {args.sampler}: {what}; nothing was trained or written")
    into_package = str(args.lab_dir) == "toy"  # the package's lab only when asked by that name
    lab_dir = args.out / "lab" if args.lab_dir is None else LAB_DIR if into_package else args.lab_dir
    if exports:  # the folder export would refuse at the end, refused before any stage trains
        if lab_dir.expanduser().resolve() == LAB_DIR.resolve() and not into_package:
            parser.error(f"--lab-dir {lab_dir} is the lab shipped in the package; it is only replaced when asked by "
                         "name (--lab-dir toy). Name another --lab-dir. Nothing was trained or written.")
        try:
            check_save_target(lab_dir, into_package=into_package)
        except ValueError as error:
            parser.error(f"--lab-dir: {error} Nothing was trained.")
    for name, what in (("stop_at", "a step of that stage's schedule"), ("budget_steps", "steps of that stage")):
        if getattr(args, name) is not None and (args.stage in ("all", "export") or "," in args.stage):
            parser.error(f"--{name.replace('_', '-')} is for one training stage ({what}), not {args.stage!r}")
    if args.budget_steps is not None and args.minutes:
        parser.error("give a budget in --minutes or in --budget-steps, not both")
    if args.from_checkpoint and args.stage != "export":
        parser.error("--from-checkpoint is for export (a look at a U-Net still training)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: name a folder for the run (it is created if missing)")
    torch.set_num_threads(min(torch.get_num_threads(), usable_cpus()))  # this script's own process: within its quota
    s = MODEL_SIZES[args.size]
    if args.unet_channels:
        s = dataclasses.replace(s, unet_channels=tuple(int(c) for c in args.unet_channels.split(",")))
    if args.vae_channels:
        s = dataclasses.replace(s, vae_channels=tuple(int(c) for c in args.vae_channels.split(",")))
    if args.unet_layers:
        s = dataclasses.replace(s, unet_layers=args.unet_layers)
    if args.unet_heads:
        s = dataclasses.replace(s, unet_heads=args.unet_heads)
    if args.vae_norm_groups:
        s = dataclasses.replace(s, vae_norm_groups=args.vae_norm_groups)
    if args.snr_gamma:
        s = dataclasses.replace(s, snr_gamma=args.snr_gamma)
    if args.two_objects is not None:
        if not 0 <= args.two_objects <= 1:
            parser.error(f"--two-objects is a share between 0 and 1, got {args.two_objects}")
        s = dataclasses.replace(s, two_objects=args.two_objects)
    args.out.mkdir(parents=True, exist_ok=True)
    accelerator = new_accelerator(mixed_precision=args.mixed_precision)  # several processes: one run, sharded
    if args.init_from_lab:
        source = LAB_DIR if str(args.init_from_lab) == "toy" else args.init_from_lab
        resized = {"unet"} if args.unet_channels or args.unet_layers or args.unet_heads else set()
        resized |= {"vae", "unet"} if args.vae_channels else set()  # a new latent space needs a new U-Net
        copied = init_from_lab(args.out, source, skip=resized) if accelerator.is_main_process else []
        accelerator.wait_for_everyone()
        s = dataclasses.replace(s, init_unet="unet" not in resized, init_vae="vae" not in resized)
        accelerator.print(f"--init-from-lab {source}: copied {copied or 'nothing (the run folder has every part)'} "
                          f"into {args.out}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    minutes = _parse_minutes(args.minutes)
    stages = list(ALL) if args.stage == "all" else args.stage.split(",")
    unknown = set(stages) - {*STAGES, "export"}
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}: use all, export, or {','.join(STAGES)}")
    if args.parallel:
        if args.stage != "all":
            parser.error("--parallel runs the stages of 'all'")
        argv = [a for a in argv if a != "--parallel"]
        position = argv.index("all")
        for pair in (("clip", "vae"), ("vision", "decoder")):
            children = [subprocess.Popen([sys.executable, "-m", "sdipc_lab.toyworld.train",
                                          *argv[:position], stage, *argv[position + 1:]],
                                         env={**os.environ, "OMP_NUM_THREADS": "1"}) for stage in pair]
            if any(child.wait() for child in children):
                raise SystemExit(f"a stage of {pair} failed; see its output above (resume with the same command)")
        stages = ["judge", "unet"]
    for option, field in (("--hard-negatives", "hard_negatives"), ("--align", "align"), ("--grey-shape", "grey_shape")):
        weight = getattr(args, field)
        if weight is None:
            continue
        if stages != ["vision"]:
            parser.error(f"{option} is for the vision stage alone")
        if not (math.isfinite(weight) and weight >= 0):
            parser.error(f"{option} is a weight >= 0, got {weight}")
        s = dataclasses.replace(s, **{field: weight})
    if args.grey_share is not None:
        if s.grey_shape == 0:
            parser.error("--grey-share is the share of images --grey-shape reads: give --grey-shape WEIGHT too")
        if not 0 < args.grey_share <= 1:
            parser.error(f"--grey-share is a share above 0 and at most 1, got {args.grey_share}")
        s = dataclasses.replace(s, grey_share=args.grey_share)
    if args.end_token_only:
        if stages != ["vision"]:
            parser.error("--end-token-only is for the vision stage alone (the other stages train the text tower, "
                         "whose padding states SD v1's U-Net reads)")
        s = dataclasses.replace(s, end_token_only=True)
    if args.fresh_vision is not None:
        if stages not in (["vision"], ["shape"]):
            parser.error("--fresh-vision is for the vision or the shape stage alone")
        if args.fresh_vision < 1 or SIZE % args.fresh_vision:
            parser.error(f"--fresh-vision is a patch size that divides the {SIZE}-px image (e.g. 4, 8), "
                         f"got {args.fresh_vision}")
        s = dataclasses.replace(s, fresh_vision_patch=args.fresh_vision)
    if args.variety is not None:
        if stages not in (["vision"], ["shape"]):
            parser.error("--variety is for the vision or the shape stage alone (the others train on the world's "
                         "images)")
        if not 0 <= args.variety < 1:
            parser.error(f"--variety is a share between 0 and 1 (1 excluded), got {args.variety}")
    world = (render(s.train_images, "train", two_objects=s.two_objects)
             if set(stages) - {"judge", "export"} else None)  # the judge draws its own
    if args.variety:
        world = with_variety(world, args.variety)
    for stage in stages:
        _check_needs(stage, args.out, args.from_checkpoint)
        if stage == "export":
            continue
        steps, batch, lr = BUDGETS[args.size][stage]
        budget = (args.steps or steps, args.batch or batch, args.lr or lr)
        limits = dict(minutes=minutes.get(stage), budget_steps=args.budget_steps, stop_at=args.stop_at)
        start = time.time()
        try:
            if stage == "judge":
                stage_functions.train_judge(s, budget, args.out, accelerator, args.seed, **limits)
            else:
                getattr(stage_functions, f"train_{stage}")(world, s, budget, args.out, accelerator, args.seed, **limits)
        except TrainingStopped as stopped:  # Ctrl-C or SIGTERM: checkpointed, say so without a traceback
            raise SystemExit(str(stopped)) from None
        accelerator.print(f"{stage}: {time.time() - start:.0f} s on {accelerator.device}")
    if exports and accelerator.is_main_process:
        unet = unet_from_checkpoint(args.out, s) if args.from_checkpoint else None
        export(args.out, lab_dir, unet, into_package=into_package, measure=s.measure, **sampler)


def recipe_main(argv: list[str]) -> None:
    """`train recipe RECIPE --out DIR [--until STEP] [--ship]`: a route of steps from a recipe file (`recipe`)."""
    parser = argparse.ArgumentParser(prog="python -m sdipc_lab.toyworld.train recipe", description=recipe.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, help=f"a recipe file (the shipped lab's: {recipe.RECIPE})")
    parser.add_argument("--out", type=Path, required=True, help="the run's folder: one subfolder per step")
    parser.add_argument("--size", choices=list(MODEL_SIZES), default="cpu",
                        help="model sizes (test: tiny models, every count divided by 1000)")
    parser.add_argument("--until", metavar="STEP", help="stop after this step")
    parser.add_argument("--ship", action="store_true", help="after the last step, ship its lab into the package and "
                        "re-run the commands that quote it (the recipe's [ship])")
    parser.add_argument("--package-lab", type=Path, default=LAB_DIR, help=argparse.SUPPRESS)  # the tests' target
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: name a folder for the run")
    try:
        recipe.run(args.recipe, args.out, size=args.size, until=args.until, ship=args.ship,
                   package_lab=args.package_lab, train_main=main)
    except recipe.RecipeError as error:
        parser.error(f"{error}. Nothing more was trained.")


def _check_needs(stage: str, out: Path, from_checkpoint: bool = False) -> None:
    needs = [part for part in NEEDS.get(stage, ()) if not (from_checkpoint and part == "unet")]
    missing = [part for part in needs if not (out / part).exists()]
    if missing:
        raise SystemExit(f"the {stage} stage reads {', '.join(missing)} from {out}, which has none yet: run the "
                         f"stages before it first ({', '.join(STAGES)}), or continue from a lab with "
                         "--init-from-lab toy")


def _parse_minutes(text: str | None) -> dict:
    """"8" (every stage) or "clip=4,vae=2"; anything else is refused with what was wrong."""
    if not text:
        return {}
    try:
        if "=" not in text:
            minutes = {stage: float(text) for stage in STAGES}
        else:
            minutes = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--minutes {text!r}: give minutes as a number (8) or per stage (clip=4,vae=2)") from None
    unknown = set(minutes) - set(STAGES)
    bad = {k: v for k, v in minutes.items() if not (math.isfinite(v) and v > 0)}
    if unknown or bad:
        raise SystemExit(f"--minutes {text!r}: " + (f"no stage named {sorted(unknown)} (stages: {', '.join(STAGES)})"
                         if unknown else f"minutes must be positive, got {bad}"))
    return minutes


NEEDS = {"vision": ("tokenizer", "text_encoder", "image_encoder"), "decoder": ("vae",),
         "unet": ("tokenizer", "text_encoder", "vae"),
         "export": ("tokenizer", "text_encoder", "image_encoder", "vae", "unet")}  # what a stage reads from the run


if __name__ == "__main__":
    main()
