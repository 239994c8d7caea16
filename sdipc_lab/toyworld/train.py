"""Train the teaching-scale lab: CLIP, VAE, U-Net and the judge's shape classifier, then export the lab.

    python -m sdipc_lab.toyworld.train all   --out runs/toyworld     # everything, then export
    python -m sdipc_lab.toyworld.train clip  --out runs/toyworld     # one model (clip, vae, unet, judge)
    python -m sdipc_lab.toyworld.train vision --out runs/toyworld    # more image-tower training, text frozen
    python -m sdipc_lab.toyworld.train vision --variety 0.5 ...      # ... half of it on varied drawings (variety.py)
    python -m sdipc_lab.toyworld.train decoder --out runs/toyworld   # more decoder training, latents unchanged
    python -m sdipc_lab.toyworld.train export --out runs/toyworld    # the lab, into runs/toyworld/lab
    python -m sdipc_lab.toyworld.train export --out runs/toyworld --from-checkpoint  # U-Net still training
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
import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import build
from ..build import sd_v1_scheduler, word_tokenizer
from ..convert import image_embeds, pseudo_prompt, token_ids
from ..lab import Lab, assemble, check_save_target, load_lab, quiet, save_lab, usable_cpus
from ..latents import from_posterior
from ..measure import cutoff_sweep, norms, singular_value_quantiles
from ..training import (
    MAX_LR,
    TrainingStopped,
    check_batch,
    checkpoint_weights,
    diffusion_loss,
    fit,
    gathered,
    new_accelerator,
    processes,
    randn_shard,
    shard,
)
from . import variety
from .evaluate import judge_conditions
from .judge import JUDGE_FILE, Judge, mask_crops, new_judge_cnn
from .world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZES,
    TWO_OBJECTS,
    all_captions,
    caption,
    sample,
    samples,
    vocabulary,
)

LAB_DIR = Path(__file__).parent / "lab"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class ModelSizes:
    width: int = 192  # text width = projection width: W_t is square, as in ViT-L/14
    text_layers: int = 4
    vision_layers: int = 4
    heads: int = 4
    patch: int = 4
    vae_channels: tuple = (32, 64, 128)
    unet_channels: tuple = (64, 128, 192)
    unet_layers: int = 2
    unet_heads: int = 8
    norm_groups: int = 32
    vae_norm_groups: int | None = None  # the VAE's GroupNorm groups (None: norm_groups)
    train_images: int = 100000
    wordings: int = 4  # captions per image whose text states the U-Net stage computes once
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting of the U-Net stage (None: uniform)
    init_unet: bool = False  # start the U-Net from out/unet (--init-from-lab) instead of random
    init_vae: bool = False  # start the VAE from out/vae (--init-from-lab), regrouped to vae_norm_groups
    two_objects: float = TWO_OBJECTS  # share of training images with a second object (the world's by default)
    hard_negatives: float = 0.0  # weight of the vision stage's attribute loss (ClipTrainer; 0: contrastive alone)
    fresh_vision_patch: int = 0  # the vision stage starts a new image tower of this patch size (0: continues the
                                 # one in out/image_encoder)


MODEL_SIZES = {
    "full": ModelSizes(),  # for a GPU: about 30 minutes on one
    # The 2-core CPU recipe. U-Net (64, 128, 128): a proxy run of ~40 min drew shape 31 % / colour 71 % from the
    # caption against 19 % / 58 % for (32, 64, 64) in the same time (docs/results/toyworld_proxies.md); the VAE's
    # low-resolution blocks widened (16, 32, 64) at little cost (bench/train_speed.py).
    # VAE GroupNorms of 4 groups (4-16 channels each, as SD's VAE), not 16 (1 channel each at 16 channels): the
    # shipped VAE's recurring speck; from scratch in 45 min, PSNR 31.1 dB, judge shape 100 %, stray 0.06 % against
    # 28.8 dB, 96 %, 0.21 % (docs/results/toyworld_proxies.md).
    # 2 attention heads (32-64 channels each), not 8: the same weights, and a training step takes 1.9 s instead of
    # 3.8 s on 2 threads (CPU attention kernels are slow on 8-channel heads; bench/train_speed.py, 2026-12-02).
    "cpu": ModelSizes(width=128, text_layers=4, vision_layers=4, heads=4, patch=8, vae_channels=(16, 32, 64),
                 unet_channels=(64, 128, 128), unet_layers=1, unet_heads=2, norm_groups=16, vae_norm_groups=4,
                 train_images=20000),
    # The recipe of the lab shipped until 2026-11 (one-word-per-token tokenizer aside): kept to resume its runs.
    "cpu-v1": ModelSizes(width=128, text_layers=4, vision_layers=4, heads=4, patch=8, vae_channels=(16, 32, 32),
                    unet_channels=(32, 64, 64), unet_layers=1, unet_heads=8, norm_groups=16, train_images=20000),
    "test": ModelSizes(width=32, text_layers=1, vision_layers=1, heads=2, patch=16, vae_channels=(8, 16, 16),
                  unet_channels=(16, 32, 32), unet_layers=1, unet_heads=2, norm_groups=8, train_images=64, wordings=2),
}
STAGES = ("clip", "vision", "vae", "decoder", "judge", "unet")  # the order `all` runs them in
# steps, batch, learning rate per stage
BUDGETS = {
    "full": {"clip": (6000, 512, 5e-4), "vision": (2000, 512, 3e-4), "vae": (4000, 128, 1e-3),
             "decoder": (2000, 128, 5e-4), "judge": (1500, 256, 2e-3), "unet": (30000, 256, 4e-4)},
    "cpu": {"clip": (100000, 128, 5e-4), "vision": (100000, 128, 3e-4), "vae": (100000, 32, 1e-3),
            "decoder": (100000, 32, 5e-4), "judge": (100000, 128, 2e-3), "unet": (100000, 64, 4e-4)},
    "cpu-v1": {"clip": (100000, 128, 5e-4), "vision": (100000, 128, 3e-4), "vae": (100000, 32, 1e-3),
               "decoder": (100000, 32, 5e-4), "judge": (100000, 128, 2e-3), "unet": (100000, 64, 4e-4)},
    "test": {"clip": (6, 8, 1e-3), "vision": (6, 8, 1e-3), "vae": (6, 4, 1e-3), "decoder": (6, 4, 1e-3),
             "judge": (6, 8, 1e-3), "unet": (6, 8, 1e-3)},
}

# Learning rates for sdipc_lab.finetune on the teaching lab, written into its constants by `export`: CT and
# Custom Diffusion chosen by `python bench/finetune.py --lr-sweep` (docs/guide/finetuning.md); FT's is the recipe's, not swept.
FINETUNE_LR = {"ft": 1e-4, "ct": 1e-3, "custom-diffusion": 3e-5}


# ---------------------------------------------------------------------------------- data

@dataclasses.dataclass
class World:
    images: torch.Tensor  # (N, 64, 64, 3) uint8
    things: list
    backgrounds: list

    two_objects: float = TWO_OBJECTS  # the share of samples drawn with a second object
    varied: int = 0  # how many of the images (the last ones) `variety.sample` drew

    def pixels(self, index: torch.Tensor, device) -> torch.Tensor:  # (B, 3, 64, 64) in [-1, 1]
        return self.images[index].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1

    def captions(self, index: torch.Tensor, rng: random.Random) -> list[str]:
        return [caption(self.things[i], self.backgrounds[i], rng) for i in index.tolist()]


def _draw(args):
    i, split, two_objects = args
    s = sample(i, split, two_objects=two_objects)
    return np.asarray(s.image), s.things, s.background


def render(n: int, split: str = "train", workers: int | None = None, two_objects: float = TWO_OBJECTS) -> World:
    """Draw samples 0..n-1 of `split` (in parallel), a second object in a `two_objects` share of them;
    deterministic whatever the worker count."""
    jobs = [(i, split, two_objects) for i in range(n)]
    if n >= 2000 and (workers or multiprocessing.cpu_count()) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            out = pool.map(_draw, jobs, chunksize=256)
    else:
        out = [_draw(job) for job in jobs]
    images = torch.from_numpy(np.stack([o[0] for o in out]))
    return World(images, [o[1] for o in out], [o[2] for o in out], two_objects)


def _draw_varied(i):
    s = variety.sample(i, "train")
    return np.asarray(s.image), s.things, s.background


def with_variety(world: World, share: float, workers: int | None = None) -> World:
    """`world` with varied drawings of its objects added (`variety.sample`), a `share` of the result: what the
    `vision` stage trains the image tower on with `--variety` (the U-Net stages never see them)."""
    if not 0 <= share < 1:
        raise ValueError(f"the varied share is between 0 and 1 (1 excluded), got {share}")
    n = round(len(world.images) * share / (1 - share))
    if n == 0:
        return world
    if n >= 2000 and (workers or multiprocessing.cpu_count()) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            out = pool.map(_draw_varied, range(n), chunksize=256)
    else:
        out = [_draw_varied(i) for i in range(n)]
    images = torch.cat([world.images, torch.from_numpy(np.stack([o[0] for o in out]))])
    return World(images, world.things + [o[1] for o in out], world.backgrounds + [o[2] for o in out],
                 world.two_objects, world.varied + n)


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:  # [-1, 1] -> CLIP's normalisation
    mean = torch.tensor(CLIP_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=pixels.device)[:, None, None]
    return ((pixels + 1) / 2 - mean) / std


# ---------------------------------------------------------------------------------- models

def new_tokenizer():
    return word_tokenizer(vocabulary())


def new_clip(s: ModelSizes, tokenizer):
    """The text and image towers, W_t square (width x width) as in ViT-L/14."""
    return (build.new_text_encoder(tokenizer, s.width, s.text_layers, s.heads, s.width),
            build.new_image_encoder(s.width, s.vision_layers, s.heads, s.width, SIZE, s.patch))


class ClipTrainer(torch.nn.Module):
    """Contrastive loss pooled at the end token and at a random padding position after it; with `captions` (the
    unit C-space embeddings of `world.all_captions()`, (1800, P)) and `hard_negatives` > 0, plus that weight times
    the attribute loss: each one-object image against its canonical caption with one attribute changed to each
    other value (the hard negatives a batch of random captions rarely holds: NegCLIP's idea)."""

    def __init__(self, text, vision, captions: torch.Tensor | None = None, hard_negatives: float = 0.0):
        super().__init__()
        self.text, self.vision = text, vision
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.captions, self.hard_negatives = captions, hard_negatives  # a constant, not a parameter: not saved

    def forward(self, input_ids, eos, pad_pos, pixels, variants=None):
        # with several processes the inputs are this process's share: the loss is the global batch's (`gathered`)
        f_txt = self.text.text_model(input_ids).last_hidden_state  # (B, 77, D)
        rows = torch.arange(len(eos), device=eos.device)
        f_img_c = gathered(F.normalize(self.vision(pixel_values=pixels).image_embeds, dim=-1))  # (B, P)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        labels = torch.arange(len(f_img_c), device=eos.device)
        variants = None if variants is None else gathered(variants)
        loss = 0
        for pos in (eos, pad_pos):
            f_txt_c = gathered(F.normalize(self.text.text_projection(f_txt[rows, pos]), dim=-1))  # (B, P)
            logits = scale * f_img_c @ f_txt_c.T
            loss = loss + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 4
        if variants is not None and self.hard_negatives:
            loss = loss + self.hard_negatives * self.attribute_loss(f_img_c, variants, scale)
        return loss

    def attribute_loss(self, f_img_c, variants, scale):
        """Cross-entropy over each attribute's values: `variants` (B, A, V + 1) holds, per image and attribute,
        the caption index of every value (-1 past the attribute's values) and, last, the true value's position;
        rows of images with two objects are all -1 and left out."""
        index, truth = variants[..., :-1], variants[..., -1]  # (B, A, V), (B, A)
        keep = truth >= 0
        if not keep.any():
            return f_img_c.sum() * 0
        table = self.captions.to(f_img_c)  # (C, P)
        logits = scale * torch.einsum("bp,bavp->bav", f_img_c, table[index.clamp(min=0)])  # (B, A, V)
        logits = logits.masked_fill(index < 0, float("-inf"))
        return F.cross_entropy(logits[keep], truth[keep])


def caption_variants(world: World) -> torch.Tensor:
    """For `ClipTrainer.attribute_loss`: (N, A, V + 1) caption indices into `world.all_captions()` of each image's
    canonical caption with each attribute (`world.ATTRIBUTES`) set to each of its values, -1 past them, and the
    true value's position last; all -1 for images with two objects."""
    values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
              "background": tuple(BACKGROUNDS)}
    names = list(values)  # the order of all_captions(): shape, colour, size, position, background
    width = max(map(len, values.values()))
    out = torch.full((len(world.things), len(names), width + 1), -1, dtype=torch.long)
    for i, (things, background) in enumerate(zip(world.things, world.backgrounds)):
        if len(things) != 1:
            continue
        t = things[0]
        truth = [values[n].index(v) for n, v in zip(names, (t.shape, t.colour, t.size, t.position, background))]
        for a, name in enumerate(names):
            for v in range(len(values[name])):
                digits = truth[:a] + [v] + truth[a + 1:]
                index = 0
                for n, d in zip(names, digits):
                    index = index * len(values[n]) + d
                out[i, a, v] = index
            out[i, a, -1] = truth[a]
    return out


def new_vae(s: ModelSizes):
    return build.new_vae(s.vae_channels, s.vae_norm_groups or s.norm_groups, SIZE)


def regrouped(vae, groups: int):
    """The same VAE with its GroupNorms over `groups` groups: their weights are per channel, so every weight carries
    over and only what is normalised together changes (fine-tuning then adapts the rest)."""
    from diffusers import AutoencoderKL

    if vae.config.norm_num_groups == groups:
        return vae
    new = AutoencoderKL.from_config({**vae.config, "norm_num_groups": groups})
    new.load_state_dict(vae.state_dict())
    return new


class VaeTrainer(torch.nn.Module):
    """L1 + MSE reconstruction, SD's tiny KL weight, and (`outlier_weight`, bench/vae_proxy.py) a penalty on
    latent means beyond +-3, the extreme values a VAE can use to steer its GroupNorms (drawn as a speck)."""

    def __init__(self, vae, kl_weight: float = 1e-6, outlier_weight: float = 0.0):
        super().__init__()
        self.vae, self.kl_weight, self.outlier_weight = vae, kl_weight, outlier_weight

    def forward(self, x, part=(0, 1)):  # x (B, 3, 64, 64) in [-1, 1]; part: see training.diffusion_loss
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * randn_shard(posterior.mean.shape, part, device=x.device,
                                                         dtype=posterior.mean.dtype)  # posterior.sample(), sharded
        recon = self.vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + self.kl_weight * posterior.kl().mean()
        if self.outlier_weight:
            loss = loss + self.outlier_weight * F.relu(posterior.mean.abs() - 3).pow(2).mean()
        return loss


def new_unet(s: ModelSizes, cross_dim: int):
    return build.new_unet(s.unet_channels, s.unet_layers, s.unet_heads, cross_dim, s.norm_groups,
                          SIZE // 2 ** (len(s.vae_channels) - 1))


def toy_scheduler():
    """SD v1's betas rescaled to zero terminal SNR, v-prediction, trailing timesteps."""
    return sd_v1_scheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")


# ---------------------------------------------------------------------------------- the loop

def batch_index(n: int, batch: int, step: int, seed: int, accelerator) -> torch.Tensor:
    """The step's global batch of image indices (batch,), the same in every process: each process trains on its
    share of it (`shard(index, processes(accelerator))`). A batch the processes cannot share evenly is refused."""
    check_batch(batch, accelerator)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101)
    return torch.randint(0, n, (batch,), generator=g)


def tokenize(tokenizer, texts: list[str], device):  # ids (B, 77), end-token positions (B,) on `device`
    ids, eos = token_ids(tokenizer, texts)
    return ids.to(device), eos.to(device)


def contrastive_batch(world: World, tokenizer, batch: int, step: int, seed: int, accelerator, name: str,
                      offset: int = 0, with_index: bool = False):
    """One CLIP batch: token ids (B, 77), end-token positions (B,), a random padding position after each
    end token (B,), and CLIP-normalised pixels (B, 3, 64, 64); with `with_index`, the images' indices (B,) too.
    `offset` picks another stream of images. With several processes, B is this process's share of the global
    `batch`, drawn (captions and padding positions too) as one process draws it."""
    index = batch_index(len(world.images), batch, step, seed + offset, accelerator)
    rng = random.Random(f"{name}:{seed}:{step}")
    ids, eos = tokenize(tokenizer, world.captions(index, rng), accelerator.device)
    pad = eos + (torch.rand(len(eos), device=eos.device) * (77 - eos)).long().clamp(max=76 - eos)
    part = processes(accelerator)
    index, ids, eos, pad = (shard(x, part) for x in (index, ids, eos, pad))
    batch_ = (ids, eos, pad, clip_normalize(world.pixels(index, accelerator.device)))
    return (*batch_, index) if with_index else batch_


# ---------------------------------------------------------------------------------- stages

def signature(stage: str, s: ModelSizes, budget, seed: int, world: World | None, out: Path, reads=()) -> dict:
    """What a stage's checkpoint must match to be resumed: sizes, batch, lr, seed, the images, and a hash of the
    frozen parts it reads (`reads`, e.g. the text tower the U-Net is conditioned on)."""
    import hashlib

    fields = {"clip": ("width", "text_layers", "vision_layers", "heads", "patch"),
              "vae": ("vae_channels", "norm_groups", "vae_norm_groups", "init_vae"),
              "unet": ("unet_channels", "unet_layers", "unet_heads", "norm_groups", "wordings", "snr_gamma"),
              "judge": ()}
    fields["vision"], fields["decoder"] = fields["clip"], fields["vae"]
    sizes = {k: getattr(s, k) for k in fields[stage]}
    if stage == "vision" and s.hard_negatives:  # recorded only when used: earlier runs keep their signature
        sizes["hard_negatives"] = s.hard_negatives
    if stage == "vision" and s.fresh_vision_patch:
        sizes["fresh_vision_patch"] = s.fresh_vision_patch
    inputs = {part: hashlib.sha256(b"".join(f.read_bytes() for f in sorted((out / part).glob("*.safetensors"))))
              .hexdigest()[:16] for part in reads}  # transformers' model.safetensors, diffusers' diffusion_pytorch_...
    images = None if world is None else len(world.images)
    if world is not None and world.two_objects != TWO_OBJECTS:  # the world's own share: the signature it always had
        images = f"{images} ({world.two_objects:g} with two objects)"
    if world is not None and world.varied:
        images = f"{images} ({world.varied} varied)"
    return dict(stage=stage, sizes=sizes, batch=budget[1], lr=budget[2], seed=seed, images=images, inputs=inputs)


# Each train_<stage>(world, sizes, (steps, batch, lr), out, accelerator, seed, **limits) trains one stage into `out`;
# `limits` are how far this run of it goes: training.fit's `minutes`, `budget_steps` and `stop_at`.

def train_clip(world: World, s: ModelSizes, budget, out: Path, accelerator, seed: int, **limits):
    steps, batch, lr = budget
    check_batch(batch, accelerator)
    tokenizer = new_tokenizer()
    torch.manual_seed(seed)
    text, vision = new_clip(s, tokenizer)
    trainer = ClipTrainer(text, vision)

    def loss_fn(module, step):
        return module(*contrastive_batch(world, tokenizer, batch, step, seed, accelerator, "clip"))

    trainer = fit("clip", trainer, loss_fn, steps=steps, lr=lr, out=out, accelerator=accelerator, **limits,
        signature=signature("clip", s, budget, seed, world, out, ()))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out / "tokenizer")
        trainer.text.save_pretrained(out / "text_encoder")
        trainer.vision.save_pretrained(out / "image_encoder")
    accelerator.wait_for_everyone()
    return trainer


def train_vision(world: World, s: ModelSizes, budget, out: Path, accelerator, seed: int, **limits):
    """Train CLIP's image tower further against the frozen text tower ("locked text"): the text states the
    U-Net is conditioned on stay bit-identical, so the U-Net stays valid, while the image embeddings (what
    SD-IPC converts) line up better with the captions. With `s.hard_negatives`, the attribute loss of
    `ClipTrainer` too; with `s.fresh_vision_patch`, a new image tower of that patch size instead of out/image_encoder. Needs `clip` first; overwrites out/image_encoder."""
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    steps, batch, lr = budget
    check_batch(batch, accelerator)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    text = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder", dtype=torch.float32).requires_grad_(False)
    if s.fresh_vision_patch:  # a new tower (its config saved with it): nothing of the old one's shortcuts
        torch.manual_seed(seed)
        vision = build.new_image_encoder(s.width, s.vision_layers, s.heads, s.width, SIZE, s.fresh_vision_patch).float()
    else:
        vision = CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder", dtype=torch.float32)
    text_before = {k: v.clone() for k, v in text.state_dict().items()}
    captions = variants = None
    if s.hard_negatives:
        with torch.no_grad():
            ids, eos = tokenize(tokenizer, all_captions(), "cpu")
            f_eos = text.text_model(ids).last_hidden_state[torch.arange(len(eos)), eos]  # (C, D)
            captions = F.normalize(text.text_projection(f_eos), dim=-1)  # (C, P)
        variants = caption_variants(world)  # (N, A, V + 1)
    trainer = ClipTrainer(text, vision, captions, s.hard_negatives)

    def loss_fn(module, step):
        *inputs, index = contrastive_batch(world, tokenizer, batch, step, seed, accelerator, "vision", offset=5,
                                           with_index=True)
        return module(*inputs, None if variants is None else variants[index].to(accelerator.device))

    trainer = fit("vision", trainer, loss_fn, steps=steps, lr=lr, out=out, accelerator=accelerator, **limits,
        signature=signature("vision", s, budget, seed, world, out, ("text_encoder",)))
    assert all(torch.equal(v, text_before[k]) for k, v in trainer.text.state_dict().items()), "the text tower moved"
    if accelerator.is_main_process:
        trainer.vision.save_pretrained(out / "image_encoder")
    accelerator.wait_for_everyone()
    return trainer


def train_vae(world: World, s: ModelSizes, budget, out: Path, accelerator, seed: int, **limits):
    """The VAE, from scratch or (`s.init_vae`, --init-from-lab) from out/vae, regrouped to the size's GroupNorm
    groups; then its scaling factor, measured. A new latent space: the U-Net must be trained on it afterwards."""
    from diffusers import AutoencoderKL

    steps, batch, lr = budget
    check_batch(batch, accelerator)
    part = processes(accelerator)
    torch.manual_seed(seed + 1)
    if s.init_vae:
        vae = regrouped(AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32),
                        s.vae_norm_groups or s.norm_groups)
    else:
        vae = new_vae(s)
    trainer = VaeTrainer(vae)

    def loss_fn(module, step):
        index = shard(batch_index(len(world.images), batch, step, seed + 1, accelerator), part)
        return module(world.pixels(index, accelerator.device), part=part)

    vae = fit("vae", trainer, loss_fn, steps=steps, lr=lr, out=out, accelerator=accelerator, **limits,
        signature=signature("vae", s, budget, seed, world, out, ())).vae
    # SD's scaling factor: 1 / std of sampled latents, measured on the data.
    with torch.no_grad():
        x = world.pixels(torch.arange(min(2048, len(world.images))), accelerator.device)
        z = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in x.split(256)])
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    accelerator.print(f"vae: scaling_factor {vae.config.scaling_factor:.4f} (latent std {z.std():.3f})")
    if accelerator.is_main_process:
        vae.save_pretrained(out / "vae")
    accelerator.wait_for_everyone()
    return vae


class DecoderTrainer(torch.nn.Module):
    """Reconstruction loss through a frozen encoder: only the decoder (and post_quant_conv) learn."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)

    def forward(self, x, part=(0, 1)):  # part: see training.diffusion_loss
        with torch.no_grad():
            posterior = self.vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * randn_shard(posterior.mean.shape, part, device=x.device,
                                                             dtype=posterior.mean.dtype)  # posterior.sample(), sharded
        recon = self.vae.decode(z).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x)


def train_decoder(world: World, s: ModelSizes, budget, out: Path, accelerator, seed: int, **limits):
    """Train the VAE's decoder further with its encoder frozen: sharper images, and the latent space (hence the
    U-Net and the latent CLIP tower trained on it) unchanged. Needs `vae` first; overwrites out/vae."""
    from diffusers import AutoencoderKL

    steps, batch, lr = budget
    check_batch(batch, accelerator)
    part = processes(accelerator)
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).to(accelerator.device)
    encoder_before = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    trainer = DecoderTrainer(vae)

    def loss_fn(module, step):
        index = shard(batch_index(len(world.images), batch, step, seed + 4, accelerator), part)
        return module(world.pixels(index, accelerator.device), part=part)

    vae = fit("decoder", trainer, loss_fn, steps=steps, lr=lr, out=out, accelerator=accelerator, **limits,
        signature=signature("decoder", s, budget, seed, world, out, ())).vae
    assert all(torch.equal(v, encoder_before[k]) for k, v in vae.encoder.state_dict().items()), "the encoder moved"
    if accelerator.is_main_process:
        vae.save_pretrained(out / "vae")  # same config, same scaling_factor: only the decoder changed
    accelerator.wait_for_everyone()
    return vae


def caption_states(world: World, tokenizer, text, device, *, wordings: int, seed: int, batch: int = 64,
                   accelerator=None):
    """The frozen text tower's states for `wordings` captions of every image, computed once: (N, K, 77, D) fp16,
    plus the empty caption's states (77, D) for caption dropout. While the U-Net trains the text tower is
    frozen, so this replaces one text-encoder forward per step with a lookup. With several processes
    (`accelerator`) each encodes every N-th chunk of `batch` captions and they exchange them: the chunks one
    process would encode, so the same states."""
    rng = random.Random(f"captions:{seed}")
    n = len(world.images)
    texts = [c for k in range(wordings) for c in world.captions(torch.arange(n), rng)]  # wording-major
    index, count = processes(accelerator)
    starts = list(range(0, len(texts), batch))
    states = []
    with torch.no_grad():
        for i in tqdm(starts[index::count], desc="caption states (once)", leave=False, disable=index > 0):
            ids, _ = tokenize(tokenizer, texts[i:i + batch], device)
            states.append(text.text_model(ids).last_hidden_state.half())
        empty = text.text_model(tokenize(tokenizer, [""], device)[0]).last_hidden_state[0]
    if count > 1:
        states = _exchanged(states, starts, len(texts), batch, count, (77, empty.shape[-1]), device)
    return torch.cat(states).view(wordings, n, 77, -1).transpose(0, 1), empty


def _exchanged(mine: list, starts: list, total: int, batch: int, count: int, shape: tuple, device) -> list:
    """Every process's chunks (process p holds chunks p, p + count, ...), gathered into the list of all chunks in
    order: padded to equal sizes for the exchange, trimmed after it."""
    import torch.distributed as dist

    rows = -(-len(starts) // count)
    local = torch.zeros((rows, batch, *shape), dtype=torch.float16, device=device)
    for k, chunk in enumerate(mine):
        local[k, :len(chunk)] = chunk
    parts = [torch.empty_like(local) for _ in range(count)]
    dist.all_gather(parts, local)
    chunks = [parts[j % count][j // count] for j in range(len(starts))]
    chunks[-1] = chunks[-1][:total - starts[-1]]
    return chunks


def cached_caption_states(out: Path, world: World, tokenizer, text, device, *, wordings: int, seed: int,
                          accelerator=None):
    """`caption_states`, kept in `out/caption_states.safetensors` so that a resumed U-Net stage reads them back
    instead of recomputing them; recomputed whenever the text tower, the images or the wordings differ. With
    several processes they share the computing and the main process writes the file."""
    import hashlib

    from safetensors.torch import load_file, save_file

    key = hashlib.sha256((out / "text_encoder" / "model.safetensors").read_bytes()
                         + world.images.numpy().tobytes()[:: 997] + f"{wordings}:{seed}".encode()).hexdigest()
    path = out / "caption_states.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            same = f.metadata().get("key") == key
        if same:
            saved = load_file(str(path))
            return saved["states"], saved["empty"].to(device)
    states, empty = caption_states(world, tokenizer, text, device, wordings=wordings, seed=seed,
                                   accelerator=accelerator)
    if accelerator is None or accelerator.is_main_process:
        tmp = path.with_suffix(".tmp")
        save_file({"states": states.contiguous().cpu(), "empty": empty.contiguous().cpu()}, str(tmp),
                  metadata={"key": key})
        os.replace(tmp, path)
    return states, empty


# Every stage loads its parts as float32: transformers 5 and diffusers keep a file's dtype by default, and a lab
# is saved in fp16 (--init-from-lab) - training or encoding in fp16 on a CPU is slow and lossy.


def train_unet(world: World, s: ModelSizes, budget, out: Path, accelerator, seed: int, **limits):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    steps, batch, lr = budget
    check_batch(batch, accelerator)
    part = processes(accelerator)
    device = accelerator.device
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    text = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder", dtype=torch.float32).to(device).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).to(device).eval().requires_grad_(False)
    with torch.no_grad():  # the posterior of every training image, once
        params = [vae.encode(world.pixels(torch.arange(i, min(i + 512, len(world.images))), device)).latent_dist.parameters
                  for i in tqdm(range(0, len(world.images), 512), desc="VAE posteriors (once)",
                                leave=False)]
        posterior = torch.cat(params)  # (N, 8, 16, 16): mean and log-variance
    states, empty = cached_caption_states(out, world, tokenizer, text, device, wordings=s.wordings, seed=seed,
                                          accelerator=accelerator)
    scheduler = toy_scheduler()
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32) if s.init_unet else new_unet(s, text.config.hidden_size)

    def loss_fn(module, step):  # the global batch, its wordings, dropout and noise drawn alike in every process
        index = batch_index(len(world.images), batch, step, seed + 2, accelerator)
        g = torch.Generator().manual_seed(seed * 7919 + step)
        wording = torch.randint(0, s.wordings, (batch,), generator=g)
        dropped = torch.rand(batch, generator=g) < 0.1  # 10 % caption dropout, for guidance
        index, wording, dropped = shard(index, part), shard(wording, part), shard(dropped, part)
        f_txt = states[index, wording].to(device).float()  # (B, 77, D): all 77 states, as SD
        f_txt[dropped.to(device)] = empty
        with torch.no_grad():
            moments = posterior[index.to(device)]
            noise = randn_shard(moments.chunk(2, dim=1)[0], part)  # as from_posterior's own draw
            z0 = from_posterior(moments, vae.config.scaling_factor, noise=noise)
        return diffusion_loss(module, scheduler, z0, f_txt, snr_gamma=s.snr_gamma, part=part)

    unet = fit("unet", unet, loss_fn, steps=steps, lr=lr, out=out, accelerator=accelerator, **limits,
               ema_decay=0.999 if steps > 1000 else None,
               signature=signature("unet", s, budget, seed, world, out, ("text_encoder", "vae")))
    if accelerator.is_main_process:
        unet.save_pretrained(out / "unet")
    accelerator.wait_for_everyone()
    return unet


def train_judge(s: ModelSizes, budget, out: Path, accelerator, seed: int, **limits):
    """The independent judge's shape classifier, on foreground masks of freshly drawn images."""
    from safetensors.torch import save_file

    steps, batch, lr = budget
    check_batch(batch, accelerator)
    part = processes(accelerator)
    n = max(batch * 8, 4000 if steps > 100 else batch * 2)
    world = render(n, "train")
    shapes = torch.tensor([SHAPES.index(t[0].shape) for t in world.things])
    masks = mask_crops(world.images)  # (N, 1, 32, 32)
    torch.manual_seed(seed + 3)
    cnn = new_judge_cnn(len(SHAPES))

    def loss_fn(module, step):
        index = shard(batch_index(n, batch, step, seed + 3, accelerator), part)
        x = masks[index].to(accelerator.device)
        noise = randn_shard(x, part)  # the global batch's, sharded
        x = (x + 0.15 * noise).clamp(0, 1)  # robustness to generated images' noise
        return F.cross_entropy(module(x), shapes[index].to(accelerator.device))

    cnn = fit("judge", cnn, loss_fn, steps=steps, lr=lr, out=out, accelerator=accelerator, **limits,
        signature=signature("judge", s, budget, seed, None, out, ()))
    if accelerator.is_main_process:
        save_file({k: v.contiguous().cpu() for k, v in cnn.state_dict().items()}, str(out / "judge.safetensors"))
    accelerator.wait_for_everyone()
    return cnn


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
    lower cutoff than the cosine picks (docs/results/toyworld_v2_progress.md, sitting 18). Without a judge, the
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


# Chosen by bench/sampler_sweep.py (docs/results/sampler_sweep.md). guidance_rescale was 0.7 (Lin et al.'s
# value) until the 96-reference sweep on run two00: at guidance 2, no rescale cut SD-IPC's stray pixels from
# 0.10 to 0.02 % on test references (drawn images: 0.02 %) and from 0.13 to 0.07 % on held-out pairs.
SAMPLER = dict(scheduler="ddim", steps=10, guidance_scale=2.0, guidance_rescale=0.0)


def export(out: Path, lab_dir: Path | None = None, unet=None, *, into_package: bool = False, **sampler) -> Path:
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
    measured = measure_constants(lab, judge=judge)  # the three constants, and the sweep and norms they came from
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", help=f"all, export, or one or more of {','.join(STAGES)} (comma-separated)")
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
                        help="vision: a SHARE of the image tower's training images drawn with the variety of users' "
                             "images (continuous sizes, rotations, styles, shades, backgrounds, JPEG; "
                             "sdipc_lab.toyworld.variety), e.g. 0.5")
    parser.add_argument("--hard-negatives", type=float, metavar="WEIGHT",
                        help="vision: add the attribute loss at this weight (each image against its caption with one "
                             "attribute changed; ClipTrainer), e.g. 1")
    parser.add_argument("--fresh-vision", type=int, metavar="PATCH",
                        help="vision: train a new image tower with this patch size (e.g. 4) against the frozen text "
                             "tower, instead of continuing the one in OUT/image_encoder")
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
    stages = list(STAGES) if args.stage == "all" else args.stage.split(",")
    unknown = set(stages) - {*STAGES, "export"}
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}: use all, export, or {','.join(STAGES)}")
    if args.parallel:
        if args.stage != "all":
            parser.error("--parallel runs the stages of 'all'")
        argv = list(sys.argv[1:] if argv is None else argv)
        argv = [a for a in argv if a != "--parallel"]
        position = argv.index("all")
        for pair in (("clip", "vae"), ("vision", "decoder")):
            children = [subprocess.Popen([sys.executable, "-m", "sdipc_lab.toyworld.train",
                                          *argv[:position], stage, *argv[position + 1:]],
                                         env={**os.environ, "OMP_NUM_THREADS": "1"}) for stage in pair]
            if any(child.wait() for child in children):
                raise SystemExit(f"a stage of {pair} failed; see its output above (resume with the same command)")
        stages = ["judge", "unet"]
    if args.hard_negatives is not None:
        if stages != ["vision"]:
            parser.error("--hard-negatives is for the vision stage alone")
        if not (math.isfinite(args.hard_negatives) and args.hard_negatives >= 0):
            parser.error(f"--hard-negatives is a weight >= 0, got {args.hard_negatives}")
        s = dataclasses.replace(s, hard_negatives=args.hard_negatives)
    if args.fresh_vision is not None:
        if stages != ["vision"]:
            parser.error("--fresh-vision is for the vision stage alone")
        if args.fresh_vision < 1 or SIZE % args.fresh_vision:
            parser.error(f"--fresh-vision is a patch size that divides the {SIZE}-px image (e.g. 4, 8), "
                         f"got {args.fresh_vision}")
        s = dataclasses.replace(s, fresh_vision_patch=args.fresh_vision)
    if args.variety is not None:
        if stages != ["vision"]:
            parser.error("--variety is for the vision stage alone (the other stages train on the world's images)")
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
                train_judge(s, budget, args.out, accelerator, args.seed, **limits)
            else:
                globals()[f"train_{stage}"](world, s, budget, args.out, accelerator, args.seed, **limits)
        except TrainingStopped as stopped:  # Ctrl-C or SIGTERM: checkpointed, say so without a traceback
            raise SystemExit(str(stopped)) from None
        accelerator.print(f"{stage}: {time.time() - start:.0f} s on {accelerator.device}")
    if exports and accelerator.is_main_process:
        unet = unet_from_checkpoint(args.out, s) if args.from_checkpoint else None
        export(args.out, lab_dir, unet, into_package=into_package, **sampler)


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
