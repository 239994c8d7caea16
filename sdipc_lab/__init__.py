"""sdipc_lab: how CLIP drives Stable Diffusion, measured.

    lab = load_lab()                       # the teaching-scale lab; "sd-v1-4" on a GPU with the weights
    images = vary(lab, reference, n=4)     # SD-IPC image variation (paper Eq. 5-7)
    images = edit(lab, reference, "on a black background", alpha=0.9)   # Eq. 8
"""

from .convert import (
                      PADDING_RULES,
                      PUBLIC_CODE,
                      InverseProjection,
                      blend,
                      convert,
                      edit_prompt_embeds,
                      encode_text,
                      eos_prompt_embeds,
                      image_embeds,
                      image_prompt_embeds,
                      inverse_projection,
                      pseudo_prompt,
                      sos_state,
                      text_embeds,
)
from .cpus import limit_threads, usable_cpus
from .datasets import candidate_texts, example_edit, judge_for, knows_world, photos, references
from .generate import edit, generate, sample, vary
from .hub import WeightsNotFoundError, download
from .images import as_rgb_images
from .lab import KNOWN_SOURCES, Lab, assemble, load_lab, pick_device, save_lab
from .measure import nearest_texts
from .plots import pipeline_diagram, show_images

__all__ = [
    "InverseProjection", "KNOWN_SOURCES", "PADDING_RULES", "PUBLIC_CODE", "Lab", "WeightsNotFoundError", "as_rgb_images", "assemble", "blend",
    "candidate_texts", "convert", "download", "edit", "example_edit", "edit_prompt_embeds", "encode_text", "eos_prompt_embeds", "generate", "image_embeds",
    "image_prompt_embeds", "inverse_projection", "judge_for", "knows_world", "limit_threads", "load_lab", "nearest_texts", "pick_device", "pipeline_diagram",
    "photos", "pseudo_prompt", "references", "sample", "save_lab", "show_images",
    "sos_state", "text_embeds", "usable_cpus", "vary",
]
