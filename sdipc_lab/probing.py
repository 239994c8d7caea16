"""Where do the semantics live? Linear probes of attributes from CLIP and U-Net features (companion paper 000).

Features (one row per caption), extracted with forward hooks and cached to disk:
- `text:L{i}:eos` / `text:L{i}:mean`: every layer of the text encoder, end token and mean over real tokens;
- `unet:{block}:t{k}`: each U-Net block (down, mid, up) spatially pooled, at several steps of the reverse process;
- `latent`: the final latent; `pixels`: the generated image, downsampled.

Probes: `RidgeCV` with group k-fold cross-validation, groups = concepts, so test concepts are never seen in
training; scored by Pearson r per attribute and 2-vs-2 accuracy, against shuffled-label baselines.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .convert import at_end, encode_text, token_ids
from .cpus import limit_threads
from .lab import Lab
from .toyworld.world import BACKGROUNDS, COLOURS, POSITIONS, SIZES

# Attribute groups with ground truth for the toy world. "words" lives only in the captions.
SHAPE_CORNERS = {"circle": 0, "heart": 1, "triangle": 3, "square": 4, "star": 10, "cross": 12}
SHAPE_ROUNDNESS = {"circle": 1.0, "heart": 0.7, "square": 0.3, "cross": 0.2, "triangle": 0.1, "star": 0.0}
WARM = {"red": 1.0, "orange": 1.0, "yellow": 0.7, "green": 0.0, "blue": 0.0, "purple": 0.3}
GROUPS = {"colour": ("hue cos", "hue sin", "warmth", "lightness"), "shape": ("roundness", "corners"),
          "size": ("size",), "position": ("x", "y"), "background": ("background lightness",),
          "words": ("says drawing", "says photo")}


def attributes(sample) -> dict:
    """Numeric attributes of a toy-world sample's first object (and of its caption's wording)."""
    t = sample.things[0]
    h, lightness, _ = colorsys.rgb_to_hls(*(c / 255 for c in COLOURS[t.colour]))
    x, y = POSITIONS[t.position]
    return {"hue cos": np.cos(2 * np.pi * h), "hue sin": np.sin(2 * np.pi * h), "warmth": WARM[t.colour],
            "lightness": lightness, "roundness": SHAPE_ROUNDNESS[t.shape], "corners": SHAPE_CORNERS[t.shape],
            "size": SIZES[t.size], "x": x, "y": y,
            "background lightness": sum(BACKGROUNDS[sample.background]) / 765,
            "says drawing": float("drawing" in sample.caption), "says photo": float("photo" in sample.caption)}


def attribute_matrix(data) -> tuple[np.ndarray, list[str]]:
    rows = [attributes(s) for s in data]
    names = list(rows[0])
    return np.array([[r[n] for n in names] for r in rows], dtype=np.float64), names


@torch.no_grad()
def text_layer_features(lab: Lab, captions: list[str], batch: int = 128) -> dict:
    """Every layer's end-token state and mean over real tokens: {"text:L{i}:eos": (N, D), ...}."""
    out: dict[str, list] = {}
    for i in range(0, len(captions), batch):
        input_ids, eos = token_ids(lab.tokenizer, captions[i:i + batch])  # (B, 77), (B,)
        hidden = lab.text_encoder.text_model(input_ids.to(lab.device), output_hidden_states=True).hidden_states
        mask = (torch.arange(input_ids.shape[1]) <= eos[:, None]).to(lab.device)[..., None].float()  # (B, 77, 1)
        for layer, h in enumerate(hidden):  # embeddings, then each transformer layer
            out.setdefault(f"text:L{layer}:eos", []).append(at_end(h, eos).float().cpu())
            out.setdefault(f"text:L{layer}:mean", []).append(((h * mask).sum(1) / mask.sum(1)).float().cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def unet_blocks(lab: Lab) -> dict:
    unet = lab.unet
    blocks = {f"down{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks["mid"] = unet.mid_block
    blocks.update({f"up{i}": b for i, b in enumerate(unet.up_blocks)})
    return blocks


@torch.no_grad()
def unet_features(lab: Lab, captions: list[str], *, at_steps=(0, 5, 10, 15, 19), steps: int = 20, seed: int = 0,
                  null_prompt: bool = False, batch: int = 16) -> dict:
    """U-Net block outputs, spatially pooled, at chosen steps of the reverse process (conditional half),
    plus the final latent and the image: {"unet:mid:t5": (N, C), ..., "latent": ..., "pixels": ...}.

    With `null_prompt=True` the U-Net gets the empty prompt instead (the control: if decoding drops to
    chance, the semantics came from CLIP)."""
    outside = sorted(k for k in set(at_steps) if not 0 <= k < steps)
    if outside:
        raise ValueError(f"at_steps {outside} are outside the reverse process's {steps} steps (0 to {steps - 1}): "
                         "read features at earlier steps, or raise steps")
    at_steps = set(at_steps)
    size = lab.size or lab.image_size  # the session's image size (load_lab(size=...)), as generate uses
    out: dict[str, list] = {}
    state = {"step": 0}
    handles = []

    def hook(name):
        def record(module, args, output):
            if state["step"] in at_steps:
                h = output[0] if isinstance(output, tuple) else output  # (2B, C, h, w)
                h = h[len(h) // 2:]  # conditional half
                out.setdefault(f"unet:{name}:t{state['step']}", []).append(h.float().mean(dim=(2, 3)).cpu())
        return record

    for name, block in unet_blocks(lab).items():
        handles.append(block.register_forward_hook(hook(name)))

    def on_step_end(pipe, i, t, kwargs):
        state["step"] = i + 1
        return kwargs

    try:
        with limit_threads(lab.threads):
            for i in range(0, len(captions), batch):
                chunk = captions[i:i + batch]
                f_txt, _ = encode_text(lab, [""] * len(chunk) if null_prompt else chunk)
                state["step"] = 0
                latents = lab.pipe(prompt_embeds=f_txt, num_inference_steps=steps, guidance_scale=lab.guidance_scale,
                                   height=size, width=size,
                                   generator=torch.Generator("cpu").manual_seed(seed + i), output_type="latent",
                                   callback_on_step_end=on_step_end).images
                out.setdefault("latent", []).append(latents.float().flatten(1).cpu())
                decoded = lab.vae.decode(latents / lab.vae.config.scaling_factor).sample.float().clamp(-1, 1)
                small = torch.nn.functional.interpolate(decoded, size=(16, 16), mode="area")
                out.setdefault("pixels", []).append(small.flatten(1).cpu())
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def cached(path: Path, key: dict, compute):
    """`compute()` once; later calls with the same `key` read the .npz at `path`."""
    path = Path(path)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    file = path.with_name(f"{path.stem}-{digest}.npz")
    if file.exists():
        with np.load(file) as data:
            return {k: data[k] for k in data.files}
    result = compute()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **result)
    tmp.replace(file)
    return result


def two_vs_two(pred: np.ndarray, true: np.ndarray, rng: np.random.Generator, pairs: int = 2000) -> float:
    """Fraction of random pairs (i, j) where matching predictions to truths is right, not swapped."""
    i, j = rng.integers(0, len(true), (2, pairs))
    keep = i != j
    i, j = i[keep], j[keep]

    def d(a, b):
        return np.linalg.norm(a - b, axis=-1)

    right = d(pred[i], true[i]) + d(pred[j], true[j])
    swapped = d(pred[i], true[j]) + d(pred[j], true[i])
    return float(np.mean(right < swapped))


def probe(features: np.ndarray, targets: np.ndarray, groups: np.ndarray, *, folds: int = 5, shuffle: bool = False,
          seed: int = 0) -> dict:
    """Cross-validated ridge probe (test groups never seen in training). Returns per-attribute Pearson r,
    their mean, 2-vs-2 accuracy, and the held-out predictions."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    y = (targets - targets.mean(0)) / (targets.std(0) + 1e-9)
    if shuffle:
        y = y[rng.permutation(len(y))]
    pred = np.zeros_like(y)
    for train, test in GroupKFold(n_splits=folds).split(features, y, groups):
        scaler = StandardScaler().fit(features[train])
        model = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit(scaler.transform(features[train]), y[train])
        pred[test] = model.predict(scaler.transform(features[test]))
    r = np.array([np.corrcoef(pred[:, k], y[:, k])[0, 1] if y[:, k].std() > 0 else 0.0 for k in range(y.shape[1])])
    return {"r": np.nan_to_num(r), "mean r": float(np.nan_to_num(r).mean()), "2v2": two_vs_two(pred, y, rng),
            "pred": pred, "true": y}


def entanglement(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean |off-diagonal correlation| of predicted attributes minus that of the true attributes."""
    def off(m):
        c = np.nan_to_num(np.corrcoef(m, rowvar=False))
        return np.abs(c[~np.eye(len(c), dtype=bool)]).mean()
    return float(off(pred) - off(true))


def concept_groups(data) -> np.ndarray:
    """Group id per sample: its (shape, colour) concept."""
    names = sorted({(s.things[0].shape, s.things[0].colour) for s in data})
    return np.array([names.index((s.things[0].shape, s.things[0].colour)) for s in data])


def decode_all(features: dict, data, *, baseline: bool = True, folds: int = 5) -> list[dict]:
    """One row per feature set: mean Pearson r, 2-vs-2 accuracy, r per attribute group, and (with
    `baseline`) the same probe on shuffled labels."""
    Y, names = attribute_matrix(data)
    groups = concept_groups(data)
    rows = []
    for key, X in features.items():
        res = probe(X, Y, groups, folds=folds)
        row = {"features": key, "mean r": res["mean r"], "2v2": res["2v2"]}
        for group, attrs in GROUPS.items():
            row[f"r {group}"] = float(np.mean([res["r"][names.index(a)] for a in attrs]))
        row["entanglement"] = entanglement(res["pred"], res["true"])
        if baseline:
            row["shuffled mean r"] = probe(X, Y, groups, folds=folds, shuffle=True)["mean r"]
        rows.append(row)
    return rows


def random_text_encoder_like(lab: Lab, seed: int = 0):
    """The lab's text encoder architecture with random weights: the random-initialisation baseline."""
    import copy

    model = copy.deepcopy(lab.text_encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.apply(model._init_weights)
    return model
