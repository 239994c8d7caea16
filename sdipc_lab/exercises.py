"""Self-checking exercises for the notebooks: `check`, `hint` and `solution`, as in Kaggle Learn.

    from sdipc_lab.exercises import exercises
    ex = exercises("05")
    ex[3].check(my_prompt, lab)     # True or False, and one line: "Correct: ..." or "Not yet: ..."
    ex[3].hint(), ex[3].solution()

Every exercise asks for something concrete (a tensor, a function, a number, a choice among named options, a
training run's folder) and `check` compares it with a reference the package computes *at check time*, on the
lab passed in, so the checks stay right when the lab is retrained. Checks that rerun a judged measurement
generate the same images as the solutions notebook (same references, seeds and calls): they take as long as
that measurement. The worked answers stay in notebooks/solutions/, one section per exercise.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import experiments as E, latent_clip as LC, probing as P
from .attention import AttentionStore, installed
from .bars import in_notebook
from .convert import (convert, edit_prompt_embeds, encode_text, image_embeds, image_prompt_embeds,
                      inverse_projection)
from .datasets import candidate_texts, judge_for, references
from .generate import edit, sample, vary
from .lab import Lab
from .measure import cutoff_sweep, nearest_texts
from .toyworld import sample as world_sample, samples
from .toyworld.evaluate import prompt_conditions
from .toyworld.judge import agreement
from .toyworld.world import SHAPE_WORDS
from .training import checkpoint_signature

ATTRIBUTES = ("shape", "colour", "size", "position", "background")
SOLUTIONS = "notebooks/solutions"


class NotYet(Exception):
    """A wrong or malformed answer; its message says what is wrong and what to try."""


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One exercise: `check(answer, ...)` -> bool, `hint()`, `solution()` (each shows one message)."""

    notebook: str  # "05"
    number: int
    task: str  # what to pass to check, in one sentence
    hints: str
    code: str  # the worked answer, ending in its check
    checker: Callable[..., str]  # returns why the answer is right; raises NotYet

    def check(self, answer=inspect.Parameter.empty, *args, **kwargs) -> bool:
        """True when `answer` is right; shows "Correct: <why>" or "Not yet: <what is wrong and what to try>"."""
        try:
            if answer is inspect.Parameter.empty:
                raise NotYet(f"pass your answer: {self.task}")
            try:
                inspect.signature(self.checker).bind(answer, *args, **kwargs)
            except TypeError as error:
                raise NotYet(f"{error}; call it as {self.task}") from None
            why, ok = self.checker(answer, *args, **kwargs), True
        except NotYet as wrong:
            why, ok = str(wrong), False
        _show(f"{'Correct' if ok else 'Not yet'}: {why}")
        return ok

    def hint(self) -> None:
        _show(f"Hint ({self.notebook}, exercise {self.number}): {self.hints}")

    def solution(self) -> None:
        _show(f"**Solution ({self.notebook}, exercise {self.number})**, worked and measured in "
              f"`{_solutions_notebook(self.notebook)}`, section {self.number}:\n\n```python\n{self.code.strip()}\n```",
              markdown=True)

    def __repr__(self) -> str:
        return f"Exercise({self.notebook}, {self.number}): {self.task}"


REGISTRY: dict[tuple[str, int], Exercise] = {}


def exercises(notebook: str | int) -> dict[int, Exercise]:
    """The exercises of a notebook ("05", 5 or "05_editing_alpha"), by number."""
    key = f"{int(str(notebook).split('_')[0]):02d}" if str(notebook).split("_")[0].isdigit() else str(notebook)
    found = {n: ex for (nb, n), ex in sorted(REGISTRY.items()) if nb == key}
    if not found:
        raise ValueError(f"no exercises for notebook {notebook!r}; there are some for "
                         f"{sorted({nb for nb, _ in REGISTRY})}")
    return found


def _exercise(notebook: str, number: int, task: str, hint: str, code: str):
    def register(checker: Callable[..., str]) -> Callable[..., str]:
        REGISTRY[(notebook, number)] = Exercise(notebook, number, task, hint, code, checker)
        return checker
    return register


def _show(text: str, markdown: bool = False) -> None:
    """A Markdown (or plain) message in a notebook, print elsewhere; no global setting is changed."""
    if in_notebook():
        from IPython.display import Markdown, display
        display(Markdown(text) if markdown else {"text/plain": text}, raw=not markdown)
    else:
        print(text)


def _solutions_notebook(notebook: str) -> str:
    root = Path(__file__).resolve().parents[1] / SOLUTIONS
    found = sorted(root.glob(f"{notebook}_*_solutions.ipynb"))
    return f"{SOLUTIONS}/{found[0].name}" if found else f"{SOLUTIONS}/{notebook}_*_solutions.ipynb"


# --- validating answers: a clear "Not yet" instead of a traceback from deep inside torch ---------------------

def _tensor(answer, shape: tuple, what: str) -> torch.Tensor:
    """`answer` as a float64 CPU tensor of `shape`; `what` names the shape for the message, e.g. "(B, 77, D)"."""
    if isinstance(answer, np.ndarray):
        answer = torch.from_numpy(answer)
    if not isinstance(answer, torch.Tensor):
        raise NotYet(f"expected a {what} tensor {tuple(shape)}, got {type(answer).__name__}")
    if tuple(answer.shape) != tuple(shape):
        raise NotYet(f"expected a {what} tensor {tuple(shape)}, got shape {tuple(answer.shape)}")
    answer = answer.detach().to("cpu", torch.float64)
    if not torch.isfinite(answer).all():
        raise NotYet(f"your {what} tensor holds NaN or infinite values")
    return answer


def _number(answer, what: str) -> float:
    if isinstance(answer, torch.Tensor) and answer.numel() == 1 or isinstance(answer, (np.ndarray, np.generic)) \
            and answer.size == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real) or not math.isfinite(answer):
        raise NotYet(f"expected {what} (a number), got {answer!r:.80}")
    return float(answer)


def _choice(answer, options: Sequence[str], what: str) -> str:
    name = answer.strip().lower() if isinstance(answer, str) else None
    if name not in options:
        raise NotYet(f"expected {what}: one of {', '.join(map(repr, options))}; got {answer!r:.80}")
    return name


def _names(answer, options: Sequence[str], what: str) -> set[str]:
    """A list (or set) of names among `options`; "none" or [] for none."""
    if isinstance(answer, str):
        answer = [] if answer.strip().lower() == "none" else [answer]
    if not isinstance(answer, (list, tuple, set)):
        raise NotYet(f"expected {what}: a list of names among {', '.join(map(repr, options))}, got {answer!r:.80}")
    return {_choice(a, options, what) for a in answer}


def _close(answer: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> bool:
    return bool(torch.allclose(answer, want.detach().to("cpu", torch.float64), rtol=rtol,
                               atol=rtol * float(want.abs().max())))


def _lab(lab) -> Lab:
    if not isinstance(lab, Lab):
        raise NotYet(f"pass the lab as the second argument: check(answer, lab); got {type(lab).__name__}")
    return lab


def _judge(lab: Lab):
    judge = judge_for(_lab(lab))
    if judge is None:
        raise NotYet(f"this check reruns the toy world's judge, which reads only the teaching lab's images; "
                     f"{lab.source!r} does not draw that world: run it with SOURCE = 'toy'")
    return judge


def _student(fn: Callable, *args):
    """Call the student's function, reporting an error of theirs as Not yet."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 (any error of the student's code is the answer to report)
        raise NotYet(f"your function raised {type(error).__name__}: {str(error)[:200]}") from None


def _frac(x: float) -> str:
    return f"{x:.2f}"


# --- 00 Quickstart -------------------------------------------------------------------------------------------

@_exercise("00", 1, "ex[1].check(ratio, lab): ||f_cnvrt|| with norm_space='t' over ||f_cnvrt|| with 'c', for the "
           "quickstart's reference S.references(lab, 1, seed=0)[0]",
           "Convert the same f_img_c = S.image_embeds(lab, ref.image) twice with S.convert(..., norm_space=...) "
           "and compare the cosine and the lengths of the two vectors.",
           """f_img_c = S.image_embeds(lab, ref.image)
paper, public = (S.convert(lab, f_img_c, norm_space=space)[0].float() for space in ("c", "t"))
ex[1].check((public.norm() / paper.norm()).item(), lab)""")
def _quickstart_norm(answer, lab, image=None) -> str:
    """The ratio of the public code's f_cnvrt length to the paper's (the two have the same direction)."""
    image = references(_lab(lab), 1, seed=0)[0].image if image is None else image
    f_img_c = image_embeds(lab, image)  # (1, P)
    paper, public = (convert(lab, f_img_c, norm_space=space)[0].double().cpu() for space in ("c", "t"))  # (D,)
    want, cos = (public.norm() / paper.norm()).item(), F.cosine_similarity(paper, public, dim=0).item()
    ratio = _number(answer, "the ratio of the two lengths")
    if abs(ratio - 1 / want) <= 1e-3 / want and abs(want - 1) > 1e-3:
        raise NotYet("that is ||paper|| / ||public||: put the public code's ('t') length on top")
    if abs(ratio - want) > 1e-3 * want:
        raise NotYet(f"the lengths' ratio is not {ratio:.4g}: take the norms of S.convert(lab, f_img_c, "
                     "norm_space='t') and norm_space='c' (the same f_img_c) and divide")
    return (f"cosine {cos:.4f}: the same direction, and the lengths differ by {abs(want - 1):.1%}, so the images "
            f"{'barely change' if abs(want - 1) < 0.1 else 'change'} (notebook 03: the two norm constants)")


@_exercise("00", 2, "ex[2].check(prompt, lab, images=[a.image, b.image]): the blend's pseudo-prompt (1, 77, D), built "
           "by hand from S.image_embeds and S.pseudo_prompt (default images: toyworld.sample(11 and 12, 'test'))",
           "A blend is the weighted mean of the *unit* C-space embeddings, converted once: F.normalize(f_img_c, "
           "dim=-1), the weighted mean over images (keepdim), then S.pseudo_prompt. A negative image's "
           "pseudo-prompt is built the same way and takes the empty prompt's place in guidance.",
           """u = F.normalize(S.image_embeds(lab, [a.image, b.image]).double(), dim=-1)   # (2, P)
blended = S.pseudo_prompt(lab, (0.5 * u).sum(0, keepdim=True))                   # (1, 77, D)
ex[2].check(blended, lab, images=[a.image, b.image])""")
def _blend(answer, lab, images=None, weights=(0.5, 0.5)) -> str:
    """The pseudo-prompt of the weighted mean of the references' unit C-space embeddings."""
    if images is None:
        images = [world_sample(i, "test", two_objects=0).image for i in (11, 12)]
    want = image_prompt_embeds(_lab(lab), images, weights=list(weights)).double().cpu()  # (1, 77, D)
    prompt = _tensor(answer, want.shape, "(1, 77, D)")
    if _close(prompt, want):
        return ("one prompt from the weighted mean of unit embeddings: the blend mixes attributes (one object), "
                "not pixels; a negative image's pseudo-prompt replaces the empty prompt in guidance")
    cos = F.cosine_similarity(prompt[0, 1], want[0, 1], dim=0).item()
    if cos > 0.9999:
        raise NotYet(f"the right direction, {prompt[0, 1].norm() / want[0, 1].norm():.2f} times the length: "
                     "convert the *mean embedding* once (S.pseudo_prompt normalises it), rather than averaging "
                     "two pseudo-prompts")
    raise NotYet(f"position 1 points elsewhere (cosine {cos:.3f} to the blend's): blend the unit C-space "
                 "embeddings (F.normalize(S.image_embeds(...), dim=-1)), not pixels or raw embeddings")


@_exercise("00", 3, "ex[3].check(attribute, lab): which attribute of the reference ('shape', 'colour', 'position', "
           "'background') the judge still finds at the largest alpha, editing with 'a huge star'",
           "Edit the quickstart's reference with alpha in (0, 0.5, 0.9, 2), n=4, seed=0, and count with the judge "
           "how often each attribute still matches ref.attributes. The check reruns that (16 images).",
           """for alpha in (0.0, 0.5, 0.9, 2.0):
    verdicts = judge(S.edit(lab, ref.image, "a huge star", alpha=alpha, n=4, seed=0))
    ...   # share of verdicts whose v[k] == ref.attributes[k], per attribute
ex[3].check("position", lab)   # what the measurement says in the lab shipped""")
def _alpha_survivor(answer, lab, reference=None, text="a huge star", alphas=(0.0, 0.5, 0.9, 2.0), n=4,
                    seed=0) -> str:
    """The attribute kept (in at least half the images) up to the largest alpha; ties all count as right."""
    options = ("shape", "colour", "position", "background")
    name = _choice(answer, options, "an attribute")
    judge = _judge(lab)
    ref = references(lab, 1, seed=0)[0] if reference is None else reference
    kept = {k: [] for k in options}
    for alpha in alphas:
        verdicts = judge(edit(lab, ref.image, text, alpha=alpha, n=n, seed=seed))
        for k in options:
            kept[k].append(float(np.mean([v[k] == ref.attributes[k] for v in verdicts])))
    last = {k: max([i for i, f in enumerate(fs) if f >= 0.5], default=-1) for k, fs in kept.items()}
    best = [k for k in options if last[k] == max(last.values())]
    table = "; ".join(f"{k} " + "/".join(f"{f:.2f}" for f in fs) for k, fs in kept.items())
    if name not in best:
        raise NotYet(f"the judge keeps {name} only up to alpha {alphas[last[name]] if last[name] >= 0 else '-'}; "
                     f"kept at alphas {alphas}: {table}. Look for the one kept longest")
    return f"kept at alphas {alphas}: {table}; the words pull the shape first, the position lasts"


@_exercise("00", 4, "ex[4].check(cosine, lab): the mean cosine of the converted prompts of S.references(lab, 4, "
           "kind='photos') to their nearest world caption",
           "For each photograph: f_cnvrt = S.image_prompt_embeds(lab, r.image)[0, 1], then "
           "S.nearest_texts(lab, f_cnvrt, S.candidate_texts(lab), k=1)[0]['cosine']; average over the four.",
           """cos = {kind: np.mean([r["cosine"] for r in rows if r["kind"] == kind]) for kind in ("photograph", "toy world")}
ex[4].check(cos["photograph"], lab)""")
def _photos_nearest(answer, lab) -> str:
    """How close a photograph's converted prompt comes to anything the teaching lab can say."""
    texts = candidate_texts(_lab(lab))

    def mean_nearest(refs) -> float:
        return float(np.mean([nearest_texts(lab, image_prompt_embeds(lab, r.image)[0, 1], texts, k=1)[0]["cosine"]
                              for r in refs]))

    photos, world = mean_nearest(references(lab, 4, kind="photos")), mean_nearest(references(lab, 4))
    cos = _number(answer, "a mean cosine")
    if abs(cos - world) <= 0.005 < abs(cos - photos):
        raise NotYet("that is the world's own images' value: take S.references(lab, 4, kind='photos')")
    if abs(cos - photos) > 0.005:
        raise NotYet(f"not {cos:.3f}: for each photograph take the nearest caption's cosine (k=1) of "
                     "S.image_prompt_embeds(lab, photo)[0, 1], and average the four")
    return (f"photographs {photos:.2f} vs the world's images {world:.2f}: the lab answers in the only words it has, "
            f"{'farther from' if photos < world else 'no farther from'} any caption than its own world")


def _pentagon() -> Image.Image:
    image = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(image).regular_polygon((64, 64, 32), 5, fill=(40, 160, 60))
    return image


@_exercise("00", 5, "ex[5].check(caption, lab): the world caption nearest to the converted prompt of a drawn "
           "pentagon (default: a green pentagon, radius 32, on a 128 px white canvas, as in the solution)",
           "ImageDraw.Draw(image).regular_polygon((64, 64, 32), 5, fill=...), then S.nearest_texts(lab, "
           "S.image_prompt_embeds(lab, image)[0, 1], S.candidate_texts(lab), k=3).",
           """near = S.nearest_texts(lab, S.image_prompt_embeds(lab, pentagon)[0, 1], S.candidate_texts(lab), k=3)
ex[5].check(near[0]["text"], lab)""")
def _pentagon_caption(answer, lab, image=None) -> str:
    """The nearest caption the lab can write, for a shape it has no word for."""
    texts = candidate_texts(_lab(lab))
    if not isinstance(answer, str):
        raise NotYet(f"expected a caption (a str from S.candidate_texts(lab)), got {type(answer).__name__}")
    f_cnvrt = image_prompt_embeds(lab, _pentagon() if image is None else image)[0, 1]  # (D,)
    near = nearest_texts(lab, f_cnvrt, texts, k=1)[0]
    if answer not in texts:
        raise NotYet(f"{answer!r:.60} is no caption this lab can write"
                     + (" — it has no word 'pentagon'" if "pentagon" in answer.lower() else "")
                     + ": pick the nearest of S.candidate_texts(lab)")
    mine = nearest_texts(lab, f_cnvrt, [answer], k=1)[0]["cosine"]
    if mine < near["cosine"] - 0.002:
        raise NotYet(f"{answer!r} has cosine {mine:.3f}; a nearer caption reaches {near['cosine']:.3f}: sort all "
                     "of S.candidate_texts(lab) with S.nearest_texts")
    return (f"{near['text']!r} (cosine {near['cosine']:.2f}): the converted prompt is a text-encoder state, and "
            "this text encoder knows six shape words, none of them 'pentagon'")


# --- 01 EOS masking --------------------------------------------------------------------------------------------

@_exercise("01", 1, "ex[1].check(mask, lab, captions): a (B, 77) mask, 1 = keep, that keeps start, words and the "
           "end token and masks only the padding",
           "token_mask(lab, captions, 'sos+words') keeps start and words; the end token sits at eos "
           "(S.encode_text(lab, captions)[1]) and the padding starts at eos + 1: compare torch.arange(77) with eos.",
           """_, eos = S.encode_text(lab, captions)                       # (N,)
mask = (torch.arange(lab.max_length)[None] <= eos[:, None]).float()   # (N, 77)
ex[1].check(mask, lab, captions)""")
def _padding_mask(answer, lab, captions) -> str:
    """The padding-only mask: position i is kept iff i <= the caption's end-token position."""
    if isinstance(captions, str):
        captions = [captions]
    _, eos = encode_text(_lab(lab), list(captions))  # (B,)
    want = (torch.arange(lab.max_length)[None] <= eos.cpu()[:, None]).double()  # (B, 77)
    mask = _tensor(answer, want.shape, "(B, 77)")
    if not ((mask == 0) | (mask == 1)).all():
        raise NotYet("a token mask holds 1 (keep) and 0 (mask) only")
    if torch.equal(mask, want):
        return "start, words and the end token kept, the padding (eos + 1 on) masked"
    row = int((mask != want).any(1).nonzero()[0])
    wrong = (mask[row] != want[row]).nonzero().flatten().tolist()
    if torch.equal(mask, (torch.arange(lab.max_length)[None] < eos.cpu()[:, None]).double()):
        raise NotYet("this masks the end token too (the 'sos+words' control): keep position eos, mask from eos + 1")
    raise NotYet(f"caption {row} differs at positions {wrong[:8]}{'...' if len(wrong) > 8 else ''} (its end token "
                 f"is at {int(eos[row])}): keep 0..eos, mask eos + 1..{lab.max_length - 1}")


def _two_objects() -> list[str]:
    return [s.caption for s in samples(6, "test", two_objects=1.0)]


@_exercise("01", 2, "ex[2].check(share, lab): the mean share of each pixel's attention output that mode='post' "
           "keeps on six two-object captions (samples(6, 'test', two_objects=1.0)), i.e. 1 - the words' share",
           "maps, _ = E.attention_maps(lab, texts, seed=0) is (B, 77, 16, 16); the words are positions 1..eos-1; "
           "sum their maps, average over pixels and captions. post zeroes that share, pre hands it to the rest.",
           """word_share = torch.stack([maps[i, 1:e].sum(0).mean() for i, e in enumerate(S.encode_text(lab, texts)[1])])
ex[2].check(1 - word_share.mean().item(), lab)""")
def _post_keeps(answer, lab, captions=None, seed=0, steps=None) -> str:
    """1 - the words' mean share of cross-attention, from the package's attention maps."""
    captions = _two_objects() if captions is None else list(captions)
    maps, _ = E.attention_maps(_lab(lab), captions, seed=seed, steps=steps)  # (B, 77, 16, 16)
    _, eos = encode_text(lab, captions)
    words = torch.stack([maps[i, 1:e].sum(0).mean() for i, e in enumerate(eos.tolist())]).mean().item()
    share = _number(answer, "a share between 0 and 1")
    if abs(share - words) < 1e-3 and abs(words - 0.5) > 1e-3:
        raise NotYet("that is the words' share, the part post *removes*; give what it keeps (1 - that)")
    if abs(share - (1 - words)) > 1e-3:
        raise NotYet(f"not {share:.3f}: sum the maps of positions 1..eos-1 (the words), average over pixels and "
                     "captions, and take 1 minus it")
    return (f"post keeps {1 - words:.0%} of each pixel's attention output, pre keeps 100% (renormalised over the "
            "start, end and padding tokens): renormalising matters as much as the words' share")


class _PerStep:
    """Hands `add` to one AttentionStore per denoising step (the pipeline's callback opens the next)."""

    def __init__(self):
        self.steps = [AttentionStore()]

    def add(self, probs):  # (2B, HW, 77)
        self.steps[-1].add(probs)

    def next_step(self, pipe, i, t, kwargs):
        self.steps.append(AttentionStore())
        return kwargs


@_exercise("01", 3, "ex[3].check(shares, lab, caption): the start token's share of the conditional attention at "
           "each denoising step (one number per step) for one caption, seed 0",
           "An object with add(probs) forwarding to the current step's AttentionStore, and "
           "callback_on_step_end that opens the next; run lab.pipe(prompt_embeds=..., cross_attention_kwargs="
           "{'store': per_step}) inside attention.installed(lab), and read store.maps()[-1][0].mean().",
           """shares = [r["start"] for r in rows]   # one per step, from the per-step stores
ex[3].check(shares, lab, caption)""")
def _start_share(answer, lab, caption=None, seed=0, steps=None) -> str:
    """Per step: the mean (over pixels) attention weight of the start token, conditional branch."""
    caption = samples(12, "test", two_objects=0)[0].caption if caption is None else caption
    per_step = _PerStep()
    f_txt, _ = encode_text(_lab(lab), caption)
    with installed(lab):
        lab.pipe(prompt_embeds=f_txt, num_inference_steps=steps or lab.steps, guidance_scale=lab.guidance_scale,
                 generator=torch.Generator("cpu").manual_seed(seed), cross_attention_kwargs={"store": per_step},
                 callback_on_step_end=per_step.next_step)
    want = [s.maps()[-1][0].mean().item() for s in per_step.steps if s.calls]  # (steps,)
    if not isinstance(answer, (list, tuple, np.ndarray, torch.Tensor)):
        raise NotYet(f"expected a list of {len(want)} shares (one per step), got {type(answer).__name__}")
    shares = [_number(x, "a share") for x in answer]
    if len(shares) != len(want):
        raise NotYet(f"expected one share per denoising step ({len(want)}), got {len(shares)}")
    off = [i for i, (a, b) in enumerate(zip(shares, want)) if abs(a - b) > 2e-3]
    if off:
        raise NotYet(f"step {off[0]}: {shares[off[0]]:.3f}, measured {want[off[0]]:.3f}: take the conditional "
                     "row (maps()[-1]) of that step's store, token 0, averaged over pixels")
    return f"the start token holds {want[0]:.2f} of the attention at the first step and {want[-1]:.2f} at the last"


# --- 02 The spectrum and the cutoff ---------------------------------------------------------------------------

@_exercise("02", 1, "ex[1].check(rank, lab): the knee, the smallest rank whose cos(f_cnvrt, true EOS) is within 0.01 "
           "of the best, over samples(48, 'test', two_objects=0)",
           "A cutoff just below a singular value keeps exactly that many: cutoffs = [0, *(0.999 * s[::step])], "
           "step = max(1, len(s) // 32); E.cutoff_experiment gives 'rank' and 'cos(f_cnvrt, true EOS)'.",
           """best = max(sweep, key=lambda r: r["cos(f_cnvrt, true EOS)"])
knee = min((r for r in sweep if r["cos(f_cnvrt, true EOS)"] >= best["cos(f_cnvrt, true EOS)"] - 0.01),
           key=lambda r: r["rank"])
ex[1].check(knee["rank"], lab)""")
def _knee(answer, lab, data=None) -> str:
    """The knee of the cosine-against-rank curve, within the sweep's step of ranks."""
    data = samples(48, "test", two_objects=0) if data is None else data
    s = E.spectrum(_lab(lab))  # (K,) descending
    step = max(1, len(s) // 32)
    sweep = cutoff_sweep(lab, [d.image for d in data], [d.caption for d in data],
                         [0.0, *(float(v) * 0.999 for v in s[::step])])
    best = max(r["cosine"] for r in sweep)
    knee = min(r["rank"] for r in sweep if r["cosine"] >= best - 0.01)
    rank = _number(answer, "a rank")
    if rank != int(rank) or not 1 <= rank <= len(s):
        raise NotYet(f"a rank is a whole number from 1 to {len(s)}, got {rank:g}")
    if abs(rank - knee) > step:
        raise NotYet(f"the cosine is within 0.01 of its best ({best:.3f}) from rank {knee} on, not {int(rank)}: "
                     "take the *smallest* such rank")
    return f"from rank {knee} of {len(s)} on, more rank adds less than 0.01 of cosine (best {best:.3f})"


@_exercise("02", 2, "ex[2].check(tikhonov, lab): a function tikhonov(lam) (or tikhonov(W, lam)) returning "
           "W_t^T (W_t W_t^T + lam I)^{-1}, (D, P), for the lab's W_t",
           "W = lab.W_t.detach().double().cpu() is (P, D): W.T @ torch.linalg.inv(W @ W.T + lam * torch.eye(P)). "
           "At lam -> 0 it is torch.linalg.pinv(W).",
           """W = lab.W_t.detach().double().cpu()                                     # (P, D)
def tikhonov(lam):                                                        # (D, P)
    return W.T @ torch.linalg.inv(W @ W.T + lam * torch.eye(W.shape[0], dtype=W.dtype))
ex[2].check(tikhonov, lab)""")
def _tikhonov(answer, lab) -> str:
    """The student's function against the SVD form V diag(s / (s^2 + lam)) U^T, at three lambdas."""
    if not callable(answer):
        raise NotYet(f"expected a function tikhonov(lam) -> (D, P) tensor, got {type(answer).__name__}")
    W = _lab(lab).W_t.detach().double().cpu()  # (P, D)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    takes_w = len(inspect.signature(answer).parameters) >= 2
    for lam in (float(s.min() ** 2), float(s.median() ** 2), float(s.max() ** 2)):
        want = (Vh.T * (s / (s**2 + lam))) @ U.T  # (D, P)
        got = _tensor(_student(answer, *((lab.W_t, lam) if takes_w else (lam,))), want.shape, "(D, P)")
        if _close(got, want, 1e-5):
            continue
        if _close(got, want.T, 1e-5):
            raise NotYet("that is the transpose: W_t^T (W_t W_t^T + lam I)^{-1} maps C-space (P) to T-space (D)")
        if _close(got, torch.linalg.pinv(W), 1e-5):
            raise NotYet(f"at lam = {lam:.3g} this is the plain pseudo-inverse: lam must shrink each direction by "
                         "s / (s^2 + lam)")
        raise NotYet(f"at lam = {lam:.3g} it differs from W_t^T (W_t W_t^T + lam I)^(-1) by "
                     f"{(got - want).abs().max():.3g} (max): check the order of the products and where lam goes")
    return "it shrinks each singular direction by s / (s^2 + lam) instead of keeping (1/s) or dropping it"


@_exercise("02", 3, "ex[3].check(count, lab): how many singular values of W_t are <= 0.3 on SD v1.4 (this check "
           "answers it with the SD v1.4 lab; on another lab it checks that lab's count at its own cutoff)",
           "s = E.spectrum(lab) with SOURCE = 'sd-v1-4' (a GPU and its weights): count s <= 0.3.",
           """s = E.spectrum(lab)
cutoff = 0.3 if lab.source.startswith("sd-") else lab.cutoff
ex[3].check(int((s <= cutoff).sum()), lab)""")
def _sd_spectrum(answer, lab) -> str:
    """The count of singular values <= 0.3 (SD v1.4) or <= the lab's own cutoff (any other lab, said so)."""
    s = E.spectrum(_lab(lab))
    sd = lab.source.startswith("sd-")
    cutoff = 0.3 if sd else lab.cutoff
    want = int((s <= cutoff).sum())
    count = _number(answer, "a count")
    if count == len(s) - want and count != want:
        raise NotYet(f"that counts the values *above* {cutoff:g}; count s <= {cutoff:g}")
    if count != want:
        raise NotYet(f"not {count:g} for {lab.source!r}: count E.spectrum(lab) <= {cutoff:g}")
    if sd:
        return f"{want} of ViT-L/14's {len(s)} singular values are <= 0.3: what the paper's cutoff drops"
    return (f"for this lab ({lab.source!r}: {want} of {len(s)} <= its cutoff {cutoff:g}). The exercise asks about "
            "SD v1.4, which this check answers only with that lab: SOURCE = 'sd-v1-4' on a GPU")


# --- 03 The norm constant --------------------------------------------------------------------------------------

NORM_MODULES = {
    "final_layer_norm": None,
    "text_projection": "it maps T-space to C-space after the end state is made; its stretching is why the C-space "
                       "norm varies more",
    "token_embedding": "the embeddings are the input; twelve layers and a normalisation come after them",
    "position_embedding": "position embeddings are added at the input, long before the last state",
    "encoder": "the transformer layers change the norm freely; what comes after them does not",
}


@_exercise("03", 1, "ex[1].check(name): which module of lab.text_encoder.text_model fixes the T-space norm? One of "
           + ", ".join(map(repr, NORM_MODULES)),
           "A layer norm outputs gamma * x_hat + beta with ||x_hat|| = sqrt(D) whatever the input: find it in "
           "print(lab.text_encoder.text_model).",
           """ex[1].check("final_layer_norm")""")
def _norm_module(answer, lab=None) -> str:
    """The module whose normalisation fixes ||f_txt^eos|| up to gamma and beta."""
    if isinstance(answer, torch.nn.LayerNorm):
        answer = "final_layer_norm"
    why = NORM_MODULES[_choice(answer, list(NORM_MODULES), "a module name")]
    if why is not None:
        raise NotYet(f"not {answer}: {why}")
    return ("the end-token state leaves final_layer_norm as gamma * x_hat + beta, ||x_hat|| = sqrt(D) for every "
            "caption: only its direction moves the norm, through gamma and beta")


@_exercise("03", 2, "ex[2].check(spread, lab): the relative spread (std / mean) of ||W_t^+ u|| over the unit "
           "embeddings u of samples(64, 'test', two_objects=0), with cutoff=0 (the plain pseudo-inverse)",
           "u = F.normalize(S.image_embeds(lab, images).double(), dim=-1); lengths = (u @ "
           "S.inverse_projection(lab, 0.0).matrix.double().T).norm(dim=-1); spread = lengths.std() / lengths.mean().",
           """lengths = (u @ S.inverse_projection(lab, 0.0).matrix.double().cpu().T).norm(dim=-1)
ex[2].check((lengths.std() / lengths.mean()).item(), lab)""")
def _pinv_spread(answer, lab, images=None) -> str:
    """std / mean of ||W_t^+ u|| at cutoff 0, against the same at the lab's cutoff for the message."""
    images = [s.image for s in samples(64, "test", two_objects=0)] if images is None else images
    u = F.normalize(image_embeds(_lab(lab), images).double().cpu(), dim=-1)  # (N, P)

    def spread(cutoff: float) -> float:
        lengths = (u @ inverse_projection(lab, cutoff).matrix.double().cpu().T).norm(dim=-1)  # (N,)
        return (lengths.std() / lengths.mean()).item()

    plain, kept = spread(0.0), spread(lab.cutoff)
    got = _number(answer, "a relative spread")
    if abs(got - kept) <= 1e-3 * kept < abs(got - plain):
        raise NotYet("that is the spread with the lab's cutoff: use S.inverse_projection(lab, 0.0)")
    if abs(got - plain) > 1e-3 * plain + 1e-9:
        raise NotYet(f"not {got:.4g}: the std over the mean of ||W_t^+ u|| for unit u, at cutoff 0")
    return (f"plain pinv spreads ||W_t^+ u|| by {plain:.0%} ({kept:.0%} with the lab's cutoff): the paper's "
            "convention passes it on to f_cnvrt, the public code's (norm_space='t') rescales the output, so it is "
            "the safer one without a cutoff")


@_exercise("03", 3, "ex[3].check(scale, lab): the smallest of the scales (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0) of "
           "the paper's norm at which the judge finds the reference's colour at least 80% as often as at 1, over "
           "samples(12, 'test', two_objects=0), seed 0",
           "E.norm_experiment(lab, data, scales=..., judge=judge, seed=0): keep the 'paper (C-space)' rows, take "
           "'judge colour' at scale 1 and the smallest scale reaching 0.8 of it. The check reruns it (~1 minute).",
           """at_one = next(r for r in sweep if r["scale"] == 1.0)["judge colour"]
ex[3].check(min(r["scale"] for r in sweep if r["judge colour"] >= 0.8 * at_one), lab)""")
def _smallest_norm(answer, lab, data=None, scales=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), seed=0) -> str:
    """Reruns the paper-convention half of E.norm_experiment, from the smallest scale up until one passes."""
    judge = _judge(lab)
    scale = _number(answer, "a scale")
    if scale not in scales:
        raise NotYet(f"pick one of the sweep's scales {scales}, got {scale:g}")
    data = samples(12, "test", two_objects=0) if data is None else data
    images, truths = [s.image for s in data], [s.attributes for s in data]

    def colour(x: float) -> float:
        out = vary(lab, images, n=1, seed=seed, norm=lab.norm * x, norm_space="c")
        return agreement(judge(out), truths)["colour"]

    at_one = colour(1.0)
    found = {}
    for x in sorted(scales):
        found[x] = colour(x) if x != 1.0 else at_one
        if found[x] >= 0.8 * at_one:
            break
    want = x
    if scale != want:
        raise NotYet(f"judge colour {at_one:.2f} at the lab's norm; " + ", ".join(
            f"{v:.2f} at x{k:g}" for k, v in found.items()) + f": the smallest scale keeping 80% of it is not {scale:g}")
    return (f"down to x{want:g} (norm {lab.norm * want:.3g}) the judge still finds the colour ({found[want]:.2f} vs "
            f"{at_one:.2f} at x1)")


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
