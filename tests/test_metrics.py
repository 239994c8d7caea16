"""The image metrics: Fréchet distance against an eigenvalue reference, torchmetrics' FID on the lab's CLIP
features against it, CLIP-I / CLIP-T / CLIP-score against direct cosines."""

import numpy as np
import pytest
import torch.nn.functional as F

from sdipc_lab import metrics as M
from sdipc_lab.convert import image_embeds, text_embeds
from sdipc_lab.toyworld import samples


def _reference_fd(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 sum sqrt(eig(S_a S_b)) (the eigenvalues are real, >= 0)."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(eig).sum()


def test_frechet_distance_against_eigenvalues():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(loc=0.5, size=(150, 5)) * 2
    assert M.frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-6)
    assert M.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


@pytest.fixture(scope="module")
def image_sets():
    return [s.image for s in samples(16, "test")], [s.image for s in samples(16, "heldout")]


def test_clip_fid_is_torchmetrics_on_the_labs_clip_features(lab, image_sets):
    a, b = image_sets
    unit = lambda ims: F.normalize(image_embeds(lab, ims).float(), dim=-1).double().numpy()  # noqa: E731
    assert M.clip_fid(lab, a, b) == pytest.approx(M.frechet_distance(unit(a), unit(b)), rel=1e-4, abs=1e-7)
    assert M.clip_fid(lab, a, a) == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 images"):
        M.clip_fid(lab, a[:1], b)


def test_clip_i_t_and_score_are_scaled_cosines(lab, image_sets):
    a, b = image_sets
    np.testing.assert_allclose(M.clip_i(lab, a, a), 100, atol=1e-3)
    f_a, f_b = (F.normalize(image_embeds(lab, x).float(), dim=-1) for x in (a, b))
    np.testing.assert_allclose(M.clip_i(lab, a, b), 100 * (f_a * f_b).sum(-1).numpy(), atol=1e-3)
    texts = [s.caption for s in samples(16, "test")]
    f_t = F.normalize(text_embeds(lab, texts).float(), dim=-1)
    cos = 100 * (f_a * f_t).sum(-1).numpy()
    np.testing.assert_allclose(M.clip_t(lab, a, texts), cos, atol=1e-3)
    # Hessel et al.: CLIPScore = 2.5 * max(cos, 0); x 100 as the paper's Table 2 (70-83 against CLIP-T 25-30)
    assert M.clip_score(lab, a, texts) == pytest.approx(2.5 * np.maximum(cos, 0).mean(), abs=1e-3)
    assert M.clip_t(lab, a[:2], "a red disk").shape == (2,)  # one text for every image


def test_verdicts_follow_the_measured_effect():
    from sdipc_lab import plots

    assert plots.verdict(0.3, 0.1) == "reproduced"
    assert plots.verdict(0.05, 0.1) == "not reproduced here"
    assert plots.verdict(-0.3, 0.1) == "opposite here"
    assert plots.verdict(None) == "information"
    # "A matches B": a tie is the claim, not a miss
    assert plots.verdict(-0.03, 0.05, ties=True) == "reproduced"
    assert plots.verdict(-0.03, 0.05) == "not reproduced here"
    assert plots.verdict(-0.3, 0.05, ties=True) == "opposite here"
    assert plots.verdict(-0.3, 0.1, opposite=False) == "not reproduced here"  # a missed tolerance has no opposite
    assert plots.verdict(float("nan")) == "not measured here"  # a column this lab has no measure for (SD: the judge)
    with pytest.raises(ValueError, match="finite"):
        plots.verdict(float("inf"))
    table = plots.claims([{"claim": "x helps", "paper": "Sec. 1", "measured here": "0.3", "effect": 0.3, "margin": 0.1}])
    assert table.rows[0]["verdict"] == "reproduced" and "effect" not in table.rows[0]
    plots.check_verdicts(table, {"x helps": "reproduced"})
    with pytest.raises(AssertionError, match="x helps"):
        plots.check_verdicts(table, {"x helps": "opposite here"})
