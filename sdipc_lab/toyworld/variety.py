"""The world's objects drawn with the variety a user's own images have: what the image tower trains on beside
the world's renderings, so that it reads shape from shape and not from the world's two sizes.

The world (`world.draw`) draws every shape at one of two radii, always upright, filled and anti-aliased, in one
shade per colour word on one of five textured backgrounds. A tower trained only on that can tell a circle from a
square by its area. `sample(i)` draws one object with

- a continuous size (object width 14-82 % of the image, log-uniform: small objects are the hardest to read), the
  words "small" / "large" by the judge's threshold (an extent of `judge.LARGE_EXTENT` pixels at 64 px: what the
  U-Net draws as large from then on);
- a free position near one of the world's five (the word is the nearest), a rotation of up to 25 degrees and an
  aspect of 0.75-1.33;
- a style: filled, outlined (1.5-4 px strokes) or wobbly (a hand-drawn edge), anti-aliased or aliased;
- a shade around its colour word (still nearest to that word) on a background that is one of the world's, a flat
  colour or a gradient of any colour (the word is the nearest of the world's five);
- the corruptions of real inputs: JPEG, blur, a low-resolution source, a slight crop.

Captions come from the world's own templates and words, so the frozen text tower reads them as it always did.
The "train" split draws only (shape, colour) pairs outside `world.HELD_OUT`, like the world's. This renderer is
for training only: `bench/any_image.py` judges the lab on drawings made by code of its own.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .judge import LARGE_EXTENT
from .world import BACKGROUNDS, COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZE, Sample, Thing, _shape, caption, draw, nearest

STYLES = ("filled", "outline", "wobbly")
STYLE_WEIGHTS = (0.6, 0.2, 0.2)
EXTENT = (9, 52)  # object width in pixels at 64 px: 14-82 % of the image
SCALE = 4  # supersampling of anti-aliased drawings


def sample(index: int, split: str = "train") -> Sample:
    """The `index`-th varied one-object sample of `split` ("train": pairs outside `HELD_OUT`; "heldout": only
    those), deterministic on every machine. Its `things[0]` holds the words the caption uses."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"variety:{split}:{index}")
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if ((shape, colour) in HELD_OUT) == (split == "heldout"):
            break
    rgb = shade(colour, rng)
    background, fill = backdrop(rgb, rng)
    style = rng.choices(STYLES, STYLE_WEIGHTS)[0]
    mask, centre, extent = object_mask(shape, style, rng)
    image = Image.composite(Image.new("RGB", (SIZE, SIZE), rgb), fill, mask)
    image = corrupt(image, rng)
    thing = Thing(shape, colour, "large" if extent >= LARGE_EXTENT else "small", nearest(centre, POSITIONS))
    return Sample(image, caption((thing,), background, rng), (thing,), background)


def shade(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """An RGB near `colour`'s that is still nearest to `colour` among the world's colour words."""
    base = np.array(COLOURS[colour], dtype=float)
    while True:
        rgb = np.clip(base * rng.uniform(0.75, 1.12) + [rng.gauss(0, 22) for _ in range(3)], 0, 255)
        value = tuple(int(c) for c in rgb)
        if nearest(value, COLOURS) == colour:
            return value


def backdrop(rgb, rng: random.Random) -> tuple[str, Image.Image]:
    """A background far from the object's colour: the world's texture (half the time), a flat colour or a
    gradient of any colour. Returns its nearest background word and the (64, 64) image."""
    while True:
        kind = rng.random()
        if kind < 0.5:
            word = rng.choice(list(BACKGROUNDS))
            image = draw((), word, seed=rng.randrange(2**31))
            mean = BACKGROUNDS[word]
        else:
            a = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
            b = a if kind < 0.75 else np.clip(a + [rng.gauss(0, 50) for _ in range(3)], 0, 255).astype(np.float32)
            angle = rng.uniform(0, 2 * math.pi)
            yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5
            t = np.clip(0.5 + xx * math.cos(angle) + yy * math.sin(angle), 0, 1)[..., None]
            pixels = a * (1 - t) + b * t + np.random.default_rng(rng.randrange(2**31)).normal(0, rng.uniform(0, 5),
                                                                                                (SIZE, SIZE, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            mean = tuple((a + b) / 2)
            word = nearest(mean, BACKGROUNDS)
        if sum((x - y) ** 2 for x, y in zip(mean, rgb)) > 90**2:
            return word, image


def object_mask(shape: str, style: str, rng: random.Random) -> tuple[Image.Image, tuple, int]:
    """The object's coverage (64, 64) "L", its bounding-box centre (x, y) and extent in pixels."""
    target = math.exp(rng.uniform(*map(math.log, EXTENT)))  # log-uniform: a third of them under 16 px
    big = SIZE * SCALE
    found = None
    for _ in range(20):
        mask = Image.new("L", (big, big), 0)
        _shape(ImageDraw.Draw(mask), shape, big / 2, big / 2, big / 4)  # upright, width about half the canvas
        if style == "outline":  # a stroke of 1.5-4 px at 64 px, measured inward from the edge
            from scipy.ndimage import distance_transform_edt

            stroke = rng.uniform(1.5, 4) * (big / 2) / target  # canvas pixels
            on = np.asarray(mask) > 127
            mask = Image.fromarray(((on & (distance_transform_edt(on) <= stroke)) * 255).astype(np.uint8))
        elif style == "wobbly":
            mask = wobble(mask, rng)
        angle = rng.uniform(-25, 25)
        aspect = math.exp(rng.uniform(-0.29, 0.29))
        ys, xs = np.nonzero(np.asarray(mask) > 127)
        width = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        s = target * SCALE / width  # canvas pixels per drawn pixel
        sx, sy = s * math.sqrt(aspect), s / math.sqrt(aspect)
        anchor = POSITIONS[rng.choice(list(POSITIONS))]
        cx = (anchor[0] + rng.uniform(-7, 7)) * SCALE
        cy = (anchor[1] + rng.uniform(-7, 7)) * SCALE
        cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        # output (u, v) -> input: rotate back, unscale, around the drawing's centre
        a, b = cos / sx, sin / sx
        d, e = -sin / sy, cos / sy
        c = big / 2 - a * cx - b * cy
        f = big / 2 - d * cx - e * cy
        placed = mask.transform((big, big), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR)
        small = placed.resize((SIZE, SIZE), Image.LANCZOS)
        if rng.random() < 0.3:  # aliased: hard edges
            small = small.point(lambda v: 255 if v > 127 else 0)
        ys, xs = np.nonzero(np.asarray(small) > 127)
        if len(ys) < 12:
            continue
        found = (small, ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2),
                 int(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1))
        touching = ys.min() == 0 or xs.min() == 0 or ys.max() == SIZE - 1 or xs.max() == SIZE - 1
        if not touching or rng.random() < 0.2:  # mostly whole objects, sometimes cut by the frame
            return found
    return found  # twenty tries, each cut by the frame: the last


def wobble(mask: Image.Image, rng: random.Random) -> Image.Image:
    """A hand-drawn-looking edge: the mask displaced by a smooth random field of a few percent of its width."""
    big = mask.size[0]
    gen = np.random.default_rng(rng.randrange(2**31))
    coarse = gen.normal(0, 1, (2, 6, 6)).astype(np.float32)
    field = [np.asarray(Image.fromarray(c).resize((big, big), Image.BICUBIC)) for c in coarse]
    amp = rng.uniform(0.015, 0.04) * big
    yy, xx = np.mgrid[0:big, 0:big]
    src_y = np.clip(yy + amp * field[0], 0, big - 1).astype(int)
    src_x = np.clip(xx + amp * field[1], 0, big - 1).astype(int)
    return Image.fromarray(np.asarray(mask)[src_y, src_x])


def corrupt(image: Image.Image, rng: random.Random) -> Image.Image:
    """What real inputs go through: a low-resolution source, blur, a slight crop, JPEG; each now and then."""
    if rng.random() < 0.2:
        low = rng.choice((24, 32, 40, 48))
        image = image.resize((low, low), Image.BILINEAR).resize((SIZE, SIZE), rng.choice((Image.NEAREST,
                                                                                           Image.BICUBIC)))
    if rng.random() < 0.15:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.1)))
    if rng.random() < 0.2:
        m = rng.randrange(1, 5)
        x0, y0 = rng.randrange(m + 1), rng.randrange(m + 1)
        image = image.crop((x0, y0, SIZE - m + x0, SIZE - m + y0)).resize((SIZE, SIZE), Image.BICUBIC)
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randrange(25, 90))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image
