"""The converter (paper Eq. 5-8) against reference math: torch.linalg.pinv and NumPy's SVD."""

import numpy as np
import pytest
import torch

import sdipc_lab as S
from sdipc_lab.convert import InverseProjection


def rand_matrix(rows, cols, seed=0, dtype=torch.float64):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def numpy_pinv(W, cutoff):
    U, s, Vh = np.linalg.svd(W, full_matrices=False)
    s_inv = np.where(s > cutoff, 1 / np.where(s > cutoff, s, 1), 0)
    return (Vh.T * s_inv) @ U.T


@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (40, 24), (128, 128)])
@pytest.mark.parametrize("cutoff", [0.0, 0.3, 2.0])
def test_inverse_matches_torch_and_numpy(shape, cutoff):
    W = rand_matrix(*shape, seed=shape[0] + shape[1])
    inv = InverseProjection(W, cutoff)
    torch.testing.assert_close(inv.matrix, torch.linalg.pinv(W, atol=cutoff), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(inv.matrix.numpy(), numpy_pinv(W.numpy(), cutoff), rtol=1e-9, atol=1e-9)
    assert inv.rank == int((torch.linalg.svdvals(W) > cutoff).sum())
    assert inv.matrix.shape == (shape[1], shape[0])  # (D, P)


def test_inverse_of_rank_deficient_matrix():
    A, B = rand_matrix(64, 10, seed=1), rand_matrix(10, 64, seed=2)
    W = A @ B  # rank 10 of 64
    inv = InverseProjection(W, cutoff=1e-6)
    assert inv.rank == 10
    torch.testing.assert_close(inv.matrix, torch.linalg.pinv(W, atol=1e-6), rtol=1e-7, atol=1e-8)
    # A pseudo-inverse, not an inverse: W W+ W = W, and W+ W is a projection.
    torch.testing.assert_close(W @ inv.matrix @ W, W, rtol=1e-7, atol=1e-7)
    P = inv.matrix @ W
    torch.testing.assert_close(P @ P, P, rtol=1e-7, atol=1e-7)


def test_cutoff_zeroes_every_singular_value():
    W = rand_matrix(16, 16)
    top = torch.linalg.svdvals(W).max().item()
    with pytest.raises(ValueError, match="zeroes every singular value"):
        InverseProjection(W, cutoff=top + 1)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cutoff"):
            InverseProjection(W, cutoff=bad)


def test_lab_cutoff_that_leaves_nothing(lab, refs):
    with pytest.raises(ValueError, match="zeroes every singular value"):
        S.image_prompt_embeds(lab, refs[0], cutoff=1e6)


def test_pseudo_prompt_layout(lab, refs):
    prompt = S.image_prompt_embeds(lab, refs)  # (3, 77, D)
    D = lab.W_t.shape[1]
    assert prompt.shape == (3, 77, D)
    f_txt, _ = S.encode_text(lab, ["a red star", "a large blue box on the left"])
    sos = f_txt[0, 0]
    torch.testing.assert_close(f_txt[1, 0], sos)  # causal: the start state is prompt-independent
    f_cnvrt = S.convert(lab, S.image_embeds(lab, refs))
    for b in range(3):
        torch.testing.assert_close(prompt[b, 0], sos)
        torch.testing.assert_close(prompt[b, 1:], f_cnvrt[b].expand(76, D))


def test_end_padded_keeps_the_words_and_copies_the_end_state(lab):
    """bench/masking.py --padding: every state after the end token is the end token's, the rest untouched."""
    from sdipc_lab.convert import encode_text, end_padded

    f_txt, eos = encode_text(lab, ["a red circle", "a small blue square on the left"])  # (2, 77, D)
    got, states = end_padded(f_txt, eos).numpy(), f_txt.numpy()
    expected = states.copy()
    for b, e in enumerate(eos.tolist()):
        expected[b, e + 1:] = states[b, e]
    assert eos[0] != eos[1] and not np.allclose(states, expected)  # two lengths, and something was replaced
    np.testing.assert_array_equal(got, expected)


def test_norm_conventions(lab, refs):
    f_img_c = S.image_embeds(lab, refs).double()
    W_plus = torch.linalg.pinv(lab.W_t.double(), atol=lab.cutoff)
    # Paper Eq. 6: ||f_txt^c|| / ||f_img^c|| * W_t^+ f_img^c
    expected = lab.norm / f_img_c.norm(dim=1, keepdim=True) * (f_img_c @ W_plus.T)
    torch.testing.assert_close(S.convert(lab, f_img_c, norm_space="c").double(), expected, rtol=1e-5, atol=1e-6)
    # Public code: rescale the T-space result to norm_t.
    f_t = S.convert(lab, f_img_c, norm_space="t")
    torch.testing.assert_close(f_t.norm(dim=1), torch.full((3,), lab.norm_t, dtype=f_t.dtype))
    torch.testing.assert_close(f_t.double() / lab.norm_t, expected / expected.norm(dim=1, keepdim=True),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="norm_space"):
        S.convert(lab, f_img_c, norm_space="x")
    with pytest.raises(ValueError, match="norm"):
        S.convert(lab, f_img_c, norm=float("nan"))


def test_full_rank_inverse_recovers_the_direction(full_lab, refs):
    f_img_c = S.image_embeds(full_lab, refs)
    f_cnvrt = S.convert(full_lab, f_img_c, cutoff=0.0)
    back = full_lab.text_encoder.text_projection(f_cnvrt)  # W_t f_cnvrt, back in C-space
    cos = torch.nn.functional.cosine_similarity(back.double(), f_img_c.double())
    assert (cos > 0.999).all(), cos


@pytest.mark.parametrize("text", ["star", "a red star", "a large blue box on the left over a white background",
                                  " ".join(["red"] * 75)])
def test_edit_layout(lab, refs, text):
    alpha = 0.7
    edited = S.edit_prompt_embeds(lab, refs[:2], text, alpha=alpha)  # (2, 77, D)
    f_txt, eos = S.encode_text(lab, text)
    t = int(eos[0])
    assert t == len(lab.tokenizer(text).input_ids) - 1
    f_cnvrt = S.image_prompt_embeds(lab, refs[:2])[:, 1]  # (2, D)
    for b in range(2):
        torch.testing.assert_close(edited[b, :t], f_txt[0, :t])  # start and word tokens kept
        comb = f_cnvrt[b] + alpha * f_txt[0, t]
        torch.testing.assert_close(edited[b, t:], comb.expand(77 - t, -1))


def test_edit_public_padding_rule_adds_each_position_own_state(lab, refs):
    alpha, text = 0.6, "a red star"
    own = S.edit_prompt_embeds(lab, refs[:2], text, alpha=alpha, padding="own")  # (2, 77, D)
    end = S.edit_prompt_embeds(lab, refs[:2], text, alpha=alpha, padding="end")
    f_txt, eos = S.encode_text(lab, text)
    t = int(eos[0])
    f_cnvrt = S.image_prompt_embeds(lab, refs[:2])[:, 1]  # (2, D)
    for b in range(2):
        torch.testing.assert_close(own[b, :t], f_txt[0, :t])
        torch.testing.assert_close(own[b, t:], f_cnvrt[b] + alpha * f_txt[0, t:])  # position i: its own f_txt[i]
    torch.testing.assert_close(own[:, : t + 1], end[:, : t + 1])  # the two rules agree up to the end token
    assert (own[:, t + 1:] - end[:, t + 1:]).abs().max() > 1e-3  # and differ after it, as padding states do
    with pytest.raises(ValueError, match="padding must be 'end'"):
        S.edit_prompt_embeds(lab, refs[0], text, padding="eos")


def test_edit_bad_alpha_and_long_text(lab, refs):
    for alpha in (float("nan"), float("inf"), "0.9", None):
        with pytest.raises(ValueError, match="alpha"):
            S.edit_prompt_embeds(lab, refs[0], "a red star", alpha=alpha)
    with pytest.raises(ValueError, match="76 tokens long|tokens long"):
        S.edit_prompt_embeds(lab, refs[0], " ".join(["red"] * 80))
    with pytest.raises(ValueError, match="one per image"):
        S.edit_prompt_embeds(lab, refs[:2], ["a", "b", "c"])


def test_blend_weights(lab, refs):
    one = S.image_prompt_embeds(lab, refs[0])
    same = S.image_prompt_embeds(lab, [refs[0], refs[0]], weights=[0.3, 0.7])
    torch.testing.assert_close(same, one)
    mixed = S.image_prompt_embeds(lab, refs[:2], weights=[1, 1])
    assert mixed.shape == one.shape
    f = S.image_embeds(lab, refs[:2]).double()
    u = f / f.norm(dim=1, keepdim=True)
    torch.testing.assert_close(mixed[0, 1], S.convert(lab, u.mean(0, keepdim=True))[0])
    with pytest.raises(ValueError, match="one weight per image"):
        S.image_prompt_embeds(lab, refs[:2], weights=[1])
    for bad in ([1, -1], [0, 0], [1, float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            S.image_prompt_embeds(lab, refs[:2], weights=bad)


def test_full_width_shapes(full_lab, refs):
    assert tuple(full_lab.W_t.shape) == (768, 768)
    assert tuple(full_lab.W_i.shape) == (768, 1024)
    assert S.image_embeds(full_lab, refs).shape == (3, 768)
    assert S.image_prompt_embeds(full_lab, refs).shape == (3, 77, 768)
    assert S.edit_prompt_embeds(full_lab, refs[0], "a red star").shape == (1, 77, 768)
    f_txt, _ = S.encode_text(full_lab, "a red star")
    assert f_txt.shape == (1, 77, 768)
