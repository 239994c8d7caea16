"""The exercises of notebooks 00-03, on the converter itself: a first look at converted prompts, blends and edits
(00), which tokens the U-Net attends to (01), W_t's spectrum and the cutoff (02), the norm constant (03).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import experiments as E
from .attention import AttentionStore, installed
from .convert import convert, encode_text, image_embeds, image_prompt_embeds, inverse_projection
from .datasets import candidate_texts, references
from .exercises_kit import NotYet, _choice, _close, _exercise, _judge, _lab, _number, _student, _tensor
from .generate import edit, vary
from .measure import cutoff_sweep, nearest_texts
from .toyworld import sample as world_sample, samples
from .toyworld.judge import agreement


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
