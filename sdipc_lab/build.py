"""Build new, untrained labs: a word-level CLIP tokenizer and randomly initialised components.

Used for the `"tiny"` lab of the unit tests, for full-width shape checks (ViT-L/14 widths with
few layers), and as the starting point of the teaching-scale world's training scripts.
Every component is a stock class (`CLIPTokenizer`, `CLIPTextModelWithProjection`,
`CLIPVisionModelWithProjection`, `AutoencoderKL`, `UNet2DConditionModel`, `DDIMScheduler`),
so a built lab saves with `save_pretrained` and loads back with `from_pretrained` like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch

# Letters, digits and a little punctuation: what the tokenizer can spell out when a word is unknown.
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-'"

TINY_WORDS = (
    "a an the of on in at with and large small big tiny red green blue yellow purple orange white "
    "black gray circle square triangle star cross heart left right top bottom middle center "
    "background photo picture drawing wearing hat"
).split()


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one lower-case word: start from letters (the last marked `</w>`), then
    merge the lowest-ranked adjacent pair, everywhere it occurs, until no ranked pair is left."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(p, float("inf")), p) for p in zip(pieces, pieces[1:])]
        rank, (a, b) = min(pairs)
        if rank == float("inf"):
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == (a, b):
                merged.append(a + b)
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def word_tokenizer(words: Iterable[str], model_max_length: int = 77):
    """A `CLIPTokenizer` whose BPE spells each of `words` as exactly one token.

    Unknown words fall back to letters. Padding uses the end token, as SD v1's tokenizer does.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in ALPHABET:
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        if not set(word) <= set(ALPHABET):
            raise ValueError(f"word {word!r} has characters outside {ALPHABET!r}")
        # BPE applies the lowest-ranked merge first, so a merge made for one word ("a"+"n" for "an") can split
        # another ("triangle" -> "tri", "an", ...). Take the pieces the merges so far leave of this word and
        # join them left to right with new, higher-ranked merges: the word ends as one token, and no earlier
        # word changes (its own merges all rank below these).
        pieces = bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks.setdefault(pair, len(ranks))
            merges.append(pair)
            add(pair[0] + pair[1])
            pieces = [pair[0] + pair[1], *pieces[2:]]
    add("<|startoftext|>")
    add("<|endoftext|>")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = model_max_length
    return tokenizer


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Widths and depths of a randomly initialised lab. The defaults are the `"tiny"` lab."""

    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    vision_width: int = 48
    vision_layers: int = 2
    vision_heads: int = 2
    projection_dim: int = 32
    clip_image_size: int = 32  # what the CLIP image tower sees
    patch_size: int = 8
    image_size: int = 32  # what the diffusion model generates
    vae_channels: tuple[int, ...] = (8, 16)  # len - 1 halvings: 32 px -> 16x16 latents
    unet_channels: tuple[int, ...] = (16, 32)
    unet_layers: int = 1
    unet_heads: int = 4
    norm_groups: int = 8


TINY = Sizes()

# CLIP ViT-L/14's widths (text 768, vision 1024, projection 768) with one layer each and a
# small U-Net: the shapes of the real thing at a fraction of the cost.
FULL_WIDTH = Sizes(
    text_width=768, text_layers=1, text_heads=12,
    vision_width=1024, vision_layers=1, vision_heads=16,
    projection_dim=768, clip_image_size=224, patch_size=14,
    image_size=32, vae_channels=(8, 16), unet_channels=(32, 64), unet_heads=8,
)


def sd_v1_scheduler(**overrides):
    """DDIM with Stable Diffusion v1's noise schedule (scaled-linear betas 0.00085 -> 0.012)."""
    from diffusers import DDIMScheduler

    config = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    config.update(overrides)
    return DDIMScheduler(**config)


def new_text_encoder(tokenizer, width: int, layers: int, heads: int, projection_dim: int):
    """A random CLIP text tower with its projection W_t (projection_dim, width), for `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, projection_dim=projection_dim, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def new_image_encoder(width: int, layers: int, heads: int, projection_dim: int, image_size: int, patch_size: int):
    """A random CLIP ViT image tower with its projection W_i (projection_dim, width)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
        projection_dim=projection_dim, image_size=image_size, patch_size=patch_size))


def new_vae(channels: tuple[int, ...], norm_groups: int, image_size: int):
    """A random SD-style VAE: 4 latent channels, len(channels) - 1 halvings of `image_size`."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=norm_groups, sample_size=image_size)


def new_unet(channels: tuple[int, ...], layers: int, heads: int, cross_dim: int, norm_groups: int, latent_size: int):
    """A random SD-style U-Net on 4-channel latents (latent_size, latent_size), cross-attending to width `cross_dim`."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_dim, attention_head_dim=heads, norm_num_groups=norm_groups)


def random_components(sizes: Sizes = TINY, *, words: Iterable[str] = TINY_WORDS, seed: int = 0) -> dict:
    """Randomly initialised lab components, deterministic given `seed`.

    Returns the dict `load_lab` reads from a folder: tokenizer, text_encoder, image_encoder,
    feature_extractor, unet, vae, scheduler.
    """
    from transformers import CLIPImageProcessorPil

    s = sizes
    tokenizer = word_tokenizer(words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = new_text_encoder(tokenizer, s.text_width, s.text_layers, s.text_heads, s.projection_dim)
        image_encoder = new_image_encoder(s.vision_width, s.vision_layers, s.vision_heads, s.projection_dim,
                                          s.clip_image_size, s.patch_size)
        vae = new_vae(s.vae_channels, s.norm_groups, s.image_size)
        unet = new_unet(s.unet_channels, s.unet_layers, s.unet_heads, s.text_width, s.norm_groups,
                        s.image_size // 2 ** (len(s.vae_channels) - 1))
    feature_extractor = CLIPImageProcessorPil(
        size={"shortest_edge": s.clip_image_size},
        crop_size={"height": s.clip_image_size, "width": s.clip_image_size},
    )
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=image_encoder,
                feature_extractor=feature_extractor, unet=unet, vae=vae, scheduler=sd_v1_scheduler())


# ---------------------------------------------------------------------------------- a local hub cache

HUB_REPOS = {"clip": "openai/clip-vit-large-patch14", "sd": "CompVis/stable-diffusion-v1-4"}
# Reduced widths for a fast offline test of the full-scale path; the rest of each real config is kept.
SHRUNK = dict(text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1),
              vision=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1),
              projection_dim=64, unet=dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1),
              vae=dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1))


HUB_CACHE_MARKER = "sdipc_lab_hub_cache.txt"  # marks a cache of random weights as hub_cache's own, to write again


def hub_cache(folder, configs, *, shrink: dict | None = SHRUNK, words: Iterable[str] = TINY_WORDS,
              seed: int = 0) -> Path:
    """A Hugging Face hub cache (`folder/models--org--name/{refs/main, snapshots/REV/...}`, as the hub client
    writes it) holding CLIP ViT-L/14 and SD v1.4 with their real configuration files (read from `configs`, one
    sub-folder per repository: `openai--clip-vit-large-patch14/`, `CompVis--stable-diffusion-v1-4/`) and random
    weights, at the widths of `shrink` (None: the real ones, several GB). The tokenizer is a small word-level
    one (`words`) in the real tokenizer's files and layout. Point HF_HUB_CACHE at `folder` and set
    HF_HUB_OFFLINE=1: `load_lab("sd-v1-4")` then runs its real `from_pretrained` path on this machine. `folder` must
    be new (in an existing folder), empty, or a cache hub_cache wrote before: a real cache is refused."""
    import json
    import shutil
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    folder, configs = Path(folder).expanduser(), Path(configs)
    if not folder.parent.is_dir():
        raise ValueError(f"hub_cache: {folder.parent} (the folder that would hold {folder.name}) does not exist: "
                         "create it first, or name a folder in an existing one")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"hub_cache: {folder} is a file; name a new or empty folder")
    if folder.exists() and any(folder.iterdir()) and not (folder / HUB_CACHE_MARKER).exists():
        held = sorted(p.name for p in folder.iterdir())[:5]
        raise ValueError(f"hub_cache: {folder} already holds {', '.join(held)}, not written by hub_cache (it may be a "
                         "real Hugging Face cache: its repositories would be replaced by random weights). Name a new "
                         "or empty folder.")
    missing = [repo for repo in HUB_REPOS.values() if not (configs / repo.replace("/", "--")).is_dir()]
    if missing:
        raise ValueError(f"hub_cache: {configs} has no configuration folder for {', '.join(missing)} (one "
                         "sub-folder per repository, e.g. openai--clip-vit-large-patch14/)")
    folder.mkdir(exist_ok=True)
    (folder / HUB_CACHE_MARKER).write_text("random weights written by sdipc_lab.build.hub_cache\n")
    shrink = shrink or {}
    snapshots = {}
    for key, repo in HUB_REPOS.items():
        root = folder / f"models--{repo.replace('/', '--')}"
        revision = "0" * 40  # any commit hash: refs/main names the snapshot
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(revision)
        snapshots[key] = root / "snapshots" / revision
        shutil.copytree(configs / repo.replace("/", "--"), snapshots[key], dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.md"))

    def edit(path: Path, change) -> dict:
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config, indent=2) + "\n")
        return config

    def shrink_clip(config):
        for tower in ("text", "vision"):
            for key in (f"{tower}_config", f"{tower}_config_dict"):  # the legacy file has both; *_dict wins
                if key in config:
                    config[key].update(shrink.get(tower, {}))
                    if "projection_dim" in shrink and "projection_dim" in config[key]:
                        config[key]["projection_dim"] = shrink["projection_dim"]
        config["projection_dim"] = shrink.get("projection_dim", config["projection_dim"])

    clip_dir, sd_dir = snapshots["clip"], snapshots["sd"]
    clip_config = edit(clip_dir / "config.json", shrink_clip)
    unet_config = edit(sd_dir / "unet" / "config.json", lambda c: c.update(
        shrink.get("unet", {}), cross_attention_dim=clip_config["text_config_dict"].get(
            "hidden_size", clip_config["text_config"]["hidden_size"])))
    vae_config = edit(sd_dir / "vae" / "config.json", lambda c: c.update(shrink.get("vae", {})))

    with tempfile.TemporaryDirectory() as tmp:  # the BPE files the hub holds: vocab.json and merges.txt
        word_tokenizer(words).save_pretrained(tmp)
        model = json.loads((Path(tmp) / "tokenizer.json").read_text())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    for where in (clip_dir, sd_dir / "tokenizer"):
        where.mkdir(exist_ok=True)
        (where / "vocab.json").write_text(json.dumps(model["vocab"]))
        (where / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(CLIPConfig.from_dict(clip_config))
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, clip_dir / "model.safetensors")
        for part, cls, config in (("unet", UNet2DConditionModel, unet_config), ("vae", AutoencoderKL, vae_config)):
            model = cls.from_config(config)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      sd_dir / part / "diffusion_pytorch_model.safetensors")
    return folder
