"""Attention processors: wrapping changes nothing until asked; masks follow their definitions."""

import numpy as np
import pytest
import torch

import sdipc_lab as S
from sdipc_lab.attention import (
    AttentionStore,
    TokenAttnProcessor,
    install,
    installed,
    token_mask,
)
from sdipc_lab.experiments import attention_maps, masked_generate

PROMPTS = ["a large red circle on the left", "a small blue star at the top over white"]


@pytest.fixture()
def fresh_lab():
    return S.load_lab("tiny", device="cpu")


def test_install_wraps_and_changes_nothing(fresh_lab):
    before = S.generate(fresh_lab, PROMPTS, n=1, seed=4)
    install(fresh_lab)
    install(fresh_lab)  # idempotent
    procs = fresh_lab.unet.attn_processors
    assert all(isinstance(p, TokenAttnProcessor) for p in procs.values())
    assert not any(isinstance(p.inner, TokenAttnProcessor) for p in procs.values())
    after = S.generate(fresh_lab, PROMPTS, n=1, seed=4)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after))


def test_token_masks(fresh_lab):
    _, eos = S.encode_text(fresh_lab, PROMPTS)
    words = token_mask(fresh_lab, PROMPTS, "sos+eos")
    control = token_mask(fresh_lab, PROMPTS, "sos+words")
    for b, t in enumerate(eos.tolist()):
        assert words[b, 0] == 1 and words[b, 1:t].sum() == 0 and words[b, t:].all()
        assert control[b, :t].all() and control[b, t:].sum() == 0
    with pytest.raises(ValueError, match="keep"):
        token_mask(fresh_lab, PROMPTS, "nothing")


def _attn_layer(lab):
    name = next(n for n in lab.unet.attn_processors if n.endswith("attn2.processor"))
    module = lab.unet.get_submodule(name.rsplit(".processor", 1)[0])
    return module


def test_post_softmax_mask_equals_zeroed_weights(fresh_lab):
    """'post' = softmax over all tokens, then masked tokens' weights set to 0 (not renormalised)."""
    attn = _attn_layer(fresh_lab)
    inner = attn.processor
    proc = TokenAttnProcessor(inner, cross=True)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    keep = (torch.rand(2, 77, generator=g) > 0.5).float()
    out = proc(attn, hidden, context, token_mask=keep, mask_mode="post")
    # Reference: the same attention by hand.
    heads, d = attn.heads, attn.to_q.out_features // attn.heads
    q = attn.to_q(hidden).view(2, -1, heads, d).transpose(1, 2)
    k = attn.to_k(context).view(2, -1, heads, d).transpose(1, 2)
    v = attn.to_v(context).view(2, -1, heads, d).transpose(1, 2)
    p = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1) * keep[:, None, None]
    ref = attn.to_out[0]((p @ v).transpose(1, 2).reshape(2, -1, heads * d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # 'pre' renormalises: equal to attention over the kept tokens alone.
    pre = proc(attn, hidden, context, token_mask=keep[:1].expand(2, -1), mask_mode="pre")
    kept = keep[0].bool()
    ref_pre = inner(attn, hidden, context[:, kept])
    torch.testing.assert_close(pre, ref_pre, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="mask_mode"):
        proc(attn, hidden, context, token_mask=keep, mask_mode="softly")


def test_all_ones_mask_changes_nothing(fresh_lab):
    plain = S.generate(fresh_lab, PROMPTS[:1], n=1, seed=2)[0]
    install(fresh_lab)
    ones = torch.ones(1, 77)
    for mode in ("post", "pre"):
        kept = S.generate(fresh_lab, PROMPTS[:1], n=1, seed=2,
                          cross_attention_kwargs={"token_mask": ones, "mask_mode": mode})[0]
        assert np.abs(np.asarray(kept, dtype=int) - np.asarray(plain, dtype=int)).max() <= 1


def test_masked_generation_and_maps(fresh_lab):
    images = masked_generate(fresh_lab, PROMPTS, keep="sos+eos", mode="post", n=2, seed=1)
    assert len(images) == 4
    maps, images = attention_maps(fresh_lab, PROMPTS, seed=1, resolution=8)
    assert maps.shape == (2, 77, 8, 8) and len(images) == 2
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8), rtol=1e-4, atol=1e-4)  # weights sum to 1


def test_store_refuses_to_report_nothing():
    with pytest.raises(RuntimeError, match="nothing recorded"):
        AttentionStore().maps()


def test_installed_restores_what_it_replaced():
    lab = S.load_lab("tiny", device="cpu")
    before = dict(lab.unet.attn_processors)
    with installed(lab):
        assert all(isinstance(p, TokenAttnProcessor) for p in lab.unet.attn_processors.values())
    after = lab.unet.attn_processors
    assert all(after[name] is proc for name, proc in before.items())  # the very same processor objects
