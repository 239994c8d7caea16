"""What SD-IPC-FT / -CT and Custom Diffusion train, and how `vary` / `edit` apply it: deep visual prompts
inserted into the CLIP image tower (forward hooks), Custom Diffusion k/v processors in the U-Net's
cross-attention, a new token's embedding, one safetensors file for all of them, and `applied(lab, ft)`, the
context in which a lab uses them. The training that produces them is `finetune.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from .attention import TokenAttnProcessor
from .lab import Lab


class DeepVisualPrompts(torch.nn.Module):
    """VPT-deep prompts (layers, N, width) for a `CLIPVisionModelWithProjection`."""

    def __init__(self, image_encoder, n_tokens: int = 8, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        config = image_encoder.config
        width, patch = config.hidden_size, config.patch_size
        bound = math.sqrt(6 / (3 * patch * patch + width))  # VPT's uniform initialisation
        g = torch.Generator().manual_seed(seed)
        prompts = (torch.rand(config.num_hidden_layers, n_tokens, width, generator=g) * 2 - 1) * bound
        self.prompts = torch.nn.Parameter(prompts)  # (L, N, D)
        self.dropout = torch.nn.Dropout(dropout)
        self._handles: list = []

    @property
    def n_tokens(self) -> int:
        return self.prompts.shape[1]

    def attach(self, image_encoder) -> None:
        """Insert prompts before every encoder layer, drop them after it (forward hooks)."""
        self.detach()
        layers = image_encoder.vision_model.encoder.layers
        if len(layers) != len(self.prompts):
            raise ValueError(f"prompts are for {len(self.prompts)} layers, the image tower has {len(layers)}")
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._inserter(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._dropper()))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _inserter(self, i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, 1 + HW, D)
            prompts = self.dropout(self.prompts[i]).to(hidden.dtype).expand(len(hidden), -1, -1)  # (B, N, D)
            hidden = torch.cat([hidden[:, :1], prompts, hidden[:, 1:]], dim=1)  # (B, 1 + N + HW, D)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        return hook

    def _dropper(self):
        def hook(module, args, kwargs_or_output, output=None):
            out = kwargs_or_output if output is None else output
            hidden = out[0] if isinstance(out, tuple) else out
            hidden = torch.cat([hidden[:, :1], hidden[:, 1 + self.n_tokens:]], dim=1)  # (B, 1 + HW, D)
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
        return hook


def kv_processors(lab: Lab) -> dict:
    """Custom Diffusion k/v processors for every cross-attention layer, initialised from the base. Their weights
    are float32 whatever the lab's dtype (diffusers' processor casts its inputs to them and its outputs back):
    AdamW on fp16 weights goes NaN within a step, as in diffusers' own training scripts' warning."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    processors = {}
    for name in lab.unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        attn = lab.unet.get_submodule(name.rsplit(".processor", 1)[0])
        proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
                                               cross_attention_dim=attn.to_k.in_features)
        proc.to_k_custom_diffusion.weight.data.copy_(attn.to_k.weight.data)
        proc.to_v_custom_diffusion.weight.data.copy_(attn.to_v.weight.data)
        processors[name] = proc.to(lab.device, torch.float32)
    return processors


@dataclasses.dataclass
class FineTuned:
    """What SD-IPC-FT/CT trained: deep visual prompts and/or k/v weights per cross-attention layer."""

    prompts: DeepVisualPrompts | None
    kv: dict  # processor name -> CustomDiffusionAttnProcessor2_0
    info: dict = dataclasses.field(default_factory=dict)
    text: tuple | None = None  # Custom Diffusion: (tokenizer, text encoder) that know the new token

    def tensors(self) -> dict:
        out = {}
        if self.prompts is not None:
            out["prompts"] = self.prompts.prompts.detach().float().cpu().contiguous()
        if self.text is not None:
            tokenizer, encoder = self.text
            row = tokenizer.convert_tokens_to_ids(self.info["token"])
            out["token_embedding"] = encoder.get_input_embeddings().weight[row].detach().float().cpu().contiguous()
        for name, proc in self.kv.items():
            out[f"kv.{name}.to_k"] = proc.to_k_custom_diffusion.weight.detach().float().cpu().contiguous()
            out[f"kv.{name}.to_v"] = proc.to_v_custom_diffusion.weight.detach().float().cpu().contiguous()
        return out


def new_finetuned(lab: Lab, *, n_tokens: int = 8, train_prompts: bool = True, train_kv: bool = True,
                  seed: int = 0) -> FineTuned:
    prompts = DeepVisualPrompts(lab.image_encoder, n_tokens, seed=seed).to(lab.device).eval() if train_prompts else None
    return FineTuned(prompts, kv_processors(lab) if train_kv else {},
                     info={**fingerprint(lab), "text_fingerprint": text_fingerprint(lab)})


def fingerprint(lab: Lab) -> dict:
    """What a fine-tuned file must match in a lab: the widths and depths its tensors were made for."""
    return {"W_t": list(lab.W_t.shape), "vision_layers": lab.image_encoder.config.num_hidden_layers,
            "vision_width": lab.image_encoder.config.hidden_size, "cross_attention_dim": lab.unet.config.cross_attention_dim}


def text_fingerprint(lab: Lab) -> str:
    """A short hash of the lab's text projection `W_t` as stored (fp16): the C-space it converts into. Latent CLIP
    towers and fine-tuned files record it, and are refused on a lab with another, which the widths alone cannot
    tell (two teaching labs have the same)."""
    w_t = lab.W_t.detach().to("cpu", torch.float16).contiguous()  # (P, D)
    return hashlib.sha256(w_t.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


def save_finetuned(ft: FineTuned, path: str | os.PathLike) -> Path:
    """One safetensors file (prompts and k/v only), written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(ft.tensors(), str(tmp), metadata={"sdipc_lab": json.dumps(ft.info)})
    os.replace(tmp, path)
    return path


def load_finetuned(lab: Lab, path: str | os.PathLike) -> FineTuned:
    """Read a fine-tuned file into new modules for `lab`; refuses a file made for another base (widths, or the
    fingerprint of its W_t), and a file cut short."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no fine-tuned file at {path}")
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        hint = f" (it holds {', '.join(p.name for p in found)})" if found else ""
        raise ValueError(f"{path} is a folder{hint}: pass the fine-tuned file itself, e.g. {path / 'finetuned.safetensors'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("sdipc_lab", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable fine-tuned file ({error}): it may be cut short or from "
                         "elsewhere; train it again, or copy it again from where it was made") from None
    base = fingerprint(lab)
    if {k: info.get(k) for k in base} != base:
        raise ValueError(f"{path} was trained on a lab with {info}; this lab has {base}. Load it into a lab of the same base.")
    theirs, mine = info.get("text_fingerprint"), text_fingerprint(lab)
    if theirs is not None and theirs != mine:  # None: files saved before it was recorded
        raise ValueError(f"{path} was trained on another lab of the same sizes (its W_t fingerprint is {theirs}, "
                         f"this lab's {mine}): its prompts and k/v mean nothing here. Load it into the lab it was "
                         "trained on (the same base), or fine-tune this lab.")
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise ValueError(f"{path} holds non-finite values (NaN or infinite) in {', '.join(bad[:5])}: the training "
                         "that wrote it went wrong; train it again with a lower learning rate")
    text = None
    if "token_embedding" in tensors:
        text = with_new_token(lab, info["token"], tensors["token_embedding"])
    prompts = None
    if "prompts" in tensors:
        prompts = DeepVisualPrompts(lab.image_encoder, tensors["prompts"].shape[1]).to(lab.device).eval()
        prompts.prompts.data.copy_(tensors["prompts"])
    kv = {}
    names = sorted({k[3:].rsplit(".", 1)[0] for k in tensors if k.startswith("kv.")})
    procs = kv_processors(lab) if names else {}
    for name in names:
        procs[name].to_k_custom_diffusion.weight.data.copy_(tensors[f"kv.{name}.to_k"])
        procs[name].to_v_custom_diffusion.weight.data.copy_(tensors[f"kv.{name}.to_v"])
        kv[name] = procs[name]
    return FineTuned(prompts, kv, info, text)


def with_new_token(lab: Lab, token: str, init: torch.Tensor):
    """Copies of the lab's tokenizer and text encoder with one more token, its embedding set to `init`."""
    tokenizer = copy.deepcopy(lab.tokenizer)
    if tokenizer.add_tokens([token]) != 1:
        raise ValueError(f"{token!r} is already a word of this tokenizer; choose a new token")
    encoder = copy.deepcopy(lab.text_encoder).float()  # the embedding table trains: float32, as k/v do
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        encoder.get_input_embeddings().weight[-1] = init.to(encoder.get_input_embeddings().weight)
    return tokenizer, encoder.requires_grad_(False).eval()


@contextlib.contextmanager
def applied(lab: Lab, ft: FineTuned | None):
    """Use `ft` inside the block: prompts hooked into the image tower, k/v processors in the U-Net."""
    if ft is None:
        yield lab
        return
    if isinstance(ft, (str, os.PathLike)):
        ft = load_finetuned(lab, ft)  # a saved file works wherever a FineTuned does
    if not isinstance(ft, FineTuned):
        raise TypeError(f"finetuned must be what finetune()/custom_diffusion() return, or the path of their "
                        f"finetuned.safetensors; got {type(ft).__name__}")

    before = dict(lab.unet.attn_processors)
    if ft.kv:
        procs = {}
        for name, proc in before.items():
            new = ft.kv.get(name, proc)
            wrapped = isinstance(proc, TokenAttnProcessor)
            procs[name] = TokenAttnProcessor(new, cross=proc.cross) if wrapped and name in ft.kv else new
        lab.unet.set_attn_processor(procs)
    if ft.prompts is not None:
        ft.prompts.attach(lab.image_encoder)
    base_text = (lab.tokenizer, lab.text_encoder)
    if ft.text is not None:  # the lab's and its pipeline's (which encodes the empty prompt for guidance)
        lab.tokenizer, lab.text_encoder = ft.text
        lab.pipe.tokenizer, lab.pipe.text_encoder = ft.text[0], ft.text[1].text_model
    try:
        yield lab
    finally:
        lab.tokenizer, lab.text_encoder = base_text
        lab.pipe.tokenizer, lab.pipe.text_encoder = base_text[0], base_text[1].text_model
        if ft.prompts is not None:
            ft.prompts.detach()
        if ft.kv:
            lab.unet.set_attn_processor(before)
