"""The measurements behind the notebooks: one function per table, on the references `datasets.references`
gives a lab (toy-world samples, or photographs on SD).

Each returns plain rows (lists of dicts) that `plots.table` renders and the notebooks assert on.
`judge` is the toy world's independent judge (`datasets.judge_for(lab)`), or None to skip its columns.
"""

from __future__ import annotations

import numpy as np
import torch

from .attention import AttentionStore, installed, token_mask
from .bars import bar
from .convert import convert, image_embeds
from .datasets import zero_shot
from .finetune import Concepts, custom_diffusion, finetune
from .generate import edit, generate, progress, sample, vary
from .lab import Lab
from .latent_clip import reno
from .measure import cutoff_sweep, norm_distributions  # noqa: F401 (norm_distributions: notebook 03 calls it here)
from .metrics import CLIPSCORE_WEIGHT, clip_fid, clip_i, clip_score, clip_t
from .toyworld import concept_samples, freehand, samples
from .toyworld.evaluate import prompt_conditions, read_drawings, stray_summary
from .toyworld.judge import agreement

MASKING_CONDITIONS = {
    "full prompt": None,
    "words masked after softmax (paper)": ("sos+eos", "post"),
    "words masked before softmax": ("sos+eos", "pre"),
    "end + padding masked (control)": ("sos+words", "post"),
}


def masked_generate(lab: Lab, prompts: list[str], *, keep: str = "sos+eos", mode: str = "post", n: int = 1,
                    seed: int = 0, steps: int | None = None) -> list:
    """Text-to-image with tokens masked in every cross-attention layer (n images per prompt)."""
    mask = token_mask(lab, prompts, keep).repeat_interleave(n, dim=0)  # (B * n, 77)
    with installed(lab):
        return generate(lab, prompts, n=n, seed=seed, steps=steps,
                        cross_attention_kwargs={"token_mask": mask.to(lab.device), "mask_mode": mode})


def attention_maps(lab: Lab, prompts: list[str], *, seed: int = 0, steps: int | None = None,
                   resolution: int = 16) -> tuple[torch.Tensor, list]:
    """Cross-attention per token, averaged over layers and steps: maps (B, 77, res, res) and the images."""
    store = AttentionStore(resolution)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    with installed(lab):
        images = generate(lab, prompts, n=1, seed=seed, steps=steps, cross_attention_kwargs={"store": store})
    maps = store.maps()
    return (maps[len(prompts):] if len(maps) == 2 * len(prompts) else maps), images  # conditional half


def pixel_change(images, references) -> float:
    """Mean absolute pixel difference in [0, 1] between paired images."""
    return float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
                          for a, b in zip(images, references)]))


def masking_experiment(lab: Lab, data, *, seeds=(0,), judge=None, steps=None) -> tuple[list[dict], dict]:
    """Sec. 3.1 / Fig. 2: generate each caption with word tokens masked (after or before the softmax),
    or with the end and padding tokens masked (control). Returns table rows and the images by condition.
    With a judge, "second object drawn" is the share of images with a second object (`stray_summary`): what a
    two-object caption should give every time and a one-object caption never; the judge's attribute columns
    (which read the largest object) only for one-object captions."""
    captions = [s.caption for s in data]
    images = {name: [] for name in MASKING_CONDITIONS}
    with progress(len(seeds) * len(MASKING_CONDITIONS), "masking"):
        for seed in seeds:
            for name, how in MASKING_CONDITIONS.items():
                if how is None:
                    images[name] += generate(lab, captions, n=1, seed=seed, steps=steps)
                else:
                    images[name] += masked_generate(lab, captions, keep=how[0], mode=how[1], n=1, seed=seed,
                                                    steps=steps)
    full = images["full prompt"]
    truths = [s.attributes for s in data] * len(seeds)
    rows = []
    for name, imgs in images.items():
        row = {"condition": name, "pixel change vs full": pixel_change(imgs, full),
               "CLIP-I vs full": float(clip_i(lab, imgs, full).mean())}
        if judge is not None:
            if all(len(s.things) == 1 for s in data):
                row.update({f"judge {k}": v for k, v in agreement(judge(imgs), truths).items()})
            row["second object drawn"] = stray_summary(imgs)["second object"]
        rows.append(row)
    return rows, images


def spectrum(lab: Lab) -> np.ndarray:
    """Singular values of W_t, descending."""
    return torch.linalg.svdvals(lab.W_t.detach().double().cpu()).numpy()


def cutoff_experiment(lab: Lab, data, cutoffs) -> list[dict]:
    """Footnote 6: for each cutoff, the rank kept, how much of f_img^c the kept subspace reconstructs,
    the cosine of f_cnvrt to the true end-token state, the share of the captions' end-token variance the
    round trip drops (what the U-Net may read there, SD-IPC cannot give back), and T-space zero-shot accuracy."""
    captions = [s.caption for s in data]
    sweep = cutoff_sweep(lab, [s.image for s in data], captions, cutoffs)
    rows = []
    for row in sweep:  # the cutoffs that keep at least one singular value
        shot = zero_shot(lab, data, "t", cutoff=row["cutoff"])
        rows.append({"cutoff": row["cutoff"], "rank": row["rank"], "reconstruction error": row["reconstruction_error"],
                     "cos(f_cnvrt, true EOS)": row["cosine"],
                     "caption variance dropped": row.get("dropped_variance", float("nan")),  # nan: one caption
                     **{f"T-space {k}": v for k, v in shot.items()}})
    return rows


def norm_experiment(lab: Lab, data, scales=(0.25, 0.5, 1.0, 2.0, 4.0), *, judge=None, seed=0, steps=None) -> list[dict]:
    """Eq. 6: variations with the paper's convention ("c") and the public code's ("t", `convert.PUBLIC_CODE`), and
    with the norm scaled by each factor: the converted vector's T-space norm and what the judge finds."""
    images = [s.image for s in data]
    truths = [s.attributes for s in data]
    f_img_c = image_embeds(lab, images)
    rows = []
    with progress(2 * len(scales) if judge is not None else 0, "norms"):
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
    refs = [s.image for s in data]
    captions = [s.caption for s in data]
    rows, images = [], {}
    conditions = prompt_conditions(lab, data, seed=seed)
    with progress(len(conditions), "conditions"):
        for name, embeds in conditions.items():
            images[name] = sample(lab, embeds, n=1, seed=seed, steps=steps)
    for name in conditions:
        row = {"condition": name, "CLIP-score": clip_score(lab, images[name], captions),
               "CLIP-I to reference": float(clip_i(lab, images[name], refs).mean())}
        if len(data) > 8:
            row["FID (CLIP features)"] = clip_fid(lab, images[name], refs)
        if judge is not None:
            row.update({f"judge {k}": v for k, v in agreement(judge(images[name]), [s.attributes for s in data]).items()})
        rows.append(row)
    return rows, images


def metric_readings(lab: Lab, data, images: dict, *, judge=None, seed: int = 0) -> list[dict]:
    """What the variation table's FID and CLIP-score can and cannot see, measured on its own images (`images`
    from `variation_table`). FID compares two *sets*: SD-IPC's images against the references in their order and
    in a shuffled order (the same number: it never pairs an image with its reference, so the shuffled baseline,
    the same prompts drawn with other noise, scores like SD-IPC by construction). CLIP-score against the true
    caption, per image: the caption's images and SD-IPC's, these split by the judge's shape verdict (with a
    judge), which shows where SD-IPC's deficit comes from. One row per reading: "reading", "value", "N"."""
    refs = [s.image for s in data]
    captions = [s.caption for s in data]
    order = np.random.default_rng(seed).permutation(len(refs))
    ipc = images["SD-IPC (vary)"]
    rows = [{"reading": "FID of SD-IPC, references in order", "value": clip_fid(lab, ipc, refs), "N": len(refs)},
            {"reading": "FID of SD-IPC, references shuffled", "value": clip_fid(lab, ipc, [refs[i] for i in order]),
             "N": len(refs)},
            {"reading": "FID of the shuffled baseline", "value": clip_fid(lab, images["shuffled reference (baseline)"], refs),
             "N": len(refs)}]
    score = lambda ims: CLIPSCORE_WEIGHT * np.maximum(clip_t(lab, ims, captions), 0)  # noqa: E731  (N,) per image
    rows.append({"reading": "CLIP-score, the true caption's images", "value": float(score(images["true caption"]).mean()),
                 "N": len(refs)})
    ipc_scores = score(ipc)
    rows.append({"reading": "CLIP-score, SD-IPC's images", "value": float(ipc_scores.mean()), "N": len(refs)})
    if judge is not None:
        right = np.array([v["shape"] == s.attributes["shape"] for v, s in zip(judge(ipc), data)])
        for name, keep in (("right", right), ("wrong", ~right)):
            if keep.any():
                rows.append({"reading": f"CLIP-score, SD-IPC's images with the {name} shape",
                             "value": float(ipc_scores[keep].mean()), "N": int(keep.sum())})
    return rows


def shape_by_size(lab: Lab, *, judge, n: int = 96, n_world: int = 48, part: str = "dev", seed: int = 0) -> list[dict]:
    """SD-IPC's and CLIP's shape accuracy against the object's width, on the world's own test renderings and on
    `n` drawings made by other code (`toyworld.freehand`, its `part`): does the lab read shapes, or the world's
    two sizes? One row per (images, width bucket): "width %" (the bucket's middle), "SD-IPC shape", "CLIP shape"
    (zero-shot), "N". Needs the toy judge: [] without one (on SD it is not measured)."""
    if judge is None:
        return []
    world = samples(n_world, "test", two_objects=0)
    widths = {"world's renderings": [_width(s.image) for s in world]}
    drawn = freehand.drawings(n, part)
    widths["other drawings"] = [d.width for d in drawn]
    rows = []
    for name, data in (("world's renderings", world), ("other drawings", drawn)):
        read = read_drawings(lab, data, judge, seed=seed)
        for low, high in freehand.BUCKETS:
            inside = [r for r, w in zip(read, widths[name]) if freehand.bucket(w) == freehand.bucket(low)]
            if inside:
                rows.append({"images": name, "width %": round(50 * (low + high)), "N": len(inside),
                             "SD-IPC shape": float(np.mean([r["sd-ipc shape"] for r in inside])),
                             "CLIP shape": float(np.mean([r["clip shape"] for r in inside]))})
    return rows


def _width(image) -> float:
    """A drawn object's width, a share of the image: the extent of the pixels far from the border's colour."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    ys, xs = np.nonzero(np.linalg.norm(x - np.median(border, axis=0), axis=-1) > 50)
    return (max(np.ptp(ys), np.ptp(xs)) + 1) / x.shape[0] if len(ys) else 0.0


def alpha_experiment(lab: Lab, data, edit_text: str, alphas, *, target: dict | None = None, judge=None, seed=0,
                     steps=None, padding: str = "end") -> tuple[list[dict], dict]:
    """Eq. 8 / App. C.1: for each alpha, CLIP-I to the reference, CLIP-T to the edit text, and (with a
    judge and a `target` like {"colour": "blue"}) how often the edit shows, and the rest of the reference.
    `padding`: Eq. 8's rule ("end") or the public code's ("own"), as in `edit`; each row names it."""
    refs = [s.image for s in data]
    rows, images = [], {}
    with progress(len(alphas), f"alpha ({padding} padding)"):
        for alpha in alphas:
            images[alpha] = edit(lab, refs, edit_text, alpha=alpha, padding=padding, n=1, seed=seed,
                                 steps=steps)  # one per reference
    for alpha, out in images.items():
        row = {"padding": padding, "alpha": alpha, "CLIP-I (reference)": float(clip_i(lab, out, refs).mean()),
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


def concept_fidelity(lab: Lab, images, concept, references, *, judge=None) -> dict:
    """How well generated `images` show `concept` ((shape, colour)): the judge's shape and colour
    agreement, and CLIP-I to the concept's reference images (mean over all pairs)."""
    row = {"CLIP-I": float(np.mean([clip_i(lab, images, [r] * len(images)).mean() for r in references]))}
    if judge is not None:
        verdicts = judge(images)
        row["judge shape"] = float(np.mean([v["shape"] == concept[0] for v in verdicts]))
        row["judge colour"] = float(np.mean([v["colour"] == concept[1] for v in verdicts]))
        row["judge both"] = float(np.mean([v["shape"] == concept[0] and v["colour"] == concept[1] for v in verdicts]))
    return row


def finetune_comparison(lab: Lab, test_concepts, finetuned, *, n_refs: int | None = None, judge=None, seed=0,
                        steps=None) -> list[dict]:
    """Table 5 analogue: SD-IPC vs SD-IPC-FT variations of `n_refs` references from each held-out concept, one
    variation each. `finetuned` is one FineTuned (row "SD-IPC-FT") or {row name: FineTuned} for several rows,
    e.g. the same FT before training (its prompts at their initialisation) beside it after. `n_refs` defaults to
    12 with a judge (its agreement is a fraction of the images: 4 concepts give 48, one image = 0.02) and to 2
    without one (CLIP-I averages every image against every reference; SD v1.4 images cost far more)."""
    if n_refs is None:
        n_refs = 12 if judge is not None else 2
    if isinstance(n_refs, bool) or not (isinstance(n_refs, int) and n_refs > 0):
        raise ValueError(f"n_refs is the number of references per concept, a positive integer; got {n_refs!r}")
    runs = {"SD-IPC": None, **(finetuned if isinstance(finetuned, dict) else {"SD-IPC-FT": finetuned})}
    rows = []
    for name, ft in runs.items():
        scores = []
        for shape, colour in test_concepts:
            refs = concept_samples(shape, colour, n_refs, start=100)
            out = vary(lab, [r.image for r in refs], n=1, seed=seed, steps=steps, finetuned=ft)
            row = concept_fidelity(lab, out, (shape, colour), [r.image for r in refs], judge=judge)
            row["CLIP-T"] = float(clip_t(lab, out, [r.caption for r in refs]).mean())
            scores.append(row)
        rows.append({"method": name, **{k: float(np.mean([s[k] for s in scores])) for k in scores[0]}})
    return rows


def domain_finetune(lab: Lab, *, kind: str = "outline", n_train: int = 100, n_test: int = 48, steps: int = 120,
                    n_tokens: int = 1, out, judge=None, seed: int = 0) -> tuple[list[dict], object]:
    """SD-IPC-FT where the paper uses it: a domain the lab reads poorly, ~100 images of it. The domain is one
    `kind` of `toyworld.freehand` drawing (at 64 px, its "dev" part); FT pairs each drawing with world renderings
    of its (shape, colour) as x_target (`finetune(targets=...)`, their captions for the regulariser). Rows:
    SD-IPC and SD-IPC-FT on `n_test` unseen drawings of the domain and on the world's test split ("shape",
    "colour": the judge's agreement on one variation each), and a linear probe on the image tower's embeddings
    (trained on the training drawings, tested on the unseen ones: its accuracy in the same columns): whether
    the tower carries the domain's shape at all, which FT's prompts can re-weight but not create. Returns
    (rows, the FineTuned)."""
    from sklearn.linear_model import LogisticRegression

    train = freehand.drawings(n_train, "dev", kind=kind, format="64 px")
    test = freehand.drawings(n_test, "dev", start=10_000, kind=kind, format="64 px")
    domain, goals, captions = {}, {}, {}
    for d in train:
        domain.setdefault(f"{d.colour} {d.shape}", []).append(d.image)
    for name in domain:
        colour, shape = name.split()
        drawn = concept_samples(shape, colour, 4)
        goals[name], captions[name] = [x.image for x in drawn], [x.caption for x in drawn]
    ft = finetune(lab, Concepts(domain), mode="ft", steps=steps, out=out, targets=Concepts(goals), captions=captions,
                  n_tokens=n_tokens, seed=seed)
    world = samples(n_test, "test", two_objects=0)
    sets = {f"{kind} drawings (unseen)": ([d.image for d in test], [{"shape": d.shape, "colour": d.colour} for d in test]),
            "world test": ([s.image for s in world], [s.attributes for s in world])}
    rows = []
    with progress(2 * len(sets), "SD-IPC and SD-IPC-FT"):
        for method, applied_ft in (("SD-IPC", None), ("SD-IPC-FT", ft)):
            for name, (images, truths) in sets.items():
                row = {"method": method, "images": name}
                if judge is not None:
                    found = agreement(judge(vary(lab, images, n=1, seed=seed, finetuned=applied_ft)), truths,
                                      ("shape", "colour"))
                    row.update(found)
                rows.append(row)
    x_train, x_test = (image_embeds(lab, [d.image for d in ds]).float().cpu().numpy() for ds in (train, test))  # (N, P)
    probe = {"method": "linear probe on the image embedding", "images": f"{kind} drawings (unseen)"}
    for attribute in ("shape", "colour"):
        fitted = LogisticRegression(max_iter=2000).fit(x_train, [getattr(d, attribute) for d in train])
        probe[attribute] = float(fitted.score(x_test, [getattr(d, attribute) for d in test]))
    return rows + [probe], ft


def fidelity_curve(lab: Lab, concept, train_images, iterations, *, out, judge=None, class_word: str | None = None,
                   train_captions=None, n_eval: int = 8, seed=0, steps=None, batch: int = 4, lr=None,
                   methods=("SD-IPC-CT", "Custom Diffusion")) -> list[dict]:
    """Sec. 3.3 analogue (CT in 30 iterations vs Custom Diffusion in 250): fidelity to a concept learnt from
    `train_images` after each number of iterations, for SD-IPC-CT (variations of the training images) and Custom Diffusion (text with the new token).
    Each method is one run, resumed from its checkpoint in `out` up to each count in turn.

    Custom Diffusion trains on `train_captions` (one per image, with "<new1>" for the concept word) and
    is asked for them back, image by image, as SD-IPC-CT varies the images themselves; without them, on
    its own templates ("a <new1> {class_word}"). At 0 iterations it gets the captions without the token.
    `lr` ({"ct": .., "custom-diffusion": ..}) overrides the lab's `finetune_lr`.
    """
    from pathlib import Path


    out, lr = Path(out), lr or {}
    class_word = class_word or concept[0]
    refs = [train_images[i % len(train_images)] for i in range(n_eval)]
    if train_captions is None:
        prompts = [f"a <new1> {class_word}"] * n_eval
    else:
        prompts = [train_captions[i % len(train_images)] for i in range(n_eval)]

    def sd_ipc_ct(it):
        ct = None if it == 0 else finetune(lab, Concepts({"concept": list(train_images)}), mode="ct", steps=it,
                                           batch=batch, out=out / "ct", seed=seed, lr=lr.get("ct"))
        return vary(lab, refs, n=1, seed=seed, steps=steps, finetuned=ct)

    def custom(it):
        if it == 0:
            return generate(lab, [p.replace("<new1> ", "") for p in prompts], n=1, seed=seed, steps=steps)
        cd = custom_diffusion(lab, train_images, class_word=class_word, steps=it, batch=batch, out=out / "cd",
                              seed=seed, captions=train_captions, lr=lr.get("custom-diffusion"))
        return generate(lab, prompts, n=1, seed=seed, steps=steps, finetuned=cd)

    run = {"SD-IPC-CT": sd_ipc_ct, "Custom Diffusion": custom}
    rows = []
    for it in iterations:
        for method in methods:
            rows.append({"method": method, "iterations": it,
                         **concept_fidelity(lab, run[method](it), concept, train_images, judge=judge)})
    return rows


RENO_CONDITIONS = {
    "pixel reward (decode + CLIP)": dict(reward="pixel", prior_weight=0.01),
    "latent reward (latent tower)": dict(reward="latent", prior_weight=0.01),
    "latent reward, no norm prior": dict(reward="latent", prior_weight=0.0),
}


def _reno_row(results, data, verdicts, attributes=("shape", "colour", "position")) -> dict:
    """One table row from `RenoResult`s and the judge's verdicts on their (first, best) images."""
    truths = [s.attributes for s in data]
    before, after = (agreement(v, truths) for v in verdicts)
    row = {"reward before": float(np.mean([r.history[0]["reward"] for r in results])),
           "best reward": float(np.mean([max(h["reward"] for h in r.history) for r in results]))}
    for a in attributes:
        row[f"{a} before"], row[f"{a} after"] = before[a], after[a]
    row["s / iteration"] = float(np.mean([np.mean([h["seconds"] for h in r.history[1:]]) for r in results]))
    row["||z|| / sqrt(d) at the end"] = float(np.mean([r.history[-1]["z_norm"] for r in results]))
    return row


def reno_experiment(lab: Lab, towers: dict, data, *, judge, iterations: int = 15, seed: int = 0,
                    conditions: dict = RENO_CONDITIONS) -> tuple[list[dict], dict]:
    """Companion paper 001: ReNO on each sample's caption with the pixel reward, the latent reward, and the
    latent reward without the norm prior. The judge's agreement with the caption before (the initial noise's
    one-step image) and after (the best iterate), the reward, seconds per iteration, and how far the noise
    left the Gaussian shell (||z|| / sqrt(d) = 1 is where N(0, I) lives; reward hacking drifts away).
    Returns the rows and the `RenoResult`s by condition."""
    rows, results = [], {}
    for name, kwargs in conditions.items():
        results[name] = [reno(lab, s.caption, towers=towers, iterations=iterations, seed=seed + i, **kwargs)
                         for i, s in enumerate(bar(data, desc=name))]
        verdicts = [judge([r.first for r in results[name]]), judge([r.image for r in results[name]])]
        rows.append({"condition": name, **_reno_row(results[name], data, verdicts)})
    return rows, results


def avoidance_experiment(lab: Lab, towers: dict, data, *, judge, iterations: int = 15, seed: int = 0,
                         reward: str = "latent") -> tuple[list[dict], dict]:
    """The safety analogue of ReNO: the generator is asked for each sample's caption (a coloured object), and
    the reward moves the image toward the caption *without* its colour word and away from the caption itself.
    How often the judge still finds the avoided colour, and whether shape and position are kept."""
    def without_colour(s) -> str:
        return " ".join(w for w in s.caption.split() if w != s.things[0].colour)

    rows, results = [], {}
    avoided = [s.things[0].colour for s in data]
    for name, avoid in (("toward the caption without its colour", False), ("... and away from the colour", True)):
        results[name] = [reno(lab, s.caption, reward=reward, towers=towers, iterations=iterations, seed=seed + i,
                              target=without_colour(s), avoid=s.caption if avoid else None)
                         for i, s in enumerate(bar(data, desc=name))]
        verdicts = [judge([r.first for r in results[name]]), judge([r.image for r in results[name]])]
        found = [float(np.mean([v["colour"] == c for v, c in zip(vs, avoided)])) for vs in verdicts]
        row = {"reward": name, "avoided colour before": found[0], "avoided colour after": found[1]}
        row.update({k: v for k, v in _reno_row(results[name], data, verdicts, ("shape", "position")).items()
                    if k.endswith(("before", "after")) and "reward" not in k})
        row["||z|| / sqrt(d) at the end"] = float(np.mean([r.history[-1]["z_norm"] for r in results[name]]))
        rows.append(row)
    return rows, results
