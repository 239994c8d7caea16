"""The teaching-scale world: one or two coloured shapes on a textured background, with captions.

Every sample carries its ground truth, and sampling is deterministic: `sample(i, split)` is the
same image and caption on every machine. Some (shape, colour) pairs never appear in the
`"train"` split; the `"heldout"` split draws only those, to measure generalisation.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS = {  # name -> RGB
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40),
    "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (150, 60, 190),
}
BACKGROUNDS = {"white": (236, 236, 236), "black": (24, 24, 24), "gray": (128, 128, 128),
               "beige": (225, 205, 160), "teal": (40, 110, 110)}
SIZES = {"small": 10, "large": 17}  # radius in pixels
POSITIONS = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47), "middle": (32, 32)}
HELD_OUT = (("star", "red"), ("circle", "green"), ("triangle", "blue"), ("cross", "yellow"),
            ("heart", "purple"), ("square", "orange"))
SPLITS = ("train", "test", "heldout")
TWO_OBJECTS = 0.2  # the world's share of samples with a second object
ATTRIBUTES = ("shape", "colour", "size", "position", "background")

# Caption vocabulary: synonyms per value, and templates.
SHAPE_WORDS = {"circle": ("circle", "disk"), "square": ("square", "box"), "triangle": ("triangle",),
               "star": ("star",), "cross": ("cross", "plus"), "heart": ("heart",)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
POSITION_WORDS = {"left": ("on the left", "at the left", "to the left"),
                  "right": ("on the right", "at the right", "to the right"),
                  "top": ("at the top", "on top", "up high"),
                  "bottom": ("at the bottom", "down low", "on the bottom"),
                  "middle": ("in the middle", "in the center", "at the center")}
BACKGROUND_TEMPLATES = ("on a {} background", "against a {} backdrop", "over {}", "with a {} background")
PREFIXES = ("", "", "a picture of ", "a drawing of ", "an image showing ", "a simple photo of ")


@dataclasses.dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    position: str


@dataclasses.dataclass
class Sample:
    image: Image.Image  # (64, 64) RGB
    caption: str
    things: tuple[Thing, ...]  # one or two objects
    background: str

    @property
    def attributes(self) -> dict:
        """Ground truth of the first (or only) object plus the background."""
        return dict(dataclasses.asdict(self.things[0]), background=self.background)


def vocabulary() -> list[str]:
    """Every word a caption can contain."""
    words = set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | {"and", "a", "an"}
    texts = [*BACKGROUND_TEMPLATES, *PREFIXES] + [w for ws in (*SHAPE_WORDS.values(), *SIZE_WORDS.values(),
                                                                *POSITION_WORDS.values()) for w in ws]
    for text in texts:
        words |= set(text.replace("{}", "").split())
    return sorted(words)


def sample(index: int, split: str = "train", *, two_objects: float = TWO_OBJECTS) -> Sample:
    """The `index`-th sample of `split`; with probability `two_objects`, a second object."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{split}:{index}")
    n = 2 if rng.random() < two_objects else 1
    positions = rng.sample(["left", "right"], 2) if n == 2 and rng.random() < 0.5 else (
        rng.sample(["top", "bottom"], 2) if n == 2 else [rng.choice(list(POSITIONS))])
    things = tuple(_thing(rng, split, pos, size="small" if n == 2 else None) for pos in positions)
    background = rng.choice(list(BACKGROUNDS))
    while any(_close(COLOURS[t.colour], BACKGROUNDS[background]) for t in things):
        background = rng.choice(list(BACKGROUNDS))
    image = draw(things, background, seed=rng.randrange(2**31))
    return Sample(image, caption(things, background, rng), things, background)


def samples(n: int, split: str = "train", start: int = 0, **kwargs) -> list[Sample]:
    return [sample(i, split, **kwargs) for i in range(start, start + n)]


def concept_samples(shape: str, colour: str, n: int, start: int = 0) -> list[Sample]:
    """`n` images of one concept (a shape in a colour), varying size, position and background."""
    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"unknown concept {colour} {shape}: shapes {SHAPES}, colours {tuple(COLOURS)}")
    out = []
    for i in range(start, start + n):
        rng = random.Random(f"concept:{shape}:{colour}:{i}")
        thing = Thing(shape, colour, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))
        background = rng.choice([b for b in BACKGROUNDS if not _close(COLOURS[colour], BACKGROUNDS[b])])
        out.append(Sample(draw((thing,), background, seed=rng.randrange(2**31)), caption((thing,), background, rng),
                          (thing,), background))
    return out


def concept_split(n_train: int = 20, n_test: int = 4, seed: int = 0) -> tuple[list, list]:
    """(shape, colour) concepts for few-shot fine-tuning: `n_train` to train on and the next `n_test` to test on,
    drawn in a seeded order from the pairs that are not `HELD_OUT` (those stay unseen by every lab's training)."""
    import itertools

    pairs = [p for p in itertools.product(SHAPES, COLOURS) if p not in HELD_OUT]
    if n_train < 0 or n_test < 1 or n_train + n_test > len(pairs):
        raise ValueError(f"n_train + n_test must be at most the {len(pairs)} concepts there are, with n_test >= 1; "
                         f"got {n_train} + {n_test}")
    random.Random(seed).shuffle(pairs)
    return pairs[:n_train], pairs[n_train:n_train + n_test]


def all_captions() -> list[str]:
    """The canonical caption of every one-object scene the world can draw (shape x colour x size x position x
    background, 1,800): the candidates `measure.nearest_texts` ranks to say what a converted prompt describes."""
    import itertools

    return [caption((Thing(shape, colour, size, position),), background)
            for shape, colour, size, position, background in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS,
                                                                                BACKGROUNDS)]


def concept_caption(s: Sample, word: str) -> str:
    """The canonical caption of a one-object sample with its colour word replaced by `word`: Custom
    Diffusion's "a large <new1> heart at the top on a white background", in the world's own language."""
    return caption((dataclasses.replace(s.things[0], colour=word),), s.background)


def _thing(rng: random.Random, split: str, position: str, size: str | None) -> Thing:
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if ((shape, colour) in HELD_OUT) == (split == "heldout"):
            return Thing(shape, colour, size or rng.choice(list(SIZES)), position)


def nearest(value, table: dict) -> str:
    """The name in `table` (name -> RGB, or (x, y)) nearest to `value`: which colour word a shade is, which
    background word a backdrop, which position word a place."""
    return min(table, key=lambda name: sum((a - b) ** 2 for a, b in zip(value, table[name])))


def _close(a, b) -> bool:
    return sum((x - y) ** 2 for x, y in zip(a, b)) < 60**2


def caption(things: tuple[Thing, ...], background: str, rng: random.Random | None = None) -> str:
    """A caption from templates and synonyms; without `rng`, the first (canonical) wording."""
    pick = (lambda options: rng.choice(options)) if rng else (lambda options: options[0])
    phrases = []
    for t in things:
        words = [pick(SIZE_WORDS[t.size]), t.colour, pick(SHAPE_WORDS[t.shape])]
        if rng and rng.random() < 0.3:  # "a red large circle" is still a large red circle
            words[0], words[1] = words[1], words[0]
        article = "an" if words[0][0] in "aeiou" else "a"
        phrases.append(f"{article} {' '.join(words)} {pick(POSITION_WORDS[t.position])}")
    text = " and ".join(phrases) + " " + pick(BACKGROUND_TEMPLATES).format(background)
    return pick(PREFIXES) + text


def draw(things, background: str, seed: int = 0, size: int = SIZE) -> Image.Image:
    """Render objects on a softly textured background (never flat: see docs/guide/teaching_lab.md on noise schedules)."""
    rng = np.random.default_rng(seed)
    base = np.array(BACKGROUNDS[background], dtype=np.float32)
    yy = np.linspace(-1, 1, size, dtype=np.float32)[:, None, None]
    pixels = base + 10 * yy * rng.choice([-1, 1]) + rng.normal(0, 6, (size, size, 3)).astype(np.float32)
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    scale = 4  # draw large, then shrink: anti-aliased edges
    mask_big = Image.new("L", (size * scale, size * scale), 0)
    for t in things:
        mask_big.paste(0, (0, 0, *mask_big.size))
        cx, cy = POSITIONS[t.position]
        jitter = rng.integers(-3, 4, 2)
        _shape(ImageDraw.Draw(mask_big), t.shape, (cx + jitter[0]) * scale, (cy + jitter[1]) * scale,
               SIZES[t.size] * scale)
        mask = mask_big.resize((size, size), Image.LANCZOS)
        shade = np.array(COLOURS[t.colour], dtype=np.float32) + rng.normal(0, 4, 3)
        canvas.paste(Image.new("RGB", canvas.size, tuple(int(c) for c in np.clip(shade, 0, 255))), (0, 0), mask)
    return canvas


def _shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    def polygon(points):
        d.polygon([(cx + x * r, cy + y * r) for x, y in points], fill=255)

    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        polygon([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)])
    elif shape == "triangle":
        polygon([(0, -1), (0.95, 0.75), (-0.95, 0.75)])
    elif shape == "star":
        polygon([(math.cos(a) * rad, math.sin(a) * rad) for k in range(10)
                 for a, rad in [(-math.pi / 2 + k * math.pi / 5, 1.0 if k % 2 == 0 else 0.42)]])
    elif shape == "cross":
        w = 0.32
        polygon([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                 (-1, -w), (-w, -w)])
    elif shape == "heart":
        lobe = 0.5
        d.ellipse((cx - r, cy - 0.8 * r, cx, cy - 0.8 * r + 2 * lobe * r), fill=255)
        d.ellipse((cx, cy - 0.8 * r, cx + r, cy - 0.8 * r + 2 * lobe * r), fill=255)
        polygon([(-0.97, -0.15), (0.97, -0.15), (0, 0.95)])
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
