"""The teaching lab's models at each size, and the modules whose forward pass is a stage's loss.

`MODEL_SIZES` and `BUDGETS` name what `python -m sdipc_lab.toyworld.train --size SIZE` trains; the builders make
the towers, VAE and U-Net at a size; `ClipTrainer`, `VaeTrainer` and `DecoderTrainer` return the loss of one
batch (`stages` feeds them to `training.fit`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .. import build
from ..build import sd_v1_scheduler, word_tokenizer
from ..training import gathered, randn_shard
from .data import CLIP_MEAN, CLIP_STD, LUMA, clip_normalize, grey
from .world import BACKGROUNDS, COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZE, SIZES, TWO_OBJECTS, vocabulary


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
    align: float = 0.0  # weight of the vision stage's alignment loss (ClipTrainer; 0: none)
    grey_shape: float = 0.0  # weight of the vision stage's grey-shape loss (ClipTrainer; 0: none)
    grey_share: float = 1.0  # share of each batch's images whose grey copies that loss reads
    end_token_only: bool = False  # the vision stage's contrastive loss at the end token alone (ClipTrainer)
    fresh_vision_patch: int = 0  # the vision stage starts a new image tower of this patch size (0: continues the
                                 # one in out/image_encoder)
    measure: tuple = (512, 48)  # export: test captions and judged references its constants are measured on


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
                  unet_channels=(16, 32, 32), unet_layers=1, unet_heads=2, norm_groups=8, train_images=64, wordings=2,
                  measure=(32, 4)),
}
STAGES = ("clip", "vision", "vae", "decoder", "judge", "unet", "shape")
ALL = STAGES[:-1]  # the order `all` runs them in; `shape` (a new image tower's first lesson, then `vision` goes
                   # on from it: `ShapeTrainer`) runs by name only, since `all`'s clip trains both towers from scratch
# steps, batch, learning rate per stage
BUDGETS = {
    "full": {"clip": (6000, 512, 5e-4), "vision": (2000, 512, 3e-4), "vae": (4000, 128, 1e-3),
             "decoder": (2000, 128, 5e-4), "judge": (1500, 256, 2e-3), "unet": (30000, 256, 4e-4),
             "shape": (2000, 256, 3e-4)},
    "cpu": {"clip": (100000, 128, 5e-4), "vision": (100000, 128, 3e-4), "vae": (100000, 32, 1e-3),
            "decoder": (100000, 32, 5e-4), "judge": (100000, 128, 2e-3), "unet": (100000, 64, 4e-4),
            "shape": (100000, 64, 3e-4)},
    "cpu-v1": {"clip": (100000, 128, 5e-4), "vision": (100000, 128, 3e-4), "vae": (100000, 32, 1e-3),
               "decoder": (100000, 32, 5e-4), "judge": (100000, 128, 2e-3), "unet": (100000, 64, 4e-4),
               "shape": (100000, 64, 3e-4)},
    "test": {"clip": (6, 8, 1e-3), "vision": (6, 8, 1e-3), "vae": (6, 4, 1e-3), "decoder": (6, 4, 1e-3),
             "judge": (6, 8, 1e-3), "unet": (6, 8, 1e-3), "shape": (6, 8, 1e-3)},
}

# Learning rates for sdipc_lab.finetune on the teaching lab, written into its constants by `export`: CT and
# Custom Diffusion chosen by `python bench/finetune.py --lr-sweep` (docs/guide/finetuning.md); FT's is the recipe's, not swept.
FINETUNE_LR = {"ft": 1e-4, "ct": 1e-3, "custom-diffusion": 3e-5}


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
    other value (the hard negatives a batch of random captions rarely holds: NegCLIP's idea). With `align` > 0,
    plus that weight times the alignment loss, 1 - cos(f_img^c, f_txt^c) of each image and its own caption's end
    token: the contrastive loss only ranks captions, so an image embedding can be right by rank and still far from
    its caption's embedding (a modality gap), and SD-IPC, which converts the image embedding itself, draws that gap.
    With `grey_shape` > 0 (and `captions`), plus that weight times the grey-shape loss (`grey_shape_loss`) of the
    first `grey_share` of each process's images (the batch's order is random: a random share of its images), whose
    grey copies cost a second pass of the image tower. With `end_token_only`, the contrastive loss at the end
    token alone, the text tower run only up to the batch's last end token: under a frozen text tower (the vision
    stage) the padding position's loss teaches the text tower nothing, and its states are within 0.5 % in cosine
    of the end token's (`docs/results/toyworld_quality.md`).
    """

    def __init__(self, text, vision, captions: torch.Tensor | None = None, hard_negatives: float = 0.0,
                 align: float = 0.0, grey_shape: float = 0.0, grey_share: float = 1.0, end_token_only: bool = False):
        super().__init__()
        self.text, self.vision = text, vision
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.captions, self.hard_negatives = captions, hard_negatives  # a constant, not a parameter: not saved
        self.align, self.grey_shape, self.grey_share = align, grey_shape, grey_share
        self.end_token_only = end_token_only

    def forward(self, input_ids, eos, pad_pos, pixels, variants=None):
        # with several processes the inputs are this process's share: the loss is the global batch's (`gathered`)
        return self.loss(self.text_features(input_ids, eos, pad_pos), pixels, variants)

    def text_features(self, input_ids, eos, pad_pos) -> tuple:
        """Each caption's unit C-space embedding at its end token and at its padding position: two (b, P); with
        `end_token_only`, at its end token alone: one (b, P), the text run only up to the last end token (causal
        attention: the states up to it are the same)."""
        positions = (eos,) if self.end_token_only else (eos, pad_pos)
        if self.end_token_only:
            input_ids = input_ids[:, :int(eos.max()) + 1]
        f_txt = self.text.text_model(input_ids).last_hidden_state  # (b, 77, D), or up to the last end token
        rows = torch.arange(len(eos), device=eos.device)
        return tuple(F.normalize(self.text.text_projection(f_txt[rows, pos]), dim=-1) for pos in positions)

    def loss(self, f_txt_c: tuple, pixels, variants=None):
        """The loss of images (b, 3, H, W) against their captions' `text_features` (two (b, P), or one)."""
        f_own = F.normalize(self.vision(pixel_values=pixels).image_embeds, dim=-1)  # (b, P): this process's
        f_img_c = gathered(f_own)  # (B, P)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        labels = torch.arange(len(f_img_c), device=f_img_c.device)
        loss = 0
        for k, f in enumerate(f_txt_c):  # the end token's, then the padding position's
            f = gathered(f)  # (B, P)
            logits = scale * f_img_c @ f.T  # (B images, B captions)
            loss = loss + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / (2 * len(f_txt_c))
            if self.align and k == 0:
                loss = loss + self.align * self.alignment_loss(f_img_c, f)
        if variants is not None and self.hard_negatives:
            loss = loss + self.hard_negatives * self.attribute_loss(f_img_c, gathered(variants), scale)
        if variants is not None and self.grey_shape:
            n = math.ceil(self.grey_share * len(pixels))  # this process's first n images
            f_grey_c = gathered(F.normalize(self.vision(pixel_values=grey_copy(pixels[:n])).image_embeds, dim=-1))
            loss = loss + self.grey_shape * self.grey_shape_loss(gathered(f_own[:n]), f_grey_c,
                                                                 gathered(variants[:n]), scale)
        return loss

    @staticmethod
    def alignment_loss(f_img_c, f_txt_c):
        """Mean 1 - cosine of unit image embeddings (B, P) and their own captions' unit embeddings (B, P)."""
        return (1 - (f_img_c * f_txt_c).sum(-1)).mean()

    def attribute_loss(self, f_img_c, variants, scale):
        """Cross-entropy over each attribute's values: `variants` (B, A, V + 1) holds, per image and attribute,
        the caption index of every value (-1 past the attribute's values) and, last, the true value's position;
        rows of images with two objects are all -1 and left out."""
        index, truth = variants[..., :-1], variants[..., -1]  # (B, A, V), (B, A)
        keep = truth >= 0
        if not keep.any():
            return f_img_c.sum() * 0
        logits = self.caption_logits(f_img_c, index, scale, float("-inf"))  # (B, A, V)
        return F.cross_entropy(logits[keep], truth[keep])

    def caption_logits(self, f_img_c, index, scale, fill):
        """scale * cos of unit image embeddings (B, P) with the captions at `index` (B, ..., V) of the caption
        table: (B, ..., V), `fill` where the index is -1."""
        rows = self.captions.to(f_img_c)[index.clamp(min=0)]  # (B, ..., V, P)
        return (scale * torch.einsum("bp,b...p->b...", f_img_c, rows)).masked_fill(index < 0, fill)

    def grey_shape_loss(self, f_img_c, f_grey_c, variants, scale):
        """Each one-object image's shape, read among its caption with the shape changed (`attribute_loss`'s shape
        row), as its grey copy's is read: KL from the grey copy's reading (held fixed) to the image's, plus the grey
        copy's cross-entropy with the true shape. Held-out pairs name no training image's shape, so a tower may learn
        "green, hence not a circle"; a shape that must be read as it is read without colour cannot lean on colour."""
        index, truth = variants[:, 0, :-1], variants[:, 0, -1]  # shape: (B, V), (B,)
        keep = truth >= 0
        if not keep.any():
            return f_img_c.sum() * 0
        logits = [self.caption_logits(f, index, scale, -1e4)[keep]
                  for f in (f_img_c, f_grey_c)]  # (K, V) each; -1e4, not -inf: the KL stays finite
        colour, grey_ = (x.log_softmax(-1) for x in logits)
        kl = F.kl_div(colour, grey_.detach(), log_target=True, reduction="batchmean")
        return kl + F.cross_entropy(logits[1], truth[keep])


def grey_copy(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised pixels (B, 3, H, W) -> their grey copies (`data.grey`), CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=pixels.device)[:, None, None]
    return clip_normalize(grey((pixels * std + mean) * 2 - 1))


class ShapeTrainer(torch.nn.Module):
    """A new image tower's first lesson, before it meets the text tower (`vision`): which of the `shapes` each
    picture holds, read by a linear head on its embedding f_img (one logit per shape, binary cross-entropy: a
    two-object picture holds two). Fed grey pictures (`data.shape_batch`), so colour, which the world's captions
    tie to shape often enough to stand in for it, cannot. The head is thrown away; the tower keeps what it learnt."""

    def __init__(self, vision, shapes: int):
        super().__init__()
        self.vision = vision
        self.head = torch.nn.Linear(vision.config.projection_dim, shapes)

    def forward(self, pixels, held):  # (B, 3, 64, 64), (B, S) of 0 and 1
        return F.binary_cross_entropy_with_logits(self.logits(pixels), held)

    def logits(self, pixels):  # (B, S)
        return self.head(self.vision(pixel_values=pixels).image_embeds)


def caption_variants(things: list, backgrounds: list) -> torch.Tensor:
    """For `ClipTrainer.attribute_loss`: (N, A, V + 1) caption indices into `world.all_captions()` of each image's
    canonical caption (of its `things` and background) with each attribute (`world.ATTRIBUTES`) set to each of its
    values, -1 past them, and the true value's position last; all -1 for images with two objects. A variant naming
    a held-out (shape, colour) pair is -1 too: as a negative it would teach the tower that such a pair is never
    right, the opposite of generalising to the pairs no training image shows (`world.HELD_OUT`, what the held-out
    split measures)."""
    values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
              "background": tuple(BACKGROUNDS)}
    names = list(values)  # the order of all_captions(): shape, colour, size, position, background
    width = max(map(len, values.values()))
    out = torch.full((len(things), len(names), width + 1), -1, dtype=torch.long)
    for i, (objects, background) in enumerate(zip(things, backgrounds)):
        if len(objects) != 1:
            continue
        t = objects[0]
        truth = [values[n].index(v) for n, v in zip(names, (t.shape, t.colour, t.size, t.position, background))]
        for a, name in enumerate(names):
            for v in range(len(values[name])):
                digits = truth[:a] + [v] + truth[a + 1:]
                index = 0
                for n, d in zip(names, digits):
                    index = index * len(values[n]) + d
                pair = (values["shape"][digits[0]], values["colour"][digits[1]])
                out[i, a, v] = -1 if pair in HELD_OUT and v != truth[a] else index
            out[i, a, -1] = truth[a]
    return out


def reading_grey(vision):
    """`vision`, a tower trained on grey pictures (`train shape`: `clip_normalize(grey(pixels))`), made to read
    every picture as its grey copy, exactly: its patch embedding's weights per channel become luminance weights,
    and the constant that changes moves into the patch tokens' position embeddings. Trained on grey alone, the
    differences between its channels' weights are still their random start, and colour reaches its shape features
    as noise; rewritten, the `vision` stage goes on from chroma weights of zero. In place; returns `vision`."""
    embeddings = vision.vision_model.embeddings
    weight = embeddings.patch_embedding.weight.data  # (D, 3, p, p)
    mean, std, luma = (torch.tensor(v, dtype=weight.dtype)[:, None, None] for v in (CLIP_MEAN, CLIP_STD, LUMA))
    grey = (weight / std).sum(1, keepdim=True) * luma * std  # (D, 3, p, p): the response to a grey level, by luma
    shift = ((grey - weight) * mean / std).sum((1, 2, 3))  # (D,) what the normalisation's means now add
    embeddings.patch_embedding.weight.data = grey
    embeddings.position_embedding.weight.data[1:] += shift  # the patch tokens' (row 0: the class token's)
    return vision


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
