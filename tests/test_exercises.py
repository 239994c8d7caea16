"""The notebooks' self-checking exercises: each right answer passes, a typical wrong one fails with a message that
says what is wrong, and malformed input gets a clear "Not yet", never a traceback."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdipc_lab as S
from sdipc_lab import experiments as E, probing as P
from sdipc_lab.exercises import REGISTRY, exercises
from sdipc_lab.toyworld import sample as world_sample, samples
from sdipc_lab.toyworld.judge import agreement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return S.load_lab("tiny")


@pytest.fixture(scope="module")
def toy():
    return S.load_lab("toy")


def verdict(capsys, ex, *args, **kwargs) -> tuple[bool, str]:
    """check()'s return value and the one line it printed."""
    ok = ex.check(*args, **kwargs)
    line = capsys.readouterr().out.strip()
    assert line.startswith("Correct: " if ok else "Not yet: ") and "\n" not in line, line
    return ok, line


def right(capsys, ex, *args, **kwargs) -> str:
    ok, line = verdict(capsys, ex, *args, **kwargs)
    assert ok, line
    return line


def wrong(capsys, ex, *args, says: str, **kwargs) -> str:
    ok, line = verdict(capsys, ex, *args, **kwargs)
    assert not ok and re.search(says, line), line
    return line


def test_every_exercise_cell_is_registered():
    """Each notebook's "## Exercises" list has one registered exercise per numbered item, and no more."""
    listed = {}
    for path in sorted((ROOT / "notebooks").glob("0*.ipynb")):
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"
                 and "## Exercises" in "".join(c["source"])]
        if cells:
            listed[path.name[:2]] = len(re.findall(r"^\d+\. ", "".join(cells[0]["source"]), re.M))
    assert listed and all(listed.values())
    registered = {nb: len(exercises(nb)) for nb in listed}
    assert registered == listed
    assert {nb for nb, _ in REGISTRY} == set(listed)
    assert all(sorted(exercises(nb)) == list(range(1, n + 1)) for nb, n in listed.items())


def test_lookup_hint_solution_and_missing_answer(capsys):
    assert exercises(5) == exercises("05") == exercises("05_editing_alpha")
    with pytest.raises(ValueError, match="no exercises for notebook '42'"):
        exercises("42")
    ex = exercises("05")[3]
    ex.hint()
    assert "Hint (05, exercise 3)" in capsys.readouterr().out
    ex.solution()
    out = capsys.readouterr().out
    assert "05_editing_alpha_solutions.ipynb" in out and "padding" in out and "```python" in out
    wrong(capsys, ex, says=r"pass your answer: ex\[3\]\.check")
    wrong(capsys, ex, torch.zeros(1), says="check", no_such_argument=1)  # a bad keyword: said, not raised


# --- 00 -------------------------------------------------------------------------------------------------------

def test_00_norm_ratio(capsys, tiny):
    ex = exercises("00")[1]
    f = S.image_embeds(tiny, S.references(tiny, 1, seed=0)[0].image)
    paper, public = (S.convert(tiny, f, norm_space=s)[0].double() for s in ("c", "t"))
    ratio = (public.norm() / paper.norm()).item()
    assert "same direction" in right(capsys, ex, ratio, tiny)
    wrong(capsys, ex, 1 / ratio, tiny, says="put the public code's")
    wrong(capsys, ex, ratio * 1.1, tiny, says="lengths' ratio is not")
    wrong(capsys, ex, "big", tiny, says="expected the ratio of the two lengths")
    wrong(capsys, ex, ratio, "tiny", says="pass the lab as the second argument")


def test_00_blend(capsys, tiny):
    ex = exercises("00")[2]
    a, b = (world_sample(i, "test", two_objects=0).image for i in (11, 12))
    u = F.normalize(S.image_embeds(tiny, [a, b]).double(), dim=-1)
    right(capsys, ex, S.pseudo_prompt(tiny, (0.5 * u).sum(0, keepdim=True)), tiny)
    halves = S.image_prompt_embeds(tiny, [a, b]).mean(0, keepdim=True)  # two pseudo-prompts averaged
    wrong(capsys, ex, halves, tiny, says="right direction.*times the length")
    wrong(capsys, ex, S.image_prompt_embeds(tiny, a), tiny, says="points elsewhere")
    wrong(capsys, ex, halves[0], tiny, says=r"expected a \(1, 77, D\) tensor \(1, 77, 32\), got shape \(77, 32\)")
    wrong(capsys, ex, [1, 2], tiny, says="got list")


def test_00_alpha_survivor(capsys, tiny):
    ex = exercises("00")[3]
    ref, judge = S.references(tiny, 1, seed=0)[0], S.judge_for(tiny)
    last = {}
    for i, alpha in enumerate((0.0, 0.5, 0.9, 2.0)):
        verdicts = judge(S.edit(tiny, ref.image, "a huge star", alpha=alpha, n=4, seed=0))
        for k in ("shape", "colour", "position", "background"):
            if np.mean([v[k] == ref.attributes[k] for v in verdicts]) >= 0.5:
                last[k] = i
    top = max(last.values(), default=None)
    best = [k for k in ("shape", "colour", "position", "background") if last.get(k) == top]
    right(capsys, ex, best[0], tiny)
    others = [k for k in ("shape", "colour", "position", "background") if k not in best]
    if others:
        wrong(capsys, ex, others[0], tiny, says="Look for the one kept longest")
    wrong(capsys, ex, "size", tiny, says="expected an attribute: one of 'shape'")


def test_00_photos_and_pentagon(capsys, tiny):
    texts = S.candidate_texts(tiny)

    def nearest(refs):
        return float(np.mean([S.nearest_texts(tiny, S.image_prompt_embeds(tiny, r.image)[0, 1], texts, k=1)[0]["cosine"]
                              for r in refs]))

    ex = exercises("00")[4]
    photos, world = nearest(S.references(tiny, 4, kind="photos")), nearest(S.references(tiny, 4))
    assert "photographs" in right(capsys, ex, photos, tiny)
    if abs(photos - world) > 0.01:
        wrong(capsys, ex, world, tiny, says="the world's own images' value")
    wrong(capsys, ex, photos + 0.5, tiny, says="average the four")

    ex = exercises("00")[5]
    from PIL import Image, ImageDraw
    pentagon = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(pentagon).regular_polygon((64, 64, 32), 5, fill=(40, 160, 60))
    near = S.nearest_texts(tiny, S.image_prompt_embeds(tiny, pentagon)[0, 1], texts, k=len(texts))
    assert "pentagon" in right(capsys, ex, near[0]["text"], tiny)
    far = next(r["text"] for r in near[::-1] if r["cosine"] < near[0]["cosine"] - 0.01)
    wrong(capsys, ex, far, tiny, says="a nearer caption reaches")
    wrong(capsys, ex, "a green pentagon", tiny, says="no word 'pentagon'")
    wrong(capsys, ex, 5, tiny, says="expected a caption")


# --- 01 -------------------------------------------------------------------------------------------------------

def test_01_padding_mask(capsys, tiny):
    from sdipc_lab.attention import token_mask
    ex = exercises("01")[1]
    captions = [s.caption for s in samples(3, "test", two_objects=0)]
    _, eos = S.encode_text(tiny, captions)
    right(capsys, ex, (torch.arange(tiny.max_length)[None] <= eos[:, None]).float(), tiny, captions)
    wrong(capsys, ex, token_mask(tiny, captions, "sos+words"), tiny, captions, says="masks the end token too")
    wrong(capsys, ex, token_mask(tiny, captions, "sos+eos"), tiny, captions, says="caption 0 differs at positions")
    wrong(capsys, ex, torch.ones(3, 76), tiny, captions, says=r"expected a \(B, 77\) tensor \(3, 77\)")
    wrong(capsys, ex, torch.ones(3, 77), tiny, says="missing a required argument: 'captions'")


def test_01_post_keeps_and_start_share(capsys, tiny):
    ex = exercises("01")[2]
    texts = [s.caption for s in samples(6, "test", two_objects=1.0)]
    maps, _ = E.attention_maps(tiny, texts, seed=0)
    share = torch.stack([maps[i, 1:e].sum(0).mean() for i, e in enumerate(S.encode_text(tiny, texts)[1])]).mean().item()
    assert "pre keeps 100%" in right(capsys, ex, 1 - share, tiny)
    wrong(capsys, ex, share, tiny, says="words' share, the part post")
    wrong(capsys, ex, None, tiny, says="expected a share")

    ex = exercises("01")[3]
    from sdipc_lab.attention import AttentionStore, installed

    class PerStep:
        def __init__(self):
            self.steps = [AttentionStore()]

        def add(self, probs):
            self.steps[-1].add(probs)

        def next_step(self, pipe, i, t, kwargs):
            self.steps.append(AttentionStore())
            return kwargs

    caption, per_step = texts[0], PerStep()
    f_txt, _ = S.encode_text(tiny, caption)
    with installed(tiny):
        tiny.pipe(prompt_embeds=f_txt, num_inference_steps=tiny.steps, guidance_scale=tiny.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(0), cross_attention_kwargs={"store": per_step},
                  callback_on_step_end=per_step.next_step)
    stores = [s for s in per_step.steps if s.calls]
    assert len(stores) == tiny.steps
    right(capsys, ex, [s.maps()[-1][0].mean().item() for s in stores], tiny, caption)
    unconditional = [s.maps()[0][0].mean().item() + 0.01 for s in stores]
    wrong(capsys, ex, unconditional, tiny, caption, says="step 0: .*conditional")
    wrong(capsys, ex, [0.5] * (tiny.steps - 1), tiny, caption, says=f"one share per denoising step \\({tiny.steps}\\)")
    wrong(capsys, ex, 0.5, tiny, caption, says="expected a list")


# --- 02 -------------------------------------------------------------------------------------------------------

def test_02_knee(capsys, tiny):
    ex = exercises("02")[1]
    data = samples(48, "test", two_objects=0)
    s = E.spectrum(tiny)
    sweep = E.cutoff_experiment(tiny, data, [0.0, *(float(v) * 0.999 for v in s[:: max(1, len(s) // 32)])])
    best = max(r["cos(f_cnvrt, true EOS)"] for r in sweep)
    knee = min(r["rank"] for r in sweep if r["cos(f_cnvrt, true EOS)"] >= best - 0.01)
    right(capsys, ex, knee, tiny)
    wrong(capsys, ex, knee - 2 if knee > 2 else knee + 3, tiny, says="take the \\*smallest\\* such rank")
    wrong(capsys, ex, 2.5, tiny, says="a whole number")


def test_02_tikhonov(capsys, tiny):
    ex = exercises("02")[2]
    W = tiny.W_t.detach().double().cpu()
    P_ = W.shape[0]

    def tikhonov(lam):
        return W.T @ torch.linalg.inv(W @ W.T + lam * torch.eye(P_, dtype=W.dtype))

    assert "s / (s^2 + lam)" in right(capsys, ex, tikhonov, tiny)
    right(capsys, ex, lambda W_, lam: torch.linalg.inv(W_.T.double() @ W_.double() + lam * torch.eye(W_.shape[1],
          dtype=torch.float64)) @ W_.T.double(), tiny)  # the push-through form, given W
    wrong(capsys, ex, lambda lam: tikhonov(lam).T, tiny, says="transpose")
    wrong(capsys, ex, lambda lam: torch.linalg.pinv(W), tiny, says="plain pseudo-inverse")
    wrong(capsys, ex, lambda lam: W.T @ torch.linalg.inv(W @ W.T + lam**2 * torch.eye(P_, dtype=W.dtype)), tiny,
          says="where lam goes")
    wrong(capsys, ex, lambda lam: W[:3], tiny, says=r"expected a \(D, P\) tensor")
    wrong(capsys, ex, lambda lam: 1 / 0, tiny, says="your function raised ZeroDivisionError")
    wrong(capsys, ex, W, tiny, says="expected a function")


def test_02_spectrum_count_says_it_needs_sd(capsys, tiny):
    ex = exercises("02")[3]
    s = E.spectrum(tiny)
    count = int((s <= tiny.cutoff).sum())
    line = right(capsys, ex, count, tiny)
    assert "SD v1.4" in line and "sd-v1-4" in line and "for this lab" in line
    wrong(capsys, ex, count + 1, tiny, says="count E.spectrum")


# --- 03 -------------------------------------------------------------------------------------------------------

def test_03_norm_module(capsys, tiny):
    ex = exercises("03")[1]
    right(capsys, ex, "final_layer_norm")
    right(capsys, ex, tiny.text_encoder.text_model.final_layer_norm)
    wrong(capsys, ex, "text_projection", says="C-space norm varies more")
    wrong(capsys, ex, "layernorm", says="expected a module name: one of 'final_layer_norm'")


def test_03_pinv_spread(capsys, tiny):
    ex = exercises("03")[2]
    u = F.normalize(S.image_embeds(tiny, [s.image for s in samples(64, "test", two_objects=0)]).double(), dim=-1)

    def spread(cutoff):
        lengths = (u @ S.inverse_projection(tiny, cutoff).matrix.double().T).norm(dim=-1)
        return (lengths.std() / lengths.mean()).item()

    assert "safer" in right(capsys, ex, spread(0.0), tiny)
    if abs(spread(0.0) - spread(tiny.cutoff)) > 1e-2 * spread(0.0):
        wrong(capsys, ex, spread(tiny.cutoff), tiny, says="with the lab's cutoff")
    wrong(capsys, ex, 2 * spread(0.0), tiny, says="std over the mean")


def test_03_smallest_norm(capsys, tiny):
    ex = exercises("03")[3]
    scales = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
    data = samples(4, "test", two_objects=0)
    sweep = [r for r in E.norm_experiment(tiny, data, scales=scales, judge=S.judge_for(tiny), seed=0)
             if r["convention"] == "paper (C-space)"]
    at_one = next(r for r in sweep if r["scale"] == 1.0)["judge colour"]
    smallest = min(r["scale"] for r in sweep if r["judge colour"] >= 0.8 * at_one)
    right(capsys, ex, smallest, tiny, data=data)
    wrong(capsys, ex, next(x for x in scales if x != smallest), tiny, data=data, says="the smallest scale keeping 80%")
    wrong(capsys, ex, 0.4, tiny, data=data, says="pick one of the sweep's scales")


# --- 04 -------------------------------------------------------------------------------------------------------

def test_04_standard_error(capsys):
    ex = exercises("04")[1]
    right(capsys, ex, lambda p, n: np.sqrt(p * (1 - p) / n))
    wrong(capsys, ex, lambda p, n: p * (1 - p) / n, says="the variance: take its square root")
    wrong(capsys, ex, lambda p, n: np.sqrt(p * (1 - p)) / n, says="the variance of a fraction is")
    wrong(capsys, ex, lambda p: p, says="your function raised TypeError")
    wrong(capsys, ex, 0.07, says="expected a function se")


def test_04_converter_loss_and_minor_image(capsys, tiny):
    ex = exercises("04")[2]
    data = samples(12, "test", two_objects=0)
    rows, _ = E.variation_table(tiny, data, judge=S.judge_for(tiny), seed=0)
    by = {r["condition"]: r for r in rows}
    loss = {a: by["[sos, true EOS x 76]"][f"judge {a}"] - by["SD-IPC (vary)"][f"judge {a}"]
            for a in ("shape", "colour", "size", "position", "background")}
    right(capsys, ex, max(loss, key=loss.get), tiny, data=data)
    low = min(loss, key=loss.get)
    if loss[low] < max(loss.values()) - math.sqrt(0.25 / len(data)):
        wrong(capsys, ex, low, tiny, data=data, says="is not among the largest")
    wrong(capsys, ex, "hue", tiny, data=data, says="expected an attribute")

    ex = exercises("04")[3]
    line = wrong(capsys, ex, "words", tiny, pairs=2, says="expected an attribute or 'none'")
    ok_any = [a for a in ("shape", "colour", "size", "position", "background", "none")
              if ex.check(a, tiny, pairs=2)]
    out = capsys.readouterr().out
    assert len(ok_any) >= 1 and out.count("Not yet: gains over the (1, 0) baseline") == 6 - len(ok_any), line


def test_04_minor_image_matches_the_solution(capsys, tiny):
    """The checker's verdict against the solutions notebook's own computation (2 pairs on the tiny lab)."""
    judge, data = S.judge_for(tiny), samples(48, "test", two_objects=0)
    pairs = [(data[2 * i], data[2 * i + 1]) for i in range(2)]
    survive = []
    for w in ((1.0, 0.0), (0.8, 0.2)):
        counts = {a: [] for a in ("shape", "colour", "size", "position", "background")}
        for a_ref, b_ref in pairs:
            verdicts = judge(S.vary(tiny, [a_ref.image, b_ref.image], weights=list(w), n=4, seed=0))
            for k in counts:
                if a_ref.attributes[k] != b_ref.attributes[k]:
                    counts[k] += [v[k] == b_ref.attributes[k] for v in verdicts]
        survive.append({k: float(np.mean(c)) for k, c in counts.items() if c})
    gained = {k: survive[1][k] - survive[0][k] for k in survive[1]}
    top = max(gained, key=gained.get)
    answer = top if gained[top] > 2 * np.sqrt(0.25 / 8) else "none"
    right(capsys, exercises("04")[3], answer, tiny, pairs=2)


# --- 05 -------------------------------------------------------------------------------------------------------

def _refs(target, n=12):
    (attribute, value), = target.items()
    return [s for s in samples(6 * n, "test", two_objects=0) if s.attributes[attribute] != value][:n]


def test_05_position_alpha_and_words_alone(capsys, tiny):
    judge = S.judge_for(tiny)
    alphas = (0.0, 0.3, 0.6, 0.9, 1.5, 2.5)
    rows, _ = E.alpha_experiment(tiny, _refs({"position": "left"}), "a disk on the left", alphas,
                                 target={"position": "left"}, judge=judge, seed=0)
    shows = "edit shows position=left"
    top = max(r[shows] for r in rows)
    pick = min((r for r in rows if r[shows] >= top - 0.1), key=lambda r: r["alpha"])
    answer = pick["alpha"] if pick[shows] >= 0.3 else None
    ex = exercises("05")[1]
    right(capsys, ex, answer, tiny)
    wrong(capsys, ex, 2.5 if answer != 2.5 else 0.0, tiny, says="the edit shows at alpha")
    wrong(capsys, ex, 0.7, tiny, says="pick one of the sweep's alphas")

    ex = exercises("05")[2]
    refs = _refs({"colour": "blue"})
    at0, _ = E.alpha_experiment(tiny, refs, "a blue disk", [0.0], target={"colour": "blue"}, judge=judge, seed=0)
    plain = np.mean([v["colour"] == "blue" for v in judge(S.vary(tiny, [s.image for s in refs], n=1, seed=0))])
    gain = at0[0]["edit shows colour=blue"] - plain
    assert "the words alone add" in right(capsys, ex, gain, tiny)
    wrong(capsys, ex, gain + 0.25, tiny, says="subtract the second from the first")
    wrong(capsys, ex, "0.2", tiny, says="expected a difference of two fractions")


def test_05_own_padding(capsys, tiny):
    ex = exercises("05")[3]
    refs = [s.image for s in _refs({"colour": "blue"}, 3)]
    text, alpha = "a blue disk", 0.9
    pseudo = S.image_prompt_embeds(tiny, refs)
    f_txt, eos = S.encode_text(tiny, [text] * len(refs))
    positions = torch.arange(tiny.max_length)[None, :, None]
    own = torch.where(positions >= eos[:, None, None], pseudo[:, 1:2] + alpha * f_txt, f_txt)
    assert "padding states have cosine" in right(capsys, ex, own, tiny, refs)
    wrong(capsys, ex, S.edit_prompt_embeds(tiny, refs, text, alpha=alpha), tiny, refs, says="this is Eq. 8")
    off = torch.where(positions > eos[:, None, None], pseudo[:, 1:2] + alpha * f_txt, f_txt)  # the end token missed
    wrong(capsys, ex, off, tiny, refs, says=f"differs from position {int(eos[0])} on")
    wrong(capsys, ex, own[:, :70], tiny, refs, says=r"expected a \(B, 77, D\) tensor \(3, 77, 32\), got shape \(3, 70, 32\)")
    wrong(capsys, ex, own.numpy().tolist(), tiny, refs, says="got list")


# --- 06 -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Four 1-step FT runs on the tiny lab, as the solutions train them."""
    from sdipc_lab import finetune as FT
    from sdipc_lab.toyworld import concept_samples
    drawn = {f"{c} {s}": concept_samples(s, c, 2) for s, c in (("circle", "red"), ("star", "blue"))}
    concepts = FT.Concepts({k: [x.image for x in v] for k, v in drawn.items()})
    captions = {k: [x.caption for x in v] for k, v in drawn.items()}
    root = tmp_path_factory.mktemp("runs")
    options = {"ab": dict(captions=captions), "no-ab": dict(captions=captions, ab=False),
               "no-reg": dict(captions=None), "prompts": dict(captions=captions, train_kv=False),
               "kv": dict(captions=captions, train_prompts=False), "no-ab-no-reg": dict(ab=False)}
    for name, kwargs in options.items():
        FT.finetune(tiny, concepts, mode="ft", steps=1, batch=2, out=root / name, seed=0, **kwargs)
    return root


def test_06_runs(capsys, runs, tiny):
    no_ab, no_reg, parts = (exercises("06")[i] for i in (1, 2, 3))
    right(capsys, no_ab, runs / "no-ab")
    right(capsys, no_ab, str(runs / "no-ab"), tiny)
    wrong(capsys, no_ab, runs / "ab", says="trained with A/B")
    wrong(capsys, no_ab, runs / "no-ab-no-reg", says="changes more than A/B")
    wrong(capsys, no_ab, runs / "nothing", says="holds no finished SD-IPC-FT run")
    wrong(capsys, no_ab, object(), says="pass the run's folder")
    right(capsys, no_reg, runs / "no-reg")
    wrong(capsys, no_reg, runs / "ab", says="trained with the regulariser")
    wrong(capsys, no_reg, runs / "no-ab-no-reg", says="keep A/B on")
    right(capsys, parts, (runs / "prompts", runs / "kv"))
    wrong(capsys, parts, (runs / "kv", runs / "prompts"), says="only the prompts: train_kv=False")
    wrong(capsys, parts, runs / "kv", says="expected two run folders")


# --- 07 -------------------------------------------------------------------------------------------------------

def test_07_probes(capsys, tiny):
    data = samples(40, "test", two_objects=0)
    text = P.text_layer_features(tiny, [s.caption for s in data])
    layers = sorted({int(k.split(":L")[1].split(":")[0]) for k in text})
    r = {kind: [row["mean r"] for row in P.decode_all({f"text:L{i}:{kind}": text[f"text:L{i}:{kind}"] for i in layers},
                                                      data, baseline=False)] for kind in ("eos", "mean")}
    gains = [i for i, e, m in zip(layers, r["eos"], r["mean"]) if m > e + 0.02]
    ex = exercises("07")[1]
    right(capsys, ex, gains, tiny, data=data)
    wrong(capsys, ex, sorted(set(gains) ^ {layers[0]}), tiny, data=data, says=r"missing \[\d*\], extra")
    wrong(capsys, ex, "all", tiny, data=data, says="expected a list of layer numbers")

    ex = exercises("07")[2]
    pixels = F.interpolate(torch.stack([torch.from_numpy(np.asarray(s.image, np.float32) / 255).permute(2, 0, 1)
                                        for s in data]), size=(16, 16), mode="area").flatten(1).numpy()
    final = f"text:L{layers[-1]}:eos"
    t, p = P.decode_all({final: text[final], "drawn pixels": pixels}, data, baseline=False)
    groups = list(P.GROUPS)
    answer = {"pixels": [g for g in groups if p[f"r {g}"] - t[f"r {g}"] > 0.3],
              "text": [g for g in groups if t[f"r {g}"] - p[f"r {g}"] > 0.3]}
    right(capsys, ex, answer, tiny, data=data)
    swapped = {"pixels": answer["text"], "text": answer["pixels"]}
    if swapped != answer:
        wrong(capsys, ex, swapped, tiny, data=data, says="expected")
    wrong(capsys, ex, {"pixels": ["hue"], "text": []}, tiny, data=data, says="expected attribute groups")
    wrong(capsys, ex, ["words"], tiny, data=data, says=r"expected a dict \{'pixels'")


def test_07_mlp_probe(capsys):
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    data = samples(120, "test", two_objects=0)
    Y, _ = P.attribute_matrix(data)
    Y = (Y - Y.mean(0)) / (Y.std(0) + 1e-9)
    groups = P.concept_groups(data)

    def mean_r(pred):
        return float(np.nanmean([np.corrcoef(pred[:, k], Y[:, k])[0, 1] if Y[:, k].std() > 0 else 0.0
                                 for k in range(Y.shape[1])]))

    def mlp_mean_r(X):  # the solution's, with fewer iterations
        pred = np.zeros_like(Y)
        for train, test in GroupKFold(n_splits=5).split(X, Y, groups):
            scaler = StandardScaler().fit(X[train])
            mlp = MLPRegressor(hidden_layer_sizes=(64,), alpha=1.0, max_iter=300, random_state=0)
            pred[test] = mlp.fit(scaler.transform(X[train]), Y[train]).predict(scaler.transform(X[test]))
        return mean_r(pred)

    def in_sample(X):  # fitted and scored on the same samples
        return mean_r(Ridge(alpha=1e-3).fit(X, Y).predict(X))

    ex = exercises("07")[3]
    assert "cross-validated probe" in right(capsys, ex, mlp_mean_r)
    wrong(capsys, ex, in_sample, says="scores pure noise at")
    wrong(capsys, ex, lambda X: 0.0, says="at only 0.00")
    wrong(capsys, ex, lambda X: X[:, 0], says="expected a mean r")


# --- 08 -------------------------------------------------------------------------------------------------------

def test_08_z_norm_and_avoided_shape(capsys, toy):
    from sdipc_lab import latent_clip as LC
    from sdipc_lab.toyworld.world import SHAPE_WORDS
    towers = LC.load_towers(LC.TOWERS_DIR, device=toy.device, dtype=toy.dtype, lab=toy)
    prompt = samples(1, "test", start=500, two_objects=0)[0].caption
    history = LC.reno(toy, prompt, towers=towers, iterations=3, prior_weight=0.0, seed=0).history
    ex = exercises("08")[1]
    assert "||z|| / sqrt(d)" in right(capsys, ex, history[-1]["z_norm"], toy, iterations=3)
    if abs(history[-1]["z_norm"] - history[0]["z_norm"]) > 1e-3:
        wrong(capsys, ex, history[0]["z_norm"], toy, iterations=3, says="that is the start")
    wrong(capsys, ex, history[-1]["z_norm"] + 0.5, toy, iterations=3, says="prior_weight=0.0")

    ex = exercises("08")[3]
    data = samples(2, "test", start=600, two_objects=0)
    results = [LC.reno(toy, p.caption, towers=towers, iterations=2, seed=i, avoid=p.caption,
                       target=" ".join(w for w in p.caption.split() if w not in SHAPE_WORDS[p.things[0].shape]))
               for i, p in enumerate(data)]
    after = agreement(S.judge_for(toy)([r.image for r in results]), [p.attributes for p in data], ("shape",))["shape"]
    assert "the avoided shape is found in" in right(capsys, ex, after, toy, data=data, iterations=2)
    wrong(capsys, ex, after + 0.25, toy, data=data, iterations=2, says="count the images whose shape")
    wrong(capsys, ex, [after], toy, data=data, iterations=2, says="expected a share")


def test_08_means_tower_folder(capsys, tiny, tmp_path):
    from sdipc_lab import latent_clip as LC
    from sdipc_lab.toyworld.train import render
    world = render(16, "train")
    for mode in ("sample", "mean"):
        LC.train_tower(tiny, "latent", world=world, out=tmp_path / mode, steps=1, batch=4, posterior=mode,
                       width=16, layers=1)
    ex = exercises("08")[2]
    right(capsys, ex, tmp_path / "mean")
    wrong(capsys, ex, tmp_path / "sample", says="trained on posterior samples")
    wrong(capsys, ex, tmp_path / "none", says="holds no finished latent-tower run")


def test_08_decode_share_needs_sd_on_a_gpu(capsys, tiny):
    wrong(capsys, exercises("08")[4], 0.2, tiny, says="needs SD v1.4 on a CUDA GPU.*'tiny' on cpu")
    wrong(capsys, exercises("08")[4], "a fifth", tiny, says="expected a share")
