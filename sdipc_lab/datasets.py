"""What each lab is shown and how it is judged: references from the world the lab knows.

A lab trained on the toy world (the teaching lab, the tiny one, any folder `toyworld.train` exports) is shown the
world's test images with their captions and true attributes, and judged by the world's independent judge. Stable
Diffusion (the hub sources) is shown real photographs with captions instead, and judged by CLIP-I / CLIP-T, the
paper's measures: the toy judge knows shapes on flat backgrounds, not cats. The notebooks call these functions
and never ask which kind of lab they run on.

    refs = references(lab, 4)             # [Sample or Photo]: .image, .caption, .attributes
    judge = judge_for(lab)                # the toy judge, or None: tables then report CLIP measures only
    table = zero_shot(lab, refs, "t")     # accuracy per attribute ("subject" for photos) in C- or T-space

The photographs are those scikit-image ships inside its wheel (offline, public domain or CC0; `PHOTOS` credits
each), centre-cropped to squares. A lab trained on shapes can be shown them too: `references(lab, n,
kind="photos")` asks what the teaching lab makes of a cat.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import random

import torch
from PIL import Image

from .generate import whole_number
from .hub import HUB_SOURCES
from .lab import Lab
from .toyworld import all_captions, evaluate, sample, samples
from .toyworld.judge import Judge

PHOTO_SIZE = 512  # pixels: SD v1's resolution; each lab's image processor resizes as it needs


@dataclasses.dataclass(frozen=True)
class PhotoInfo:
    loader: str      # the function in skimage.data
    caption: str
    subject: str     # what zero-shot classification and word reading ask for
    credit: str


PHOTOS = {
    "astronaut": PhotoInfo("astronaut", "a photo of an astronaut in a spacesuit in front of a flag", "astronaut",
                           "Eileen Collins, NASA; public domain"),
    "cat": PhotoInfo("chelsea", "a close-up photo of a tabby cat", "cat", "Stefan van der Walt; CC0"),
    "coffee": PhotoInfo("coffee", "a photo of a cup of coffee on a saucer", "cup of coffee", "Rachel Michetti; CC0"),
    "rocket": PhotoInfo("rocket", "a photo of a rocket on a launch pad at night", "rocket",
                        "SpaceX (Falcon 9, DSCOVR); public domain"),
    "cameraman": PhotoInfo("camera", "a black and white photo of a man with a camera on a tripod", "cameraman",
                           "Lav Varshney; CC0"),
    "galaxies": PhotoInfo("hubble_deep_field", "a telescope image of many galaxies in deep space", "galaxy",
                          "Hubble eXtreme Deep Field, NASA; public domain"),
    "retina": PhotoInfo("retina", "a medical photo of the retina of a human eye", "eye",
                        "Mikael Häggström, Wikimedia Commons; CC0"),
    "coins": PhotoInfo("coins", "a black and white photo of old coins", "coin",
                       "Greek coins from Pompeii, Brooklyn Museum; no known copyright restrictions"),
}
# More subjects than photos, so that zero-shot and word reading choose among plausible wrong answers too.
DISTRACTOR_SUBJECTS = ("dog", "car", "horse", "tree", "house", "bird", "flower", "boat", "bicycle", "mountain")
PHOTO_TEMPLATE = "a photo of a {}"


@dataclasses.dataclass
class Photo:
    """A real photograph shown to a lab, in the shape of a toy-world `Sample`: image, caption, attributes."""
    image: Image.Image  # (PHOTO_SIZE, PHOTO_SIZE) RGB
    caption: str
    name: str
    subject: str
    credit: str

    @property
    def attributes(self) -> dict:
        return {"subject": self.subject}


def knows_world(lab: Lab) -> bool:
    """Whether `lab` was made for the toy world: not a hub source, and its tokenizer is a small word-level one
    (the world's). SD v1.x's tokenizer has 49,408 tokens."""
    return lab.source not in HUB_SOURCES and len(lab.tokenizer) < 10_000


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[Photo, ...]:
    try:
        from skimage import data
    except ImportError as error:  # a dependency of sdipc_lab: only a broken install gets here
        raise ImportError("the real photographs come from scikit-image, which is missing: pip install "
                          "scikit-image (it is in sdipc_lab's dependencies; reinstall sdipc_lab)") from error
    out = []
    for name, info in PHOTOS.items():
        image = Image.fromarray(getattr(data, info.loader)()).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((PHOTO_SIZE, PHOTO_SIZE), Image.LANCZOS)
        out.append(Photo(image, info.caption, name, info.subject, info.credit))
    return tuple(out)


def photos(n: int | None = None, *, seed: int | None = None) -> list[Photo]:
    """The real photographs (all of them, or `n`): the first `n` in `PHOTOS` order, or `n` drawn by `seed`."""
    pool = list(_photos())
    n = len(pool) if n is None else whole_number("n", n, low=1)
    if n > len(pool):
        raise ValueError(f"asked for {n} photographs; there are {len(pool)} ({', '.join(PHOTOS)}). "
                         f"Ask for at most {len(pool)}, or pass your own images to vary / edit.")
    chosen = random.Random(seed).sample(pool, n) if seed is not None else pool[:n]
    return [dataclasses.replace(p, image=p.image.copy()) for p in chosen]  # yours to draw on: the cache stays clean


def references(lab: Lab, n: int, *, seed: int | None = None, kind: str | None = None, **world) -> list:
    """`n` references for `lab`: toy-world test images (single objects) for a lab that knows the world, real
    photographs otherwise (at most len(PHOTOS); fewer are returned when `n` is larger, so a notebook's N works
    on every lab). `seed=None`: the first `n` (a fixed set, as tables use); an int: `n` drawn at random by the
    seed. `kind`: "photos" or "world" instead of the lab's own kind (photographs can be shown to any lab).
    `world`: passed to `toyworld.samples` (e.g. split="train")."""
    n = whole_number("n", n, low=1)
    if seed is not None:
        seed = whole_number("seed", seed, low=0)  # or None: the first n
    if kind not in (None, "photos", "world"):
        raise ValueError(f'kind must be "photos", "world" or None (the lab\'s own), got {kind!r}')
    if (kind or ("world" if knows_world(lab) else "photos")) == "photos":
        return photos(min(n, len(PHOTOS)), seed=seed)
    split = world.pop("split", "test")
    world.setdefault("two_objects", 0)
    if seed is None:
        return samples(n, split, **world)
    if n > DRAWN_FROM:
        raise ValueError(f"asked for {n} references drawn by seed {seed} from the first {DRAWN_FROM} images of "
                         f"the {split!r} split: ask for at most {DRAWN_FROM}, or pass seed=None for the first {n}")
    return [sample(i, split, **world) for i in random.Random(seed).sample(range(DRAWN_FROM), n)]


DRAWN_FROM = 1000  # `references(..., seed=...)` draws among the first images of a split


def judge_for(lab: Lab):
    """The toy world's independent judge for a lab that knows the world; None otherwise (SD is judged by
    CLIP-I / CLIP-T alone: every table in `experiments` leaves the judge's columns out for judge=None)."""
    if not knows_world(lab):
        return None
    return Judge()


def candidate_texts(lab: Lab) -> list[str]:
    """Texts to read a converted prompt against (`nearest_texts`), in the lab's own language: every caption of
    the world for a world lab (whatever it is shown); for SD, the photographs' captions and a photo of each
    distractor subject."""
    if knows_world(lab):
        return all_captions()
    return [p.caption for p in _photos()] + [PHOTO_TEMPLATE.format(s) for s in DISTRACTOR_SUBJECTS]


def example_edit(lab: Lab) -> str:
    """An edit text that makes sense for the lab's references: the world's "a huge star", or a change of style
    for photographs (the kind of edit the paper's Fig. 5 shows)."""
    return "a huge star" if knows_world(lab) else "a watercolor painting"


def _are_photos(data) -> bool:
    kinds = {isinstance(d, Photo) for d in data}
    if len(kinds) > 1:
        raise ValueError("mix of photographs and toy-world samples: pass one kind at a time")
    return kinds == {True}


def _subjects() -> tuple[list[str], list[str]]:
    """Every subject (the photographs' and the distractors'), and its prompt "a photo of a {}"."""
    subjects = list(dict.fromkeys([p.subject for p in _photos()] + list(DISTRACTOR_SUBJECTS)))
    return subjects, [PHOTO_TEMPLATE.format(s) for s in subjects]


@torch.no_grad()
def zero_shot(lab: Lab, data, space: str = "c", cutoff: float | None = None) -> dict:
    """Zero-shot accuracy per attribute (Table 1) in C-space or, through W_t^+, T-space: the world's attributes
    (`toyworld.evaluate.zero_shot`), or for photographs the subject among all subjects ("a photo of a {}")."""
    if not _are_photos(data):
        return evaluate.zero_shot(lab, data, space, cutoff=cutoff)
    subjects, prompts = _subjects()
    f_img = evaluate.image_features(lab, [p.image for p in data], space, cutoff=cutoff)  # (N, P or D)
    f_txt = evaluate.text_features(lab, prompts, space)  # (S, P or D)
    return {"subject": evaluate.accuracy(f_img, f_txt, [subjects.index(p.subject) for p in data])}


def word_reading(lab: Lab, f: torch.Tensor, like) -> list[dict]:
    """Which word a T-space vector f (D,) picks for each attribute of reference `like`
    (`toyworld.evaluate.word_reading`); for a photograph, which subject ("a photo of a {}") among all of them."""
    if not isinstance(like, Photo):
        return evaluate.word_reading(lab, f, like)
    subjects, prompts = _subjects()
    return [evaluate.read_word(lab, f, "subject", subjects, prompts, like.subject)]


def retrieval(lab: Lab, data, space: str = "c", cutoff: float | None = None) -> dict:
    """Image->text and text->image recall@1 and @5 within `data` (Table 1): world samples against their canonical
    captions (`toyworld.evaluate.retrieval`), photographs against their captions."""
    if not _are_photos(data):
        return evaluate.retrieval(lab, data, space, cutoff=cutoff)
    return evaluate.recalls(evaluate.image_features(lab, [p.image for p in data], space, cutoff=cutoff)
                            @ evaluate.text_features(lab, [p.caption for p in data], space).T)  # (N, N)


def measured(row: dict) -> dict:
    """`row` with NaN for every column this lab did not measure (the judge's, on SD): a claim built from it gets
    the verdict "not measured here" instead of a KeyError."""
    return collections.defaultdict(lambda: math.nan, row)
