"""Image variation, editing and text-to-image, all through the stock `StableDiffusionPipeline`.

SD-IPC needs no sampler of its own: the pseudo-prompt goes in as `prompt_embeds`, a negative
image's pseudo-prompt as `negative_prompt_embeds`, and the pipeline's own empty-prompt embedding
is the unconditional branch otherwise. The initial noise comes from a CPU generator seeded with
`seed`, so the same seed gives the same images on the same machine, on any device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Sequence

import torch

from .adapters import applied
from .bars import TextLine, in_notebook, bar as progress_bar
from .convert import edit_prompt_embeds, encode_text, image_prompt_embeds
from .cpus import limit_threads
from .images import as_rgb_images
from .lab import Lab


def whole_number(name: str, value, *, low: int, high: int | None = None) -> int:
    """`value` as an int (NumPy integers too), or a ValueError naming `name` and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high and value > high):
        span = f">= {low}" + (f" and <= {high}" if high else "")
        raise ValueError(f"{name} must be a whole number {span}, got {value!r}")
    return int(value)


def real_number(name: str, value) -> float:
    """`value` as a float (NumPy scalars too), or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


_overall = contextvars.ContextVar("sdipc_lab_overall_bar", default=None)


@contextlib.contextmanager
def progress(total: int, desc: str):
    """One progress bar over many generation calls: each `sample` (so each vary / edit / generate) inside the
    block ticks it once. The pipeline's own per-call bar is off (`assemble`): a notebook shows one bar per
    experiment, not one per call. In a notebook the bar is a line of plain text that removes itself when the
    block ends (an empty output is left, shown as nothing) and stays, where it stopped, if the block fails:
    nothing is saved that needs the kernel to be drawn (`TextLine`)."""
    line = TextLine() if total and in_notebook() else None  # kept, to blank it when the block ends
    bar = progress_bar(total=total, desc=desc, disable=total == 0, **({"file": line} if line is not None else {}))
    token = _overall.set(bar)
    failed = True
    try:
        yield bar
        failed = False
    finally:
        _overall.reset(token)
        bar.close()
        if line is not None and line.handle is not None and not failed:
            line.show("")  # the finished bar removes itself; an interrupted one stays where it stopped


SETTINGS = ("steps", "guidance_scale", "guidance_rescale", "height", "width")  # a call's sampler settings


def sample(lab: Lab, prompt_embeds: torch.Tensor, *, negative_prompt_embeds: torch.Tensor | None = None,
           n: int = 4, seed: int = 0, cross_attention_kwargs: dict | None = None, output_type: str = "pil",
           **settings):
    """Generate `n` images per prompt from prompt embeddings (B, 77, D); returns a flat list (B * n).

    `settings`, each defaulting to the lab's own: steps, guidance_scale, guidance_rescale, and height / width in
    pixels (the lab's `size`, by default its U-Net's own: 512 on SD v1.4, where 256 is ~4x cheaper)."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown sampler setting(s) {sorted(unknown)}: use {', '.join(SETTINGS)}")
    get = lambda key, default: default if settings.get(key) is None else settings[key]  # noqa: E731
    n = whole_number("n (images per prompt)", n, low=1)
    steps = whole_number("steps", get("steps", lab.steps), low=1)
    seed = whole_number("seed", seed, low=0, high=2**63 - 1)
    guidance_scale = real_number("guidance_scale", get("guidance_scale", lab.guidance_scale))
    guidance_rescale = real_number("guidance_rescale", get("guidance_rescale", lab.guidance_rescale))
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be between 0 (off) and 1, got {guidance_rescale}")
    factor = max(8, lab.pipe.vae_scale_factor)  # the pipeline's own rule, and the VAE's downsampling
    height, width = (whole_number(k, get(k, lab.size or lab.image_size), low=factor) for k in ("height", "width"))
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height} x {width}")
    if negative_prompt_embeds is not None and guidance_scale <= 1:
        raise ValueError(f"negative images act through guidance, and guidance_scale {guidance_scale} <= 1 turns it "
                         "off: they would be ignored. Raise guidance_scale, or drop negative_images.")
    B = len(prompt_embeds)
    if negative_prompt_embeds is not None and len(negative_prompt_embeds) == 1 and B > 1:
        negative_prompt_embeds = negative_prompt_embeds.expand(B, -1, -1)
    generator = torch.Generator("cpu").manual_seed(seed)
    with limit_threads(lab.threads):
        result = lab.pipe(
            prompt_embeds=prompt_embeds.to(lab.device, lab.dtype),
            negative_prompt_embeds=None if negative_prompt_embeds is None else negative_prompt_embeds.to(lab.device, lab.dtype),
            num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, height=height, width=width, generator=generator,
            output_type=output_type, cross_attention_kwargs=cross_attention_kwargs,
        )
    if (bar := _overall.get()) is not None:
        bar.update(1)
    return list(result.images) if output_type == "pil" else result.images


def vary(lab: Lab, images, *, n: int = 4, seed: int = 0, negative_images=None, weights: Sequence[float] | None = None,
         cutoff: float | None = None, norm: float | None = None, norm_space: str = "c", finetuned=None,
         **settings) -> list:
    """SD-IPC image variation: `n` images for each reference image (or for their blend, with `weights`).

    `negative_images` are converted the same way (blended into one) and steer generation away.
    `finetuned` (from `sdipc_lab.finetune`, or the path of its file) applies SD-IPC-FT/CT for this call.
    `settings`: the sampler's (`sample`). Returns a flat list of PIL images, reference by reference.
    """
    convert_kwargs = dict(cutoff=cutoff, norm=norm, norm_space=norm_space)
    with applied(lab, finetuned):
        prompt = image_prompt_embeds(lab, images, weights=weights, **convert_kwargs)  # (B, 77, D)
        negative = _negative(lab, negative_images, convert_kwargs)
        return sample(lab, prompt, negative_prompt_embeds=negative, n=n, seed=seed, **settings)


def edit(lab: Lab, image, text: str, *, alpha: float = 0.9, padding: str = "end", n: int = 4, seed: int = 0,
         negative_images=None, cutoff: float | None = None, norm: float | None = None, norm_space: str = "c",
         finetuned=None, **settings) -> list:
    """SD-IPC editing (Eq. 8): `n` images of the reference image changed by `text`, strength `alpha`.
    `padding`: "end" (Eq. 8) or "own" (the public code's), as in `edit_prompt_embeds`.
    `settings`: the sampler's (`sample`)."""
    convert_kwargs = dict(cutoff=cutoff, norm=norm, norm_space=norm_space)
    with applied(lab, finetuned):
        prompt = edit_prompt_embeds(lab, image, text, alpha=alpha, padding=padding, **convert_kwargs)  # (B, 77, D)
        negative = _negative(lab, negative_images, convert_kwargs)
        return sample(lab, prompt, negative_prompt_embeds=negative, n=n, seed=seed, **settings)


def generate(lab: Lab, prompts: str | Sequence[str], *, n: int = 4, seed: int = 0,
             cross_attention_kwargs: dict | None = None, finetuned=None, **settings) -> list:
    """Plain text-to-image with the same pipeline, steps and noise: the reference SD-IPC is compared with.
    `finetuned`, as in `vary` (a Custom Diffusion file brings its new token's word). `settings`: the sampler's."""
    with applied(lab, finetuned):
        f_txt, _ = encode_text(lab, prompts)  # (B, 77, D), refuses texts over 77 tokens
        return sample(lab, f_txt, n=n, seed=seed, cross_attention_kwargs=cross_attention_kwargs, **settings)


def _negative(lab: Lab, negative_images, convert_kwargs: dict) -> torch.Tensor | None:
    if negative_images is None:
        return None
    negatives = as_rgb_images(negative_images)
    return image_prompt_embeds(lab, negatives, weights=[1.0] * len(negatives), **convert_kwargs)  # (1, 77, D)
