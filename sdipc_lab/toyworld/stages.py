"""The training stages: each `train_<stage>(world, sizes, (steps, batch, lr), out, accelerator, seed, **limits)`
trains one model (or part of one) into the run folder `out`, resumably (`training.fit`); `limits` are how far
this run of it goes: `fit`'s `minutes`, `budget_steps` and `stop_at`.

Every stage loads its parts as float32: transformers 5 and diffusers keep a file's dtype by default, and a lab
is saved in fp16 (--init-from-lab) - training or encoding in fp16 on a CPU is slow and lossy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import build
from ..latents import from_posterior
from ..training import Budget, check_batch, diffusion_loss, fit, processes, randn_shard, shard
from .data import (
    World,
    batch_index,
    cached_caption_states,
    clip_normalize,
    contrastive_batch,
    grey,
    render,
    shape_batch,
    tokenize,
)
from .judge import mask_crops, new_judge_cnn
from .models import (
    ClipTrainer,
    DecoderTrainer,
    ModelSizes,
    ShapeTrainer,
    VaeTrainer,
    caption_variants,
    new_clip,
    new_tokenizer,
    new_unet,
    new_vae,
    reading_grey,
    regrouped,
    toy_scheduler,
)
from .world import SHAPES, SIZE, TWO_OBJECTS, all_captions


def signature(stage: str, s: ModelSizes, budget, seed: int, world: World | None, out: Path, reads=()) -> dict:
    """What a stage's checkpoint must match to be resumed: sizes, batch, lr, seed, the images, and a hash of the
    frozen parts it reads (`reads`, e.g. the text tower the U-Net is conditioned on)."""
    import hashlib

    fields = {"clip": ("width", "text_layers", "vision_layers", "heads", "patch"),
              "vae": ("vae_channels", "norm_groups", "vae_norm_groups", "init_vae"),
              "unet": ("unet_channels", "unet_layers", "unet_heads", "norm_groups", "wordings", "snr_gamma"),
              "judge": ()}
    fields["vision"] = fields["shape"] = fields["clip"]
    fields["decoder"] = fields["vae"]
    sizes = {k: getattr(s, k) for k in fields[stage]}
    if stage == "vision" and s.hard_negatives:  # recorded only when used: earlier runs keep their signature
        sizes["hard_negatives"] = s.hard_negatives
    if stage in ("vision", "shape") and s.fresh_vision_patch:
        sizes["fresh_vision_patch"] = s.fresh_vision_patch
    if stage == "vision" and s.align:
        sizes["align"] = s.align
    if stage == "vision" and s.grey_shape:
        sizes["grey_shape"] = s.grey_shape
    if stage == "vision" and s.grey_share != 1.0:
        sizes["grey_share"] = s.grey_share
    if stage == "vision" and s.end_token_only:
        sizes["end_token_only"] = True
    inputs = {part: hashlib.sha256(b"".join(f.read_bytes() for f in sorted((out / part).glob("*.safetensors"))))
              .hexdigest()[:16] for part in reads}  # transformers' model.safetensors, diffusers' diffusion_pytorch_...
    images = None if world is None else len(world.images)
    if world is not None and world.two_objects != TWO_OBJECTS:  # the world's own share: the signature it always had
        images = f"{images} ({world.two_objects:g} with two objects)"
    if world is not None and world.varied:
        images = f"{images} and {world.varied} varied, drawn anew"
    return dict(stage=stage, sizes=sizes, batch=budget[1], lr=budget[2], seed=seed, images=images, inputs=inputs)


def train_clip(world: World, s: ModelSizes, budget, out: Path, accelerator, seed: int, **limits):
    steps, batch, lr = budget
    check_batch(batch, accelerator)
    tokenizer = new_tokenizer()
    torch.manual_seed(seed)
    text, vision = new_clip(s, tokenizer)
    trainer = ClipTrainer(text, vision)

    def loss_fn(module, step):
        return module(*contrastive_batch(world, tokenizer, batch, step, seed, accelerator, "clip"))

    trainer = fit("clip", trainer, loss_fn, budget=Budget(steps, **limits), lr=lr, out=out, accelerator=accelerator,
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
    `ClipTrainer` too; with `s.align`, its alignment loss; with `s.grey_shape`, its grey-shape loss (of a
    `s.grey_share` of the images); with `s.end_token_only`, its contrastive loss at the end token alone; with
    `s.fresh_vision_patch`, a new image tower of that patch size instead of out/image_encoder. Needs `clip`
    first; overwrites out/image_encoder."""
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
    captions = None
    if s.hard_negatives or s.grey_shape:
        with torch.no_grad():
            ids, eos = tokenize(tokenizer, all_captions(), "cpu")
            captions = ClipTrainer(text, vision).text_features(ids, eos, eos)[0]  # (C, P): at each end token
    trainer = ClipTrainer(text, vision, captions, s.hard_negatives, s.align, s.grey_shape, s.grey_share,
                          s.end_token_only)

    def loss_fn(module, step):
        *inputs, things, backgrounds = contrastive_batch(world, tokenizer, batch, step, seed, accelerator, "vision",
                                                         offset=5, with_things=True)
        variants = (caption_variants(things, backgrounds).to(accelerator.device) if s.hard_negatives or s.grey_shape
                    else None)
        return module(*inputs, variants)  # variants: (B, A, V + 1)

    trainer = fit("vision", trainer, loss_fn, budget=Budget(steps, **limits), lr=lr, out=out, accelerator=accelerator,
        signature=signature("vision", s, budget, seed, world, out, ("text_encoder",)))
    assert all(torch.equal(v, text_before[k]) for k, v in trainer.text.state_dict().items()), "the text tower moved"
    if accelerator.is_main_process:
        trainer.vision.save_pretrained(out / "image_encoder")
    accelerator.wait_for_everyone()
    return trainer


def train_shape(world: World, s: ModelSizes, budget, out: Path, accelerator, seed: int, **limits):
    """A new image tower (the size's, or of patch `s.fresh_vision_patch`) learns to read shape first, on grey
    pictures (`ShapeTrainer`); `vision` then aligns it with the frozen text tower. Aligned from scratch, a new tower
    learns colour first and shape slowly; one that has learnt shape first aligns much faster. Writes
    out/image_encoder (a run that has one: it is replaced), made to read colour pictures as their grey copies
    (`reading_grey`), and prints how many test pictures its head reads."""
    steps, batch, lr = budget
    check_batch(batch, accelerator)
    torch.manual_seed(seed)
    vision = build.new_image_encoder(s.width, s.vision_layers, s.heads, s.width, SIZE, s.fresh_vision_patch or s.patch)
    trainer = ShapeTrainer(vision.float(), len(SHAPES))

    def loss_fn(module, step):
        return module(*shape_batch(world, batch, step, seed, accelerator))

    trainer = fit("shape", trainer, loss_fn, budget=Budget(steps, **limits), lr=lr, out=out, accelerator=accelerator,
        signature=signature("shape", s, budget, seed, world, out, ()))
    if accelerator.is_main_process:
        test = render(256, "test", two_objects=0.0)
        with torch.no_grad():
            trainer.eval()
            logits = trainer.logits(clip_normalize(grey(test.pixels(torch.arange(256), accelerator.device))))
        truth = torch.tensor([SHAPES.index(t[0].shape) for t in test.things], device=logits.device)
        print(f"shape: its head reads the shape of {(logits.argmax(1) == truth).float().mean():.0%} of 256 one-object "
              "test pictures (grey)")
        reading_grey(trainer.vision).save_pretrained(out / "image_encoder")  # what it reads grey, it reads in colour
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

    vae = fit("vae", trainer, loss_fn, budget=Budget(steps, **limits), lr=lr, out=out, accelerator=accelerator,
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

    vae = fit("decoder", trainer, loss_fn, budget=Budget(steps, **limits), lr=lr, out=out, accelerator=accelerator,
        signature=signature("decoder", s, budget, seed, world, out, ())).vae
    assert all(torch.equal(v, encoder_before[k]) for k, v in vae.encoder.state_dict().items()), "the encoder moved"
    if accelerator.is_main_process:
        vae.save_pretrained(out / "vae")  # same config, same scaling_factor: only the decoder changed
    accelerator.wait_for_everyone()
    return vae


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

    unet = fit("unet", unet, loss_fn, budget=Budget(steps, **limits), lr=lr, out=out, accelerator=accelerator,
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

    cnn = fit("judge", cnn, loss_fn, budget=Budget(steps, **limits), lr=lr, out=out, accelerator=accelerator,
        signature=signature("judge", s, budget, seed, None, out, ()))
    if accelerator.is_main_process:
        save_file({k: v.contiguous().cpu() for k, v in cnn.state_dict().items()}, str(out / "judge.safetensors"))
    accelerator.wait_for_everyone()
    return cnn


# The references the lab's cutoff is judged on: test-split images far past the ones the benches and notebooks use
