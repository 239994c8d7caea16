"""Measurements on a lab's CLIP spaces: the norm constants, the cutoff sweep, zero-shot accuracy.

Functions take a lab plus images and captions, so they serve the teaching lab and SD v1.4 alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .convert import InverseProjection, at_end, convert, encode_text, image_embeds, to_c_space
from .lab import Lab


@torch.no_grad()
def eos_states(lab: Lab, captions: Sequence[str], batch: int = 256) -> torch.Tensor:
    """f_txt^{t,eos} (N, D), the end-token states of `captions`."""
    out = []
    for i in range(0, len(captions), batch):
        f_txt, eos = encode_text(lab, list(captions[i:i + batch]))
        out.append(at_end(f_txt, eos).float())
    return torch.cat(out)


@torch.no_grad()
def norms(lab: Lab, captions: Sequence[str]) -> dict:
    """The C-space text norm ||f_txt^c|| (paper Eq. 6) and the T-space end-token norm, over captions."""
    f_eos = eos_states(lab, captions)
    f_txt_c = to_c_space(lab, f_eos)  # (N, P)
    c, t = f_txt_c.norm(dim=1), f_eos.norm(dim=1)
    return dict(norm=c.mean().item(), norm_std=c.std().item(), norm_t=t.mean().item(), norm_t_std=t.std().item())


@torch.no_grad()
def cutoff_sweep(lab: Lab, images, captions: Sequence[str], cutoffs: Sequence[float]) -> list[dict]:
    """For each cutoff that keeps at least one singular value: the rank kept, the reconstruction error
    ||W_t W_t^+ f - f|| of unit image embeddings (how much of f_img^c the kept subspace holds), and the mean
    cosine of f_cnvrt to the true caption's end-token state."""
    f_img_c = torch.cat([image_embeds(lab, images[i:i + 256]) for i in range(0, len(images), 256)]).double().cpu()
    f_eos = eos_states(lab, captions).double().cpu()
    W = lab.W_t.detach().double().cpu()  # (P, D)
    unit = F.normalize(f_img_c, dim=-1)  # (N, P)
    rows = []
    for cutoff in cutoffs:
        try:
            inverse = InverseProjection(W, cutoff)
        except ValueError:
            continue
        error = (unit @ (W @ inverse.matrix).T - unit).norm(dim=-1).mean().item()
        cos = F.cosine_similarity(convert(lab, f_img_c, cutoff=cutoff).double().cpu(), f_eos).mean().item()
        rows.append(dict(cutoff=float(cutoff), rank=inverse.rank, reconstruction_error=error, cosine=cos))
    return rows


def singular_value_quantiles(lab: Lab, qs=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75)) -> list[float]:
    s = torch.linalg.svdvals(lab.W_t.detach().double().cpu())
    return [0.0] + [float(np.quantile(s.numpy(), q)) * 0.999 for q in qs[1:]]


@torch.no_grad()
def nearest_texts(lab: Lab, f_cnvrt: torch.Tensor, texts: Sequence[str], k: int = 5) -> list[dict]:
    """What a converted prompt "says": the `k` texts whose end-token states (T-space) are closest in cosine to
    f_cnvrt (D,), best first, as rows {"text", "cosine"}."""
    if f_cnvrt.dim() != 1:
        raise ValueError(f"f_cnvrt must be one vector (D,), got shape {tuple(f_cnvrt.shape)}")
    f_eos = eos_states(lab, list(texts))  # (N, D)
    cos = F.cosine_similarity(f_eos, f_cnvrt.float().to(f_eos.device)[None], dim=-1)  # (N,)
    best = cos.topk(min(k, len(texts)))
    return [{"text": texts[i], "cosine": round(float(c), 3)} for c, i in zip(best.values, best.indices.tolist())]
