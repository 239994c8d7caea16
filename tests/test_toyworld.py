"""The teaching-scale world: deterministic sampling, held-out combinations, captions, the judge, training."""

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sdipc_lab.build import word_tokenizer
from sdipc_lab.toyworld import COLOURS, HELD_OUT, SHAPES, caption, concept_split, sample, samples, vocabulary
from sdipc_lab.toyworld.judge import agreement, analytic

QUICK = (32, 4)  # export's measuring: test captions, judged references (the full 512 / 48 take a minute)


def test_sampling_is_deterministic():
    a, b = sample(5, "train"), sample(5, "train")
    assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert sample(5, "test").caption != a.caption or not np.array_equal(np.asarray(sample(5, "test").image),
                                                                         np.asarray(a.image))
    assert a.image.size == (64, 64) and a.image.mode == "RGB"


def test_held_out_combinations_never_in_train():
    train = samples(400, "train")
    held = samples(100, "heldout")
    pairs = {(t.shape, t.colour) for s in train for t in s.things}
    assert not pairs & set(HELD_OUT)
    assert all((t.shape, t.colour) in HELD_OUT for s in held for t in s.things)
    with pytest.raises(ValueError, match="split"):
        sample(0, "validation")


def test_concept_split_is_seeded_disjoint_and_never_held_out():
    train, test = concept_split(20, 4, seed=0)
    assert (train, test) == concept_split(20, 4, seed=0) and (train, test) != concept_split(20, 4, seed=1)
    assert len(train) == 20 and len(test) == 4 and not set(train) & set(test)
    assert all(s in SHAPES and c in COLOURS and (s, c) not in HELD_OUT for s, c in train + test)
    n = len(SHAPES) * len(COLOURS) - len(HELD_OUT)
    assert len(set(sum(concept_split(n - 1, 1), []))) == n  # every concept that is not held out, once
    with pytest.raises(ValueError, match="at most"):
        concept_split(n, 1)


def test_captions_use_only_the_vocabulary_and_fit_77_tokens():
    tokenizer = word_tokenizer(vocabulary())
    words = set(vocabulary())
    for s in samples(300, "train"):
        assert set(s.caption.split()) <= words, s.caption
        ids = tokenizer(s.caption).input_ids
        assert len(ids) <= 77 and tokenizer.unk_token_id not in ids[1:-1]
    one = sample(0, "test", two_objects=0)
    assert caption(one.things, one.background) == caption(one.things, one.background)  # canonical wording
    assert len({caption(one.things, one.background, random.Random(k)) for k in range(20)}) > 3  # synonyms


def test_analytic_judge_on_drawn_images():
    data = samples(200, "test", two_objects=0)
    scores = agreement(analytic([s.image for s in data]), [s.attributes for s in data],
                       ("colour", "size", "position", "background"))
    assert min(scores.values()) >= 0.97, scores


def test_the_judge_reads_a_small_objects_colour_from_its_inside_not_its_blended_rim():
    """A small yellow object on black: its anti-aliased rim is yellow blended into black, orange on average."""
    from sdipc_lab.toyworld.world import Thing, draw

    images = [draw((Thing(shape, "yellow", "small", "middle"),), "black", seed=k) for shape in SHAPES for k in range(3)]
    assert [v["colour"] for v in analytic(images)] == ["yellow"] * len(images)


def test_judge_sees_nothing_on_an_empty_image():
    from PIL import Image

    [verdict] = analytic([Image.new("RGB", (64, 64), (128, 128, 128))])
    assert verdict["colour"] is None and verdict["background"] == "gray"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from accelerate import Accelerator

    from sdipc_lab.toyworld import data, models, stages

    out = tmp_path_factory.mktemp("run")
    world = data.render(64, "train")
    acc = Accelerator(cpu=True)
    s = models.MODEL_SIZES["test"]
    stages.train_clip(world, s, (20, 8, 2e-3), out, acc, seed=0)
    shutil.copytree(out / "image_encoder", out / "image_encoder_before_vision")
    stages.train_vision(world, s, (20, 16, 5e-3), out, acc, seed=0)  # batch 8 sits at chance (log 8) for 20 steps
    stages.train_vae(world, s, (20, 8, 2e-3), out, acc, seed=0)
    shutil.copytree(out / "vae", out / "vae_before_decoder")
    stages.train_decoder(world, s, (20, 16, 2e-3), out, acc, seed=0)
    stages.train_unet(world, s, (20, 8, 2e-3), out, acc, seed=0)
    stages.train_judge(s, (20, 16, 2e-3), out, acc, seed=0)
    return out, world, acc


def _losses(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return int(meta["step"]), json.loads(meta["losses"])


@pytest.mark.parametrize("stage", ["clip", "vision", "vae", "unet", "judge"])
def test_training_loss_falls(tiny_run, stage):
    out, _, _ = tiny_run
    step, losses = _losses(out / f"{stage}.ckpt.safetensors")
    assert step == 20 and len(losses) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert (out / f"{stage}_loss.png").exists()


def test_decoder_stage_trains_the_decoder_and_keeps_the_latent_space(tiny_run):
    """The decoder stage must not move the encoder (the U-Net and latent towers were trained on its latents),
    and must lower the reconstruction error. Judged on a fixed batch: at this scale, the per-batch training
    loss is dominated by which images were drawn."""
    from diffusers import AutoencoderKL

    out, world, _ = tiny_run
    x = world.pixels(torch.arange(16), "cpu")
    before, after = (AutoencoderKL.from_pretrained(out / name) for name in ("vae_before_decoder", "vae"))
    with torch.no_grad():
        z_before, z_after = before.encode(x).latent_dist.mean, after.encode(x).latent_dist.mean
        assert torch.equal(z_before, z_after)
        error = [(vae.decode(z_before).sample - x).abs().mean().item() for vae in (before, after)]
    assert error[1] < error[0]
    assert before.config.scaling_factor == after.config.scaling_factor
    assert _losses(out / "decoder.ckpt.safetensors")[0] == 20


def test_vision_stage_trains_the_image_tower_against_the_frozen_text_tower(tiny_run):
    """The vision stage must not move the text tower (the U-Net was trained on its states) and must align
    images better with their captions: the contrastive loss on a fixed batch falls."""
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    from sdipc_lab.toyworld import data, models

    out, world, _ = tiny_run
    with safe_open(str(out / "vision.ckpt.safetensors"), framework="pt") as ckpt:
        trained = {k.split(".")[1] for k in ckpt.keys() if k.startswith("model.")}
    assert trained == {"vision", "logit_scale"}  # nothing of the text tower trained
    text = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    index = torch.arange(32)
    ids, eos = data.tokenize(tokenizer, world.captions(index, random.Random(0)), "cpu")
    pixels = data.clip_normalize(world.pixels(index, "cpu"))
    losses = []
    for name in ("image_encoder_before_vision", "image_encoder"):
        trainer = models.ClipTrainer(text, CLIPVisionModelWithProjection.from_pretrained(out / name))
        with torch.no_grad():
            losses.append(trainer(ids, eos, eos, pixels).item())
    assert losses[1] < losses[0], losses
    assert _losses(out / "vision.ckpt.safetensors")[0] == 20


def test_training_resumes_from_the_checkpoint(tiny_run, capsys):
    from sdipc_lab.toyworld import models, stages

    out, world, acc = tiny_run
    _, before = _losses(out / "clip.ckpt.safetensors")
    stages.train_clip(world, models.MODEL_SIZES["test"], (24, 8, 2e-3), out, acc, seed=0)
    assert "resumed at step 20" in capsys.readouterr().out
    step, after = _losses(out / "clip.ckpt.safetensors")
    assert step == 24 and after[:20] == before and len(after) == 24
    assert not list(out.glob("*.tmp"))  # atomic writes leave nothing behind


def test_stop_at_stops_a_stage_at_a_step_of_its_schedule_and_the_same_command_goes_on(tmp_path, capsys):
    from sdipc_lab.toyworld import train as T

    argv = ["clip", "--size", "test", "--out", str(tmp_path), "--steps", "12"]
    T.main([*argv, "--stop-at", "6"])  # returns: a script may go on to `export --from-checkpoint`
    assert _losses(tmp_path / "clip.ckpt.safetensors")[0] == 6
    assert "stopped at step 6 of 12 (stop_at)" in capsys.readouterr().out
    T.main(argv)
    assert "resumed at step 6" in capsys.readouterr().out
    assert _losses(tmp_path / "clip.ckpt.safetensors")[0] == 12


def test_budget_steps_trains_a_stage_that_many_steps_from_where_it_is(tmp_path, capsys):
    from sdipc_lab.toyworld import train as T

    argv = ["clip", "--size", "test", "--out", str(tmp_path), "--steps", "100"]
    T.main([*argv, "--budget-steps", "4"])
    assert _losses(tmp_path / "clip.ckpt.safetensors")[0] == 4
    assert "budget reached at step 4 of 100 (4 steps from step 0" in capsys.readouterr().out
    T.main([*argv, "--budget-steps", "3"])  # spent: a new budget, a warm restart of the cosine
    assert "budget reached at step 7 of 100 (3 steps from step 4" in capsys.readouterr().out
    assert _losses(tmp_path / "clip.ckpt.safetensors")[0] == 7


def test_the_share_of_two_object_scenes_is_the_one_asked_and_part_of_the_signature(tmp_path):
    from sdipc_lab.toyworld import data, models, stages

    counts = {share: [len(t) for t in data.render(200, two_objects=share).things] for share in (0.0, 0.2, 1.0)}
    assert set(counts[0.0]) == {1} and set(counts[1.0]) == {2}
    assert 0.1 < counts[0.2].count(2) / 200 < 0.3
    same = data.render(200)  # the default world is the 0.2 one, image for image
    assert torch.equal(same.images, data.render(200, two_objects=0.2).images)
    s, budget = models.MODEL_SIZES["test"], (6, 8, 1e-3)
    signatures = [stages.signature("unet", s, budget, 0, data.render(8, two_objects=share), tmp_path)
                  for share in (0.2, 0.05)]
    assert signatures[0]["images"] == 8  # what checkpoints of the default world always carried
    assert signatures[0] != signatures[1]  # a run on another world share is not resumed as if it were the same


def test_a_checkpoint_of_other_sizes_is_refused_not_overwritten(tmp_path):
    from sdipc_lab.training import fit

    def loss_fn(m, step):
        return m(torch.ones(2, 4)).pow(2).mean()

    fit("m", torch.nn.Linear(4, 3), loss_fn, budget=2, lr=0.1, out=tmp_path)
    before = (tmp_path / "m.ckpt.safetensors").read_bytes()
    with pytest.raises(ValueError, match="does not fit this model.*another folder"):
        fit("m", torch.nn.Linear(4, 5), loss_fn, budget=4, lr=0.1, out=tmp_path)
    assert (tmp_path / "m.ckpt.safetensors").read_bytes() == before


def test_checkpoint_round_trip(tmp_path):
    from sdipc_lab.checkpoints import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=opt, step=7, losses=[1.0, 0.5])
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    assert load_checkpoint(tmp_path / "c.safetensors", model=model2, optimizer=opt2) == (7, [1.0, 0.5])
    torch.testing.assert_close(model2.weight, model.weight)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    torch.testing.assert_close(s2["exp_avg"], s1["exp_avg"])


def test_export_makes_a_loadable_lab(tiny_run, tmp_path):
    import sdipc_lab as S
    from sdipc_lab.toyworld import exporting, models

    out, _, _ = tiny_run
    folder = exporting.export(out, tmp_path / "lab", measure=QUICK)
    lab = S.load_lab(folder, device="cpu")
    constants = json.loads((folder / "sdipc_lab.json").read_text())
    assert constants["cutoff"] == lab.cutoff and constants["norm"] > 0 and constants["norm_t"] > 0
    assert lab.finetune_lr == models.FINETUNE_LR  # the teaching scale's fine-tuning rates, not SD v1.4's
    assert lab.scheduler.config.prediction_type == "v_prediction"
    assert lab.scheduler.config.rescale_betas_zero_snr
    assert len(S.vary(lab, sample(0, "test").image, n=1, steps=2)) == 1


def test_measure_constants_chooses_the_cutoff_the_judge_reads_best(tiny_run, tmp_path):
    """With a judge, the lab's cutoff is the candidate whose SD-IPC variations the judge reads best, judged on
    test references past the ones the benches report on; without one, the candidate closest in cosine. A stand-in
    judge that reads only the j-th candidate's images right must make export pick that candidate."""
    import sdipc_lab as S
    from sdipc_lab.toyworld import exporting

    out, _, _ = tiny_run
    lab = S.load_lab(exporting.export(out, tmp_path / "lab", measure=QUICK), device="cpu")
    refs = samples(4, "test", start=exporting.CUTOFF_REFERENCES, two_objects=0)
    by_cosine = exporting.measure_constants(lab, n=8)
    assert by_cosine["cutoff_chosen_by"] == "cosine"
    assert by_cosine["cutoff"] == round(max(by_cosine["cutoff_sweep"], key=lambda r: r["cosine"])["cutoff"], 4)
    for j in (0, len(by_cosine["cutoff_sweep"]) - 1):
        calls = []

        def judge(images, j=j):  # right on the j-th condition judged, wrong shape and colour on every other
            calls.append(len(images))
            right = len(calls) - 1 == j
            return [dict(s.attributes, **({} if right else {"shape": None, "colour": None})) for s in refs]

        chosen = exporting.measure_constants(lab, n=8, judge=judge, n_judged=len(refs))
        assert calls == [len(refs)] * len(chosen["cutoff_sweep"])  # one judged batch per candidate cutoff
        assert chosen["cutoff"] == round(chosen["cutoff_sweep"][j]["cutoff"], 4)
        assert chosen["cutoff_chosen_by"] == "judge"
        assert chosen["cutoff_sweep"][j]["judged"]["shape"] == 1.0  # judged on the references at CUTOFF_REFERENCES
        assert (chosen["norm"], chosen["norm_t"]) == (by_cosine["norm"], by_cosine["norm_t"])


def test_shipped_judge_reads_drawn_images():
    """The independent judge that scores generated images must itself be right on drawn ones."""
    from sdipc_lab.toyworld.judge import Judge

    data = samples(150, "test", two_objects=0)
    scores = agreement(Judge()([s.image for s in data]), [s.attributes for s in data])
    assert min(scores.values()) >= 0.95, scores


def test_zero_shot_is_perfect_for_the_true_captions_own_features(lab):
    """Feeding each sample's canonical-caption text features as its 'image' features must score 1.0 on every
    attribute: the true-value caption *is* that caption. A permuted assignment must not."""
    from sdipc_lab.toyworld.evaluate import text_features, zero_shot_of

    data = samples(12, "test", two_objects=0)
    f = text_features(lab, [caption(s.things, s.background) for s in data])
    assert all(v == 1.0 for v in zero_shot_of(lab, f, data).values())
    shuffled = zero_shot_of(lab, f.roll(1, dims=0), data)
    assert min(shuffled.values()) < 1.0


@pytest.mark.parametrize("shared", [True, False])
def test_accuracy_against_numpy(shared):
    """`evaluate.accuracy`: the nearest candidate text per image, candidates shared (V, D) or per image (N, V, D)."""
    from sdipc_lab.toyworld.evaluate import accuracy

    g = torch.Generator().manual_seed(0)
    f_img = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=-1)  # (N, D)
    f_txt = torch.nn.functional.normalize(torch.randn(*(() if shared else (9,)), 4, 5, generator=g), dim=-1)
    truth = torch.randint(0, 4, (9,), generator=g)
    sim = np.einsum("nd,vd->nv" if shared else "nd,nvd->nv", f_img.numpy(), f_txt.numpy())  # (N, V)
    assert accuracy(f_img, f_txt, truth) == pytest.approx(np.mean(sim.argmax(1) == truth.numpy()))
    assert accuracy(f_img, f_txt, sim.argmax(1)) == 1.0


def test_cutoff_sweep_against_numpy(lab):
    from sdipc_lab.convert import image_embeds
    from sdipc_lab.measure import cutoff_sweep, eos_states

    data = samples(6, "test", two_objects=0)
    W = lab.W_t.detach().double().numpy()
    s = np.linalg.svd(W, compute_uv=False)
    cutoffs = [0.0, float(np.median(s)), float(s.max()) * 2]  # the last keeps nothing: skipped
    rows = cutoff_sweep(lab, [d.image for d in data], [d.caption for d in data], cutoffs)
    assert [r["cutoff"] for r in rows] == cutoffs[:2]
    f = image_embeds(lab, [d.image for d in data]).double().numpy()
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    eos = eos_states(lab, [d.caption for d in data]).double().numpy()
    for row in rows:
        pinv = np.linalg.pinv(W, rcond=None) if row["cutoff"] == 0 else None
        if pinv is None:
            U, sv, Vt = np.linalg.svd(W)
            keep = sv > row["cutoff"]
            pinv = (Vt[keep].T / sv[keep]) @ U[:, keep].T
            assert row["rank"] == keep.sum()
        error = np.linalg.norm(f @ (W @ pinv).T - f, axis=1).mean()
        assert row["reconstruction_error"] == pytest.approx(error, abs=1e-6)
        converted = f @ pinv.T  # f_cnvrt up to its (positive) norm constant
        cos = (converted * eos).sum(1) / np.linalg.norm(converted, axis=1) / np.linalg.norm(eos, axis=1)
        assert row["cosine"] == pytest.approx(cos.mean(), abs=1e-4)
        centred = eos - eos.mean(0)  # the between-caption variance W_t^+ W_t drops, from the same encoding
        dropped = 1 - np.sum((centred @ (pinv @ W).T) ** 2) / np.sum(centred ** 2)
        assert row["dropped_variance"] == pytest.approx(max(0.0, dropped), abs=1e-9)
    assert rows[0]["reconstruction_error"] < 1e-6  # full rank: W_t W_t^+ = I
    assert rows[1]["dropped_variance"] > 0
    one = cutoff_sweep(lab, [data[0].image], [data[0].caption], cutoffs[:1])
    assert "dropped_variance" not in one[0]  # one caption has no variance between captions


def test_dropped_variance_against_pinv(lab):
    """The share of the end-token states' between-caption variance outside W_t^+ W_t's range, against
    `torch.linalg.pinv(W_t, atol=cutoff)` and NumPy; 0 at cutoff 0 (W_t is square and full rank here)."""
    from sdipc_lab.measure import dropped_variance, eos_states

    captions = [d.caption for d in samples(12, "test", two_objects=0)]
    W = lab.W_t.detach().double()
    s = torch.linalg.svdvals(W)
    eos = eos_states(lab, captions).double().numpy()
    centred = eos - eos.mean(0)  # (N, D)
    cutoffs = (0.0, float(s.quantile(0.2)), float(s.quantile(0.9)))
    shares = dropped_variance(lab, captions, cutoffs)
    for cutoff, share in zip(cutoffs, shares, strict=True):
        projector = (torch.linalg.pinv(W, atol=cutoff) @ W).numpy()  # (D, D)
        expected = 1 - np.sum((centred @ projector.T) ** 2) / np.sum(centred ** 2)
        assert share == pytest.approx(expected, abs=1e-9)
    assert shares[0] == pytest.approx(0.0, abs=1e-9)
    assert 0 < shares[1] < shares[2] < 1  # a higher cutoff drops more
    with pytest.raises(ValueError, match="at least 2 captions"):
        dropped_variance(lab, captions[:1], [lab.cutoff])
    with pytest.raises(ValueError, match="zeroes every singular value"):
        dropped_variance(lab, captions, [float(s.max()) * 2])


def test_cutoff_experiment_rows_are_the_measures(lab):
    """Notebook 02's sweep table: each row carries the cutoff sweep's numbers and the dropped caption variance."""
    from sdipc_lab import experiments as E
    from sdipc_lab.measure import cutoff_sweep, dropped_variance

    data = samples(5, "test", two_objects=0)
    s = torch.linalg.svdvals(lab.W_t.detach().double())
    cutoffs = [0.0, float(s.quantile(0.3))]
    rows = E.cutoff_experiment(lab, data, cutoffs)
    sweep = cutoff_sweep(lab, [d.image for d in data], [d.caption for d in data], cutoffs)
    shares = dropped_variance(lab, [d.caption for d in data], cutoffs)
    for row, ref, share in zip(rows, sweep, shares, strict=True):
        assert (row["rank"], row["cos(f_cnvrt, true EOS)"]) == (ref["rank"], ref["cosine"])
        assert row["caption variance dropped"] == pytest.approx(share)
    assert rows[0]["caption variance dropped"] == pytest.approx(0.0, abs=1e-9)
    assert rows[1]["caption variance dropped"] > 0


def test_every_size_budgets_every_stage():
    from sdipc_lab.toyworld import models, train as T

    assert all(set(budget) == set(models.STAGES) for budget in models.BUDGETS.values())
    assert set(models.MODEL_SIZES) == set(models.BUDGETS)
    assert T._parse_minutes("3") == dict.fromkeys(models.STAGES, 3.0)


@pytest.mark.parametrize("size", ["full", "cpu"])
def test_every_size_builds_a_lab_within_the_weight_budget(size):
    """The GPU recipe (`--size full`) has never trained here; building its models checks what can be checked
    without a GPU: the classes accept the widths, W_t is square (as in ViT-L/14) and the exported (fp16)
    CLIP + VAE + U-Net stay within the issue's 40 MB."""
    from sdipc_lab.toyworld import models

    s = models.MODEL_SIZES[size]
    text, vision = models.new_clip(s, models.new_tokenizer())
    models = [text, vision, models.new_vae(s), models.new_unet(s, cross_dim=text.config.hidden_size)]
    P, D = text.text_projection.weight.shape
    assert P == D == s.width == vision.config.projection_dim
    megabytes = sum(p.numel() for m in models for p in m.parameters()) * 2 / 1e6  # fp16 on disk
    assert megabytes <= 40, f"{size}: {megabytes:.1f} MB"


def test_the_oracle_condition_is_the_round_trip_of_the_true_end_token_state(lab):
    """"SD-IPC on the caption's embedding" converts W_t f_eos back: with nothing cut (cutoff 0, W_t square and
    full rank) it must point exactly along the true end-token state, and lose what a cutoff removes."""
    from sdipc_lab.toyworld.evaluate import prompt_conditions

    data = samples(4, "test", two_objects=0)
    P, D = lab.W_t.shape
    assert P == D
    cos = torch.nn.functional.cosine_similarity
    saved = lab.cutoff
    try:
        lab.cutoff = 0.0
        conditions = prompt_conditions(lab, data)
        oracle, eos = conditions["SD-IPC on the caption's embedding (oracle)"], conditions["[sos, true EOS x 76]"]
        assert torch.allclose(cos(oracle[:, 1], eos[:, 1], dim=-1), torch.ones(4), atol=1e-4)
        torch.testing.assert_close(oracle[:, 0], eos[:, 0])  # the same start-token state
        lab.cutoff = float(torch.linalg.svdvals(lab.W_t.double())[P // 2])  # cut half the spectrum
        cut = prompt_conditions(lab, data)["SD-IPC on the caption's embedding (oracle)"]
        assert (cos(cut[:, 1], eos[:, 1], dim=-1) < 0.999).all()
    finally:
        lab.cutoff = saved
        lab.cache.clear()


def test_cutoff_conditions_convert_with_pinv_at_each_cutoff(lab):
    """bench/toyworld_quality.py --cutoffs: each row is Eq. 6-7 at its cutoff, checked against torch.linalg.pinv:
    [sos, norm * pinv(W_t, atol=cutoff) @ unit(f_c) x 76], f_c the caption's (oracle) or the image's embedding."""
    from sdipc_lab.convert import image_embeds, text_embeds
    from sdipc_lab.toyworld.evaluate import cutoff_conditions, prompt_conditions

    data = samples(3, "test", two_objects=0)
    W = lab.W_t.double()  # (P, D)
    cutoffs = [0.0, float(torch.linalg.svdvals(W)[len(W) // 2])]
    rows = cutoff_conditions(lab, data, cutoffs)
    assert list(rows) == ["[sos, true EOS x 76]", *(f"{kind}, cutoff {c:.4g}" for c in cutoffs
                                                     for kind in ("oracle", "SD-IPC (vary)"))]
    torch.testing.assert_close(rows["[sos, true EOS x 76]"], prompt_conditions(lab, data)["[sos, true EOS x 76]"])
    embeddings = {"oracle": text_embeds(lab, [s.caption for s in data]),
                  "SD-IPC (vary)": image_embeds(lab, [s.image for s in data])}
    for c in cutoffs:
        for kind, f_c in embeddings.items():
            unit = torch.nn.functional.normalize(f_c.double(), dim=-1)  # (N, P)
            expected = lab.norm * unit @ torch.linalg.pinv(W, atol=c).T  # (N, D)
            got = rows[f"{kind}, cutoff {c:.4g}"]
            torch.testing.assert_close(got[:, 1:].double(), expected[:, None].expand(-1, 76, -1), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got[:, 0], rows["[sos, true EOS x 76]"][:, 0])  # the start-token state


@pytest.mark.parametrize("words", ["world", "tiny"])
def test_word_tokenizer_spells_every_word_as_one_token(words):
    from sdipc_lab.build import TINY_WORDS

    vocab = vocabulary() if words == "world" else TINY_WORDS
    tokenizer = word_tokenizer(vocab)
    split = {w: tokenizer.tokenize(w) for w in vocab if len(tokenizer.tokenize(w)) != 1}
    assert not split  # "triangle", "orange", "purple", "yellow"... were split into pieces by earlier merges
    text = " ".join(vocab)
    assert len(tokenizer(text).input_ids) == len(vocab) + 2  # one id per word, plus sos and eos
    assert tokenizer.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]  # unknown words still spell out


def test_bpe_matches_the_tokenizer():
    from sdipc_lab.build import bpe

    tokenizer = word_tokenizer(vocabulary())
    ranks = {tuple(line.split()): i for i, line in enumerate(tokenizer.bpe_ranks)} if hasattr(
        tokenizer, "bpe_ranks") else None
    for word in ("triangle", "zebra", "backdrop", "and"):
        pieces = tokenizer.tokenize(word)
        assert "".join(pieces).replace("</w>", "") == word
        if ranks is not None:
            assert bpe(word, ranks) == pieces


def test_cached_caption_states_equal_the_text_encoder(tiny_run):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from sdipc_lab.toyworld import data

    out, world, acc = tiny_run
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    text = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder", dtype=torch.float32).eval()
    states, empty = data.caption_states(world, tokenizer, text, "cpu", wordings=2, seed=0, batch=16)
    assert states.shape == (len(world.images), 2, 77, text.config.hidden_size)
    rng = random.Random("captions:0")
    first = world.captions(torch.arange(len(world.images)), rng)
    second = world.captions(torch.arange(len(world.images)), rng)
    with torch.no_grad():
        for k, texts in enumerate((first, second)):
            ids, _ = data.tokenize(tokenizer, texts[:5], "cpu")
            direct = text.text_model(ids).last_hidden_state
            torch.testing.assert_close(states[:5, k].float(), direct, atol=2e-3, rtol=2e-3)  # fp16 storage
        torch.testing.assert_close(empty, text.text_model(data.tokenize(tokenizer, [""], "cpu")[0]).last_hidden_state[0])
    assert not torch.equal(states[:, 0], states[:, 1])  # two wordings, not one twice


def test_min_snr_weighting_against_a_direct_computation():
    from sdipc_lab.toyworld.models import toy_scheduler
    from sdipc_lab.training import diffusion_loss

    class Echo(torch.nn.Module):  # predicts zeros: the loss is the weighted mean of target**2
        def forward(self, z, t, encoder_hidden_states):
            return type("Out", (), {"sample": torch.zeros_like(z)})()

    scheduler = toy_scheduler()
    z0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.zeros(6, 77, 8)
    loss = diffusion_loss(Echo(), scheduler, z0, context, snr_gamma=5.0, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws, in the same order
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    a = scheduler.alphas_cumprod[t].double()
    v = a.sqrt()[:, None, None, None] * noise - (1 - a).sqrt()[:, None, None, None] * z0  # v-prediction target
    snr = a / (1 - a)
    weight = np.minimum(snr.numpy(), 5.0) / (snr.numpy() + 1)
    expected = np.mean((v.double() ** 2).mean(dim=(1, 2, 3)).numpy() * weight)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    plain = diffusion_loss(Echo(), scheduler, z0, context, generator=torch.Generator().manual_seed(1))
    assert plain.item() == pytest.approx((v.double() ** 2).mean().item(), rel=1e-4)
    assert plain.item() != pytest.approx(loss.item(), rel=1e-2)


def test_export_never_replaces_a_folder_that_is_not_a_lab(tiny_run, tmp_path):
    from sdipc_lab.toyworld import exporting

    out, _, _ = tiny_run
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("two years of work")
    with pytest.raises(SystemExit, match="not a lab folder"):
        exporting.export(out, precious, measure=QUICK)
    assert (precious / "thesis.txt").read_text() == "two years of work"
    lab_dir = exporting.export(out, tmp_path / "lab", guidance_rescale=0.3, scheduler="dpm++", steps=12, measure=QUICK)
    assert json.loads((lab_dir / "sdipc_lab.json").read_text())["guidance_rescale"] == 0.3
    import sdipc_lab as S

    lab = S.load_lab(lab_dir, device="cpu")
    assert type(lab.scheduler).__name__ == "DPMSolverMultistepScheduler" and lab.steps == 12
    assert lab.guidance_rescale == 0.3
    exporting.export(out, lab_dir, measure=QUICK)  # a lab is replaced whole
    assert S.load_lab(lab_dir, device="cpu").guidance_rescale == exporting.SAMPLER["guidance_rescale"]  # the defaults again
    assert not list(tmp_path.glob("lab.*"))  # no .tmp / .old left beside it


def test_init_from_lab_copies_only_what_the_run_lacks(tiny_run, tmp_path):
    from sdipc_lab.toyworld import exporting

    out, _, _ = tiny_run
    lab_dir = exporting.export(out, tmp_path / "lab", measure=QUICK)
    run = tmp_path / "run"
    (run / "vae").mkdir(parents=True)
    (run / "vae" / "mine.txt").write_text("keep")
    copied = exporting.init_from_lab(run, lab_dir, skip=("unet",))
    assert copied == ["tokenizer", "text_encoder", "image_encoder"]
    assert (run / "vae" / "mine.txt").exists() and not (run / "unet").exists()
    with pytest.raises(SystemExit, match="not a lab"):
        exporting.init_from_lab(run, tmp_path)


def test_vae_stage_continues_from_the_runs_vae_with_other_norm_groups(tiny_run, tmp_path):
    """--init-from-lab with --vae-norm-groups: the VAE's GroupNorms regrouped (every weight kept), then trained
    on from there, not from a new VAE."""
    import dataclasses

    from diffusers import AutoencoderKL

    from sdipc_lab.toyworld import models, stages

    out, world, acc = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out / "vae", run / "vae")
    start = AutoencoderKL.from_pretrained(run / "vae")
    regrouped = models.regrouped(start, 2)
    norms = [m for m in regrouped.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {2} and regrouped.config.norm_num_groups == 2
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in regrouped.state_dict().items())
    assert models.regrouped(start, start.config.norm_num_groups) is start

    s = dataclasses.replace(models.MODEL_SIZES["test"], vae_norm_groups=2, init_vae=True)
    stages.train_vae(world, s, (3, 8, 1e-4), run, acc, seed=0)
    after = AutoencoderKL.from_pretrained(run / "vae")
    assert after.config.norm_num_groups == 2

    def distance(a, b):
        return sum((x - b.state_dict()[k]).norm().item() for k, x in a.state_dict().items())

    assert 0 < distance(after, start) < distance(models.new_vae(s), start) / 10


def test_stray_pixels_find_blotches_away_from_the_object():
    from PIL import Image

    from sdipc_lab.toyworld.judge import stray_pixels

    drawn = [s.image for s in samples(16, "test", two_objects=0)]
    assert stray_pixels(drawn).max() < 0.01
    blotched = []
    for im in drawn[:4]:
        a = np.asarray(im).copy()
        a[:6, :10] = (0, 255, 255)  # a cyan streak in a corner, far from any object
        blotched.append(Image.fromarray(a))
    assert np.all(stray_pixels(blotched) >= 50 / 4096)


def test_stray_parts_split_specks_from_a_second_object():
    """judge.stray_parts: stray pixels in regions under 30 pixels (specks) and of 30 or more (blobs: in generated
    images, a second object); the two sum to stray_pixels."""
    from PIL import Image

    from sdipc_lab.toyworld.evaluate import stray_summary
    from sdipc_lab.toyworld.judge import foreground, stray_parts, stray_pixels

    drawn = [s.image for s in samples(8, "test", two_objects=0)]
    masks, background, _ = foreground(drawn)
    specked, blobbed = [], []
    for im, m, bg in zip(drawn, masks, background):
        ys, xs = np.nonzero(m)
        y0 = 3 if ys.mean() > 32 else 47  # a corner square (14 px) away from the object, inside the 2-px border
        x0 = 3 if xs.mean() > 32 else 47
        ink = 0 if bg.mean() > 128 else 255  # far from the background colour
        a = np.asarray(im).copy()
        for dy in (0, 12):
            for dx in (0, 12):
                a[y0 + dy:y0 + dy + 2, x0 + dx:x0 + dx + 2] = ink  # four 2x2 specks, 12 px apart
        specked.append(Image.fromarray(a))
        a = np.asarray(im).copy()
        a[y0:y0 + 8, x0:x0 + 8] = ink  # one 8x8 blob
        blobbed.append(Image.fromarray(a))
    base_specks, base_blobs = stray_parts(drawn)
    specks, blobs = stray_parts(specked)
    assert np.all(specks - base_specks >= 4 * 4 / 4096) and np.array_equal(blobs, base_blobs)
    specks, blobs = stray_parts(blobbed)
    assert np.array_equal(specks, base_specks) and np.all(blobs - base_blobs >= 64 / 4096)
    np.testing.assert_allclose(specks + blobs, stray_pixels(blobbed))
    summary = stray_summary(blobbed)  # what judge_conditions and the bench report
    assert summary["second object"] == 1.0 and summary["stray"] == pytest.approx(stray_pixels(blobbed).mean())
    assert summary["stray blobs"] == pytest.approx(blobs.mean())


def test_loss_curves_leave_the_plotting_backend_alone(tmp_path):
    import matplotlib

    from sdipc_lab.training import plot_losses

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's inline backend
    try:
        plot_losses("unet", [1.0, 0.5, 0.25], tmp_path / "curve.png")
        assert matplotlib.get_backend() == "svg" and (tmp_path / "curve.png").stat().st_size > 1000
    finally:
        matplotlib.use(before)


def test_contact_sheet_shows_each_reference_with_its_vae_round_trip(lab):
    """The variations sheet: per random test reference, the reference, its VAE round trip (the latent space's best),
    then its SD-IPC variations; the pairs sheet: one panel per (shape, colour)."""
    import matplotlib.pyplot as plt

    from sdipc_lab.toyworld import COLOURS, SHAPES
    from sdipc_lab.toyworld.evaluate import contact_sheet, reconstruct

    pairs, varied = contact_sheet(lab, seed=3, n_references=2, variations=1)
    try:
        assert sum(bool(ax.images) for ax in pairs.axes) == len(SHAPES) * len(COLOURS)
        panels = [ax for ax in varied.axes if ax.images]
        assert [ax.get_title() for ax in panels[:3]][1:] == ["VAE round trip", "SD-IPC"] and len(panels) == 6
        reference = panels[0].images[0].get_array()  # (64, 64, 3)
        from PIL import Image
        expected = np.asarray(reconstruct(lab, [Image.fromarray(np.asarray(reference, dtype=np.uint8))])[0])
        np.testing.assert_array_equal(np.asarray(panels[1].images[0].get_array()), expected)
    finally:
        plt.close(pairs), plt.close(varied)


def test_export_from_checkpoint_takes_the_checkpoints_ema_unet(tiny_run, tmp_path):
    """`train export --from-checkpoint`: a lab whose U-Net is the latest checkpoint's EMA copy (a look at a run
    still training), while the run's own U-Net folder is neither read nor needed."""
    import sdipc_lab as S
    from sdipc_lab.toyworld import models, train as T
    from sdipc_lab.checkpoints import save_checkpoint

    out, _, _ = tiny_run
    run = tmp_path / "run"
    for part in ("tokenizer", "text_encoder", "image_encoder", "vae"):
        shutil.copytree(out / part, run / part)
    s = models.MODEL_SIZES["test"]
    width = json.loads((out / "text_encoder" / "config.json").read_text())["hidden_size"]
    model, ema = models.new_unet(s, width), models.new_unet(s, width)
    with torch.no_grad():
        for p in ema.parameters():
            p.normal_(0, 0.02)
    save_checkpoint(run / "unet.ckpt.safetensors", model=model, step=7, losses=[1.0] * 7, ema=ema,
                    optimizer=torch.optim.AdamW(model.parameters()))
    T.main(["export", "--size", "test", "--out", str(run), "--from-checkpoint"])
    lab = S.load_lab(run / "lab", device="cpu")
    got, want = lab.unet.state_dict(), ema.state_dict()
    assert got.keys() == want.keys()
    for key in want:  # the lab is fp16: equal to the EMA weights within fp16 rounding, not the training weights
        torch.testing.assert_close(got[key].float(), want[key].half().float())
    assert not (run / "unet").exists()
    with pytest.raises(SystemExit, match="does not fit this model"):  # a U-Net of other sizes is refused
        T.main(["export", "--size", "cpu", "--out", str(run), "--from-checkpoint", "--lab-dir", str(tmp_path / "x")])
    (run / "unet.ckpt.safetensors").unlink()
    with pytest.raises(SystemExit, match="has no unet.ckpt"):
        T.main(["export", "--size", "test", "--out", str(run), "--from-checkpoint"])


def test_export_with_init_from_lab_writes_the_run_s_lab_not_the_source(tiny_run, tmp_path):
    """`export --init-from-lab SOURCE` exports to OUT/lab (or --lab-dir): the lab it continued from is only read."""
    from sdipc_lab.toyworld import exporting, train as T

    out, _, _ = tiny_run
    source = exporting.export(out, tmp_path / "source", measure=QUICK)
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
    run = tmp_path / "run"
    T.main(["export", "--size", "test", "--out", str(run), "--init-from-lab", str(source)])
    assert (run / "lab" / "sdipc_lab.json").exists()
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == before


def test_diversity_is_the_mean_pairwise_rms_of_the_shrunk_images():
    """Against a direct NumPy computation; identical images give 0 and no judged flips; a red and a blue
    variation of one drawing are far apart."""
    from PIL import Image

    from sdipc_lab.toyworld.evaluate import diversity
    from sdipc_lab.toyworld.judge import Judge
    from sdipc_lab.toyworld.world import Thing, draw

    star = (Thing("star", "red", "large", "middle"),)
    group = [draw(star, "white", seed=k) for k in range(3)]
    other = [draw((Thing("circle", "blue", "small", "left"),), "white", seed=0), group[0]]
    shrink = [np.asarray(im.resize((16, 16), Image.BOX), dtype=np.float64) / 255 for im in group + other]
    pairs = [(0, 1), (0, 2), (1, 2), (3, 4)]
    want = np.mean([np.sqrt(np.mean((shrink[i] - shrink[j]) ** 2)) for i, j in pairs])
    got = diversity([group, other], judge=Judge())
    assert got["distance"] == pytest.approx(want, rel=1e-12)
    assert got["shape"] == pytest.approx(1 / 4) and got["position"] == pytest.approx(1 / 4)  # only the last pair
    same = diversity([[group[0], group[0].copy()]], judge=Judge())
    assert same == {"distance": 0.0, "shape": 0.0, "size": 0.0, "position": 0.0}
    with pytest.raises(ValueError, match="group of 1"):
        diversity([[group[0]]])


def test_recipe_runs_the_shipped_route_stage_by_stage_goes_on_where_it_stopped_and_ships(tmp_path, capsys):
    """The shipped lab's recipe at --size test: each step continues from the folder it copies (the text tower's
    warm restarts add up), --until stops after a step, the same command goes on; --ship refuses a package folder
    holding a user's file before training, then swaps the lab in whole and runs each quoting command once."""
    from safetensors import safe_open

    import sdipc_lab as S
    from sdipc_lab.toyworld import recipe, train as T

    out, package = tmp_path / "route", tmp_path / "package_lab"
    T.main(["recipe", str(recipe.RECIPE), "--out", str(out), "--size", "test", "--until", "text-b"])
    names = [step["name"] for step in recipe.load(recipe.RECIPE)["step"]]
    assert [name for name in names if (out / f"{name}.done").exists()] == names[:names.index("text-b") + 1]
    with safe_open(str(out / "text-b" / "clip.ckpt.safetensors"), framework="pt") as f:
        assert int(f.metadata()["step"]) == 1 + 1 + 2  # the recipe's 1,000 + 513 + 1,555, divided by 1000
    assert "stopped after text-b" in capsys.readouterr().out

    quoting = tmp_path / "quoting.toml"  # the same route; one cheap command in place of the benches
    quoting.write_text(recipe.RECIPE.read_text().split("[ship.commands]")[0]
                       + '[ship.commands]\nquote = "python -c \'print(1 + 1)\'"\n')
    ship = ["recipe", str(quoting), "--out", str(out), "--size", "test", "--ship", "--package-lab", str(package)]
    package.mkdir()
    (package / "sdipc_lab.json").write_text("{}")
    (package / "notes.md").write_text("mine")
    with pytest.raises(SystemExit):
        T.main(ship)
    assert "notes.md" in capsys.readouterr().err and (package / "notes.md").read_text() == "mine"
    assert not (out / "text-c.done").exists()  # refused before training
    (package / "notes.md").unlink()
    T.main(ship)
    printed = capsys.readouterr().out
    assert "=== step clip:" not in printed and "=== step text-c:" in printed  # went on where it stopped
    assert all((out / f"{name}.done").exists() for name in names)
    lab = out / recipe.load(recipe.RECIPE)["ship"]["step"] / "lab"
    assert sorted(p.name for p in package.iterdir()) == sorted(p.name for p in lab.iterdir())
    assert S.load_lab(package, device="cpu").cutoff > 0
    assert (out / "ship" / "quote.txt").read_text() == "2\n"
    T.main(ship)
    assert "===" not in capsys.readouterr().out  # a finished route trains, ships and runs nothing again


def test_recipe_refuses_a_misspelt_step_stage_or_option_before_training(tmp_path, capsys):
    from sdipc_lab.toyworld import recipe, train as T

    out = tmp_path / "route"
    with pytest.raises(SystemExit):
        T.main(["recipe", str(recipe.RECIPE), "--out", str(out), "--size", "test", "--until", "text-d"])
    err = capsys.readouterr().err
    assert "--until 'text-d' is not a step" in err and "text-c" in err
    text = recipe.RECIPE.read_text()
    for broken, why in ((text.replace('stage = "unet"', 'stage = "unett"', 1), "no stage 'unett'"),
                        (text.replace("stop_at = 4000", "stop_after = 4000"), "unknown key(s) ['stop_after']"),
                        (text.replace('copy = { vae = "toy" }', 'copy = { vae = "text-z" }'), "which no step")):
        bad = tmp_path / "bad.toml"
        bad.write_text(broken)
        with pytest.raises(SystemExit):
            T.main(["recipe", str(bad), "--out", str(out), "--size", "test"])
        assert why in capsys.readouterr().err
    assert not out.exists() or not any(out.glob("*.done"))  # nothing trained


def test_quality_bench_draws_n_references_or_refuses(monkeypatch, capsys):
    """bench/toyworld_quality.py's generation rows take their references from the pool: --n above --pool is refused
    (it used to run on --pool references while its header said --n), and without --pool the pool grows to --n."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import toyworld_quality

    seen = []
    monkeypatch.setattr(toyworld_quality, "measure", seen.append)
    monkeypatch.setenv("BENCH_NO_RESULTS", "1")
    for argv, pool in ((["--n", "288"], 288), (["--n", "48"], 100), (["--n", "96", "--pool", "200"], 200)):
        monkeypatch.setattr(sys, "argv", ["toyworld_quality.py", "--quick", *argv])
        toyworld_quality.main()
        assert seen.pop().pool == pool
    monkeypatch.setattr(sys, "argv", ["toyworld_quality.py", "--n", "288", "--pool", "100"])
    with pytest.raises(SystemExit) as exit_:
        toyworld_quality.main()
    assert exit_.value.code == 2 and "--n 288 references need --pool 288 or more" in capsys.readouterr().err
