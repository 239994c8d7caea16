"""Image metrics with the lab's CLIP: CLIP-I, CLIP-T, CLIP-score, and a Fréchet distance on CLIP features.

CLIP-I (image-image) and CLIP-T (image-text) follow DreamBooth and the paper's Tables 3-6: cosine
similarities x 100. CLIP-score is 100 * max(cos, 0) (Hessel et al. without the 2.5 weight, as the
paper's Table 2 numbers suggest). The Fréchet distance is computed on the lab's CLIP image features
("CLIP-FID", Kynkäänniemi et al. 2023) because Inception weights cannot be fetched offline; it is
comparable between rows measured with the same lab, not with published FIDs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from .convert import image_embeds, text_embeds
from .lab import Lab


def _image_features(lab: Lab, images, batch: int = 128) -> torch.Tensor:  # (N, P), unit norm
    images = list(images)
    return F.normalize(torch.cat([image_embeds(lab, images[i:i + batch]) for i in range(0, len(images), batch)]).float(), dim=-1)


def clip_i(lab: Lab, images, references) -> np.ndarray:
    """100 x cos(f_img(image), f_img(reference)) per pair (N,)."""
    return 100 * (_image_features(lab, images) * _image_features(lab, references)).sum(-1).numpy()


def clip_t(lab: Lab, images, texts) -> np.ndarray:
    """100 x cos(f_img(image), f_txt(text)) per pair (N,)."""
    texts = [texts] * len(list(images)) if isinstance(texts, str) else list(texts)
    f_txt = F.normalize(text_embeds(lab, texts).float(), dim=-1)
    return 100 * (_image_features(lab, images) * f_txt).sum(-1).numpy()


def clip_score(lab: Lab, images, texts) -> float:
    return float(np.maximum(clip_t(lab, images, texts), 0).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (N, d)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def clip_fid(lab: Lab, images, references) -> float:
    """Fréchet distance between the unit CLIP image features of two image sets."""
    return frechet_distance(_image_features(lab, images).numpy().astype(np.float64),
                            _image_features(lab, references).numpy().astype(np.float64))
