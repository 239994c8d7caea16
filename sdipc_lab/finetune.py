"""Few-shot fine-tuning of the converter (paper Sec. 3.2-3.3): SD-IPC-FT and SD-IPC-CT, and a Custom
Diffusion baseline.

What trains, with everything else frozen (the inverse W_t^+ too):
- `DeepVisualPrompts`: VPT-deep. N learnable tokens *inserted* after the class token at the input of every
  layer of the CLIP image transformer and dropped again at its output, so the next layer gets fresh ones.
  No image token is overwritten (a public port overwrites the first patch tokens: see the tests).
  Attached with forward hooks, a public PyTorch seam; the model's code is untouched.
- the U-Net's cross-attention `to_k`/`to_v`, through diffusers' `CustomDiffusionAttnProcessor2_0`
  (`train_kv=True, train_q_out=False`), initialised from the base weights.

The loss is Eq. 9: the denoising loss of `x_target`'s latents conditioned on the converted prompt of
`x_ref`, plus (SD-IPC-FT) the ordinary text-to-image loss as a regulariser. `x_target` is `x_ref`, or
another image of the same concept ("A/B training", App. C.2).

    python -m sdipc_lab.finetune FOLDER --mode ft --out runs/ft      # sub-folders = concepts (A/B)
    python -m sdipc_lab.finetune FOLDER --mode ct --out runs/ct      # one concept, 5 images, 30 steps
    accelerate launch -m sdipc_lab.finetune ...                      # several GPUs, same command
    accelerate launch --multi_gpu --num_processes 2 -m sdipc_lab.finetune ...   # 2 processes, also on a CPU

With several processes `--batch` is the global batch: each step draws it as one process would, and each process
trains on its contiguous share, so N processes train the same weights as one (up to float rounding), N times faster.

The result is one small safetensors file (prompts and k/v only) that `load_finetuned` reads into any lab
of the same base; `vary(..., finetuned=ft)` and `edit(..., finetuned=ft)` use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
from pathlib import Path

import torch

# FT.load_finetuned, FT.FineTuned, ...: the fine-tuned parts' public names, re-exported from adapters.py. They are
# applied by passing them (or their file) as `finetuned=` to vary / edit / generate: the one way to use them.
from .adapters import FineTuned as FineTuned
from .adapters import applied, fingerprint, kv_processors, text_fingerprint, with_new_token
from .adapters import load_finetuned as load_finetuned
from .adapters import new_finetuned as new_finetuned
from .adapters import save_finetuned as save_finetuned
from .convert import encode_text, pseudo_prompt, token_ids
from .cpus import limit_threads
from .generate import whole_number
from .images import as_rgb_images, digest
from .lab import Lab, load_lab
from .latents import encode_latents
from .training import (
    MAX_LR,
    Budget,
    TrainingStopped,
    check_batch,
    check_positive,
    diffusion_loss,
    fit,
    new_accelerator,
    processes,
    shard,
    use_local_gpu,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MODES = {  # the paper's recipes (Sec. 4.1): steps, schedule, text-to-image regulariser; the lr is the lab's
    "ft": dict(steps=1000, schedule="cosine", text_weight=1.0),
    "ct": dict(steps=30, schedule="constant", text_weight=0.0),
}


# ------------------------------------------------------------------------------------------ data

@dataclasses.dataclass
class Concepts:
    """Images grouped by concept: {concept: [PIL images]}."""

    images: dict

    @property
    def flat(self) -> list:
        return [(c, im) for c, ims in self.images.items() for im in ims]


def read_folder(folder: str | os.PathLike) -> Concepts:
    """A folder of images (one concept) or of sub-folders of images (one concept each)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if subfolders and loose:
        raise ValueError(f"{folder} has both image files ({', '.join(sorted(loose)[:3])}...) and sub-folders "
                         f"({', '.join(p.name for p in subfolders[:3])}...): with sub-folders each one is a concept, and "
                         "loose images would be left out. Move them into a sub-folder of their own.")
    groups = {p.name: _images_in(p) for p in subfolders} if subfolders else {folder.name: _images_in(folder)}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise ValueError(f"{folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                         "put the images in it, or one sub-folder of images per concept")
    return Concepts(groups)


def _images_in(folder: Path) -> list:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [as_rgb_images(p)[0] for p in files]  # a broken file raises with its name


# ------------------------------------------------------------------------------------------ training

class Eq9(torch.nn.Module):
    """The loss of Eq. 9 for a batch; holds the lab's frozen modules and the trainable parts."""

    def __init__(self, lab: Lab, ft: FineTuned):
        super().__init__()
        self.lab = lab
        self.prompts = ft.prompts
        self.kv = torch.nn.ModuleDict({k.replace(".", "/"): v for k, v in ft.kv.items()})
        self.part = (0, 1)  # (process index, process count): batches are this process's share of a global batch

    def forward(self, ref_pixels, target_latents, text_states=None, text_latents=None):
        lab = self.lab
        f_img_c = lab.image_encoder(pixel_values=ref_pixels).image_embeds  # (B, P), through the prompts
        prompt = pseudo_prompt(lab, f_img_c)  # (B, 77, D), W_t^+ fixed
        loss = diffusion_loss(lab.unet, lab.scheduler, target_latents, prompt, part=self.part)
        if text_states is not None:
            loss = loss + diffusion_loss(lab.unet, lab.scheduler, text_latents, text_states, part=self.part)
        return loss


def latents_of(lab: Lab, images) -> torch.Tensor:
    """VAE latents (B, 4, h, w), scaled, of images resized to the size the lab generates at (`lab.size`, by
    default the U-Net's own: fine-tuning at 256 px on SD v1.4 costs ~4x less than at 512), posterior means."""
    return encode_latents(lab, images, sample=False, size=lab.size)


def finetune(lab: Lab, concepts: Concepts, *, mode: str = "ft", out: str | os.PathLike = "runs/finetune",
             steps: int | None = None, lr: float | None = None, batch: int = 4, ab: bool | None = None,
             captions: dict | None = None, n_tokens: int = 8, train_prompts: bool = True, train_kv: bool = True,
             targets: Concepts | None = None, seed: int = 0, minutes: float | None = None,
             accelerator=None) -> FineTuned:
    """Train SD-IPC-FT (`mode="ft"`) or SD-IPC-CT (`mode="ct"`) on `concepts`; resumable from `out`.

    `ab=True` (default when every concept has >= 2 images in FT) picks x_target among the other images of
    x_ref's concept. `captions` ({concept: text}, or {concept: [one text per image]}) feeds the text-to-image
    regulariser of FT, in the lab's own language (the teaching lab's captions name size, position and
    background: per-image captions); without it the regulariser is off. `lr` defaults to the lab's `finetune_lr[mode]` (the paper's for SD v1.4, measured
    for the teaching lab). `targets` (FT only): x_target is drawn from `targets.images[concept]` instead, and the
    regulariser's (caption, image) pairs come from the targets (`captions` then names the targets' images): a
    domain's images as references, the pictures the lab draws of the same concepts as targets — adapting the
    converter to a domain it reads poorly. Returns the trained parts, also saved to `out/finetuned.safetensors`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'ft' (SD-IPC-FT) or 'ct' (SD-IPC-CT), got {mode!r}")
    batch, seed, n_tokens = _counts(batch=batch, seed=seed, n_tokens=n_tokens)
    if not concepts.images or not all(concepts.images.values()):
        raise ValueError(f"every concept needs images; got {({c: len(v) for c, v in concepts.images.items()})}")
    if targets is not None:
        if mode != "ft":
            raise ValueError("targets pair a domain's images with other images of their concepts: an FT option "
                             f"(mode='ft'), not {mode!r}")
        missing = sorted(set(concepts.images) - {c for c, v in targets.images.items() if v})
        if missing:
            raise ValueError(f"targets have no images for concepts {missing}: give every concept at least one target")
    recipe = MODES[mode]
    steps = recipe["steps"] if steps is None else steps
    lr = lab.finetune_lr[mode] if lr is None else lr
    check_positive(steps=steps, lr=lr)  # before the run folder is claimed
    counts = {c: len(v) for c, v in concepts.images.items()}
    if ab is None:
        ab = mode == "ft" and (targets is not None or min(counts.values()) >= 2)
    if ab and targets is None and min(counts.values()) < 2:
        raise ValueError(f"A/B training needs at least 2 images per concept; got {counts}. Add images or pass ab=False.")
    out = Path(out)
    accelerator = accelerator or new_accelerator()
    check_batch(batch, accelerator)
    if accelerator.is_main_process:
        claim_run_folder(out, mode, {"concepts": {c: digest(v) for c, v in concepts.images.items()},
                                     **({"targets": {c: digest(v) for c, v in targets.images.items()}} if targets else {})},
                         f"concepts {sorted(concepts.images)}")
    accelerator.wait_for_everyone()
    torch.manual_seed(seed)
    ft = new_finetuned(lab, n_tokens=n_tokens, train_prompts=train_prompts, train_kv=train_kv, seed=seed)
    module = Eq9(lab, ft)
    module.part = processes(accelerator)
    for p in lab.unet.parameters():
        p.requires_grad_(False)
    for p in lab.image_encoder.parameters():
        p.requires_grad_(False)
    for part in [*(ft.kv.values()), *([ft.prompts] if ft.prompts is not None else [])]:
        for p in part.parameters():
            p.requires_grad_(True)
    flat = concepts.flat
    pixels = lab.feature_extractor(images=[im for _, im in flat], return_tensors="pt").pixel_values.to(lab.device, lab.dtype)
    goals = targets or concepts  # where x_target (and the regulariser's images) come from
    goal_flat = goals.flat
    latents = latents_of(lab, [im for _, im in goal_flat])  # (M, 4, h, w)
    text_weight = recipe["text_weight"] if captions else 0.0
    text_states = None
    if text_weight:
        missing = set(goals.images) - set(captions)
        if missing:
            raise ValueError(f"captions are missing for concepts {sorted(missing)}")
        texts = []
        for c, ims in goals.images.items():
            per_image = [captions[c]] * len(ims) if isinstance(captions[c], str) else list(captions[c])
            if len(per_image) != len(ims):
                raise ValueError(f"concept {c!r} has {len(ims)} images but {len(per_image)} captions; give one "
                                 "caption for the concept, or one per image")
            texts += per_image
        f_txt, _ = encode_text(lab, texts)
        text_states = f_txt.to(lab.dtype)
    by_concept = {}  # concept -> indices into goal_flat
    for j, (c, _) in enumerate(goal_flat):
        by_concept.setdefault(c, []).append(j)

    def loss_fn(m, step):  # the global batch of the step, drawn alike by every process; this process's share of it
        rng = random.Random(f"ft:{seed}:{step}")
        ref = [rng.randrange(len(flat)) for _ in range(batch)]
        if targets is not None:
            target = [rng.choice(by_concept[flat[i][0]]) for i in ref]
        else:
            target = [rng.choice([j for j in by_concept[flat[i][0]] if j != i]) if ab else i for i in ref]
        idx = torch.tensor(shard(ref, module.part), device=lab.device)
        tgt = torch.tensor(shard(target, module.part), device=lab.device)
        if text_states is None:
            return m(pixels[idx], latents[tgt])
        own = idx if targets is None else tgt  # the regulariser's (caption, image) pairs
        return m(pixels[idx], latents[tgt], text_states[own], latents[own])

    lab.image_encoder.train(ft.prompts is not None)  # prompt dropout on
    with applied(lab, ft), limit_threads(lab.threads):
        signature = dict(mode=mode, lr=lr, batch=batch, ab=bool(ab), seed=seed, n_tokens=n_tokens,
                         train_prompts=train_prompts, train_kv=train_kv, lab=fingerprint(lab),
                         concepts={c: digest(v) for c, v in concepts.images.items()},
                         **({"targets": {c: digest(v) for c, v in targets.images.items()}} if targets else {}),
                         captions=captions if text_weight else None)
        fit(f"sdipc-{mode}", module, loss_fn, budget=Budget(steps, minutes=minutes), lr=lr, out=out,
            accelerator=accelerator, schedule=recipe["schedule"], weight_decay=0.0, every=max(10, steps // 10),
            signature=signature)
    lab.image_encoder.eval()
    for part in [*(ft.kv.values()), *([ft.prompts] if ft.prompts is not None else [])]:
        part.requires_grad_(False).eval()
    ft.info.update(mode=mode, steps=steps, lr=lr, ab=bool(ab), concepts=counts,
                   **({"targets": {c: len(v) for c, v in targets.images.items()}} if targets else {}))
    if accelerator.is_main_process:
        save_finetuned(ft, out / "finetuned.safetensors")
    accelerator.wait_for_everyone()
    return ft


RUN_FILE = "finetune_run.json"  # what a fine-tuning run folder holds: its mode and the data it trains on
RUN_OUTPUTS = ("finetuned.safetensors", "finetuned.tmp")


def _counts(**values) -> list[int]:
    """Batch sizes, seeds and token counts as ints (NumPy integers too), refused with their name otherwise."""
    low = {"seed": 0}
    return [whole_number(k, v, low=low.get(k, 1), high=2**63 - 1 if k == "seed" else None) for k, v in values.items()]


def claim_run_folder(out: Path, mode: str, data: dict, what: str) -> None:
    """A fine-tuning run writes into `out` only if it is new, empty, or holds the run of the same mode on the same
    data (recorded in `RUN_FILE`): another run's `finetuned.safetensors` and checkpoints are never overwritten, nor
    files that no run wrote."""
    import json

    record = {"mode": mode, **data}
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} is a file: name a folder (--out; it is created if missing)")
    if (out / RUN_FILE).exists():
        try:
            saved = json.loads((out / RUN_FILE).read_text())
        except (OSError, ValueError):
            saved = None
        if saved != json.loads(json.dumps(record)):
            was = (f"a {saved.get('mode')!r} run on other data" if isinstance(saved, dict) and saved.get("mode") == mode
                   else f"a {saved.get('mode')!r} run" if isinstance(saved, dict) else f"an unreadable {RUN_FILE}")
            raise ValueError(f"{out} holds {was}; this is a {mode!r} run on {what}. Nothing was trained or "
                             "overwritten: train into another folder (--out / out=).")
        return
    if out.exists():
        ours = {*RUN_OUTPUTS, *(f"{n}{end}" for n in (*(f"sdipc-{m}" for m in MODES), "custom-diffusion")
                                for end in (".ckpt.safetensors", ".ckpt.tmp", "_loss.png", ".lock"))}
        strangers = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if strangers:
            raise ValueError(f"{out} holds files a fine-tuning run did not write ({', '.join(strangers[:5])}); they "
                             "are left alone. Train into a new or empty folder (--out / out=).")
        previous = _finetuned_info(out / "finetuned.safetensors")
        if previous is not None and previous.get("mode") != mode:  # a run from before RUN_FILE was recorded
            raise ValueError(f"{out} holds a {previous.get('mode')!r} run's finetuned.safetensors; this is a {mode!r} "
                             "run. Nothing was trained or overwritten: train into another folder (--out / out=).")
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _finetuned_info(path: Path) -> dict | None:
    import json

    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("sdipc_lab", "{}"))
    except Exception:  # unreadable: no mode to compare
        return {}


class TextToImageLoss(torch.nn.Module):
    """Custom Diffusion's loss: denoising under the caption, through the new token's embedding."""

    def __init__(self, lab: Lab, ft: FineTuned):
        super().__init__()
        self.lab, self.encoder = lab, ft.text[1]
        self.kv = torch.nn.ModuleDict({k.replace(".", "/"): v for k, v in ft.kv.items()})
        self.part = (0, 1)  # (process index, process count): batches are this process's share of a global batch

    def forward(self, input_ids, latents):
        f_txt = self.encoder.text_model(input_ids).last_hidden_state  # (B, 77, D)
        return diffusion_loss(self.lab.unet, self.lab.scheduler, latents, f_txt.to(latents.dtype), part=self.part)


def custom_diffusion(lab: Lab, images, *, class_word: str, token: str = "<new1>", steps: int = 250,
                     lr: float | None = None, token_lr_scale: float = 10.0, batch: int = 4, captions=None,
                     out: str | os.PathLike = "runs/custom_diffusion", seed: int = 0, minutes: float | None = None,
                     accelerator=None) -> FineTuned:
    """The baseline (Kumari et al. 2023): a new token, initialised from `class_word`, and the cross-attention
    k/v, trained with the text-to-image loss on captions "a <new1> {class_word}" (templates below).

    `captions`, one per image and each containing `token`, replace the templates: for a lab whose own
    captions are never that short (the teaching lab always names size, position and background), so the
    baseline learns in the language its U-Net was trained on.
    """
    images = as_rgb_images(images)
    batch, seed = _counts(batch=batch, seed=seed)
    lr = lab.finetune_lr["custom-diffusion"] if lr is None else lr
    check_positive(steps=steps, lr=lr)
    if captions is not None:
        captions = list(captions)
        if len(captions) != len(images) or not all(token in c for c in captions):
            raise ValueError(f"captions must be one per image ({len(images)}) and each must contain {token!r}; "
                             f"got {len(captions)}: {captions[:2]}...")
    class_ids = lab.tokenizer(class_word, add_special_tokens=False).input_ids
    if len(class_ids) != 1:
        raise ValueError(f"class_word must be one token of the lab's vocabulary; {class_word!r} is {len(class_ids)}")
    accelerator = accelerator or new_accelerator()
    check_batch(batch, accelerator)
    if accelerator.is_main_process:
        claim_run_folder(Path(out), "custom-diffusion", {"images": digest(images), "token": token,
                                                          "class_word": class_word},
                         f"{len(images)} images of {class_word!r}")
    accelerator.wait_for_everyone()
    init = lab.text_encoder.get_input_embeddings().weight[class_ids[0]].detach()
    tokenizer, encoder = with_new_token(lab, token, init)
    ft = FineTuned(None, kv_processors(lab), info={**fingerprint(lab), "text_fingerprint": text_fingerprint(lab),
                                                   "token": token, "class_word": class_word},
                   text=(tokenizer, encoder))
    table = encoder.get_input_embeddings().weight
    table.requires_grad_(True)
    only_new = torch.zeros(len(table), 1, device=table.device)
    only_new[-1] = token_lr_scale  # the token learns faster than k/v, as in Custom Diffusion's recipe
    table.register_hook(lambda grad: grad * only_new)
    for proc in ft.kv.values():
        proc.requires_grad_(True)
    for p in lab.unet.parameters():
        p.requires_grad_(False)
    per_image = captions is not None
    if not per_image:
        templates = ["a {} {}", "a picture of a {} {}", "an image showing a {} {}", "a drawing of a {} {}"]
        captions = [t.format(token, class_word) for t in templates]
    ids = token_ids(tokenizer, captions)[0].to(lab.device)  # (K, 77)
    latents = latents_of(lab, images)  # (N, 4, h, w)
    module = TextToImageLoss(lab, ft)
    module.part = processes(accelerator)

    def loss_fn(m, step):  # the global batch of the step, drawn alike by every process; this process's share of it
        rng = random.Random(f"cd:{seed}:{step}")
        pick = [rng.randrange(len(images)) for _ in range(batch)]
        which = pick if per_image else [rng.randrange(len(captions)) for _ in range(batch)]
        which, pick = shard(which, module.part), shard(pick, module.part)
        return m(ids[torch.tensor(which, device=lab.device)], latents[torch.tensor(pick, device=lab.device)])

    with applied(lab, dataclasses.replace(ft, text=None)), limit_threads(lab.threads):
        signature = dict(mode="custom-diffusion", token=token, class_word=class_word, lr=lr, batch=batch, seed=seed,
                         token_lr_scale=token_lr_scale, lab=fingerprint(lab), images=digest(images),
                         captions=captions)
        fit("custom-diffusion", module, loss_fn, budget=Budget(steps, minutes=minutes), lr=lr, out=Path(out),
            accelerator=accelerator, schedule="constant", weight_decay=0.0, every=max(10, steps // 10),
            signature=signature)
    table.requires_grad_(False)
    for proc in ft.kv.values():
        proc.requires_grad_(False)
    ft.info.update(mode="custom-diffusion", steps=steps, lr=lr)
    if accelerator.is_main_process:
        save_finetuned(ft, Path(out) / "finetuned.safetensors")
    accelerator.wait_for_everyone()
    return ft


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdipc_lab.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="images of one concept, or one sub-folder of images per concept")
    parser.add_argument("--mode", choices=list(MODES), default="ft")
    parser.add_argument("--lab", default="toy", help="toy, sd-v1-4, or a lab folder")
    parser.add_argument("--out", default="runs/finetune")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float, help="default: the lab's finetune_lr for the mode")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-ab", action="store_true", help="x_target = x_ref even with several images per concept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a whole number >= 1, got {getattr(args, name)}")
    if args.lr is not None and not (math.isfinite(args.lr) and 0 < args.lr <= MAX_LR):
        parser.error(f"--lr must be a positive number at most {MAX_LR:g}, got {args.lr}: fine-tuning rates are "
                     "around 1e-5 to 1e-2 (default: the lab's finetune_lr for the mode)")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")

    try:
        concepts = read_folder(args.folder)
        use_local_gpu()  # several GPUs: this process's one, for the lab (loaded before the processes join)
        lab = load_lab(args.lab)
        accelerator = new_accelerator()
        ft = finetune(lab, concepts, mode=args.mode, out=args.out, steps=args.steps, lr=args.lr, batch=args.batch,
                      ab=False if args.no_ab else None, seed=args.seed, accelerator=accelerator)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:  # Ctrl-C or SIGTERM: checkpointed
        print(stopped, file=sys.stderr)
        return 130
    accelerator.print(f"saved {Path(args.out) / 'finetuned.safetensors'}: {ft.info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
