"""A run folder's trained parts as a lab: its constants measured (`measure_constants`: the cutoff chosen by the
judge), its sampler set, saved in fp16 (`export`); and the other way, a lab's parts copied into a run folder to
train on from it (`init_from_lab`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..components import quiet
from ..convert import image_embeds, pseudo_prompt
from ..lab import Lab, assemble, check_save_target, load_lab, save_lab
from ..measure import cutoff_sweep, norms, singular_value_quantiles
from ..checkpoints import checkpoint_weights
from .data import CLIP_MEAN, CLIP_STD
from .evaluate import judge_conditions
from .judge import JUDGE_FILE, Judge
from .models import FINETUNE_LR, ModelSizes, new_unet, toy_scheduler
from .world import SIZE, samples

LAB_DIR = Path(__file__).parent / "lab"


# The references the lab's cutoff is judged on: test-split images far past the ones the benches and notebooks use
# (`samples(n, "test")` from index 0), so the choice is not made on the references it is reported on.
CUTOFF_REFERENCES = 100_000
JUDGED = ("shape", "colour", "size", "position")  # what the cutoff is chosen by (the background is always right)


def measure_constants(lab: Lab, n: int = 512, judge=None, n_judged: int = 48) -> dict:
    """The teaching lab's `cutoff`, `norm`, `norm_t`, measured on the toy world's test split.

    norms: means over `n` test captions. cutoff: a quantile of W_t's singular values (`singular_value_quantiles`).
    With a `judge`, the candidate whose SD-IPC variations of `n_judged` test references (`CUTOFF_REFERENCES` on)
    the judge reads best (mean agreement on shape, colour, size and position; ties go to the higher cosine):
    the cosine of f_cnvrt to the true end-token state says how close the converted vector comes, not what the
    U-Net draws from it — a U-Net that reads caption information in W_t's weak directions draws better from a
    lower cutoff than the cosine picks (`docs/results/cutoff_oracle.md`). Without a judge, the
    candidate closest in cosine. Returns the constants, the sweep (with each judged candidate's agreement under
    "judged") and the norms."""
    data = samples(n, "test", two_objects=0)
    captions = [s.caption for s in data]
    measured = norms(lab, captions)
    sweep = cutoff_sweep(lab, [s.image for s in data], captions, singular_value_quantiles(lab))
    if judge is None:
        best = max(sweep, key=lambda row: row["cosine"])
    else:
        refs = samples(n_judged, "test", start=CUTOFF_REFERENCES, two_objects=0)
        f_img_c = image_embeds(lab, [s.image for s in refs])  # (N, P)
        embeds = {row["cutoff"]: pseudo_prompt(lab, f_img_c, cutoff=row["cutoff"], norm=measured["norm"])
                  for row in sweep}  # (N, 77, D) each, with the norm the lab will have
        judged = judge_conditions(lab, refs, judge, embeds=embeds)
        for row in sweep:
            scores = judged[row["cutoff"]]
            row["judged"] = {k: scores[k] for k in (*JUDGED, "stray")}
        best = max(sweep, key=lambda row: (round(float(np.mean([row["judged"][k] for k in JUDGED])), 6),
                                           row["cosine"]))
    return dict(cutoff=round(best["cutoff"], 4), norm=round(measured["norm"], 3), norm_t=round(measured["norm_t"], 3),
                cutoff_chosen_by="judge" if judge is not None else "cosine", cutoff_sweep=sweep, norms=measured)


def load_parts(out: Path, unet=None) -> dict:
    """A run folder's trained parts as float32 lab components (`assemble` takes them); `unet` stands in for a
    run whose U-Net is not trained yet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPImageProcessorPil, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    with quiet():
        return dict(
            tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(out / "text_encoder", dtype=torch.float32),
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder", dtype=torch.float32),
            feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)),
            unet=unet if unet is not None else UNet2DConditionModel.from_pretrained(out / "unet",
                                                                                    torch_dtype=torch.float32),
            vae=AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32),
            scheduler=toy_scheduler(),
        )


# Chosen by bench/sampler_sweep.py (docs/results/sampler_sweep.md). No guidance rescale (Lin et al. use 0.7): at
# guidance 2, on 96 references, rescale 0 cut SD-IPC's stray pixels from 0.10 to 0.02 % on test references
# (drawn images: 0.02 %) and from 0.13 to 0.07 % on held-out pairs.
SAMPLER = dict(scheduler="ddim", steps=10, guidance_scale=2.0, guidance_rescale=0.0)


def export(out: Path, lab_dir: Path | None = None, unet=None, *, into_package: bool = False,
           measure: tuple[int, int] = (512, 48), **sampler) -> Path:
    """Assemble the trained parts into a lab folder (fp16 weights, default `out/lab`), with its measured constants
    and its sampler settings (`SAMPLER`, overridden by `sampler`: as chosen by bench/sampler_sweep.py).
    `unet` stands in for the run's finished U-Net (`unet_from_checkpoint`: a look at a run still training).
    An existing lab there is replaced whole (written beside it, then swapped); any other folder, or a lab folder
    holding files a lab writer did not write, is refused. The package's own lab (and judge) is written only with
    `into_package=True` (`--lab-dir toy`), whatever path names it."""
    import shutil

    lab_dir = Path(lab_dir) if lab_dir is not None else out / "lab"
    if lab_dir.expanduser().resolve() == LAB_DIR.resolve() and not into_package:
        raise SystemExit(f"export: {lab_dir} is the lab shipped in the package; it is only replaced when asked by "
                         "name (--lab-dir toy). Name another --lab-dir.")
    try:  # before the minutes of measuring: a folder save_lab would refuse at the end
        check_save_target(lab_dir, into_package=into_package)
    except ValueError as error:
        raise SystemExit(f"export: {error}") from None

    parts = load_parts(out, unet)
    unknown = set(sampler) - set(SAMPLER)
    if unknown:
        raise ValueError(f"unknown sampler setting(s) {sorted(unknown)}: use {', '.join(SAMPLER)}")
    sampler = {**SAMPLER, **sampler}
    constants = dict(cutoff=0.0, norm=1.0, norm_t=1.0, steps=int(sampler["steps"]),
                     guidance_scale=float(sampler["guidance_scale"]),
                     guidance_rescale=float(sampler["guidance_rescale"]), finetune_lr=FINETUNE_LR)
    with quiet():
        lab = assemble(parts, constants, source="toy", device="cpu", dtype=torch.float32)
    lab.use_scheduler(sampler["scheduler"])
    parts["scheduler"] = lab.scheduler
    judge = run_judge(out)
    n, n_judged = measure  # test captions and judged references the constants are measured on
    measured = measure_constants(lab, n=n, judge=judge, n_judged=n_judged)  # the constants, their sweep and norms
    for key in ("cutoff", "norm", "norm_t"):
        constants[key] = measured[key]
        setattr(lab, key, constants[key])
    with quiet():
        half = assemble(dict(parts), constants, source="toy", device="cpu", dtype=torch.float16)
    try:
        save_lab(half, lab_dir, extra={"constants_measured.json": json.dumps({**constants, **measured}, indent=2) + "\n"},
                 into_package=into_package)
    except ValueError as error:
        raise SystemExit(f"export: {error}") from None
    if (out / "judge.safetensors").exists() and into_package:
        shutil.copy(out / "judge.safetensors", JUDGE_FILE)
    load_lab(lab_dir, device="cpu")  # it must load
    size = sum(f.stat().st_size for f in lab_dir.rglob("*.safetensors"))
    print(f"exported the lab to {lab_dir} ({size / 2**20:.1f} MB of weights): {constants}")
    return lab_dir


def run_judge(out: Path):
    """The judge export chooses the cutoff with: the run's own (`out/judge.safetensors`) if it trained one, else
    the shipped one; None (the cutoff is then chosen by cosine) if there is neither."""
    path = out / "judge.safetensors" if (out / "judge.safetensors").exists() else JUDGE_FILE
    return Judge(path) if path.exists() else None


def unet_from_checkpoint(out: Path, s: ModelSizes):
    """The U-Net of the run's latest checkpoint (its EMA weights), for exporting a run whose U-Net is still
    training: `train export --from-checkpoint`. The architecture is the run's `unet/` config if it has one (a run
    continued from a lab), else the one `s` builds (a U-Net trained from scratch: give the run's --size)."""
    from diffusers import UNet2DConditionModel

    ckpt = out / "unet.ckpt.safetensors"
    if not ckpt.exists():
        raise SystemExit(f"--from-checkpoint: {out} has no {ckpt.name}: train the unet stage first (it writes a "
                         "checkpoint every few minutes)")
    if (out / "unet" / "config.json").exists():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(out / "unet"))
    else:
        cross_dim = json.loads((out / "text_encoder" / "config.json").read_text())["hidden_size"]
        unet = new_unet(s, cross_dim)
    try:
        step, kind = checkpoint_weights(ckpt, unet)
    except ValueError as error:
        raise SystemExit(f"--from-checkpoint: {error}") from None
    print(f"--from-checkpoint: the U-Net's {kind} weights at step {step} of {ckpt}")
    return unet.float().eval()


def init_from_lab(out: Path, lab_dir: Path, skip=()) -> list[str]:
    """Copy a lab's components into the run folder `out` where it has none yet (so `vision`, `decoder` and `unet`
    continue from the lab's CLIP, VAE and U-Net): training goes on from a shipped lab when no run folder is left.
    Never overwrites what `out` holds. Returns the components copied."""
    import shutil

    if not (lab_dir / "sdipc_lab.json").exists():
        raise SystemExit(f"--init-from-lab {lab_dir}: not a lab folder (no sdipc_lab.json); 'toy' names the shipped lab")
    copied = []
    for part in ("tokenizer", "text_encoder", "image_encoder", "vae", "unet"):
        if part not in skip and not (out / part).exists():
            shutil.copytree(lab_dir / part, out / part)
            copied.append(part)
    return copied
