"""Image metrics with the lab's CLIP: CLIP-I, CLIP-T, CLIP-score, and FID on CLIP features.

CLIP-I (image-image) and CLIP-T (image-text) follow DreamBooth and the paper's Tables 3-6: cosine
similarities x 100. CLIP-score is Hessel et al.'s CLIPScore, 2.5 * max(cos, 0), shown x 100 as the paper's
Table 2 does: its CLIP-scores (70-83) are about 2.5x the CLIP-T values of its Tables 3-6 (25-30), the
weight included. Notebook 04's table uses CLIP-score; 05 and 06 use CLIP-I and CLIP-T. FID is torchmetrics' `FrechetInceptionDistance` with the lab's CLIP
image tower as its feature extractor ("CLIP-FID", Kynkäänniemi et al. 2023), because Inception weights
cannot be fetched offline; it is comparable between rows measured with the same lab, not with published
FIDs. `frechet_distance` is the same formula in NumPy/SciPy, the reference the tests check it against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from .convert import image_embeds, text_embeds
from .images import as_rgb_images
from .lab import Lab


def _image_features(lab: Lab, images, batch: int = 128) -> torch.Tensor:  # (N, P), unit norm
    return F.normalize(image_embeds(lab, images, batch).float(), dim=-1)


def clip_i(lab: Lab, images, references) -> np.ndarray:
    """100 x cos(f_img(image), f_img(reference)) per pair (N,)."""
    return 100 * (_image_features(lab, images) * _image_features(lab, references)).sum(-1).cpu().numpy()


def clip_t(lab: Lab, images, texts) -> np.ndarray:
    """100 x cos(f_img(image), f_txt(text)) per pair (N,)."""
    texts = [texts] * len(list(images)) if isinstance(texts, str) else list(texts)
    f_txt = F.normalize(text_embeds(lab, texts).float(), dim=-1)
    return 100 * (_image_features(lab, images) * f_txt).sum(-1).cpu().numpy()


CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021, Eq. 1


def clip_score(lab: Lab, images, texts) -> float:
    """Mean CLIPScore x 100: 100 * 2.5 * max(cos(f_img, f_txt), 0) (Hessel et al. 2021)."""
    return float(CLIPSCORE_WEIGHT * np.maximum(clip_t(lab, images, texts), 0).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (N, d)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


class ClipFeatures(torch.nn.Module):
    """The lab's CLIP image tower as torchmetrics' feature extractor: uint8 images (N, 3, H, W) -> unit
    C-space features (N, P), through the lab's own preprocessing."""

    def __init__(self, lab: Lab):
        super().__init__()
        self._lab = lab  # a plain attribute: the metric must not adopt (or move) the lab's modules
        self.num_features = int(lab.W_t.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        images = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in x]
        return _image_features(self._lab, images).double().cpu()


def _uint8(images) -> torch.Tensor:  # (N, 3, H, W) uint8

    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in as_rgb_images(list(images))])


def clip_fid(lab: Lab, images, references) -> float:
    """FID between two image sets, on the lab's CLIP image features (torchmetrics; needs >= 2 of each)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    images, references = list(images), list(references)
    if min(len(images), len(references)) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(images)} and {len(references)}")
    metric = FrechetInceptionDistance(feature=ClipFeatures(lab))
    metric.update(_uint8(references), real=True)
    metric.update(_uint8(images), real=False)
    return float(metric.compute())
