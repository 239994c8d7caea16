"""The exercises of notebooks 04-05, on the paper's image variation and editing: the noise of a judged fraction,
what the converter loses against the true end token, what a blend's minor image passes on (04); the right alpha,
the words alone, and the public code's padding rule built by hand (05).
"""

from __future__ import annotations

import math

import numpy as np
import torch.nn.functional as F

from . import experiments as E
from .convert import edit_prompt_embeds, encode_text
from .exercises_kit import NotYet, _choice, _close, _exercise, _judge, _lab, _number, _student, _tensor
from .generate import sample, vary
from .toyworld import samples
from .toyworld.evaluate import prompt_conditions
from .toyworld.judge import agreement

ATTRIBUTES = ("shape", "colour", "size", "position", "background")


# --- 04 Variation and Table 1 ----------------------------------------------------------------------------------

@_exercise("04", 1, "ex[1].check(se): a function se(p, n) giving the standard error of a judge fraction p measured "
           "over n images",
           "A fraction of n independent yes/no verdicts has variance p (1 - p) / n.",
           """ex[1].check(lambda p, n: np.sqrt(p * (1 - p) / n))""")
def _standard_error(answer, lab=None) -> str:
    """sqrt(p (1 - p) / n) at several p and n."""
    if not callable(answer):
        raise NotYet(f"expected a function se(p, n), got {type(answer).__name__}")
    for p, n in ((0.5, 48), (0.1, 24), (0.9, 12), (0.0, 48)):
        got, want = _number(_student(answer, p, n), "a standard error"), math.sqrt(p * (1 - p) / n)
        if abs(got - want) > 1e-9 + 1e-6 * want:
            if abs(got - want**2) < 1e-9:
                raise NotYet(f"se({p}, {n}) = {got:.4g} is the variance: take its square root")
            raise NotYet(f"se({p}, {n}) = {got:.4g}, expected {want:.4g}: the variance of a fraction is "
                         "p (1 - p) / n")
    return (f"about {math.sqrt(0.25 / 48):.2f} at N = 48 for p near 0.5: two conditions differ convincingly when "
            "their gap is well over twice that")


@_exercise("04", 2, "ex[2].check(attribute, lab): which attribute the converter loses most (the judge's [sos, true "
           "EOS x 76] row minus SD-IPC's) on samples(48, 'test', two_objects=0), seed 0",
           "E.variation_table(lab, data, judge=judge, seed=0): per attribute, 'judge <a>' of '[sos, true EOS x 76]' "
           "minus that of 'SD-IPC (vary)'. The check reruns those two rows (~1 minute).",
           """loss = {a: eos[f"judge {a}"] - ipc[f"judge {a}"] for a in ATTRIBUTES}
ex[2].check(max(loss, key=loss.get), lab)""")
def _converter_loss(answer, lab, data=None, seed=0) -> str:
    """The largest judge gap [sos, EOS x 76] - SD-IPC; attributes within one standard error of it count too."""
    name = _choice(answer, ATTRIBUTES, "an attribute")
    judge = _judge(lab)
    data = samples(48, "test", two_objects=0) if data is None else data
    conditions = prompt_conditions(lab, data, seed=seed)
    truths = [s.attributes for s in data]
    found = {c: agreement(judge(sample(lab, conditions[c], n=1, seed=seed)), truths)
             for c in ("[sos, true EOS x 76]", "SD-IPC (vary)")}
    loss = {a: found["[sos, true EOS x 76]"][a] - found["SD-IPC (vary)"][a] for a in ATTRIBUTES}
    se = math.sqrt(0.25 / len(data))
    worst = [a for a in ATTRIBUTES if loss[a] >= max(loss.values()) - se]
    table = ", ".join(f"{a} {v:+.2f}" for a, v in loss.items())
    if name not in worst:
        raise NotYet(f"lost by the converter: {table}; {name} is not among the largest (within one standard error, "
                     f"{se:.2f})")
    return f"lost by the converter: {table}: most on {' and '.join(worst)}"


@_exercise("04", 3, "ex[3].check(attribute, lab): the attribute of the *minor* image that shows through most at "
           "weights (0.8, 0.2) over the (1, 0) baseline, or 'none' if no gain exceeds the noise; 8 pairs of "
           "samples(48, 'test', two_objects=0), n=4, seed 0",
           "For each pair (data[2i], data[2i+1]) and weights, judge S.vary(lab, [a, b], weights=w, n=4, seed=0); "
           "count, over pairs whose references differ in an attribute, how often an image takes b's value. "
           "Noise: 2 * sqrt(0.25 / 32). The check reruns (1, 0) and (0.8, 0.2) (64 images).",
           """ex[3].check(top if gained[top] > noise else "none", lab)""")
def _minor_image(answer, lab, pairs=8, seed=0, data=None) -> str:
    """The attribute whose share of the minor image's value rises most from (1, 0) to (0.8, 0.2), beyond noise."""
    name = _choice(answer, (*ATTRIBUTES, "none"), "an attribute or 'none'")
    judge = _judge(lab)
    data = samples(2 * pairs, "test", two_objects=0) if data is None else data
    twos = [(data[2 * i], data[2 * i + 1]) for i in range(pairs)]
    share = []
    for w in ((1.0, 0.0), (0.8, 0.2)):
        counts = {a: [] for a in ATTRIBUTES}
        for a_ref, b_ref in twos:
            verdicts = judge(vary(lab, [a_ref.image, b_ref.image], weights=list(w), n=4, seed=seed))
            for k in ATTRIBUTES:
                if a_ref.attributes[k] != b_ref.attributes[k]:
                    counts[k] += [v[k] == b_ref.attributes[k] for v in verdicts]
        share.append({k: float(np.mean(c)) for k, c in counts.items() if c})
    gained = {k: share[1][k] - share[0][k] for k in share[1]}
    noise = 2 * math.sqrt(0.25 / (4 * pairs))
    top = max(gained.values())
    right = {k for k, g in gained.items() if g > noise and g >= top - 1e-9} or {"none"}
    table = ", ".join(f"{k} {g:+.2f}" for k, g in gained.items())
    if name not in right:
        raise NotYet(f"gains over the (1, 0) baseline: {table} (noise ~{noise:.2f}): "
                     + ("no gain exceeds the noise, so: 'none'" if right == {"none"} else
                        f"{name} is not the one that shows through most"))
    return f"gains over the baseline: {table} (noise ~{noise:.2f})"


# --- 05 Editing and alpha --------------------------------------------------------------------------------------

ALPHAS = (0.0, 0.3, 0.6, 0.9, 1.5, 2.5)


def _edit_references(target: dict, n: int = 12) -> list:
    """The solutions' references: the first n test samples that do not already have the edit's value."""
    (attribute, value), = target.items()
    return [s for s in samples(6 * n, "test", two_objects=0) if s.attributes[attribute] != value][:n]


def _shows(row: dict) -> float:
    return row[next(k for k in row if k.startswith("edit shows"))]


@_exercise("05", 1, "ex[1].check(alpha, lab): the right alpha for 'a disk on the left': the smallest of ALPHAS "
           "that shows the edit within 0.1 of the most any alpha shows; None if no alpha shows it in 30% of images",
           "E.alpha_experiment(lab, refs, 'a disk on the left', (0, 0.3, 0.6, 0.9, 1.5, 2.5), target={'position': "
           "'left'}, judge=judge, seed=0) with 12 test references not already on the left. The check reruns it.",
           """pick = best_alpha(results["a disk on the left"])
shows = next(k for k in pick if k.startswith("edit shows"))
ex[1].check(pick["alpha"] if pick[shows] >= 0.3 else None, lab)""")
def _position_alpha(answer, lab, text="a disk on the left", target=None, alphas=ALPHAS, seed=0, data=None) -> str:
    """The smallest alpha near the top of the 'edit shows' curve, from a rerun of E.alpha_experiment."""
    target = {"position": "left"} if target is None else target
    if answer is not None and not (isinstance(answer, str) and answer.lower() == "none"):
        alpha = _number(answer, "an alpha (or None)")
        if alpha not in alphas:
            raise NotYet(f"pick one of the sweep's alphas {alphas} (or None), got {alpha:g}")
    else:
        alpha = None
    data = _edit_references(target) if data is None else data
    rows, _ = E.alpha_experiment(lab, data, text, alphas, target=target, judge=_judge(lab), seed=seed)
    top = max(_shows(r) for r in rows)
    pick = min((r for r in rows if _shows(r) >= top - 0.1), key=lambda r: r["alpha"])
    want = pick["alpha"] if _shows(pick) >= 0.3 else None
    curve = ", ".join(f"{r['alpha']:g}: {_shows(r):.2f}" for r in rows)
    if alpha != want:
        raise NotYet(f"the edit shows at alpha {curve}: " + (
            "no alpha makes it in 30% of images, so: None" if want is None else
            f"the smallest alpha within 0.1 of the best is not {alpha}"))
    return f"the edit shows at alpha {curve}" + ("; this lab cannot move an object by an edit" if want is None else "")


@_exercise("05", 2, "ex[2].check(gain, lab): for 'a blue disk', how much more often the judge finds blue at alpha 0 "
           "(words only) than in plain variation of the same 12 references, seed 0",
           "At alpha 0: the first row of E.alpha_experiment(..., target={'colour': 'blue'}); plain: judge "
           "S.vary(lab, images, n=1, seed=0) and count colour == 'blue'. The gain is their difference.",
           """r = rows[0]   # "a blue disk"
ex[2].check(r["alpha 0 (words only)"] - r["variation (no text)"], lab)""")
def _words_alone(answer, lab, text="a blue disk", target=None, seed=0, data=None) -> str:
    """(edit shows at alpha 0) - (plain variation shows the value), both judged."""
    target = {"colour": "blue"} if target is None else target
    gain = _number(answer, "a difference of two fractions")
    (attribute, value), = target.items()
    judge, refs = _judge(lab), _edit_references(target) if data is None else data
    rows, _ = E.alpha_experiment(lab, refs, text, [0.0], target=target, judge=judge, seed=seed)
    plain = float(np.mean([v[attribute] == value for v in judge(vary(lab, [s.image for s in refs], n=1, seed=seed))]))
    want = _shows(rows[0]) - plain
    if abs(gain - want) > 1e-6:
        raise NotYet(f"not {gain:.3f}: the edit shows in {_shows(rows[0]):.2f} at alpha 0 and {value} in {plain:.2f} "
                     "of plain variations; subtract the second from the first")
    return f"the words alone add {want:+.2f}" + (" (a simple edit works at alpha 0, as App. C.1 says it can)"
                                                 if want >= 0.2 else ": here the end-token term is needed")


@_exercise("05", 3, "ex[3].check(prompt, lab, refs): the public code's padding rule built by hand, (B, 77, D), "
           "for the 12 reference images refs, 'a blue disk' and alpha 0.9",
           "pseudo = S.image_prompt_embeds(lab, refs) and f_txt, eos = S.encode_text(lab, [text] * B): from eos on, "
           "each position gets pseudo[:, 1:2] + alpha * f_txt (its own state), before eos f_txt; torch.where "
           "with positions = torch.arange(77)[None, :, None].",
           """pseudo = S.image_prompt_embeds(lab, refs)                                  # (B, 77, D)
f_txt, eos = S.encode_text(lab, [text] * len(refs))                        # (B, 77, D), (B,)
positions = torch.arange(lab.max_length)[None, :, None]                    # (1, 77, 1)
own = torch.where(positions >= eos[:, None, None], pseudo[:, 1:2] + alpha * f_txt, f_txt)  # padding: own states
ex[3].check(own, lab, refs)""")
def _own_padding(answer, lab, refs=None, text="a blue disk", alpha=0.9) -> str:
    """The hand-built prompt against S.edit_prompt_embeds(..., padding="own")."""
    refs = [s.image for s in _edit_references({"colour": "blue"})] if refs is None else refs
    want = edit_prompt_embeds(_lab(lab), refs, text, alpha=alpha, padding="own").double().cpu()  # (B, 77, D)
    prompt = _tensor(answer, want.shape, "(B, 77, D)")
    if _close(prompt, want, 1e-5):
        f_txt, eos = encode_text(lab, text)
        e = int(eos[0])
        cos = F.cosine_similarity(f_txt[0, e + 1:], f_txt[0, e][None], dim=-1)
        return (f"the public code's rule; its padding states have cosine {cos.min():.3f} to {cos.max():.3f} to the "
                "end token's, so the two rules differ little")
    if _close(prompt, edit_prompt_embeds(lab, refs, text, alpha=alpha, padding="end").double().cpu(), 1e-5):
        raise NotYet("this is Eq. 8 (the end token's state at every padding position); the public code adds each "
                     "position's own state f_txt[i]")
    bad = (prompt - want).abs().amax(dim=(0, 2))  # (77,)
    first = int((bad > 1e-5 * want.abs().max()).nonzero()[0])
    raise NotYet(f"differs from position {first} on: before the end token keep f_txt, from it on "
                 "pseudo[:, 1:2] + alpha * f_txt")
