"""Companion papers: probing (000) and latent CLIP with ReNO (001), on the tiny lab."""

import numpy as np
import pytest
import torch

from sdipc_lab import latent_clip as LC
from sdipc_lab import probing as P
from sdipc_lab.toyworld import samples


@pytest.fixture(scope="module")
def data():
    return samples(40, "test", two_objects=0)


def test_attributes_are_ground_truth(data):
    Y, names = P.attribute_matrix(data)
    assert Y.shape == (40, len(names)) and set(a for g in P.GROUPS.values() for a in g) == set(names)
    s = data[0]
    assert P.attributes(s)["corners"] == P.SHAPE_CORNERS[s.things[0].shape]


def test_probe_recovers_a_linear_signal_and_not_a_shuffled_one(data):
    Y, _ = P.attribute_matrix(data)
    rng = np.random.default_rng(0)
    X = Y @ rng.normal(size=(Y.shape[1], 30)) + 0.05 * rng.normal(size=(len(Y), 30))  # attributes, linearly mixed
    groups = P.concept_groups(data)
    good = P.probe(X, Y, groups)
    assert good["mean r"] > 0.8 and good["2v2"] > 0.9
    assert P.probe(X, Y, groups, shuffle=True)["mean r"] < 0.3
    noise = P.probe(rng.normal(size=X.shape), Y, groups)
    assert noise["mean r"] < 0.3


def test_group_folds_never_test_on_a_training_concept(data):
    from sklearn.model_selection import GroupKFold

    groups = P.concept_groups(data)
    for train, test in GroupKFold(n_splits=5).split(np.zeros(len(groups)), groups=groups):
        assert not set(groups[train]) & set(groups[test])


def test_entanglement_index():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(200, 4))
    assert abs(P.entanglement(true, true)) < 1e-12
    shared = rng.normal(size=(200, 1))
    assert P.entanglement(true + 3 * shared, true) > 0.5  # predictions that co-vary more than the truth


def test_features_have_the_documented_keys(lab, data):
    text = P.text_features(lab, [s.caption for s in data[:4]])
    layers = lab.text_encoder.config.num_hidden_layers
    assert {f"text:L{i}:eos" for i in range(layers + 1)} <= set(text)
    unet = P.unet_features(lab, [s.caption for s in data[:4]], at_steps=(0, 2), steps=3)
    assert "unet:mid:t0" in unet and "unet:mid:t2" in unet and unet["latent"].shape[0] == 4
    null = P.unet_features(lab, [s.caption for s in data[:4]], at_steps=(0,), steps=3, null_prompt=True)
    assert not np.allclose(null["unet:mid:t0"], unet["unet:mid:t0"])


def test_cache_reads_back(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"x": np.arange(3)}  # noqa: E731
    a = P.cached(tmp_path / "f.npz", {"k": 1}, compute)
    b = P.cached(tmp_path / "f.npz", {"k": 1}, compute)
    assert calls == [1] and np.array_equal(a["x"], b["x"])


@pytest.fixture(scope="module")
def towers(lab, tmp_path_factory):
    out = tmp_path_factory.mktemp("towers")
    for kind in LC.KINDS:
        LC.train_tower(lab, kind, out=out, n_images=32, steps=3, batch=8, width=32, layers=1)
    return LC.load_towers(out)


def test_towers_have_matched_token_counts(towers, lab):
    latent, pixel = towers["latent"].config, towers["pixel"].config
    assert latent.num_channels == lab.vae.config.latent_channels and pixel.num_channels == 3
    assert (latent.image_size // latent.patch_size) == (pixel.image_size // pixel.patch_size)
    assert latent.projection_dim == pixel.projection_dim == lab.W_t.shape[0]  # the lab's C-space


def test_reno_raises_the_reward_and_keeps_the_best(lab, towers):
    for reward in LC.KINDS:
        image, history = LC.reno(lab, "a red disk", reward=reward, towers=towers, iterations=4, seed=1)
        assert image.size == (lab.image_size, lab.image_size)
        assert history[-1]["reward"] > history[0]["reward"]
    with pytest.raises(ValueError, match="latent tower"):
        LC.reno(lab, "a red disk", reward="latent")


def test_norm_prior_in_fp32_and_minimal_near_sqrt_d():
    d = 1024
    z = torch.randn(1, d, dtype=torch.float16)
    assert LC.norm_prior(z).dtype == torch.float32
    r_best = np.sqrt(d - 1)
    values = [LC.norm_prior(torch.full((1, d), r / np.sqrt(d))).item() for r in (r_best / 2, r_best, r_best * 2)]
    assert values[1] < values[0] and values[1] < values[2]


def test_missing_towers_say_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m sdipc_lab.latent_clip train"):
        LC.load_towers(tmp_path)
