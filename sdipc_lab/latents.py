"""The lab's VAE as a pair of functions: images to scaled latents and back (used by fine-tuning, Latent-CLIP,
and the toy world's reconstruction measure)."""

from __future__ import annotations

import numpy as np
import torch

from .lab import Lab


def pixels_of(images, device, size: int) -> torch.Tensor:  # (B, 3, size, size) in [-1, 1]
    """PIL images resized to `size` and scaled to [-1, 1], as the VAE reads them."""
    return torch.stack([torch.from_numpy(np.array(im.resize((size, size)))).permute(2, 0, 1)
                        for im in images]).float().to(device) / 127.5 - 1


@torch.no_grad()
def encode_latents(lab: Lab, images, sample: bool = True, size: int | None = None) -> torch.Tensor:
    """Scaled VAE latents (B, 4, h, w) of PIL images resized to `size` pixels (default: the U-Net's own,
    `lab.image_size`); sampled from the posterior by default (as the latent tower was trained), its mean with
    `sample=False`."""
    dist = lab.vae.encode(pixels_of(images, lab.device, size or lab.image_size).to(lab.dtype)).latent_dist
    return (dist.sample() if sample else dist.mean) * lab.vae.config.scaling_factor


def from_posterior(moments: torch.Tensor, scaling_factor: float, sample: bool = True,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled latents (B, C, h, w) from the VAE posterior's moments (B, 2C, h, w) (`latent_dist.parameters`: mean,
    log-variance): a draw from it (torch's global generator, or the standard normal `noise` (B, C, h, w) given), or
    its mean with `sample=False`."""
    mean, logvar = moments.chunk(2, dim=1)
    if sample and noise is None:
        noise = torch.randn_like(mean)
    z = mean + noise * (0.5 * logvar).exp() if sample else mean
    return z * scaling_factor


@torch.no_grad()
def decode_latents(lab: Lab, latents: torch.Tensor) -> list:
    """PIL images of scaled latents (B, 4, h, w): the inverse of `encode_latents`."""
    pixels = lab.vae.decode(latents.to(lab.dtype) / lab.vae.config.scaling_factor).sample.float().clamp(-1, 1)
    return lab.pipe.image_processor.postprocess(pixels, output_type="pil")
