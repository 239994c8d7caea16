"""A lab's components one at a time: the class each is loaded with, `quiet()` around the libraries' reports,
the checks that a folder's weights are those its config builds and that the parts fit together, and the stock
pipeline over them.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch


def _component_class(part: str, where: str, subfolder: str | None, local_only: bool):
    import diffusers
    import transformers

    fixed = {
        "tokenizer": transformers.CLIPTokenizer,
        "text_encoder": transformers.CLIPTextModelWithProjection,
        "image_encoder": transformers.CLIPVisionModelWithProjection,
        "feature_extractor": transformers.CLIPImageProcessorPil,
        "unet": diffusers.UNet2DConditionModel,
        "vae": diffusers.AutoencoderKL,
    }
    if part in fixed:
        return fixed[part]
    # The scheduler's class is whatever the folder says (SD v1.4 ships PNDM, the toy lab DDIM).
    config = diffusers.DDIMScheduler.load_config(where, subfolder=subfolder, local_files_only=local_only)
    name = config.get("_class_name", "")
    if not name.endswith("Scheduler") or not hasattr(diffusers, name):
        raise ValueError(f"{where}: scheduler class {name!r} is not a diffusers scheduler")
    return getattr(diffusers, name)


@contextlib.contextmanager
def quiet():
    """Silence the libraries' load reports and shard bars while a lab is loaded or saved.

    (The CLIP checkpoint holds both towers; loading one reports the other's keys as unexpected.)
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    t_level, d_level = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # the user's own warning filters come back on exit
            # diffusers passes the hub client an argument it has deprecated, on every hub load: nothing to act on.
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield
    finally:
        transformers_logging.set_verbosity(t_level)
        diffusers_logging.set_verbosity(d_level)
        if bars:
            transformers_logging.enable_progress_bar()


# The file each component's folder describes itself with (the tokenizer is checked by its vocabulary).
CONFIG_FILES = {"text_encoder": "config.json", "image_encoder": "config.json", "unet": "config.json",
                "vae": "config.json", "scheduler": "scheduler_config.json",
                "feature_extractor": "preprocessor_config.json"}


def check_weights(part: str, model: torch.nn.Module, folder: Path) -> None:
    """The weights in `folder` (its .safetensors files) must be exactly those its config builds, all finite: the
    libraries fill a missing tensor with random numbers and load NaNs without a word. A ValueError names the file
    and the tensors otherwise."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    stored = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            stored.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    state = model.state_dict()
    expected = {key: tuple(value.shape) for key, value in state.items()}
    problems = []
    for what, keys in (("missing", sorted(set(expected) - set(stored))),
                       ("unexpected", sorted(set(stored) - set(expected))),
                       ("of another shape than the config's",
                        sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])),
                       ("not finite (NaN or infinite values)",
                        sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()))):
        if keys:
            problems.append(f"{len(keys)} tensor(s) {what}: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else ""))
    if problems:
        where = ", ".join(str(f) for f in files) or f"{folder} (no .safetensors file)"
        raise ValueError(f"the lab's {part} weights in {where} do not match its config.json: " + "; ".join(problems)
                         + ". The lab would run with random or broken weights there: restore the file, or re-save "
                         "the lab with sdipc_lab.save_lab.")


def _kind_of(component) -> str | None:
    """Which of the lab's model components `component` can stand in for, by what the lab calls on it: the VAE's
    encode/decode, the U-Net's cross-attention, the text and image towers' projections (W_t, W_i)."""
    config = getattr(component, "config", None)
    if hasattr(component, "encode") and hasattr(component, "decode") and hasattr(config, "latent_channels"):
        return "vae"
    if hasattr(config, "cross_attention_dim") and not hasattr(component, "decode"):
        return "unet"
    if hasattr(component, "text_projection"):
        return "text_encoder"
    if hasattr(component, "visual_projection"):
        return "image_encoder"
    return None


def check_consistent(parts: dict) -> None:
    """The tokenizer, the text tower and the U-Net must agree, or results are silently wrong."""
    tok, text = parts["tokenizer"], parts["text_encoder"].config
    problems = []
    if tok.model_max_length != text.max_position_embeddings:
        problems.append(f"tokenizer pads to {tok.model_max_length} tokens, the text encoder has "
                        f"{text.max_position_embeddings} positions")
    if len(tok) > text.vocab_size:
        problems.append(f"tokenizer has {len(tok)} tokens, the text encoder's vocabulary {text.vocab_size}")
    # ViT-L/14's config carries the legacy eos_token_id 2, for which transformers pools at the highest id:
    # right while the end token is the last of the vocabulary. (sdipc_lab finds the end token itself.)
    legacy = text.eos_token_id == 2 and tok.eos_token_id == max(tok.get_vocab().values())
    if tok.eos_token_id != text.eos_token_id and not legacy:
        problems.append(f"eos_token_id: tokenizer {tok.eos_token_id}, text encoder config {text.eos_token_id}")
    if parts["unet"].config.cross_attention_dim != text.hidden_size:
        problems.append(f"U-Net cross-attends to width {parts['unet'].config.cross_attention_dim}, "
                        f"the text encoder is {text.hidden_size} wide")
    if problems:
        raise ValueError("the lab's components do not fit together: " + "; ".join(problems))


def _pipeline(parts: dict):
    """The stock `StableDiffusionPipeline` over a lab's components (no safety checker: the images are a lab's)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"].text_model, tokenizer=parts["tokenizer"],
        unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)  # experiments show one bar over many calls (generate.progress)
    return pipe
