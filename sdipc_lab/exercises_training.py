"""The exercises of notebooks 06-08, each about something trained on top of the lab: SD-IPC-FT runs, whose
folders record how they were trained (06), probes of the text tower's layers (07), latent CLIP towers and ReNO's
optimised noise (08).
"""

from __future__ import annotations

import numbers
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import latent_clip as LC, probing as P
from .datasets import references
from .exercises_kit import NotYet, _exercise, _judge, _lab, _names, _number, _student
from .lab import Lab
from .toyworld import samples
from .toyworld.judge import agreement
from .toyworld.world import SHAPE_WORDS
from .checkpoints import checkpoint_signature


# --- 06 Fine-tuning: the runs' folders record how they were trained ---------------------------------------------

def _run(folder) -> dict:
    """The signature of a finished SD-IPC-FT run in `folder` (the `out=` of FT.finetune)."""
    if not isinstance(folder, (str, Path)):
        raise NotYet(f"pass the run's folder (the out= you trained into, e.g. RUNS / 'no-ab'), got "
                     f"{type(folder).__name__}: the folder's checkpoint records how the run was trained")
    folder = Path(folder)
    ckpt = folder / "sdipc-ft.ckpt.safetensors"
    if not ckpt.exists() or not (folder / "finetuned.safetensors").exists():
        raise NotYet(f"{folder} holds no finished SD-IPC-FT run: train with FT.finetune(lab, concepts, mode='ft', "
                     f"out={str(folder)!r}, ...)")
    return checkpoint_signature(ckpt) or {}


@_exercise("06", 1, "ex[1].check(folder): the folder of an FT run trained without A/B (ab=False), otherwise as the "
           "notebook's (captions on, prompts and k/v trained)",
           "FT.finetune(lab, concepts, mode='ft', steps=..., out=RUNS / 'no-ab', captions=captions, ab=False); then "
           "compare 'copies position' and 'copies background' of its variations with the A/B run's.",
           """no_ab = train("no-ab", captions=captions, ab=False)
ex[1].check(RUNS / "no-ab")""")
def _no_ab(answer, lab=None) -> str:
    run = _run(answer)
    if run.get("ab", True):
        raise NotYet("this run trained with A/B (ab=True): pass ab=False")
    if not run.get("captions") or not (run.get("train_prompts") and run.get("train_kv")):
        raise NotYet("it changes more than A/B: keep captions=captions and train prompts and k/v, so only A/B differs")
    return ("trained without A/B: now compare what its variations copy from the reference (position, background) "
            "with the A/B run's, against the noise 2 * sqrt(0.25 / N)")


@_exercise("06", 2, "ex[2].check(folder): the folder of an FT run without the text-to-image regulariser "
           "(captions=None), A/B on",
           "FT.finetune(..., out=RUNS / 'no-reg', captions=None); then generate from captions with each run applied "
           "(S.generate(..., finetuned=ft)) and judge them against the captions.",
           """no_reg = train("no-reg", captions=None)
ex[2].check(RUNS / "no-reg")""")
def _no_regulariser(answer, lab=None) -> str:
    run = _run(answer)
    if run.get("captions"):
        raise NotYet("this run trained with the regulariser (captions given): pass captions=None")
    if not run.get("ab"):
        raise NotYet("it changes more than the regulariser: keep A/B on (the default), so only the captions differ")
    return "trained without Eq. 9's text term: compare generation from captions before and after it"


@_exercise("06", 3, "ex[3].check((prompts_folder, kv_folder)): two FT runs, one training only the prompts "
           "(train_kv=False), one only k/v (train_prompts=False), captions on",
           "FT.finetune(..., train_kv=False) and FT.finetune(..., train_prompts=False) into two folders; compare "
           "'concept (shape and colour)' and the pixel change vs SD-IPC of their variations.",
           """ex[3].check((RUNS / "prompts", RUNS / "kv"))""")
def _parts(answer, lab=None) -> str:
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise NotYet("expected two run folders: (the prompts-only run's, the k/v-only run's)")
    prompts, kv = map(_run, answer)
    if not (prompts.get("train_prompts") and not prompts.get("train_kv")):
        raise NotYet("the first run must train only the prompts: train_kv=False")
    if not (kv.get("train_kv") and not kv.get("train_prompts")):
        raise NotYet("the second run must train only k/v: train_prompts=False")
    if not (prompts.get("captions") and kv.get("captions")):
        raise NotYet("keep captions=captions in both, so only the trained part differs")
    return ("one run per part: compare their judged concept against the noise, and their pixel change vs SD-IPC; "
            "at the notebook's few steps the difference is usually within noise")


# --- 07 Probing --------------------------------------------------------------------------------------------------

def _text_probes(lab: Lab, data) -> tuple[list[int], dict]:
    text = P.text_layer_features(lab, [s.caption for s in data])  # {"text:L{i}:eos" / ":mean": (N, D)}
    layers = sorted({int(k.split(":L")[1].split(":")[0]) for k in text})
    return layers, text


@_exercise("07", 1, "ex[1].check(layers, lab): the text layers at which the mean over tokens decodes better than "
           "the end token (mean r higher by more than 0.02), over samples(120, 'test', two_objects=0)",
           "P.decode_all({f'text:L{i}:eos': ...}, data, baseline=False) and the same with ':mean'; compare "
           "'mean r' layer by layer.",
           """ex[1].check([r["layer"] for r in curve if r["mean over tokens"] > r["end token"] + 0.02], lab)""")
def _mean_layers(answer, lab, data=None) -> str:
    data = samples(120, "test", two_objects=0) if data is None else data
    layers, text = _text_probes(_lab(lab), data)
    if not isinstance(answer, (list, tuple, set)) or not all(isinstance(i, numbers.Integral) for i in answer):
        raise NotYet(f"expected a list of layer numbers among {layers} ([] for none), got {answer!r:.80}")
    r = {kind: [row["mean r"] for row in P.decode_all({f"text:L{i}:{kind}": text[f"text:L{i}:{kind}"]
                                                       for i in layers}, data, baseline=False)]
         for kind in ("eos", "mean")}
    want = {i for i, e, m in zip(layers, r["eos"], r["mean"]) if m > e + 0.02}
    if set(answer) != want:
        raise NotYet(f"missing {sorted(want - set(answer))}, extra {sorted(set(answer) - want)}: mean r "
                     + ", ".join(f"L{i} {e:.2f}/{m:.2f}" for i, e, m in zip(layers, r["eos"], r["mean"]))
                     + " (end token / mean)")
    return (f"the mean gains at layers {sorted(want) or 'none'}: early on the end token knows nothing of the "
            "caption, the mean is a bag of words; attention gathers the caption into the end token layer by layer")


@_exercise("07", 2, "ex[2].check({'pixels': [...], 'text': [...]}, lab): the attribute groups decoded far better "
           "(r higher by more than 0.3) from drawn pixels (16 x 16, area-averaged) than from the final layer's end "
           "token, and the other way round, over samples(120, 'test', two_objects=0)",
           "P.decode_all({final: text[final], 'drawn pixels': pixels}, data, baseline=False); compare the "
           "'r <group>' columns.",
           """ex[2].check({"pixels": [g for g in groups if rows[1][f"r {g}"] - rows[0][f"r {g}"] > 0.3],
             "text": [g for g in groups if rows[0][f"r {g}"] - rows[1][f"r {g}"] > 0.3]}, lab)""")
def _pixels_vs_text(answer, lab, data=None) -> str:
    data = samples(120, "test", two_objects=0) if data is None else data
    if not isinstance(answer, dict) or set(answer) != {"pixels", "text"}:
        raise NotYet("expected a dict {'pixels': [groups], 'text': [groups]}")
    groups = list(P.GROUPS)
    got = {k: _names(v, groups, "attribute groups") for k, v in answer.items()}
    layers, text = _text_probes(_lab(lab), data)
    pixels = F.interpolate(torch.stack([torch.from_numpy(np.asarray(s.image, np.float32) / 255).permute(2, 0, 1)
                                        for s in data]), size=(16, 16), mode="area").flatten(1).numpy()  # (N, 768)
    final = f"text:L{layers[-1]}:eos"
    t, p = P.decode_all({final: text[final], "drawn pixels": pixels}, data, baseline=False)
    want = {"pixels": {g for g in groups if p[f"r {g}"] - t[f"r {g}"] > 0.3},
            "text": {g for g in groups if t[f"r {g}"] - p[f"r {g}"] > 0.3}}
    table = ", ".join(f"{g} {t[f'r {g}']:.2f}/{p[f'r {g}']:.2f}" for g in groups)
    for k in ("pixels", "text"):
        if got[k] != want[k]:
            raise NotYet(f"'{k}': expected {sorted(want[k]) or 'none'}, got {sorted(got[k]) or 'none'}; r (text / "
                         f"pixels): {table}")
    return (f"r (text / pixels): {table}. The wording exists only in the text; a linear probe on raw pixels finds "
            "only what is linear in them")


@_exercise("07", 3, "ex[3].check(probe): your MLP probe, a function probe(X) -> mean r (cross-validated with whole "
           "concepts held out) for features X (N, F) of samples(120, 'test', two_objects=0)",
           "GroupKFold(n_splits=5).split(X, Y, P.concept_groups(data)); fit MLPRegressor on the training folds, "
           "predict the test fold, then Pearson r per attribute column of Y (P.attribute_matrix(data)).",
           """ex[3].check(mlp_mean_r)""")
def _mlp_probe(answer, lab=None, data=None) -> str:
    """A probe must score informative features high and noise near 0: a probe scored on its own training data
    scores noise high too."""
    if not callable(answer):
        raise NotYet(f"expected a function probe(X) -> float, got {type(answer).__name__}")
    data = samples(120, "test", two_objects=0) if data is None else data
    Y, _ = P.attribute_matrix(data)  # (N, A)
    rng = np.random.default_rng(0)
    Y = (Y - Y.mean(0)) / (Y.std(0) + 1e-9)
    informative = np.concatenate([Y + 0.3 * rng.standard_normal(Y.shape), rng.standard_normal((len(Y), 16))], 1)
    noise = rng.standard_normal((len(Y), 64))
    high, low = (_number(_student(answer, X.astype(np.float32)), "a mean r") for X in (informative, noise))
    if low > 0.2:
        raise NotYet(f"it scores pure noise at {low:.2f}: it is scored on the samples it was fitted on; "
                     "cross-validate (GroupKFold over P.concept_groups(data)) and score the held-out folds only")
    if high < 0.5:
        raise NotYet(f"it scores features that hold the attributes (plus noise) at only {high:.2f}: check that it "
                     "predicts every column of Y and correlates each with the truth")
    return (f"informative features {high:.2f}, noise {low:.2f}: a cross-validated probe; now compare its ranking of "
            "the layers with ridge's (scipy.stats.spearmanr)")


# --- 08 Latent CLIP and ReNO -------------------------------------------------------------------------------------

def _towers(lab: Lab) -> dict:
    if "exercise towers" not in lab.cache:
        lab.cache["exercise towers"] = LC.load_towers(LC.TOWERS_DIR, device=lab.device, dtype=lab.dtype, lab=lab)
    return lab.cache["exercise towers"]


@_exercise("08", 1, "ex[1].check(z_norm, lab): ||z|| / sqrt(d) after 50 ReNO iterations without the norm prior "
           "(prior_weight=0), for the caption of samples(1, 'test', start=500, two_objects=0)[0], seed 0",
           "r = LC.reno(lab, caption, towers=towers, iterations=50, prior_weight=0.0, seed=0); its history holds "
           "'z_norm' per iteration: plot it, and take the last.",
           """ex[1].check(runs[LONG][0].history[-1]["z_norm"], lab)""")
def _z_norm(answer, lab, prompt=None, iterations=50, seed=0) -> str:
    prompt = samples(1, "test", start=500, two_objects=0)[0].caption if prompt is None else prompt
    z = _number(answer, "||z|| / sqrt(d)")
    history = LC.reno(_lab(lab), prompt, towers=_towers(lab), iterations=iterations, prior_weight=0.0,
                      seed=seed).history
    want = history[-1]["z_norm"]
    if abs(z - history[0]["z_norm"]) < 1e-4 < abs(z - want):
        raise NotYet("that is the start (iteration 0): take the last entry of the history")
    if abs(z - want) > 1e-3 * want:
        raise NotYet(f"not {z:.3f} after {iterations} iterations: read history[-1]['z_norm'] of a run with "
                     "prior_weight=0.0")
    return (f"||z|| / sqrt(d) {history[0]['z_norm']:.2f} -> {want:.2f}: "
            + ("z left the Gaussian shell the U-Net was trained on: reward hacking" if want > 1.5 else
               "z stays near the Gaussian shell within these iterations"))


@_exercise("08", 2, "ex[2].check(folder): the folder of a latent tower trained on posterior means "
           "(LC.train_tower(lab, 'latent', ..., posterior='mean', out=folder))",
           "LC.train_tower(lab, 'latent', world=render(2048, 'train'), out=runs_dir / 'mean', steps=60, "
           "posterior='mean', init=towers['latent']); then LC.zero_shot_by_encoder on drawn and generated images.",
           """ex[2].check(runs_dir / "mean")""")
def _means_tower(answer, lab=None) -> str:
    if not isinstance(answer, (str, Path)):
        raise NotYet(f"pass the run's folder (the out= of LC.train_tower), got {type(answer).__name__}: its "
                     "checkpoint records how the tower was trained")
    ckpt = Path(answer) / "latent-clip.ckpt.safetensors"
    if not ckpt.exists() or not (Path(answer) / "latent").exists():
        raise NotYet(f"{answer} holds no finished latent-tower run: LC.train_tower(lab, 'latent', ..., out=folder)")
    run = checkpoint_signature(ckpt) or {}
    if run.get("posterior", "sample") != "mean":
        raise NotYet("this tower was trained on posterior samples (the default): pass posterior='mean'")
    return ("trained on posterior means; LC.zero_shot_by_encoder reads means too, so compare on generated images, "
            "whose latents are not posterior means")


@_exercise("08", 3, "ex[3].check(share, lab): the share of images in which the judge still finds the avoided shape "
           "after ReNO (15 iterations) toward the caption without its shape word and away from the caption, for "
           "samples(8, 'test', start=600, two_objects=0), seeds 0..7",
           "target: the caption without SHAPE_WORDS[s.things[0].shape]; avoid: the caption; LC.reno(..., "
           "iterations=15, seed=SEED + i, target=..., avoid=...); judge r.image, compare with p.attributes.",
           """ex[3].check(rows[1]["shape after"], lab)""")
def _avoid_shape(answer, lab, data=None, iterations=15, seed=0) -> str:
    share = _number(answer, "a share between 0 and 1")
    judge = _judge(lab)
    data = samples(8, "test", start=600, two_objects=0) if data is None else data
    results = [LC.reno(lab, p.caption, towers=_towers(lab), iterations=iterations, seed=seed + i,
                       target=" ".join(w for w in p.caption.split() if w not in SHAPE_WORDS[p.things[0].shape]),
                       avoid=p.caption) for i, p in enumerate(data)]
    truths = [p.attributes for p in data]
    before, after = (agreement(judge([getattr(r, k) for r in results]), truths) for k in ("first", "image"))
    if abs(share - before["shape"]) < 1e-6 < abs(share - after["shape"]):
        raise NotYet("that is before ReNO (r.first): judge the best iterate, r.image")
    if abs(share - after["shape"]) > 1e-6:
        raise NotYet(f"not {share:.2f}: judge r.image of each run and count the images whose shape is the avoided one")
    kept = [a for a in ("colour", "position") if after[a] >= before[a]]
    return (f"the avoided shape is found in {before['shape']:.2f} -> {after['shape']:.2f} of images; kept: "
            f"{', '.join(kept) or 'nothing'} (N = {len(data)}: small differences are noise)")


@_exercise("08", 4, "ex[4].check(share, lab): the decode's share of the pixel path's scoring time on SD v1.4 at "
           "512 px (bench/latent_reward.py --source sd-v1-4); needs the SD v1.4 lab on a CUDA GPU",
           "On a GPU: python bench/latent_reward.py --source sd-v1-4 prints 'decode share'; or "
           "LC.scoring_cost(lab, towers, latents)[0]['decode share'] with lab = S.load_lab('sd-v1-4').",
           """ex[4].check(share_printed_by_the_bench, lab)   # lab = S.load_lab("sd-v1-4") on a GPU""")
def _decode_share(answer, lab) -> str:
    """Timed again on the lab (timings vary: within 0.1); only SD v1.4 on CUDA answers the question."""
    share = _number(answer, "a share between 0 and 1")
    if not (_lab(lab).source.startswith("sd-") and torch.device(lab.device).type == "cuda"):
        raise NotYet(f"this exercise needs SD v1.4 on a CUDA GPU (S.load_lab('sd-v1-4')); this lab is "
                     f"{lab.source!r} on {lab.device}, which cannot answer it")
    images = [r.image for r in references(lab, 4)]
    latents = LC.encode_latents(lab, images)  # (4, 4, h, w)
    tower = LC.new_tower(lab, "latent").to(lab.device, lab.dtype).eval()
    start = time.perf_counter()
    want = LC.scoring_cost(lab, {"latent": tower}, latents)[0]["decode share"]
    if abs(share - want) > 0.1:
        raise NotYet(f"the decode takes {want:.0%} of the pixel path here (timed in {time.perf_counter() - start:.0f}"
                     f" s), not {share:.0%}: read 'decode share' of the bench's pixel row")
    return f"the decode takes {want:.0%} of scoring at {lab.image_size} px (timed again: within 0.1)"
