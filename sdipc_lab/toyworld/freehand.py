"""Shapes drawn by code other than the world's, each with its truth: the images a user brings.

`bench/any_image.py` and notebook 04 ask the users' question with them: what does the teaching lab make of *my*
drawing? The world (`world.draw`) draws six shapes at two radii, upright, filled, one shade per colour, on five
backgrounds, at 64 px; nothing here shares its code or its choices:

- kinds of drawing: `"pil"` (PIL's primitives at the image's own resolution, as a student's first try),
  `"matplotlib"` (anti-aliased patches), `"outline"` (matplotlib, strokes only), `"aliased"` (scikit-image's
  polygon fill, hard edges) and `"hand-drawn"` (a wobbly pen line, filled or not);
- the object's width anywhere from 15 to 80 % of the image, off-centre, rotated by up to 20 degrees, in the
  geometry of its own outlines (a 5-point star of any depth, a parametric heart, ...);
- shades around each colour word, flat and gradient backgrounds of colours outside the world's five;
- inputs at 64 and 32 px, 256 px, 640 x 480 and as JPEG.

Two parts, drawn from disjoint seeds: `"dev"`, which any tuning may look at, and `"heldout"`, which no training or
tuning decision looks at; the headline numbers of `bench/any_image.py` are the held-out part's.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZE, Thing, caption, nearest

KINDS = ("pil", "matplotlib", "outline", "aliased", "hand-drawn")
FORMATS = ("64 px", "32 px", "256 px", "640x480", "JPEG")
PARTS = {"dev": 0, "heldout": 1_000_000}  # seed offsets: the two parts never share an index
WIDTH = (0.15, 0.80)  # the object's width, a share of the image's shorter side
SMALL, LARGE = 0.33, 0.45  # below: "small" (the world's small objects are 27-31 %); above: "large" (45-53 %)
BUCKETS = ((0.15, 0.25), (0.25, 0.40), (0.40, 0.60), (0.60, 0.80))  # the world's objects: 27-31 and 45-53 %


@dataclasses.dataclass
class Drawing:
    image: Image.Image  # RGB, at the format's size
    shape: str
    colour: str  # the colour word the shade is nearest to
    width: float  # the object's width, a share of the shorter side
    kind: str
    format: str
    centre: tuple  # (x, y) in the central square, 0..1
    background_rgb: tuple
    rgb: tuple  # the object's shade

    @property
    def size(self) -> str | None:
        """The size word the lab should read: None between `SMALL` and `LARGE`, where either is fair."""
        return "small" if self.width < SMALL else "large" if self.width > LARGE else None

    @property
    def bucket(self) -> str:
        return bucket(self.width)

    @property
    def things(self) -> tuple[Thing, ...]:
        """The world's words for it, to build captions with (the size by the midpoint of the fair band)."""
        position = nearest([c * SIZE for c in self.centre], POSITIONS)
        size = "small" if self.width < (SMALL + LARGE) / 2 else "large"
        return (Thing(self.shape, self.colour, size, position),)

    @property
    def background(self) -> str:
        return nearest(self.background_rgb, BACKGROUNDS)

    @property
    def attributes(self) -> dict:
        return dict(dataclasses.asdict(self.things[0]), background=self.background)

    @property
    def caption(self) -> str:
        return caption(self.things, self.background)


def bucket(width: float) -> str:
    """The size bucket of an object `width` (share of the image), e.g. "15-25 %"."""
    for low, high in BUCKETS:
        if width < high or high == BUCKETS[-1][1]:
            return f"{low * 100:.0f}-{high * 100:.0f} %"
    raise AssertionError


def drawings(n: int, part: str = "dev", start: int = 0, **fixed) -> list[Drawing]:
    """`n` drawings of `part` ("dev" or "heldout"), the same on every machine; `fixed` pins any of shape, colour,
    kind, format, width (e.g. `kind="pil", format="64 px"`)."""
    return [drawing(i, part, **fixed) for i in range(start, start + n)]


def drawing(index: int, part: str = "dev", *, shape: str | None = None, colour: str | None = None,
            kind: str | None = None, format: str | None = None, width: float | None = None) -> Drawing:
    """The `index`-th drawing of `part`; keywords pin what they name, the rest is drawn at random."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {tuple(PARTS)}, got {part!r}")
    rng = random.Random(f"freehand:{index + PARTS[part]}")
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    kind = kind or rng.choice(KINDS)
    format = format or rng.choice(FORMATS)
    for name, value, allowed in (("shape", shape, SHAPES), ("colour", colour, tuple(COLOURS)), ("kind", kind, KINDS),
                                 ("format", format, FORMATS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}: one of {allowed}")
    width = rng.uniform(*WIDTH) if width is None else width
    rgb = _shade(colour, rng)
    colours = (_background(rgb, rng), None)
    if rng.random() < 0.4:
        colours = (colours[0], _background(rgb, rng))
    w, h = {"64 px": (64, 64), "32 px": (32, 32), "256 px": (256, 256), "640x480": (640, 480), "JPEG": (256, 256)}[format]
    side = min(w, h)
    points = outline(shape, rng)  # (K, 2), extent 2 across
    angle = math.radians(rng.uniform(-20, 20))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = points @ rot.T
    points *= 1 / np.ptp(points, axis=0).max()  # extent 1 across, after rotation
    half = width / 2
    centre = tuple(rng.uniform(half + 0.03, 1 - half - 0.03) if half < 0.47 else 0.5 for _ in range(2))
    x0, y0 = (w - side) / 2, (h - side) / 2
    xy = np.stack([x0 + (centre[0] + points[:, 0] * width) * side, y0 + (centre[1] + points[:, 1] * width) * side], 1)
    image = _backdrop(w, h, *colours, rng)
    image = RENDERERS[kind](image, xy, rgb, side, rng)
    if format == "JPEG":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randrange(40, 86))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    mean = tuple(np.mean([c for c in colours if c is not None], axis=0))
    return Drawing(image, shape, colour, width, kind, format, centre, mean, rgb)


def outline(shape: str, rng: random.Random) -> np.ndarray:
    """The shape's outline as points (K, 2), centred, 2 across, y down: this module's own geometry."""
    t = np.linspace(0, 2 * math.pi, 120, endpoint=False)
    if shape == "circle":
        p = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        p = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float)
    elif shape == "triangle":
        p = np.array([(0, -1), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)])
    elif shape == "star":
        inner = rng.uniform(0.38, 0.5)
        a = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        p = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "cross":
        w = rng.uniform(0.28, 0.4)
        p = np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                      (-1, -w), (-w, -w)])
    elif shape == "heart":
        p = np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    p = p - (p.max(0) + p.min(0)) / 2
    return p * (2 / np.ptp(p, axis=0).max())


def _shade(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """A shade of `colour` (hue, saturation and value moved) that is clearly nearest to that word."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in COLOURS[colour]))
    while True:
        rgb = colorsys.hsv_to_rgb((h + rng.uniform(-0.03, 0.03)) % 1, min(1, s * rng.uniform(0.7, 1.1)),
                                  min(1, v * rng.uniform(0.8, 1.08)))
        rgb = tuple(int(round(c * 255)) for c in rgb)
        d = sorted(sum((a - b) ** 2 for a, b in zip(rgb, ref)) ** 0.5 for ref in COLOURS.values())
        if nearest(rgb, COLOURS) == colour and d[0] < 0.75 * d[1]:
            return rgb


def _background(rgb, rng: random.Random) -> tuple[int, int, int]:
    """A background colour far from the object's: pure white or black (a fresh canvas: the world's white and black
    are textured greys), or any colour away from the world's five."""
    while True:
        pick = rng.random()
        if pick < 0.3:
            bg = (255, 255, 255)
        elif pick < 0.4:
            bg = (0, 0, 0)
        else:
            bg = tuple(rng.randrange(256) for _ in range(3))
            if min(sum((a - b) ** 2 for a, b in zip(bg, ref)) for ref in BACKGROUNDS.values()) < 40**2:
                continue
        if sum((a - b) ** 2 for a, b in zip(bg, rgb)) > 120**2:
            return bg


def _backdrop(w: int, h: int, a, b, rng: random.Random) -> Image.Image:
    """Flat `a`, or a linear gradient from `a` to `b` at a random angle."""
    if b is None:
        return Image.new("RGB", (w, h), a)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx / max(w - 1, 1) - 0.5) * math.cos(angle) + (yy / max(h - 1, 1) - 0.5) * math.sin(angle)
    t = np.clip(t + 0.5, 0, 1)[..., None]
    return Image.fromarray((np.array(a, np.float32) * (1 - t) + np.array(b, np.float32) * t).astype(np.uint8))


def _pil(image, xy, rgb, side, rng):
    ImageDraw.Draw(image).polygon([tuple(p) for p in xy], fill=rgb)
    return image


def _aliased(image, xy, rgb, side, rng):
    from skimage.draw import polygon

    pixels = np.array(image)
    rr, cc = polygon(xy[:, 1], xy[:, 0], shape=pixels.shape[:2])
    pixels[rr, cc] = rgb
    return Image.fromarray(pixels)


def _matplotlib(image, xy, rgb, side, rng, *, fill=True, pen=None, line=None):
    """Draw with matplotlib's Agg renderer (anti-aliased) over `image`, without touching pyplot's state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Polygon

    w, h = image.size
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.asarray(image), extent=(0, w, h, 0), interpolation="nearest")
    colour = tuple(c / 255 for c in rgb)
    lw = (pen or 0) * side / 64 * 72 / 100  # pen in pixels at 64 px -> points
    if line is not None:
        ax.plot(line[:, 0], line[:, 1], color=colour, lw=lw, solid_capstyle="round", solid_joinstyle="round")
        if fill:
            ax.add_patch(Polygon(line, closed=True, facecolor=colour, edgecolor="none"))
    else:
        ax.add_patch(Polygon(xy, closed=True, facecolor=colour if fill else "none",
                             edgecolor=colour if not fill else "none", lw=lw, joinstyle="round"))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _outline(image, xy, rgb, side, rng):
    return _matplotlib(image, xy, rgb, side, rng, fill=False, pen=rng.uniform(1.5, 3.5))


def _hand(image, xy, rgb, side, rng):
    """A pen line along the outline: resampled densely, displaced by a smooth wobble, not quite closed."""
    closed = np.concatenate([xy, xy[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    s = np.concatenate([[0], np.cumsum(seg)])
    u = np.linspace(0, s[-1], 200)
    line = np.stack([np.interp(u, s, closed[:, 0]), np.interp(u, s, closed[:, 1])], 1)
    extent = np.ptp(xy, axis=0).max()
    phase = [rng.uniform(0, 2 * math.pi) for _ in range(4)]
    k = np.linspace(0, 2 * math.pi, len(line))
    wobble = extent * rng.uniform(0.01, 0.035)
    line[:, 0] += wobble * (np.sin(3 * k + phase[0]) + 0.5 * np.sin(7 * k + phase[1]))
    line[:, 1] += wobble * (np.sin(4 * k + phase[2]) + 0.5 * np.sin(9 * k + phase[3]))
    line = line[: int(len(line) * rng.uniform(0.97, 1.0))]
    return _matplotlib(image, xy, rgb, side, rng, fill=rng.random() < 0.5, pen=rng.uniform(1.5, 3), line=line)


RENDERERS = {"pil": _pil, "matplotlib": lambda *a: _matplotlib(*a), "outline": _outline, "aliased": _aliased,
             "hand-drawn": _hand}
