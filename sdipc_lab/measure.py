"""Measurements on a lab's CLIP spaces: the norm constants, the cutoff sweep, the caption variance the round trip
drops, zero-shot accuracy.

Functions take a lab plus images and captions, so they serve the teaching lab and SD v1.4 alike.
"""

from __future__ import annotations

import numbers
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
def norm_distributions(lab: Lab, captions: Sequence[str]) -> dict:
    """Per caption: the C-space norm ||f_txt^c|| (Eq. 6's constant) and the T-space end-token norm, (N,) each."""
    f_eos = eos_states(lab, captions)  # (N, D)
    return {"C-space ||f_txt^c||": to_c_space(lab, f_eos).norm(dim=-1).cpu().numpy(),
            "T-space ||f_txt^eos||": f_eos.norm(dim=-1).cpu().numpy()}


def norms(lab: Lab, captions: Sequence[str]) -> dict:
    """Their means and (sample) standard deviations: the lab's `norm` and `norm_t`, measured."""
    c, t = norm_distributions(lab, captions).values()
    return dict(norm=float(c.mean()), norm_std=float(c.std(ddof=1)), norm_t=float(t.mean()),
                norm_t_std=float(t.std(ddof=1)))


@torch.no_grad()
def cutoff_sweep(lab: Lab, images, captions: Sequence[str], cutoffs: Sequence[float]) -> list[dict]:
    """For each cutoff that keeps at least one singular value: the rank kept, the reconstruction error
    ||W_t W_t^+ f - f|| of unit image embeddings (how much of f_img^c the kept subspace holds), the mean
    cosine of f_cnvrt to the true caption's end-token state, and (with 2 captions or more) the share of the
    captions' end-token variance the round trip drops (`dropped_variance`; the captions are encoded once)."""
    f_img_c = image_embeds(lab, images).double().cpu()
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
        row = dict(cutoff=float(cutoff), rank=inverse.rank, reconstruction_error=error, cosine=cos)
        if len(f_eos) > 1:
            row["dropped_variance"] = dropped_share(f_eos, W, inverse)
        rows.append(row)
    return rows


def dropped_share(f_eos: torch.Tensor, W: torch.Tensor, inverse: InverseProjection) -> float:
    """The share (0..1) of the variance of end-token states f_eos (N, D) between its rows that the round trip
    W_t^+ W_t discards, for W_t = W (P, D) and its pseudo-inverse `inverse`: `dropped_variance` for states
    already encoded."""
    centred = f_eos - f_eos.mean(0)  # (N, D)
    kept = centred @ (inverse.matrix @ W).T  # (N, D): W_t^+ W_t, a projector
    return max(0.0, float(1 - kept.pow(2).sum() / centred.pow(2).sum()))  # max: no -0.000 at rank D


@torch.no_grad()
def dropped_variance(lab: Lab, captions: Sequence[str], cutoffs: Sequence[float]) -> list[float]:
    """For each cutoff: the share (0..1) of the captions' end-token states' variance *between captions* that the
    round trip W_t^+ W_t discards — the part of f_txt^{t,eos} in the right singular directions of W_t whose singular
    values are <= cutoff. What the U-Net reads there, SD-IPC cannot give it back, so a text tower that keeps
    caption information in W_t's weak directions lowers the oracle row however well the U-Net draws from the
    caption (docs/guide/teaching_lab.md, "Why a route in phases")."""
    f_eos = eos_states(lab, captions).double().cpu()  # (N, D), encoded once for every cutoff
    if len(f_eos) < 2:
        raise ValueError(f"dropped_variance needs at least 2 captions to measure a variance, got {len(f_eos)}")
    W = lab.W_t.detach().double().cpu()  # (P, D)
    return [dropped_share(f_eos, W, InverseProjection(W, float(cutoff))) for cutoff in cutoffs]


def singular_value_quantiles(lab: Lab, qs=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75)) -> list[float]:
    s = torch.linalg.svdvals(lab.W_t.detach().double().cpu())
    return [0.0] + [float(np.quantile(s.numpy(), q)) * 0.999 for q in qs[1:]]


@torch.no_grad()
def nearest_texts(lab: Lab, f_cnvrt: torch.Tensor, texts: Sequence[str], k: int = 5) -> list[dict]:
    """What a converted prompt "says": the `k` texts whose end-token states (T-space) are closest in cosine to
    f_cnvrt (D,), best first, as rows {"text", "cosine"}. One text (a str) is read as a list of one."""
    if not isinstance(f_cnvrt, torch.Tensor):
        raise ValueError(f"f_cnvrt must be a tensor (D,), e.g. S.convert(lab, f_img_c)[0], got "
                         f"{type(f_cnvrt).__name__}: the texts come second, nearest_texts(lab, f_cnvrt, texts)")
    if f_cnvrt.dim() != 1:
        raise ValueError(f"f_cnvrt must be one vector (D,), got shape {tuple(f_cnvrt.shape)}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be one or more strings to compare with (e.g. candidate_texts(lab)), got {texts!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a whole number >= 1 (how many texts to return), got {k!r}")
    f_eos = eos_states(lab, list(texts))  # (N, D)
    cos = F.cosine_similarity(f_eos, f_cnvrt.float().to(f_eos.device)[None], dim=-1)  # (N,)
    best = cos.topk(min(k, len(texts)))
    return [{"text": texts[i], "cosine": round(float(c), 3)} for c, i in zip(best.values, best.indices.tolist())]
