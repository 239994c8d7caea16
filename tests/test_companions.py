"""Companion papers: probing (000) and latent CLIP with ReNO (001), on the tiny lab."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from sdipc_lab import latent_clip as LC
from sdipc_lab import probing as P
from sdipc_lab.toyworld import samples
from sdipc_lab.toyworld.data import render


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
    text = P.text_layer_features(lab, [s.caption for s in data[:4]])
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
        LC.train_tower(lab, kind, world=render(32, "train"), out=out, steps=3, batch=8, width=32, layers=1)
    return LC.load_towers(out, lab=lab)  # towers trained for this lab pass the fit check


def test_towers_have_matched_token_counts(towers, lab):
    latent, pixel = towers["latent"].config, towers["pixel"].config
    assert latent.num_channels == lab.vae.config.latent_channels and pixel.num_channels == 3
    assert (latent.image_size // latent.patch_size) == (pixel.image_size // pixel.patch_size)
    assert latent.projection_dim == pixel.projection_dim == lab.W_t.shape[0]  # the lab's C-space


def test_reno_raises_the_reward(lab, towers):
    for reward in LC.KINDS:
        result = LC.reno(lab, "a red disk", reward=reward, towers=towers, iterations=4, seed=1)
        assert result.image.size == result.first.size == (lab.image_size, lab.image_size)
        rewards = [h["reward"] for h in result.history]
        assert max(rewards[1:]) > rewards[0]
        z = torch.randn(1, lab.unet.config.in_channels, lab.unet.config.sample_size, lab.unet.config.sample_size,
                        generator=torch.Generator().manual_seed(1))
        assert result.history[0]["z_norm"] == pytest.approx(z.norm().item() / z.numel() ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="latent tower"):
        LC.reno(lab, "a red disk", reward="latent")


def test_reno_keeps_the_best_iterate(lab, towers):
    """With zero iterations the result is the first image; the kept image is the best iterate's, so a run
    stopped at the best iteration returns the same image."""
    result = LC.reno(lab, "a red disk", reward="pixel", iterations=5, seed=2, lr=50.0)
    assert LC.reno(lab, "a red disk", reward="pixel", iterations=0, seed=2).image == result.first
    best = max(range(6), key=lambda k: result.history[k]["reward"])
    assert LC.reno(lab, "a red disk", reward="pixel", iterations=best, seed=2, lr=50.0).image == result.image


def test_reno_avoid_raises_the_margin_over_the_avoided_concept(lab, towers):
    from sdipc_lab.convert import image_embeds, text_embeds

    result = LC.reno(lab, "a red disk", reward="pixel", iterations=6, seed=3, target="a red disk", avoid="a blue star")
    plain = LC.reno(lab, "a red disk", reward="pixel", iterations=0, seed=3)
    assert plain.first == result.first  # same start
    unit = lambda x: torch.nn.functional.normalize(x.float(), dim=-1)  # noqa: E731
    f = unit(image_embeds(lab, [result.first, result.image]))  # through the feature extractor, from 8-bit pixels
    margin = (f @ unit(text_embeds(lab, "a red disk")).T - f @ unit(text_embeds(lab, "a blue star")).T).squeeze(1)
    assert margin[1] > margin[0] - 5e-3  # the reward, recomputed independently, did not fall


def test_norm_prior_in_fp32_and_minimal_near_sqrt_d():
    d = 1024
    z = torch.randn(1, d, dtype=torch.float16)
    assert LC.norm_prior(z).dtype == torch.float32
    r_best = np.sqrt(d - 1)
    values = [LC.norm_prior(torch.full((1, d), r / np.sqrt(d))).item() for r in (r_best / 2, r_best, r_best * 2)]
    assert values[1] < values[0] and values[1] < values[2]


def test_towers_stored_in_fp16_load_as_fp32(towers, tmp_path):
    for kind, tower in towers.items():
        tower.half().save_pretrained(tmp_path / kind)
        tower.float()
    loaded = LC.load_towers(tmp_path)
    assert all(p.dtype == torch.float32 for t in loaded.values() for p in t.parameters())
    assert LC.load_towers(tmp_path, dtype=torch.float16)["latent"].dtype == torch.float16


def test_towers_of_another_lab_are_refused(towers, lab, tmp_path):
    assert set(LC.load_towers(LC.TOWERS_DIR, lab=None)) == set(LC.KINDS)  # the shipped ones load
    with pytest.raises(ValueError, match="trained for another lab.*latent_clip train --lab tiny"):
        LC.load_towers(LC.TOWERS_DIR, lab=lab)  # the toy lab's towers on the tiny lab


def test_towers_of_another_text_tower_are_refused(towers, lab, tmp_path):
    # Same widths, another C-space: only the recorded fingerprint of W_t can tell (two teaching labs are alike).
    assert towers["latent"].config.text_fingerprint == LC.text_fingerprint(lab)
    for kind, tower in towers.items():
        tower.save_pretrained(tmp_path / kind)
    other = dataclasses.replace(lab, text_encoder=copy.deepcopy(lab.text_encoder), cache={})
    with torch.no_grad():
        other.text_encoder.text_projection.weight.mul_(1.01)  # (P, D): one more step of training, say
    assert LC.text_fingerprint(other) != LC.text_fingerprint(lab)
    LC.load_towers(tmp_path, lab=lab)  # its own lab: fine
    with pytest.raises(ValueError, match="trained for another lab: against another text tower.*latent_clip train"):
        LC.load_towers(tmp_path, lab=other)


def test_the_shipped_towers_belong_to_the_shipped_lab():
    import sdipc_lab as S

    toy = S.load_lab("toy", device="cpu")
    towers = LC.load_towers(LC.TOWERS_DIR, lab=toy)  # raises if the package's towers are another text tower's
    assert {t.config.text_fingerprint for t in towers.values()} == {LC.text_fingerprint(toy)}


def test_missing_towers_say_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m sdipc_lab.latent_clip train"):
        LC.load_towers(tmp_path)


def test_scoring_cost_rows(lab, towers):
    latents = torch.randn(2, lab.vae.config.latent_channels, lab.unet.config.sample_size, lab.unet.config.sample_size)
    pixel, latent = LC.scoring_cost(lab, towers, latents, repeats=2)
    assert 0 < pixel["decode share"] < 1 and latent["decode share"] == 0.0
    assert latent["ratio to pixel path"] == pytest.approx(latent["ms / batch"] / pixel["ms / batch"])


def test_reno_experiment_starts_every_condition_from_the_same_noise(lab, towers):
    from sdipc_lab import experiments as E
    from sdipc_lab.toyworld.judge import Judge

    data = samples(2, "test", two_objects=0)
    rows, results = E.reno_experiment(lab, towers, data, judge=Judge(), iterations=2)
    assert [r["condition"] for r in rows] == list(E.RENO_CONDITIONS)
    firsts = [[r.first for r in rs] for rs in results.values()]
    assert all(f == firsts[0] for f in firsts)  # the "before" column is one and the same image set
    assert len({r["shape before"] for r in rows}) == len({r["colour before"] for r in rows}) == 1
    rows, results = E.avoidance_experiment(lab, towers, data, judge=Judge(), iterations=2)
    assert len(rows) == 2 and rows[0]["avoided colour before"] == rows[1]["avoided colour before"]
    assert {"shape before", "shape after", "position after"} <= set(rows[0])


def test_latent_tower_reads_posterior_samples_or_means(lab, towers, tmp_path):
    world = render(8, "train")
    seen = {}
    for mode in ("sample", "mean"):
        def record(module, args, kwargs, mode=mode):
            seen.setdefault(mode, kwargs["pixel_values"].detach().clone())
        start = towers["latent"]
        hook = start.register_forward_pre_hook(record, with_kwargs=True)  # deep-copied with it: fires in training
        try:
            trained = LC.train_tower(lab, "latent", world=world, out=tmp_path / mode, steps=1, batch=4,
                                     posterior=mode, init=start)
        finally:
            hook.remove()
        assert not any(torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))  # a copy trained
    with torch.no_grad():
        x = torch.nn.functional.interpolate(world.pixels(torch.arange(8), lab.device), size=(lab.image_size,) * 2,
                                            mode="area")  # as train_tower sizes them
        means = lab.vae.encode(x).latent_dist.mean * lab.vae.config.scaling_factor
    first = [torch.isclose(seen["mean"][0], m, atol=1e-5).all().item() for m in means]
    assert any(first), "with posterior='mean' the tower must read a posterior mean"
    assert not any(torch.isclose(seen["sample"][0], m, atol=1e-5).all().item() for m in means)  # a sample is not one
    with pytest.raises(ValueError, match="posterior must be"):
        LC.train_tower(lab, "latent", world=world, out=tmp_path / "x", steps=1, posterior="mode")


def test_unet_features_follow_the_session_size_and_refuse_steps_outside_the_process(lab, data):
    """A lab loaded with size=... is probed at that size (SD v1.4 at 256 px is ~4x cheaper)."""
    captions = [s.caption for s in data[:2]]
    bigger = dataclasses.replace(lab, size=2 * lab.image_size)
    native = P.unet_features(lab, captions, at_steps=(0,), steps=2)["latent"]
    doubled = P.unet_features(bigger, captions, at_steps=(0,), steps=2)["latent"]
    assert doubled.shape[1] == 4 * native.shape[1]  # twice the side: four times the latent's positions
    with pytest.raises(ValueError, match=r"at_steps \[5\] are outside the reverse process's 3 steps"):
        P.unet_features(lab, captions, at_steps=(0, 5), steps=3)
