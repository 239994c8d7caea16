"""The measurements behind the notebooks: one function per table, on toy-world samples.

Each returns plain rows (lists of dicts) that `plots.table` renders and the notebooks assert on.
`judge` is the toy world's independent judge (`toyworld.judge.Judge()`), or None to skip its columns.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attention import masked_generate
from .convert import InverseProjection, convert, encode_text, image_embeds
from .generate import edit, generate, sample, vary
from .lab import Lab
from .metrics import clip_fid, clip_i, clip_score, clip_t

MASKING_CONDITIONS = {
    "full prompt": None,
    "words masked after softmax (paper)": ("sos+eos", "post"),
    "words masked before softmax": ("sos+eos", "pre"),
    "end + padding masked (control)": ("sos+words", "post"),
}


def pixel_change(images, references) -> float:
    """Mean absolute pixel difference in [0, 1] between paired images."""
    return float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
                          for a, b in zip(images, references)]))


def masking_experiment(lab: Lab, data, *, seeds=(0,), judge=None, steps=None) -> tuple[list[dict], dict]:
    """Sec. 3.1 / Fig. 2: generate each caption with word tokens masked (after or before the softmax),
    or with the end and padding tokens masked (control). Returns table rows and the images by condition."""
    from .toyworld.judge import agreement

    captions = [s.caption for s in data]
    images = {name: [] for name in MASKING_CONDITIONS}
    for seed in tqdm(seeds, desc="seeds", leave=False):
        for name, how in MASKING_CONDITIONS.items():
            if how is None:
                images[name] += generate(lab, captions, n=1, seed=seed, steps=steps)
            else:
                images[name] += masked_generate(lab, captions, keep=how[0], mode=how[1], n=1, seed=seed, steps=steps)
    full = images["full prompt"]
    truths = [s.attributes for s in data] * len(seeds)
    rows = []
    for name, imgs in images.items():
        row = {"condition": name, "pixel change vs full": pixel_change(imgs, full),
               "CLIP-I vs full": float(clip_i(lab, imgs, full).mean())}
        if judge is not None:
            row.update({f"judge {k}": v for k, v in agreement(judge(imgs), truths).items()})
        rows.append(row)
    return rows, images


def spectrum(lab: Lab) -> np.ndarray:
    """Singular values of W_t, descending."""
    return torch.linalg.svdvals(lab.W_t.detach().double().cpu()).numpy()


def cutoff_experiment(lab: Lab, data, cutoffs) -> list[dict]:
    """Footnote 6: for each cutoff, the rank kept, how much of f_img^c the kept subspace reconstructs,
    the cosine of f_cnvrt to the true end-token state, and T-space zero-shot accuracy."""
    from .toyworld.evaluate import zero_shot

    f_img_c = torch.cat([image_embeds(lab, [s.image for s in data[i:i + 128]]) for i in range(0, len(data), 128)])
    f_img_c = f_img_c.double().cpu()
    f_txt, eos = encode_text(lab, [s.caption for s in data])
    f_eos = f_txt[torch.arange(len(eos)), eos].double().cpu()
    W = lab.W_t.detach().double().cpu()
    rows = []
    for cutoff in cutoffs:
        try:
            inverse = InverseProjection(W, cutoff)
        except ValueError:
            continue
        recon = F.normalize(f_img_c, dim=-1) @ (W @ inverse.matrix).T  # W_t W_t^+ f: the part W_t^+ keeps
        error = (recon - F.normalize(f_img_c, dim=-1)).norm(dim=-1).mean().item()
        cos = F.cosine_similarity(convert(lab, f_img_c, cutoff=cutoff).double().cpu(), f_eos).mean().item()
        shot = zero_shot(lab, data, "t", cutoff=cutoff)
        rows.append({"cutoff": float(cutoff), "rank": inverse.rank, "reconstruction error": error,
                     "cos(f_cnvrt, true EOS)": cos, **{f"T-space {k}": v for k, v in shot.items()}})
    return rows


def norm_distributions(lab: Lab, captions) -> dict:
    """Per caption: the C-space norm ||f_txt^c|| (Eq. 6's constant) and the T-space end-token norm."""
    f_txt, eos = encode_text(lab, list(captions))
    f_eos = f_txt[torch.arange(len(eos)), eos].float()
    return {"C-space ||f_txt^c||": (f_eos @ lab.W_t.float().T).norm(dim=-1).cpu().numpy(),
            "T-space ||f_txt^eos||": f_eos.norm(dim=-1).cpu().numpy()}


def norm_experiment(lab: Lab, data, scales=(0.25, 0.5, 1.0, 2.0, 4.0), *, judge=None, seed=0, steps=None) -> list[dict]:
    """Eq. 6: variations with the paper's convention ("c") and the public code's ("t"), and with the norm
    scaled by each factor: the converted vector's T-space norm and what the judge finds."""
    from .toyworld.judge import agreement

    images = [s.image for s in data]
    truths = [s.attributes for s in data]
    f_img_c = image_embeds(lab, images)
    rows = []
    for space in ("c", "t"):
        base = lab.norm if space == "c" else lab.norm_t
        for scale in scales:
            f = convert(lab, f_img_c, norm=base * scale, norm_space=space)
            row = {"convention": "paper (C-space)" if space == "c" else "public code (T-space)", "scale": scale,
                   "norm": base * scale, "norm of f_cnvrt": f.float().norm(dim=-1).mean().item()}
            if judge is not None:
                out = vary(lab, images, n=1, seed=seed, steps=steps, norm=base * scale, norm_space=space)
                row.update({f"judge {k}": v for k, v in agreement(judge(out), truths).items()})
            rows.append(row)
    return rows


def variation_table(lab: Lab, data, *, judge=None, seed=0, steps=None) -> tuple[list[dict], dict]:
    """Table 2 analogue: each condition's judge agreement, CLIP-score against the true caption, and
    Fréchet distance (CLIP features) to the drawn references. Returns rows and images by condition."""
    from .toyworld.evaluate import prompt_conditions
    from .toyworld.judge import agreement

    refs = [s.image for s in data]
    captions = [s.caption for s in data]
    rows, images = [], {}
    for name, embeds in prompt_conditions(lab, data, seed=seed).items():
        images[name] = sample(lab, embeds, n=1, seed=seed, steps=steps)
        row = {"condition": name, "CLIP-score": clip_score(lab, images[name], captions),
               "CLIP-I to reference": float(clip_i(lab, images[name], refs).mean())}
        if len(data) > 8:
            row["FID (CLIP features)"] = clip_fid(lab, images[name], refs)
        if judge is not None:
            row.update({f"judge {k}": v for k, v in agreement(judge(images[name]), [s.attributes for s in data]).items()})
        rows.append(row)
    return rows, images


def alpha_experiment(lab: Lab, data, edit_text: str, alphas, *, target: dict | None = None, judge=None, seed=0,
                     steps=None) -> tuple[list[dict], dict]:
    """Eq. 8 / App. C.1: for each alpha, CLIP-I to the reference, CLIP-T to the edit text, and (with a
    judge and a `target` like {"colour": "blue"}) how often the edit shows, and the rest of the reference."""
    refs = [s.image for s in data]
    rows, images = [], {}
    for alpha in alphas:
        out = edit(lab, refs, edit_text, alpha=alpha, n=1, seed=seed, steps=steps)  # one per reference
        images[alpha] = out
        row = {"alpha": alpha, "CLIP-I (reference)": float(clip_i(lab, out, refs).mean()),
               "CLIP-T (edit text)": float(clip_t(lab, out, edit_text).mean())}
        if judge is not None and target:
            verdicts = judge(out)
            (attribute, value), = target.items()
            row[f"edit shows {attribute}={value}"] = float(np.mean([v[attribute] == value for v in verdicts]))
            kept = [a for a in ("shape", "colour", "position") if a != attribute]
            row[f"keeps reference {'/'.join(kept)}"] = float(np.mean(
                [all(v[a] == s.attributes[a] for a in kept) for v, s in zip(verdicts, data)]))
        rows.append(row)
    return rows, images
