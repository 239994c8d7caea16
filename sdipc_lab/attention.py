"""Cross-attention processors that record maps per token and mask tokens (paper Sec. 3.1, Fig. 2).

`install(lab)` wraps every attention processor of the U-Net once (it never discards the installed
ones: a Custom Diffusion processor with its own k/v weights keeps working). A wrapped processor does
nothing different until the pipeline passes `cross_attention_kwargs`:

    token_mask  (B, 77) float, 1 = keep, 0 = mask; applied to the conditional half of the batch only
    mask_mode   "post": attention weights set to 0 *after* the softmax, not renormalised (the paper's
                        "weights set to 0")
                "pre":  an additive -10000 bias *before* the softmax, the remaining weights
                        renormalised (what `UNet2DConditionModel(encoder_attention_mask=...)` does)
    store       an `AttentionStore` that sums the attention probabilities

Only cross-attention layers (`attn2`) act on them; self-attention wrappers pass them by.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .convert import encode_text
from .lab import Lab

MASK_MODES = ("post", "pre")


class AttentionStore:
    """Sums cross-attention probabilities per token, over layers and steps, at one resolution."""

    def __init__(self, resolution: int = 16):
        self.resolution = resolution
        self.total: torch.Tensor | None = None  # (B, 77, res, res)
        self.calls = 0

    def add(self, probs: torch.Tensor) -> None:  # (B, HW, 77), mean over heads
        B, HW, L = probs.shape
        side = int(round(HW ** 0.5))
        maps = probs.transpose(1, 2).reshape(B, L, side, side).float()
        maps = F.interpolate(maps, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def maps(self) -> torch.Tensor:
        """Mean attention per token (B, 77, res, res); each pixel's weights over tokens sum to 1."""
        if self.total is None:
            raise RuntimeError("nothing recorded: pass cross_attention_kwargs={'store': store} to the pipeline")
        return self.total / self.calls


class TokenAttnProcessor:
    """Wraps an attention processor; see the module docstring for what it adds."""

    def __init__(self, inner, cross: bool):
        self.inner, self.cross = inner, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 token_mask: torch.Tensor | None = None, mask_mode: str = "post", store: AttentionStore | None = None,
                 **kwargs):
        if not self.cross or (token_mask is None and store is None):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be 'post' (after the softmax, the paper's) or 'pre', got {mask_mode!r}")
        keep = None if token_mask is None else _full_batch(token_mask, len(hidden_states)).to(hidden_states)
        if keep is not None and mask_mode == "pre":
            bias = (1 - keep[:, None, :]) * -10000.0  # (B, 1, 77), as UNet2DConditionModel builds it
            attention_mask = bias if attention_mask is None else attention_mask + bias
            keep = None
        if keep is None and store is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        out, probs = self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, keep)
        if store is not None:
            store.add(probs)  # the whole batch; attention_maps() keeps the conditional half
        if keep is None:  # recording only: the inner processor computes the output, exactly as before
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return out

    def _explicit(self, attn, hidden_states, encoder_hidden_states, attention_mask, keep):
        """Attention written out: returns the output and the probabilities (B, HW, 77) averaged over heads."""
        B = len(hidden_states)
        custom = getattr(self.inner, "train_kv", False)  # Custom Diffusion's own k/v projections
        query = attn.to_q(hidden_states)  # (B, HW, C)
        to_k = self.inner.to_k_custom_diffusion if custom else attn.to_k
        to_v = self.inner.to_v_custom_diffusion if custom else attn.to_v
        key = to_k(encoder_hidden_states.to(to_k.weight.dtype)).to(query.dtype)  # (B, 77, C)
        value = to_v(encoder_hidden_states.to(to_v.weight.dtype)).to(query.dtype)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(B, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))  # (B, h, n, d)
        scores = (q @ k.transpose(-1, -2)).float() * attn.scale  # (B, h, HW, 77)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[1], B)
            scores = scores + mask.view(B, attn.heads, -1, mask.shape[-1]).float()
        probs = scores.softmax(dim=-1)
        if keep is not None:
            probs = probs * keep[:, None, None, :]  # weights set to 0, not renormalised
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor, probs.mean(1)


def _full_batch(token_mask: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, 77) masks for the conditional prompts -> (batch, 77), the unconditional half kept whole."""
    if batch == len(token_mask):
        return token_mask
    if batch == 2 * len(token_mask):  # classifier-free guidance: [unconditional, conditional]
        return torch.cat([torch.ones_like(token_mask), token_mask])
    raise ValueError(f"token_mask has {len(token_mask)} rows for a batch of {batch}; give one row per image generated")


@contextlib.contextmanager
def installed(lab: Lab):
    """`install` for the duration of a block, then the U-Net's processors exactly as they were."""
    before = dict(lab.unet.attn_processors)
    install(lab)
    try:
        yield lab
    finally:
        lab.unet.set_attn_processor(before)


def install(lab: Lab) -> None:
    """Wrap each of the U-Net's attention processors (once); outputs are unchanged until asked."""
    processors = lab.unet.attn_processors
    if all(isinstance(p, TokenAttnProcessor) for p in processors.values()):
        return
    lab.unet.set_attn_processor({name: p if isinstance(p, TokenAttnProcessor) else
                                 TokenAttnProcessor(p, cross=name.endswith("attn2.processor"))
                                 for name, p in processors.items()})


def token_mask(lab: Lab, prompts: list[str], keep: str = "sos+eos") -> torch.Tensor:
    """(B, 77) float masks. keep="sos+eos": mask the word tokens, keep start, end and padding
    (the paper's experiment); keep="sos+words": mask the end and padding tokens instead (the control)."""
    _, eos = encode_text(lab, prompts)
    positions = torch.arange(lab.max_length, device=eos.device)[None]  # (1, 77)
    words = (positions >= 1) & (positions < eos[:, None])  # (B, 77)
    if keep == "sos+eos":
        return (~words).float()
    if keep == "sos+words":
        return (positions < eos[:, None]).float()
    raise ValueError(f"keep must be 'sos+eos' or 'sos+words', got {keep!r}")
