"""A CLIP image tower that reads VAE latents (companion paper 001, Latent-CLIP), and ReNO with its reward.

- `latent tower`: a ViT (`CLIPVisionModelWithProjection`, 4 input channels) on the lab's scaled, sampled
  VAE latents, trained contrastively against the lab's *frozen* text tower, so it lives in the same C-space.
- `pixel tower`: the same ViT on pixels with a patch size that gives the same token count: the control.
- `reno()`: reward-based noise optimisation (ReNO): optimise the initial noise of a one-step generator so
  that a CLIP reward rises, with the norm prior in fp32, gradient clipping, SGD with Nesterov momentum, and
  the best image kept. The latent reward needs no VAE decode inside the loop.

    python -m sdipc_lab.latent_clip train --out runs/latent_clip     # both towers, then export (<= 10 MB)
    accelerate launch -m sdipc_lab.latent_clip train ...              # several GPUs, same command (--multi_gpu
                                                                      # --num_processes N: N processes on a CPU)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapters import text_fingerprint  # towers record the C-space they were trained into
from .components import quiet
from .convert import encode_text, image_embeds, text_embeds
from .cpus import limit_threads
from .lab import Lab, load_lab
from .latents import decode_latents, encode_latents, from_posterior, pixels_of
from .toyworld.evaluate import zero_shot_of
from .toyworld.data import render
from .training import (Budget, TrainingStopped, check_batch, fit, gathered, new_accelerator, processes, randn_shard, shard,
                       use_local_gpu)

TOWERS_DIR = Path(__file__).parent / "toyworld" / "latent_clip"
KINDS = ("latent", "pixel")


def new_tower(lab: Lab, kind: str, *, width: int = 128, layers: int = 4, heads: int = 4, tokens_side: int = 8):
    """A ViT whose patch embedding takes latent channels (kind="latent") or RGB ("pixel"), with
    `tokens_side`^2 patches either way, projecting into the lab's C-space."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    latent_side = lab.unet.config.sample_size
    side, channels = (latent_side, lab.vae.config.latent_channels) if kind == "latent" else (lab.image_size, 3)
    if side % tokens_side:
        raise ValueError(f"{side} px is not divisible into {tokens_side} x {tokens_side} patches")
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
        projection_dim=lab.W_t.shape[0], image_size=side, patch_size=side // tokens_side, num_channels=channels))


def tower_embeds(tower, x: torch.Tensor) -> torch.Tensor:
    """Unit C-space embeddings (B, P) from latents or pixels in [-1, 1]."""
    return F.normalize(tower(pixel_values=x).image_embeds.float(), dim=-1)


class TowerTrainer(torch.nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x, f_txt_c):  # f_txt_c: (B, P) unit text embeddings from the frozen lab
        # with several processes, x is this process's share: the loss is over the global batch (`gathered`)
        f_img, f_txt_c = gathered(tower_embeds(self.tower, x)), gathered(f_txt_c)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * f_img @ f_txt_c.T
        labels = torch.arange(len(f_img), device=x.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_tower(lab: Lab, kind: str, *, world, out: Path, steps: int = 2000, batch: int = 128, lr: float = 5e-4,
                minutes: float | None = None, seed: int = 0, width: int = 128, layers: int = 4, accelerator=None,
                posterior: str = "sample", init=None):
    """Contrastive training against the lab's frozen text tower on `world`'s images and captions (resumable): any
    object with `images` (N, H, W, 3) uint8, `pixels(index, device)` and `captions(index, rng)`, such as
    `toyworld.data.render(n)`. A latent tower reads VAE latents drawn from the posterior (`posterior="sample"`,
    the companion paper's) or its means (`"mean"`); `init`: a tower to go on training (a copy is trained)."""
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
    n_images = len(world.images)
    accelerator = accelerator or new_accelerator()
    check_batch(batch, accelerator)
    part = processes(accelerator)
    torch.manual_seed(seed)
    tower = new_tower(lab, kind, width=width, layers=layers) if init is None else copy.deepcopy(init)
    tower.train().requires_grad_(True)
    trainer = TowerTrainer(tower).to(lab.device)
    def pixels(index):  # (B, 3, S, S) in [-1, 1] at the lab's image size
        x = world.pixels(index, lab.device)
        return x if x.shape[-1] == lab.image_size else F.interpolate(x, size=(lab.image_size,) * 2, mode="area")

    moments = None
    if kind == "latent":  # the posterior (mean, log-variance) of every image, once
        with torch.no_grad():
            moments = torch.cat([lab.vae.encode(pixels(torch.arange(i, min(i + 256, n_images))).to(lab.dtype))
                                   .latent_dist.parameters for i in range(0, n_images, 256)])  # (N, 8, h, w)

    def loss_fn(module, step):  # the global batch of the step, drawn alike by every process; this process's share
        rng = random.Random(f"{kind}:{seed}:{step}")
        index = torch.tensor([rng.randrange(n_images) for _ in range(batch)])
        captions = shard(world.captions(index, rng), part)
        index = shard(index, part)
        with torch.no_grad():
            f_txt_c = F.normalize(text_embeds(lab, captions).float(), dim=-1)
            if kind == "latent":  # scaled (and by default sampled) latents: "rescaling is key"
                share, noise = moments[index.to(lab.device)], None
                if posterior == "sample":  # drawn for the global batch, sharded: any process count draws alike
                    noise = randn_shard(share.chunk(2, dim=1)[0], part)  # as from_posterior's own draw
                x = from_posterior(share, lab.vae.config.scaling_factor, sample=posterior == "sample", noise=noise)
            else:
                x = pixels(index)
        return module(x, f_txt_c)

    signature = dict(kind=kind, lab=lab.source, text=list(lab.W_t.shape), images=n_images, batch=batch, lr=lr,
                     seed=seed, width=width, layers=layers)
    if posterior != "sample" or init is not None:  # (only then: runs started before these options still resume)
        signature.update(posterior=posterior, init=init is not None)
    with limit_threads(lab.threads):
        fit(f"{kind}-clip", trainer, loss_fn, budget=Budget(steps, minutes=minutes), lr=lr, out=Path(out),
            accelerator=accelerator, signature=signature)
    tower.eval().requires_grad_(False)
    tower.config.text_fingerprint = text_fingerprint(lab)  # the C-space it was trained into, checked at load
    if accelerator.is_main_process:
        tower.save_pretrained(Path(out) / kind)
    accelerator.wait_for_everyone()
    return tower


def load_towers(folder: Path = TOWERS_DIR, device="cpu", dtype=torch.float32, *, lab: Lab | None = None) -> dict:
    """The committed latent and pixel towers of the teaching lab: {"latent": tower, "pixel": tower}.

    They are stored in fp16 (small files) and loaded as `dtype`: fp32 by default, as fp16 matmuls on a
    CPU are several times slower. Pass the lab's (`device=lab.device, dtype=lab.dtype`) on a GPU.
    With `lab`, the towers are checked against it (C-space width, latent and image sizes, and the fingerprint
    of the text projection they were trained against): towers trained for one lab mean nothing on another."""
    from transformers import CLIPVisionModelWithProjection


    missing = [k for k in KINDS if not (Path(folder) / k / "config.json").exists()]
    if missing:
        raise FileNotFoundError(f"no {', '.join(missing)} tower in {folder}: train them with "
                                "`python -m sdipc_lab.latent_clip train`")
    with quiet():
        towers = {k: CLIPVisionModelWithProjection.from_pretrained(Path(folder) / k, use_safetensors=True)
                  .to(device, dtype).eval() for k in KINDS}
    if lab is not None:
        train_them = (f"Train towers for this lab: `python -m sdipc_lab.latent_clip train --lab {lab.source} --export "
                      "FOLDER`, then load_towers(FOLDER) (notebook 08: TOWERS = FOLDER).")
        wanted = {k: new_tower(lab, k, width=8, layers=1, heads=1).config for k in KINDS}
        mine = text_fingerprint(lab)
        for k, tower in towers.items():
            have = {a: getattr(tower.config, a) for a in ("projection_dim", "image_size", "num_channels")}
            need = {a: getattr(wanted[k], a) for a in have}
            if have != need:
                raise ValueError(f"the {k} tower in {folder} was trained for another lab ({have}; the "
                                 f"{lab.source!r} lab needs {need}). {train_them}")
            theirs = getattr(tower.config, "text_fingerprint", None)  # None: towers saved before it was recorded
            if theirs is not None and theirs != mine:
                raise ValueError(f"the {k} tower in {folder} was trained for another lab: against another text "
                                 f"tower (its W_t fingerprint is {theirs}, the {lab.source!r} lab's {mine}), so its "
                                 f"embeddings are not in this lab's C-space. {train_them}")
    return towers


@torch.no_grad()
def zero_shot_by_encoder(lab: Lab, towers: dict, data) -> dict:
    """Per image encoder (the lab's pixel CLIP, the latent tower, the pixel tower): zero-shot accuracy per
    attribute, as in notebook 04 (captions that differ in one attribute)."""
    images = [s.image for s in data]
    feats = {"pixel CLIP (the lab's)": F.normalize(image_embeds(lab, images).float(), dim=-1),
             "latent tower": tower_embeds(towers["latent"], encode_latents(lab, images, sample=False)),
             "pixel tower (control)": tower_embeds(towers["pixel"], pixels_of(images, lab.device, lab.image_size))}
    return {name: zero_shot_of(lab, f_img, data) for name, f_img in feats.items()}


def scoring_cost(lab: Lab, towers: dict, latents: torch.Tensor, repeats: int = 7) -> list[dict]:
    """Milliseconds to score a batch of scaled latents (B, 4, h, w): decode + the lab's pixel CLIP, vs the
    latent tower. Each repeat times the decode, the pixel CLIP on its output and the latent tower back to
    back; medians over repeats (after one warm-up), and the decode's share of each repeat's pixel path."""
    import statistics

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, 1e3 * (time.perf_counter() - start)

    decode_ms, clip_ms, latent_ms = [], [], []
    with torch.no_grad():
        for k in range(repeats + 1):
            pixels, t_decode = timed(lambda: lab.vae.decode(latents / lab.vae.config.scaling_factor).sample)
            _, t_clip = timed(lambda: _pixel_clip(lab, pixels.clamp(-1, 1)))
            _, t_latent = timed(lambda: tower_embeds(towers["latent"], latents))
            if k:  # the first round warms up
                decode_ms.append(t_decode), clip_ms.append(t_clip), latent_ms.append(t_latent)
    pixel_ms = [d + c for d, c in zip(decode_ms, clip_ms)]
    t_pixel, t_latent = statistics.median(pixel_ms), statistics.median(latent_ms)
    share = statistics.median(d / p for d, p in zip(decode_ms, pixel_ms))
    return [{"path": "decode + pixel CLIP", "ms / batch": t_pixel, "decode share": share, "ratio to pixel path": 1.0},
            {"path": "latent CLIP", "ms / batch": t_latent, "decode share": 0.0,
             "ratio to pixel path": t_latent / t_pixel}]


def one_step(lab: Lab, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A differentiable one-step generator: the U-Net's clean-latent estimate from noise z at the last timestep."""
    sched = lab.scheduler
    t = torch.full((len(z),), sched.config.num_train_timesteps - 1, device=z.device, dtype=torch.long)
    a = sched.alphas_cumprod.to(z.device)[t][:, None, None, None].to(z.dtype)
    out = lab.unet(z, t, encoder_hidden_states=context).sample
    if sched.config.prediction_type == "v_prediction":
        return a.sqrt() * z - (1 - a).sqrt() * out
    return (z - (1 - a).sqrt() * out) / a.sqrt().clamp(min=1e-4)


def norm_prior(z: torch.Tensor) -> torch.Tensor:
    """-log p(||z||) of a standard Gaussian's norm, in fp32: 1/2 ||z||^2 - (d - 1) log ||z||."""
    z = z.float().flatten(1)
    r = z.norm(dim=1)
    return (0.5 * r**2 - (z.shape[1] - 1) * torch.log(r)).mean()


@dataclasses.dataclass
class RenoResult:
    image: object  # PIL image of the best iterate
    first: object  # PIL image of the initial noise's one-step result (before any optimisation)
    history: list  # per iteration: reward, seconds, z_norm (||z|| / sqrt(d): 1.0 is where Gaussian noise lives)


def reno(lab: Lab, prompt: str, *, reward: str = "latent", towers: dict | None = None, iterations: int = 20,
         lr: float = 5.0, prior_weight: float = 0.01, clip: float = 0.1, seed: int = 0, target: str | None = None,
         avoid: str | None = None) -> RenoResult:
    """ReNO: optimise the initial noise so the CLIP reward of the one-step image rises.

    The one-step generator is conditioned on `prompt`; the reward is the cosine to `target` (default: the
    prompt) in the lab's C-space, minus the cosine to `avoid` if given (concept avoidance, the safety analogue).
    reward: "latent" (latent tower on the latent: no decode) or "pixel" (decode, then the lab's CLIP).
    prior_weight=0 drops the norm prior (and invites reward hacking).
    """
    if reward not in KINDS:
        raise ValueError(f"reward must be 'latent' or 'pixel', got {reward!r}")
    if reward == "latent" and towers is None:
        raise ValueError("the latent reward needs the latent tower: towers=load_towers()")
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (1, lab.unet.config.in_channels, lab.unet.config.sample_size, lab.unet.config.sample_size)
    z = torch.nn.Parameter(torch.randn(shape, generator=g).to(lab.device, lab.dtype))
    optimizer = torch.optim.SGD([z], lr=lr, momentum=0.9, nesterov=True)
    context = encode_text(lab, prompt)[0]  # (1, 77, D)
    with torch.no_grad():
        goal = F.normalize(text_embeds(lab, target or prompt).float(), dim=-1)  # (1, P)
        away = F.normalize(text_embeds(lab, avoid).float(), dim=-1) if avoid else None
    first, best, best_reward, history = None, None, -float("inf"), []
    with limit_threads(lab.threads):
        for it in range(iterations + 1):
            start = time.perf_counter()
            x0 = one_step(lab, z, context)  # (1, 4, h, w) scaled latents
            if reward == "latent":
                f = tower_embeds(towers["latent"], x0)
            else:
                pixels = lab.vae.decode(x0 / lab.vae.config.scaling_factor).sample.clamp(-1, 1)
                f = _pixel_clip(lab, pixels)
            score = (f * goal).sum() - ((f * away).sum() if away is not None else 0)
            loss = 100 * (1 - score) + prior_weight * norm_prior(z)
            if it == 0:
                first = x0.detach()
            if score.item() > best_reward:
                best_reward, best = score.item(), x0.detach()
            z_norm = z.detach().float().norm().item() / z.numel() ** 0.5
            if it < iterations:
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([z], clip)
                optimizer.step()
            history.append({"iteration": it, "reward": score.item(), "seconds": time.perf_counter() - start,
                            "z_norm": z_norm})
    best_image, first_image = decode_latents(lab, torch.cat([best, first]))
    return RenoResult(best_image, first_image, history)


def _pixel_clip(lab: Lab, pixels: torch.Tensor) -> torch.Tensor:
    """The lab's CLIP image embedding of pixels in [-1, 1], differentiably (resize + CLIP normalisation)."""
    fe = lab.feature_extractor
    size = fe.crop_size["height"]
    x = F.interpolate((pixels + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(fe.image_mean, device=x.device)[:, None, None]
    std = torch.tensor(fe.image_std, device=x.device)[:, None, None]
    return F.normalize(lab.image_encoder(pixel_values=((x - mean) / std).to(lab.dtype)).image_embeds.float(), dim=-1)


def towers_folder_strangers(folder: Path) -> list[str]:
    """What in `folder` is not a tower's export (`KIND/config.json`, `KIND/model.safetensors`): the towers are
    written only into a new or empty folder, or over towers, never over anything else."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        return [folder.name]
    ours = {"config.json", "model.safetensors"}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not (
        (p.is_dir() and p.parent == folder and p.name in KINDS) or
        (p.is_file() and p.parent.parent == folder and p.parent.name in KINDS and p.name in ours)))[:5]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--lab", default="toy")
    parser.add_argument("--out", type=Path, help="checkpoints (default: runs/latent_clip/<lab>)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--minutes", type=float, help="time budget per tower")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--towers", default=",".join(KINDS),
                        help="which towers to train, e.g. latent (the pixel tower reads no VAE latents: a new VAE "
                             "needs only a new latent tower)")
    parser.add_argument("--export", type=Path, help="where the towers go (default: OUT/towers; 'toy' names the "
                        "package's own towers, only ever replaced when asked by that name, and only for --lab toy)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.towers.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--towers {args.towers!r}: name one or both of {','.join(KINDS)}")
    if str(args.export) == "toy":
        if args.lab != "toy":
            parser.error(f"the package's towers belong to the toy lab; for --lab {args.lab} name another --export")
        args.export = TOWERS_DIR
    elif args.export is not None and args.export.expanduser().resolve() == TOWERS_DIR.resolve():
        parser.error(f"--export {args.export} is the package's own towers folder: it is only replaced when asked "
                     "by name (--export toy, for --lab toy); name another --export")
    args.out = args.out or Path("runs/latent_clip") / Path(args.lab).name
    args.export = args.export or args.out / "towers"
    if args.export.resolve() != TOWERS_DIR.resolve():
        strangers = towers_folder_strangers(args.export)
        if strangers:
            parser.error(f"--export {args.export} holds files that are not latent CLIP towers ({', '.join(strangers)}); "
                         "they are left alone: name a new or empty folder, or one that holds only towers")
    use_local_gpu()  # several GPUs: this process's one, for the lab (loaded before the processes join)
    lab = load_lab(args.lab)
    accelerator = new_accelerator()
    world = render(args.images, "train")
    for kind in kinds:
        try:
            tower = train_tower(lab, kind, world=world, out=args.out, steps=args.steps, minutes=args.minutes,
                                accelerator=accelerator)
        except TrainingStopped as stopped:  # Ctrl-C or SIGTERM: checkpointed, say so without a traceback
            raise SystemExit(str(stopped)) from None
        if accelerator.is_main_process:
            tower.half().save_pretrained(args.export / kind, safe_serialization=True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    size = sum(f.stat().st_size for f in Path(args.export).rglob("*.safetensors"))
    print(f"exported the {' and '.join(kinds)} tower{'s' * (len(kinds) > 1)} to {args.export} "
          f"({size / 2**20:.1f} MB in the folder)")


if __name__ == "__main__":
    main()
