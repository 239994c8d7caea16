"""The independent judge: what a toy-world image shows, measured without the CLIP being studied.

Colour, size, position and background are read analytically from the pixels (the foreground is
whatever differs from the border's colour); the shape comes from a small CNN trained on the
foreground masks of drawn images (`train.py judge`). Its accuracy on drawn images is reported by
`bench/toyworld_quality.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZE

JUDGE_FILE = Path(__file__).parent / "judge.safetensors"
THRESHOLD = 50.0  # RGB distance from the background colour that counts as foreground
MIN_PIXELS = 12
LARGE_EXTENT = 25  # pixels: small objects span about 17-20, large ones 29-34


def _as_array(images) -> np.ndarray:  # (N, 64, 64, 3) float32; larger images (SD's 512 px) are resized
    from PIL import Image


    if isinstance(images, torch.Tensor):
        return images.numpy().astype(np.float32)
    return np.stack([np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC) if im.size != (SIZE, SIZE)
                                else im.convert("RGB"), dtype=np.float32) for im in images])


def _smooth(x: np.ndarray) -> np.ndarray:  # 3x3 mean, per channel: tames generated images' speckle
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    t = F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return t.permute(0, 2, 3, 1).numpy()


def foreground(images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks (N, H, W) bool, background colours (N, 3) and the smoothed images (N, H, W, 3)."""
    x = _smooth(_as_array(images))
    border = np.concatenate([x[:, :2].reshape(len(x), -1, 3), x[:, -2:].reshape(len(x), -1, 3),
                             x[:, :, :2].reshape(len(x), -1, 3), x[:, :, -2:].reshape(len(x), -1, 3)], axis=1)
    background = np.median(border, axis=1)  # (N, 3)
    distance = np.linalg.norm(x - background[:, None, None], axis=-1)
    return distance > THRESHOLD, background, x


def mask_crops(images, size: int = 32) -> torch.Tensor:
    """The foreground mask of each image, cropped square around the object, resized: (N, 1, size, size)."""
    masks, _, _ = foreground(images)
    out = torch.zeros(len(masks), 1, size, size)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(ys) < MIN_PIXELS:
            continue
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        half = max(ys.max() - ys.min(), xs.max() - xs.min()) / 2 + 2
        y0, y1 = int(max(0, cy - half)), int(min(m.shape[0], cy + half + 1))
        x0, x1 = int(max(0, cx - half)), int(min(m.shape[1], cx + half + 1))
        crop = torch.from_numpy(m[y0:y1, x0:x1].astype(np.float32))[None, None]
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out


def _nearest(value: np.ndarray, table: dict) -> str:
    names = list(table)
    return names[int(np.argmin([np.linalg.norm(value - np.array(table[n])) for n in names]))]


def new_judge_cnn(n_classes: int) -> torch.nn.Module:
    """Shape classifier on a 32x32 foreground mask (see judge.py)."""
    def block(i, o):
        return [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.GELU(), torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 64), torch.nn.Flatten(),
                               torch.nn.Linear(64 * 16, 128), torch.nn.GELU(), torch.nn.Linear(128, n_classes))


class Judge:
    """`judge(images)` -> one dict per image: shape, colour, size, position, background (None if no object)."""

    def __init__(self, path: Path = JUDGE_FILE):
        from safetensors.torch import load_file

        self.cnn = new_judge_cnn(len(SHAPES)).eval()
        if not Path(path).exists():
            raise FileNotFoundError(f"no judge weights at {path}: train them with "
                                    "`python -m sdipc_lab.toyworld.train judge`")
        self.cnn.load_state_dict(load_file(str(path)))

    @torch.no_grad()
    def __call__(self, images) -> list[dict]:
        verdicts = analytic(images)
        shapes = self.cnn(mask_crops(images)).argmax(1).tolist()
        for verdict, shape in zip(verdicts, shapes):
            if verdict["colour"] is not None:
                verdict["shape"] = SHAPES[shape]
        return verdicts


def analytic(images) -> list[dict]:
    """Colour, size, position and background read from the pixels; shape left None (the CNN's job)."""
    masks, background, x = foreground(images)
    out = []
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        verdict = dict(shape=None, colour=None, size=None, position=None,
                       background=_nearest(background[i], BACKGROUNDS))
        if len(ys) >= MIN_PIXELS:
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            centre = np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2])
            verdict.update(colour=_nearest(x[i][_interior(m)].mean(0), COLOURS), position=_nearest(centre, POSITIONS),
                           size="large" if extent >= LARGE_EXTENT else "small")
        out.append(verdict)
    return out


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask less its one-pixel rim, where the object's colour is blended with the background's (a small yellow
    object on black read as orange from its whole mask: 19 of 1,300 drawn images; none from its interior);
    the whole mask where too little is left."""
    from scipy import ndimage

    inside = ndimage.binary_erosion(mask)
    return inside if inside.sum() >= MIN_PIXELS // 2 else mask


def stray_pixels(images, threshold: float = THRESHOLD / 2, margin: int = 3) -> np.ndarray:
    """Artefacts: per image, the share of pixels away from the object that differ from the background colour
    by more than `threshold` (RGB distance) - streaks, blotches, halos. The object is the largest connected
    foreground region, grown by `margin` pixels; (N,) fractions. Drawn images score near 0 (their texture
    noise is well under the threshold). `stray_parts` splits them by the size of the region they form."""
    specks, blobs = stray_parts(images, threshold, margin)
    return specks + blobs


def stray_parts(images, threshold: float = THRESHOLD / 2, margin: int = 3, blob: int = 30):
    """The stray pixels of `stray_pixels`, split by the connected region they form: (specks, blobs), (N,)
    fractions each, summing to `stray_pixels`. Specks and thin streaks are regions under `blob` pixels; blobs are
    regions of `blob` or more - in the generated images looked at, a second object where the reference has one (a
    small drawn object covers about 150 pixels)."""
    from scipy import ndimage

    masks, background, x = foreground(images)
    stray = np.linalg.norm(x - background[:, None, None], axis=-1) > threshold  # (N, H, W)
    specks, blobs = np.zeros(len(masks)), np.zeros(len(masks))
    for i, m in enumerate(masks):
        labels, n = ndimage.label(m)
        if n:
            largest = labels == 1 + int(np.argmax(ndimage.sum(m, labels, range(1, n + 1))))
            stray[i] &= ~ndimage.binary_dilation(largest, iterations=margin)
        regions, k = ndimage.label(stray[i])
        sizes = np.asarray(ndimage.sum(stray[i], regions, range(1, k + 1))) if k else np.zeros(0)  # (k,) pixels
        specks[i] = sizes[sizes < blob].sum() / stray[i].size
        blobs[i] = sizes[sizes >= blob].sum() / stray[i].size
    return specks, blobs


def agreement(verdicts: list[dict], truths: list[dict], attributes=("shape", "colour", "size", "position", "background")) -> dict:
    """Fraction of images on which the judge finds each true attribute."""
    return {a: float(np.mean([v[a] == t[a] for v, t in zip(verdicts, truths)])) for a in attributes}
