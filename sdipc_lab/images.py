"""Turn what a user passes as "images" into a list of 8-bit RGB PIL images, or say clearly why not.

Accepted: a PIL image, a path to an image file (`~` expanded; EXIF orientation applied), an (H, W) or (H, W, 3) uint8 NumPy array, or a
non-empty list of these. Conversions, each one documented and none silent about losing data:

| mode                  | becomes                                                         |
|-----------------------|-----------------------------------------------------------------|
| RGB                   | itself                                                          |
| L, 1 (grayscale)      | RGB with three equal channels                                   |
| P (palette)           | RGB (RGBA first if the palette has transparency)                |
| RGBA, LA, PA, La      | composited onto white, with a warning                           |
| I;16*, I (16-bit)     | scaled to 8 bits (value / 257), then RGB; mode I with values    |
|                       | 0..255 taken as 8-bit                                           |
| CMYK, YCbCr           | RGB through PIL                                                 |
| F (float), others     | refused: no fixed range to map to 8 bits                        |
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 16  # pixels; smaller images carry too little to describe


def as_rgb_images(images) -> list[Image.Image]:
    """Validate and convert `images` (one, or a list) to a list of RGB PIL images."""
    if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray)):
        images = [images]
    if images is None or not isinstance(images, (list, tuple)):
        raise TypeError(f"expected a PIL image, a path, a uint8 array, or a list of them; got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("no images given: pass a PIL image, a path to an image file, or a non-empty list of them")
    return [_as_rgb(image, i) for i, image in enumerate(images)]


def _as_rgb(image, i: int) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        image = _open(Path(image), i)
    elif isinstance(image, np.ndarray):
        image = _from_array(image, i)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"image {i} is a {type(image).__name__}; pass a PIL image, a path, or a uint8 array "
                        "(for a torch tensor in [0, 1]: PIL.Image.fromarray((t.permute(1, 2, 0) * 255).byte().numpy()))")
    if min(image.size) < MIN_SIDE:
        w, h = image.size
        raise ValueError(f"image {i} is {w}x{h} pixels; SD-IPC needs at least {MIN_SIDE}x{MIN_SIDE} "
                         "(the CLIP image tower resizes it, but a tiny image has nothing to describe)")
    return _to_rgb(image, i)


def _open(path: Path, i: int) -> Image.Image:
    path = path.expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image {i}: no file at {path}")
    if path.is_dir():
        raise ValueError(f"image {i}: {path} is a folder; pass image files (or a list of them)")
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)  # a photo's EXIF orientation applied, as viewers show it
    except Image.DecompressionBombError as error:
        raise ValueError(f"image {i}: {path} is too large to open safely ({error}); resize it first, e.g. to "
                         "1024 pixels on its long side") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image {i}: {path} is not an image file that PIL can read ({error})") from None


def _from_array(array: np.ndarray, i: int) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise TypeError(f"image {i}: arrays must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); "
                        f"got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _to_rgb(image: Image.Image, i: int) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("L", "1", "CMYK", "YCbCr"):
        return image.convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        return _to_rgb(image, i)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() < 255:
            warnings.warn(f"image {i} has transparent pixels ({mode}); composited onto a white background", stacklevel=4)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"image {i} is a 32-bit integer image with values {values.min()}..{values.max()}; "
                             "convert it to 8-bit RGB first")
        if mode == "I" and values.max() <= 255:  # 8-bit values stored as 32-bit integers (PIL's "I" from uint8 data)
            return Image.fromarray(values.astype(np.uint8)).convert("RGB")
        return Image.fromarray((values // 257).astype(np.uint8)).convert("RGB")
    raise TypeError(f"image {i} has mode {mode!r}, which has no fixed mapping to 8-bit RGB; "
                    "convert it yourself first, e.g. image.convert('RGB') after scaling to 0..255")


def digest(images) -> str:
    """A short hash of images' pixels (and sizes): what a training checkpoint records of its data."""
    import hashlib

    h = hashlib.sha256()
    for im in as_rgb_images(images):
        h.update(f"{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()[:16]
