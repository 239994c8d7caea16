"""Quality of a lab on the toy world, judged by ground truth and by the independent judge.

Used by `bench/toyworld_quality.py` and the notebooks. Every function takes a list of `Sample`s
(single-object ones: the judge reads one object).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..convert import (
    convert,
    encode_text,
    eos_prompt_embeds,
    image_embeds,
    image_prompt_embeds,
    pseudo_prompt,
    text_embeds,
    to_c_space,
)
from ..generate import generate, progress, vary
from ..generate import sample as generate_from_embeds
from ..lab import Lab
from ..latents import decode_latents, encode_latents
from ..measure import eos_states
from ..plots import show_images
from .judge import agreement, stray_parts
from .world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    Thing,
    caption,
    samples,
)

VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
          "background": tuple(BACKGROUNDS)}


@torch.no_grad()
def text_features(lab: Lab, texts: list[str], space: str = "c", batch: int = 512) -> torch.Tensor:
    """Unit-norm text features: C-space f_txt^c, or T-space end-token states ("t")."""
    f_eos = eos_states(lab, texts, batch)  # (N, D)
    return F.normalize(to_c_space(lab, f_eos) if space == "c" else f_eos, dim=-1)


@torch.no_grad()
def image_features(lab: Lab, images, space: str = "c", batch: int = 256, cutoff: float | None = None) -> torch.Tensor:
    """Unit-norm image features: C-space f_img^c, or T-space f_cnvrt ("t", after W_t^+ at `cutoff`)."""
    f = image_embeds(lab, images, batch).float()
    return F.normalize(f if space == "c" else convert(lab, f, cutoff=cutoff).float(), dim=-1)


def caption_with(s, attribute: str, value: str) -> str:
    """The caption of sample `s`'s first object with one attribute changed, e.g. ("position", "left")."""
    thing = s.things[0]
    if attribute == "background":
        return caption((thing,), value)
    return caption((dataclasses.replace(thing, **{attribute: value}),), s.background)


def zero_shot(lab: Lab, data, space: str = "c", cutoff: float | None = None) -> dict:
    """Per attribute: how often the image is closest to its canonical caption with the true value,
    among the captions that differ from it in that attribute alone."""
    return zero_shot_of(lab, image_features(lab, [s.image for s in data], space, cutoff=cutoff), data, space)


@torch.no_grad()
def zero_shot_of(lab: Lab, f_img: torch.Tensor, data, space: str = "c") -> dict:
    """`zero_shot` for given unit image features (N, P) of `data`: any image encoder in the lab's space."""
    return {attribute: float(np.mean(hits)) for attribute, hits in zero_shot_hits(lab, f_img, data, space).items()}


@torch.no_grad()
def zero_shot_hits(lab: Lab, f_img: torch.Tensor, data, space: str = "c", attributes=tuple(VALUES)) -> dict:
    """Per attribute, per image (N,): is the image's unit feature (N, P) closest to its canonical caption with the
    true value, among the captions that differ from it in that attribute alone? `data`: anything with `attributes`
    and `things` (world samples, `freehand` drawings)."""
    hits = {}
    for attribute in attributes:
        values = VALUES[attribute]
        texts = [caption_with(s, attribute, v) for s in data for v in values]
        f_txt = text_features(lab, texts, space).view(len(data), len(values), -1)  # (N, V, P or D)
        pred = torch.einsum("nd,nvd->nv", f_img.to(f_txt), f_txt).argmax(1).cpu()  # (N,)
        hits[attribute] = (pred == torch.as_tensor([values.index(s.attributes[attribute]) for s in data])).tolist()
    return hits


def read_drawings(lab: Lab, data, judge, *, seed: int = 0, batch: int = 16) -> list[dict]:
    """What the lab makes of each image in `data` (world samples or `freehand` drawings, one object each): CLIP's
    zero-shot reading of its shape and colour ("clip shape", "clip colour": True or False) and the judge's reading
    of one SD-IPC variation ("sd-ipc shape", "sd-ipc colour", "sd-ipc size"; size None where the truth is in the
    fair band between the sizes). One dict per image."""
    images = [s.image for s in data]
    f_img = image_features(lab, images)  # (N, P), unit
    clip = zero_shot_hits(lab, f_img, data, attributes=("shape", "colour"))
    embeds = image_prompt_embeds(lab, images)  # (N, 77, D)
    generated = []
    with progress(len(range(0, len(data), batch)), "SD-IPC variations"):
        for i in range(0, len(data), batch):
            generated += generate_from_embeds(lab, embeds[i:i + batch], n=1, seed=seed + i)
    rows = []
    for k, (s, verdict) in enumerate(zip(data, judge(generated))):
        size = getattr(s, "size", s.attributes["size"])  # freehand: None in the fair band
        rows.append({"clip shape": clip["shape"][k], "clip colour": clip["colour"][k],
                     "sd-ipc shape": verdict["shape"] == s.attributes["shape"],
                     "sd-ipc colour": verdict["colour"] == s.attributes["colour"],
                     "sd-ipc size": None if size is None else verdict["size"] == size, "image": generated[k]})
    return rows


def accuracy(f_img: torch.Tensor, f_txt: torch.Tensor, truth) -> float:
    """Share of images whose most similar text is the true one. f_img (N, D) unit image features; f_txt the unit
    candidate texts, (V, D) shared by every image or (N, V, D) one set per image; truth (N,) the right text's index."""
    f_txt = f_txt.expand(len(f_img), -1, -1) if f_txt.dim() == 2 else f_txt  # (N, V, D)
    pred = torch.einsum("nd,nvd->nv", f_img.to(f_txt), f_txt).argmax(1).cpu()  # (N,)
    return (pred == torch.as_tensor(truth)).float().mean().item()


@torch.no_grad()
def word_reading(lab: Lab, f: torch.Tensor, like) -> list[dict]:
    """Which word a T-space vector f (D,) picks for each attribute: the captions of sample `like` with each value
    of the attribute put in, ranked by `read_word`."""
    return [read_word(lab, f, attribute, values, [caption_with(like, attribute, v) for v in values], like.attributes[attribute])
            for attribute, values in VALUES.items()]


@torch.no_grad()
def read_word(lab: Lab, f: torch.Tensor, attribute: str, values, texts: list[str], truth) -> dict:
    """Which of `values` a T-space vector f (D,) picks, value i standing for `texts[i]`, ranked by the cosine of
    their end-token states to f. A row: attribute, the word read, its cosine, the runner-up and the margin between
    them (near 0: the vector does not decide), and the truth."""
    f_eos = text_features(lab, texts, "t")  # (V, D), unit
    cos = (f_eos @ F.normalize(f.float().to(f_eos.device), dim=0)).cpu()
    order = cos.argsort(descending=True).tolist()
    return {"attribute": attribute, "read as": values[order[0]], "cosine": round(float(cos[order[0]]), 3),
            "runner-up": values[order[1]], "margin": round(float(cos[order[0]] - cos[order[1]]), 3), "truth": truth}


def retrieval(lab: Lab, data, space: str = "c", cutoff: float | None = None) -> dict:
    """Image->text and text->image recall@1 and @5 in the pool `data` (its canonical captions)."""
    f_img = image_features(lab, [s.image for s in data], space, cutoff=cutoff)
    f_txt = text_features(lab, [caption(s.things, s.background) for s in data], space)
    return recalls(f_img @ f_txt.T)


def recalls(sim: torch.Tensor) -> dict:
    """Recall@1 and @5 both ways from similarities (N, N) of image i to text j, the right text on the diagonal."""
    truth = torch.arange(len(sim))

    def recall(scores, k):
        return (scores.topk(min(k, len(sim)), dim=1).indices.cpu() == truth[:, None]).any(1).float().mean().item()

    return {"i2t R@1": recall(sim, 1), "i2t R@5": recall(sim, 5), "t2i R@1": recall(sim.T, 1),
            "t2i R@5": recall(sim.T, 5)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / max(mse, 1e-10))


@torch.no_grad()
def reconstruct(lab: Lab, images) -> list:
    """Encode and decode through the lab's VAE (posterior mean)."""
    return decode_latents(lab, encode_latents(lab, images, sample=False))


def prompt_conditions(lab: Lab, data, *, seed: int = 0) -> dict:
    """Prompt embeddings (N, 77, D) for each row of the variation table. "SD-IPC on the caption's embedding"
    converts the caption's own C-space text embedding instead of the image's: SD-IPC with a perfect image
    tower, so what it loses against [sos, true EOS x 76] is lost in the round trip W_t^+ W_t, not by CLIP."""
    captions = [s.caption for s in data]
    images = [s.image for s in data]
    shuffled = np.random.default_rng(seed).permutation(len(data))
    while len(data) > 1 and (shuffled == np.arange(len(data))).any():
        shuffled = np.random.default_rng(seed := seed + 1).permutation(len(data))
    sd_ipc = image_prompt_embeds(lab, images)
    return {
        "true caption": encode_text(lab, captions)[0],
        "[sos, true EOS x 76]": eos_prompt_embeds(lab, captions),
        "SD-IPC on the caption's embedding (oracle)": pseudo_prompt(lab, text_embeds(lab, captions)),
        "SD-IPC (vary)": sd_ipc,
        "shuffled reference (baseline)": sd_ipc[torch.as_tensor(shuffled)],
    }


def cutoff_conditions(lab: Lab, data, cutoffs) -> dict:
    """Prompt embeddings (N, 77, D) that say what the cutoff costs SD-IPC: "[sos, true EOS x 76]" (what a perfect
    round trip gives, up to scale), then for each cutoff the oracle (the caption's own C-space embedding through
    W_t^+) and SD-IPC (the image's). At cutoff 0 the oracle differs from the first row only by the norm of Eq. 6
    (a square W_t of full rank inverts exactly), so the rows split the round trip's loss into the norm's share
    and the cutoff's. Keys: the row's name, with the cutoff."""
    captions = [s.caption for s in data]
    f_txt_c, f_img_c = text_embeds(lab, captions), image_embeds(lab, [s.image for s in data])  # (N, P) each
    rows = {"[sos, true EOS x 76]": eos_prompt_embeds(lab, captions)}
    for cutoff in cutoffs:
        rows[f"oracle, cutoff {cutoff:.4g}"] = pseudo_prompt(lab, f_txt_c, cutoff=cutoff)
        rows[f"SD-IPC (vary), cutoff {cutoff:.4g}"] = pseudo_prompt(lab, f_img_c, cutoff=cutoff)
    return rows


def judge_conditions(lab: Lab, data, judge, *, seed: int = 0, batch: int = 16, conditions=None, embeds=None,
                     **sampler) -> dict:
    """For each condition (all of `prompt_conditions`, or those named in `conditions`; or the prompt embeddings
    (N, 77, D) given by name in `embeds`): the judge's agreement between generated images and the references'
    truth, and the stray pixels of `stray_summary` ("stray", "stray blobs": in the images looked at, a second object
    where the reference has one, "second object"). `sampler`: steps, guidance_scale, guidance_rescale (default:
    the lab's)."""
    truths = [s.attributes for s in data]
    rows = {}
    chosen = embeds if embeds is not None else {
        k: v for k, v in prompt_conditions(lab, data, seed=seed).items() if conditions is None or k in conditions}
    with progress(len(chosen) * len(range(0, len(data), batch)), "conditions"):
        for name, embeds in chosen.items():
            images = []
            for i in range(0, len(data), batch):
                images += generate_from_embeds(lab, embeds[i:i + batch], n=1, seed=seed + i, **sampler)
            rows[name] = {**agreement(judge(images), truths), **stray_summary(images)}
    return rows


def stray_summary(images) -> dict:
    """Over `images`: "stray", the mean share of stray background pixels, "stray blobs", the part of it in regions
    of 30 pixels or more, and "second object", the share of images with such a region (`judge.stray_parts`)."""
    specks, blobs = stray_parts(images)  # (N,) each
    return {"stray": float((specks + blobs).mean()), "stray blobs": float(blobs.mean()),
            "second object": float((blobs > 0).mean())}


def diversity(groups, judge=None, size: int = 16) -> dict:
    """How much the images made for one reference differ from each other, over `groups` (one list of images per
    reference): "distance", the mean over pairs of images of the RMS difference (0-1) of the two shrunk to
    `size` x `size` pixels (the object's outline, place and shade, not texture noise); with a `judge`, the
    share of pairs it reads as another shape ("shape"), size, or position. Drawn images of one caption are the
    yardstick: the world itself varies only the texture, a 3-pixel jitter and the shade."""
    from itertools import combinations

    from PIL import Image

    distances, verdicts = [], []
    for group in groups:
        if len(group) < 2:
            raise ValueError(f"diversity compares images within a group: got a group of {len(group)}")
        x = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BOX), dtype=np.float64) / 255
                      for im in group])  # (n, size, size, 3)
        distances += [float(np.sqrt(((x[i] - x[j]) ** 2).mean())) for i, j in combinations(range(len(x)), 2)]
        if judge is not None:
            verdicts.append(judge(list(group)))
    out = {"distance": float(np.mean(distances))}
    for attribute in ("shape", "size", "position") if judge is not None else ():
        out[attribute] = float(np.mean([v[i][attribute] != v[j][attribute]
                                        for v in verdicts for i, j in combinations(range(len(v)), 2)]))
    return out


def contact_sheet(lab: Lab, *, seed: int = 0, n_references: int = 12, variations: int = 3):
    """Two figures of what the lab draws, nothing picked by hand: every (shape, colour) pair from its canonical
    caption (large, in the middle, one background per colour; held-out pairs marked *), and SD-IPC variations of
    `n_references` test references drawn at random by `seed`, each beside its VAE round trip (the best any image
    generated in the lab's latent space can look). Returns (pairs_figure, variations_figure)."""
    backgrounds = {"red": "white", "orange": "teal", "yellow": "gray", "green": "beige", "blue": "white",
                   "purple": "gray"}
    captions, titles = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            captions.append(caption((Thing(shape, colour, "large", "middle"),), backgrounds[colour]))
            titles.append(f"{colour} {shape}" + (" *" if (shape, colour) in HELD_OUT else ""))
    images = generate(lab, captions, n=1, seed=seed)
    pairs = show_images(images, titles, ncols=len(SHAPES), size=1.3,
                        suptitle=f"'{lab.source}' lab, from the caption 'a large <colour> <shape> in the middle\n"
                                 f"on a <background> background' (* never seen in training; seed {seed})")
    rng = np.random.default_rng(seed)
    index = sorted(rng.choice(1000, n_references, replace=False).tolist())
    refs = [samples(1, "test", start=int(i), two_objects=0)[0] for i in index]
    grid, grid_titles = [], []
    round_trips = reconstruct(lab, [s.image for s in refs])
    for i, s, r in zip(index, refs, round_trips):
        grid += [s.image, r, *vary(lab, s.image, n=variations, seed=seed)]
        grid_titles += [f"test #{i}", "VAE round trip", *(["SD-IPC"] * variations)]
    varied = show_images(grid, grid_titles, ncols=2 * (variations + 2), size=1.3,
                         suptitle=f"SD-IPC variations from the image alone: {n_references} random test references "
                                  f"(seed {seed}), each with its VAE round trip and {variations} variations")
    return pairs, varied
