"""The paper's Eq. 5-8: the inverse text projection, the norm, the pseudo-prompt, and editing.

Symbols (paper Sec. 3.1), with D the text width (T-space) and P the projection width (C-space):

    f_img_c  = W_i CLIP_i(x)                         (B, P)   image embedding in C-space
    f_txt    = CLIP_t(s)                             (B, 77, D) text states in T-space
    f_txt_c  = W_t f_txt[eos]                        (B, P)   text embedding in C-space
    f_cnvrt  = ||f_txt_c|| / ||f_img_c|| W_t^+ f_img_c  (B, D)   Eq. 6, the converted embedding
    prompt   = [f_txt[sos], f_cnvrt x 76]            (B, 77, D) Eq. 7, the pseudo-prompt
    edit     = [f_txt[:t], (f_cnvrt + alpha f_txt[t]) x (77 - t)]   Eq. 8, t = the end token's position

"The public code" below means the third-party reimplementations of SD-IPC that the workbook compares with
(the authors published no code); what they hard-code is listed once, in `PUBLIC_CODE`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .images import as_rgb_images
from .lab import Lab

NORM_SPACES = ("c", "t")
PADDING_RULES = ("end", "own")  # Eq. 8's f_txt[t] at every padding position, or each position's own f_txt[i]

# What the public third-party reimplementations of SD-IPC hard-code, where they differ from the paper (the
# authors' repository holds no code). Each difference is a keyword of this package, the paper's value first.
PUBLIC_CODE = {
    "W_t^+": "torch.linalg.pinv(W_t, atol=0.3): the paper's cutoff (footnote 6), the same here",
    "norm": "the T-space result rescaled to 27.5 (norm_space='t'); the paper scales the C-space input (Eq. 6)",
    "alpha": "0.6 (edit(alpha=0.6)); the paper's 0.9 (Sec. 4.1)",
    "padding": "each padding position's own text state f_txt[i], i >= t (edit(padding='own')); Eq. 8 repeats "
               "the end token's f_txt[t] (padding='end')",
    "sampler": "a stock StableDiffusionPipeline, guidance 7.5, 50 steps, its own empty-prompt embedding as the "
               "unconditional branch: the same here on SD v1.4",
}


class InverseProjection:
    """W_t^+, the Moore-Penrose pseudo-inverse of W_t by SVD, singular values <= `cutoff` zeroed.

    Equal to `torch.linalg.pinv(W_t, atol=cutoff)` (paper footnote 6 uses cutoff 0.3 for ViT-L/14).
    Computed in float64; `matrix` is (D, P) so that `f_cnvrt = matrix @ f_img_c`.
    """

    def __init__(self, W_t: torch.Tensor, cutoff: float):
        if not math.isfinite(cutoff) or cutoff < 0:
            raise ValueError(f"cutoff must be a finite number >= 0, got {cutoff}")
        W = W_t.detach().to("cpu", torch.float64)  # (P, D)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (P, K), (K,), (K, D)
        keep = S > cutoff
        if not keep.any():
            raise ValueError(f"cutoff {cutoff} zeroes every singular value of W_t (they run from "
                             f"{S.min().item():.4g} to {S.max().item():.4g}); choose a cutoff below "
                             f"{S.max().item():.4g}, e.g. {S.quantile(0.1).item():.3g} (the 10th percentile)")
        self.cutoff = float(cutoff)
        self.singular_values = S  # (K,), descending
        self.rank = int(keep.sum())
        self.matrix = (Vh[keep].T / S[keep]) @ U[:, keep].T  # (D, P)

    def __call__(self, f_img_c: torch.Tensor) -> torch.Tensor:  # (B, P) -> (B, D)
        dtype = exact_dtype(f_img_c.device)
        return f_img_c.to(dtype) @ self.matrix.T.to(f_img_c.device, dtype)

    def __repr__(self) -> str:
        return f"InverseProjection(cutoff={self.cutoff}, rank={self.rank}/{len(self.singular_values)})"


def exact_dtype(device: torch.device) -> torch.dtype:
    """float64 for the converter's arithmetic, except on Apple MPS, which has no float64: float32 there (the SVD
    itself always runs in float64 on the CPU)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def inverse_projection(lab: Lab, cutoff: float | None = None) -> InverseProjection:
    """The lab's W_t^+ at `cutoff` (default: the lab's own), computed once and cached."""
    cutoff = lab.cutoff if cutoff is None else float(cutoff)
    key = ("inverse", cutoff)
    if key not in lab.cache:
        lab.cache[key] = InverseProjection(lab.W_t, cutoff)
    return lab.cache[key]


@torch.no_grad()
def encode_text(lab: Lab, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T-space states of `texts`: f_txt (B, 77, D) and the end-token positions t (B,).

    Refuses (ValueError) a text longer than the encoder's 77 tokens rather than cutting it silently.
    """
    input_ids, eos = token_ids(lab.tokenizer, texts)
    f_txt = lab.text_encoder.text_model(input_ids.to(lab.device)).last_hidden_state  # (B, 77, D)
    return f_txt, eos.to(lab.device)


def token_ids(tokenizer, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, 77), padded as SD v1 pads, and end-token positions (B,); a text longer than the
    tokenizer's 77 tokens is refused (ValueError), not cut silently."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a string or a non-empty list of strings")
    length = tokenizer.model_max_length
    tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=False)
    unknown = tokenizer.unk_token_id
    for i, (ids, mask) in enumerate(zip(tokens.input_ids, tokens.attention_mask)):
        if unknown is not None and unknown in ids[1:sum(mask) - 1]:  # the text's own tokens (unk may be the pad)
            chars = sorted({ch for ch in texts[i].lower() if tokenizer.convert_tokens_to_ids(ch) == unknown and
                            tokenizer.convert_tokens_to_ids(ch + "</w>") == unknown and not ch.isspace()})
            raise ValueError(f"text {i} has characters this tokenizer cannot spell ({''.join(chars)!r}), which would "
                             f"become end-of-text tokens without a word: {texts[i][:60]!r}. Remove them.")
        if len(ids) > length:
            raise ValueError(f"text {i} is {len(ids)} tokens long; the CLIP text encoder reads at most "
                             f"{length} (start + {length - 2} tokens + end). Shorten it: {texts[i][:60]!r}...")
    return torch.tensor(tokens.input_ids), torch.tensor(tokens.attention_mask).sum(1) - 1


def at_end(states: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Each row's state at its end token: (B, 77, D) and positions (B,) -> f_txt^{t,eos} (B, D)."""
    return states[torch.arange(len(eos), device=states.device), eos.to(states.device)]


def end_padded(states: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """The padding states replaced by copies of the end state, the words kept: (B, 77, D), (B,) -> (B, 77, D).
    What SD-IPC's pseudo-prompt does to the padding, on a real caption (bench/masking.py --padding)."""
    positions = torch.arange(states.shape[1], device=states.device)[None]  # (1, 77)
    padding = (positions > eos.to(states.device)[:, None])[..., None]  # (B, 77, 1)
    return torch.where(padding, at_end(states, eos)[:, None], states)


def to_c_space(lab: Lab, f_eos: torch.Tensor) -> torch.Tensor:
    """f_txt^c = W_t f_txt^{t,eos}: T-space end-token states (B, D) -> C-space (B, P), in float32."""
    return f_eos.float() @ lab.W_t.float().T.to(f_eos.device)


@torch.no_grad()
def text_embeds(lab: Lab, texts: str | Sequence[str]) -> torch.Tensor:
    """f_txt_c = W_t f_txt[eos], the C-space text embedding (B, P)."""
    f_txt, eos = encode_text(lab, texts)
    return lab.text_encoder.text_projection(at_end(f_txt, eos))  # (B, P), in the lab's dtype


@torch.no_grad()
def image_embeds(lab: Lab, images, batch: int = 256) -> torch.Tensor:
    """f_img_c = W_i CLIP_i(x), the C-space image embedding (B, P); `batch` images at a time."""
    images = as_rgb_images(images)
    out = []
    for i in range(0, len(images), batch):
        pixels = lab.feature_extractor(images=images[i:i + batch], return_tensors="pt").pixel_values
        out.append(lab.image_encoder(pixel_values=pixels.to(lab.device, lab.dtype)).image_embeds)
    return torch.cat(out)


def sos_state(lab: Lab) -> torch.Tensor:
    """f_txt^{0,sos} (D,): the start token's state, the same for every prompt of a causal text encoder."""
    if "sos" not in lab.cache:
        lab.cache["sos"] = encode_text(lab, "")[0][0, 0]
    return lab.cache["sos"]


def convert(lab: Lab, f_img_c: torch.Tensor, *, cutoff: float | None = None, norm: float | None = None,
            norm_space: str = "c") -> torch.Tensor:
    """Eq. 6: f_cnvrt (B, D) from C-space image embeddings (B, P).

    norm_space="c" (the paper): f_cnvrt = norm * W_t^+ (f_img_c / ||f_img_c||), norm = ||f_txt^c||.
    norm_space="t" (the public code): f_cnvrt = norm * u / ||u||, u = W_t^+ f_img_c, norm = ||f_txt^eos||.
    """
    if norm_space not in NORM_SPACES:
        raise ValueError(f"norm_space must be 'c' (paper's Eq. 6) or 't' (public code), got {norm_space!r}")
    if norm is None:
        norm = lab.norm if norm_space == "c" else lab.norm_t
    if not math.isfinite(norm) or norm <= 0:
        raise ValueError(f"norm must be a finite number > 0, got {norm}")
    inverse = inverse_projection(lab, cutoff)
    f = f_img_c.to(exact_dtype(f_img_c.device))
    if norm_space == "c":
        f_cnvrt = inverse(f / f.norm(dim=-1, keepdim=True)) * norm
    else:
        u = inverse(f)
        f_cnvrt = u / u.norm(dim=-1, keepdim=True) * norm
    return f_cnvrt.to(lab.dtype)


def blend(f_img_c: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """One C-space embedding (1, P) from several: the weighted mean of their unit vectors."""
    w = torch.as_tensor(list(weights), dtype=torch.float64)  # on the CPU
    if w.shape != (len(f_img_c),):
        raise ValueError(f"got {len(w)} weights for {len(f_img_c)} images; give one weight per image")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()} "
                         "(to steer away from an image, pass it as a negative image instead)")
    f = f_img_c.to(exact_dtype(f_img_c.device))
    unit = f / f.norm(dim=-1, keepdim=True)
    mean = (w[:, None].to(unit) * unit).sum(0, keepdim=True) / w.sum().item()  # (1, P)
    if mean.norm() < 1e-6:
        raise ValueError("the weighted image embeddings cancel out (their blend has no direction to convert); "
                         "change the weights, or pass one of the images as a negative image instead")
    return mean.to(f_img_c.dtype)


def pseudo_prompt(lab: Lab, f_img_c: torch.Tensor, *, cutoff: float | None = None, norm: float | None = None,
                  norm_space: str = "c") -> torch.Tensor:
    """Eq. 7 from C-space image embeddings (B, P): [f_sos, f_cnvrt x 76] (B, 77, D). Differentiable."""
    f_cnvrt = convert(lab, f_img_c, cutoff=cutoff, norm=norm, norm_space=norm_space)  # (B, D)
    B, D = f_cnvrt.shape
    sos = sos_state(lab).to(f_cnvrt.dtype).expand(B, 1, D)  # (B, 1, D)
    return torch.cat([sos, f_cnvrt[:, None].expand(B, lab.max_length - 1, D)], dim=1)  # (B, 77, D)


def image_prompt_embeds(lab: Lab, images, *, cutoff: float | None = None, norm: float | None = None,
                        norm_space: str = "c", weights: Sequence[float] | None = None) -> torch.Tensor:
    """Eq. 7: the pseudo-prompt [f_sos, f_cnvrt x 76] (B, 77, D), one per image.

    With `weights`, the images are blended into a single prompt (1, 77, D).
    """
    f_img_c = image_embeds(lab, images)  # (B, P)
    if weights is not None:
        f_img_c = blend(f_img_c, weights)  # (1, P)
    return pseudo_prompt(lab, f_img_c, cutoff=cutoff, norm=norm, norm_space=norm_space)


def eos_prompt_embeds(lab: Lab, texts: str | Sequence[str]) -> torch.Tensor:
    """[f_sos, f_txt[eos] x 76] (B, 77, D): what SD-IPC would give with a perfect converter.

    The best SD-IPC can do: the true caption's end-token state in place of f_cnvrt (Eq. 7's layout).
    """
    f_txt, eos = encode_text(lab, texts)  # (B, 77, D)
    B, _, D = f_txt.shape
    f_eos = at_end(f_txt, eos)  # (B, D)
    return torch.cat([f_txt[:, :1], f_eos[:, None].expand(B, lab.max_length - 1, D)], dim=1)


def edit_prompt_embeds(lab: Lab, images, text: str | Sequence[str], *, alpha: float = 0.9, padding: str = "end",
                       cutoff: float | None = None, norm: float | None = None, norm_space: str = "c",
                       weights: Sequence[float] | None = None) -> torch.Tensor:
    """Eq. 8: [f_sos, f_w1..f_w(t-1), f_comb x (77 - t)] (B, 77, D), f_comb = f_cnvrt + alpha f_txt[t].

    t is the end token's position in `text` (from the tokenizer's attention mask). One text for all
    images, or one text per image. alpha = 0.9 is the paper's (Sec. 4.1); the public code uses 0.6.
    padding="end" is Eq. 8 (the end state f_txt[t] added at every position from t on); padding="own" is the
    public code's (`PUBLIC_CODE`): position i >= t gets f_cnvrt + alpha f_txt[i], its own padding state.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number (0.9 in the paper), got {alpha!r}")
    if padding not in PADDING_RULES:
        raise ValueError(f"padding must be 'end' (Eq. 8: the end token's state at every padding position) or "
                         f"'own' (the public code: each position's own state), got {padding!r}")
    alpha = float(alpha)
    if not (isinstance(text, str) or (isinstance(text, Sequence) and text and all(isinstance(t, str) for t in text))):
        raise ValueError(f"text must be the edit text (a str, e.g. 'a blue disk'), or one per image, got {text!r}")
    pseudo = image_prompt_embeds(lab, images, cutoff=cutoff, norm=norm, norm_space=norm_space, weights=weights)
    B = len(pseudo)
    texts = [text] * B if isinstance(text, str) else list(text)
    if len(texts) != B:
        raise ValueError(f"got {len(texts)} edit texts for {B} prompts; give one text, or one per image")
    f_txt, eos = encode_text(lab, texts)  # (B, 77, D), (B,)
    f_txt = f_txt.to(pseudo.dtype)
    added = at_end(f_txt, eos)[:, None] if padding == "end" else f_txt  # (B, 1, D) or (B, 77, D)
    f_comb = pseudo[:, 1:2] + alpha * added  # (B, 1, D) or (B, 77, D)
    positions = torch.arange(lab.max_length, device=f_txt.device)[None, :, None]  # (1, 77, 1)
    return torch.where(positions >= eos[:, None, None], f_comb, f_txt)  # (B, 77, D)

