"""Images the world's renderer did not make: the varied training drawings (`variety`), the bench's drawings by other
code (`freehand`), and what the lab reads of them (`read_drawings`, `shape_by_size`)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import sdipc_lab as S
from sdipc_lab.toyworld import COLOURS, HELD_OUT, SHAPES, Sample, freehand, samples, variety
from sdipc_lab.toyworld.evaluate import read_drawings
from sdipc_lab.toyworld.judge import LARGE_EXTENT, Judge
from sdipc_lab.toyworld.world import POSITIONS


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_variety_is_deterministic_varied_and_never_draws_held_out_pairs():
    a, b = variety.sample(3), variety.sample(3)
    assert a.caption == b.caption and np.array_equal(pixels(a.image), pixels(b.image))
    assert a.image.size == (64, 64) and a.image.mode == "RGB"
    data = [variety.sample(i) for i in range(120)]
    things = [s.things[0] for s in data]
    assert not {(t.shape, t.colour) for t in things} & set(HELD_OUT)
    assert all((t.shape, t.colour) in HELD_OUT for s in (variety.sample(i, "heldout") for i in range(20))
               for t in s.things)
    assert {t.size for t in things} == {"small", "large"} and {t.position for t in things} == set(POSITIONS)
    assert {t.shape for t in things} == set(SHAPES)
    with pytest.raises(ValueError, match="split"):
        variety.sample(0, "test")


def test_variety_size_word_follows_the_drawn_extent():
    """Drawn without corruption, the object's extent decides the word: large from the judge's threshold on."""
    import random

    for i in range(40):
        rng = random.Random(f"extent:{i}")
        mask, centre, extent = variety.object_mask(rng.choice(SHAPES), rng.choice(variety.STYLES), rng)
        ys, xs = np.nonzero(np.asarray(mask) > 127)
        assert extent == max(np.ptp(ys), np.ptp(xs)) + 1
        assert 0.6 * variety.EXTENT[0] <= extent <= 64  # rotation and aspect move it from the drawn width
        assert 0 <= centre[0] < 64 and 0 <= centre[1] < 64
    assert LARGE_EXTENT == 25  # the words' boundary: between the world's small (17-20 px) and large (29-34 px)


def test_variety_shades_stay_nearest_to_their_colour_word():
    import random

    rng = random.Random(0)
    for colour in COLOURS:
        for _ in range(30):
            assert variety.nearest(variety.shade(colour, rng), COLOURS) == colour


def test_freehand_drawings_are_deterministic_and_the_parts_disjoint():
    a, b = freehand.drawing(7), freehand.drawing(7)
    assert np.array_equal(pixels(a.image), pixels(b.image)) and a.shape == b.shape and a.width == b.width
    dev = {(d.shape, d.colour, round(d.width, 6)) for d in freehand.drawings(30, "dev")}
    held = {(d.shape, d.colour, round(d.width, 6)) for d in freehand.drawings(30, "heldout")}
    assert not dev & held
    with pytest.raises(ValueError, match="part"):
        freehand.drawing(0, "test")
    with pytest.raises(ValueError, match="kind"):
        freehand.drawing(0, kind="crayon")


@pytest.mark.parametrize("kind", freehand.KINDS)
def test_freehand_truth_matches_the_pixels(kind):
    """The object's measured width is the `width` it claims (a pen's outline: its centre line), and its shade is
    nearest to its colour word."""
    for i in range(6):
        d = freehand.drawing(i, kind=kind, format="256 px")
        assert d.image.size == (256, 256) and d.image.mode == "RGB"
        on = np.linalg.norm(pixels(d.image) - np.array(d.rgb, np.float32), axis=-1) < 40
        ys, xs = np.nonzero(on)
        measured = (max(np.ptp(ys), np.ptp(xs)) + 1) / 256
        stroke = 0.09 if kind in ("outline", "hand-drawn") else 0.03  # a pen line adds its width, and wobbles
        assert abs(measured - d.width) < stroke, (kind, i, measured, d.width)
        assert variety.nearest(d.rgb, COLOURS) == d.colour
        assert freehand.WIDTH[0] <= d.width <= freehand.WIDTH[1]


def test_freehand_formats_and_size_truth():
    sizes = {f: freehand.drawing(0, format=f).image.size for f in freehand.FORMATS}
    assert sizes == {"64 px": (64, 64), "32 px": (32, 32), "256 px": (256, 256), "640x480": (640, 480),
                     "JPEG": (256, 256)}
    assert freehand.drawing(1, width=0.2).size == "small" and freehand.drawing(1, width=0.7).size == "large"
    assert freehand.drawing(1, width=0.4).size is None  # the fair band: either word is right
    assert [freehand.bucket(w) for w in (0.15, 0.3, 0.5, 0.8)] == ["15-25 %", "25-40 %", "40-60 %", "60-80 %"]


def test_with_variety_adds_the_share_and_changes_the_signature():
    from sdipc_lab.toyworld import data, models, stages

    world = data.render(12, "train")
    mixed = data.with_variety(world, 0.5)
    assert len(mixed) == 24 and mixed.varied == 12 and len(world) == 12
    assert mixed.images is world.images  # nothing drawn in advance: each varied drawing is drawn for its batch
    assert data.with_variety(world, 0.0) is world
    s = models.MODEL_SIZES["test"]
    budget = (6, 8, 1e-3)
    assert (stages.signature("vision", s, budget, 0, world, Path("."))["images"]
            != stages.signature("vision", s, budget, 0, mixed, Path("."))["images"])
    with pytest.raises(ValueError, match="share"):
        data.with_variety(world, 1.0)


class _Process:  # what contrastive_batch reads of an Accelerator
    def __init__(self, index=0, count=1):
        self.process_index, self.num_processes, self.device = index, count, torch.device("cpu")


def _batch(world, tokenizer, step, process=None, batch=16):
    from sdipc_lab.toyworld import data

    torch.manual_seed(7)  # the padding positions: every process draws them alike, as accelerate seeds them
    return data.contrastive_batch(world, tokenizer, batch, step, 0, process or _Process(), "vision", offset=5,
                                  with_things=True)


def test_each_batch_draws_its_varied_drawings_anew():
    from sdipc_lab.toyworld import data, models
    from sdipc_lab.toyworld.data import tokenize

    tokenizer = models.new_tokenizer()
    world = data.with_variety(data.render(8, "train", two_objects=0), 0.75)  # 8 of the world's, 24 varied
    ids, eos, pad, pixels, things, backgrounds = _batch(world, tokenizer, 0)
    assert ids.shape == (16, 77) and pixels.shape == (16, 3, 64, 64) and len(things) == len(backgrounds) == 16
    assert torch.equal(pixels, _batch(world, tokenizer, 0)[3])  # a step's batch is the same every time
    assert ((eos < pad) & (pad <= 76)).all()

    index = data.batch_index(len(world), 16, 0, 5, _Process())
    varied = [p for p in range(16) if index[p] >= 8]
    assert 4 <= len(varied) < 16  # both kinds in one batch
    for p in range(16):
        if p in varied:  # the drawing of its own index, with its own caption
            s = variety.sample(data.varied_index(5, 0, p, 16))
            expected = data.clip_normalize(data.to_pixels(torch.from_numpy(np.asarray(s.image))[None], "cpu"))[0]
            assert things[p] == s.things and backgrounds[p] == s.background
            assert torch.equal(pixels[p], expected)
            assert torch.equal(ids[p], tokenize(tokenizer, [s.caption], "cpu")[0][0])
        else:
            assert things[p] == world.things[index[p]]
            assert torch.equal(pixels[p], data.clip_normalize(world.pixels(index[p:p + 1], "cpu"))[0])

    # never the same drawing twice: 3 steps' varied drawings all differ
    drawn = [pixels[p] for p in varied]
    for step in (1, 2):
        index = data.batch_index(len(world), 16, step, 5, _Process())
        drawn += [x for x, i in zip(_batch(world, tokenizer, step)[3], index) if i >= 8]
    assert len({x.numpy().tobytes() for x in drawn}) == len(drawn) > 12


def test_processes_draw_their_shares_of_the_batch_one_process_draws():
    from sdipc_lab.toyworld import data, models

    tokenizer = models.new_tokenizer()
    world = data.with_variety(data.render(8, "train"), 0.5)
    one = _batch(world, tokenizer, 3)
    halves = [_batch(world, tokenizer, 3, _Process(k, 2)) for k in range(2)]
    for whole, a, b in zip(one, *halves):
        if isinstance(whole, torch.Tensor):
            assert torch.equal(whole, torch.cat([a, b]))
        else:
            assert whole == a + b


def test_grey_is_pils_luminance_in_every_channel():
    from sdipc_lab.toyworld import data

    image = samples(1, "test")[0].image
    g = data.grey(data.to_pixels(torch.from_numpy(np.array(image))[None], "cpu"))[0]  # (3, 64, 64) in [-1, 1]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    reference = torch.from_numpy(np.array(image.convert("L"), dtype=np.float32)) / 127.5 - 1  # PIL: 299/587/114
    assert (g[0] - reference).abs().max() <= 1 / 127.5  # PIL rounds to whole levels


def test_shape_batch_holds_each_pictures_shapes_grey_and_shared_as_one_process_draws_it():
    from sdipc_lab.toyworld import data

    world = data.with_variety(data.render(8, "train", two_objects=1.0), 0.5)
    pixels, held = data.shape_batch(world, 16, 2, 0, _Process())
    assert pixels.shape == (16, 3, 64, 64) and held.shape == (16, len(SHAPES))
    index = data.batch_index(len(world), 16, 2, 7, _Process())
    for p in range(16):
        things = (world.things[index[p]] if index[p] < 8 else
                  variety.sample(data.varied_index(7, 2, p, 16)).things)
        assert held[p].nonzero().flatten().tolist() == sorted({SHAPES.index(t.shape) for t in things})
    assert (held.sum(1) == 2).any() and (held.sum(1) == 1).any()  # two-object pictures and varied drawings
    unnormalised = pixels * torch.tensor(data.CLIP_STD)[:, None, None] + torch.tensor(data.CLIP_MEAN)[:, None, None]
    assert torch.allclose(unnormalised[:, 0], unnormalised[:, 2], atol=1e-5)  # no colour left
    halves = [data.shape_batch(world, 16, 2, 0, _Process(k, 2)) for k in range(2)]
    assert torch.equal(pixels, torch.cat([h[0] for h in halves]))
    assert torch.equal(held, torch.cat([h[1] for h in halves]))


def test_shape_stage_teaches_a_new_tower_shape_and_leaves_it_for_vision(tmp_path, capsys):
    """`train shape` trains a new tower (the size's) with a shape head, resumably, and writes only the tower: what
    `vision` goes on from; the loss, which starts at chance (log 2 per shape), falls."""
    from transformers import CLIPVisionModelWithProjection

    from sdipc_lab.toyworld import models
    from sdipc_lab.toyworld import train as T
    from sdipc_lab.toyworld.data import CLIP_STD, LUMA

    argv = ["shape", "--size", "test", "--out", str(tmp_path), "--steps", "40", "--variety", "0.5", "--lr", "3e-3"]
    T.main([*argv, "--stop-at", "20"])
    T.main(argv)
    out = capsys.readouterr().out
    assert "shape: resumed at step 20" in out and "its head reads the shape of" in out
    with safe_open(str(tmp_path / "shape.ckpt.safetensors"), framework="pt") as ckpt:
        meta = ckpt.metadata()
        assert {k.split(".")[1] for k in ckpt.keys() if k.startswith("model.")} == {"vision", "head"}
    losses = json.loads(meta["losses"])
    assert int(meta["step"]) == 40 == len(losses)
    assert abs(losses[0] - np.log(2)) < 0.3 and np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1, losses
    tower = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "image_encoder")
    s = models.MODEL_SIZES["test"]
    assert (tower.config.hidden_size, tower.config.patch_size, tower.config.projection_dim) == (s.width, s.patch,
                                                                                                s.width)
    weight = tower.vision_model.embeddings.patch_embedding.weight  # (D, 3, p, p): written to read colour as grey
    assert torch.allclose(weight / weight.sum(1, keepdim=True), (torch.tensor(LUMA) * torch.tensor(CLIP_STD) / (
        torch.tensor(LUMA) * torch.tensor(CLIP_STD)).sum())[:, None, None].expand_as(weight), atol=1e-3)
    with pytest.raises(SystemExit):  # its options are the vision stage's, nobody else's
        T.main(["clip", "--size", "test", "--out", str(tmp_path), "--variety", "0.5"])


def test_read_drawings_scores_each_image_against_its_truth():
    lab = S.load_lab("tiny", device="cpu")
    data = freehand.drawings(3, "dev", format="64 px") + samples(2, "test", two_objects=0)
    rows = read_drawings(lab, data, Judge(), batch=2)
    assert len(rows) == 5
    for row, d in zip(rows, data):
        assert isinstance(row["clip shape"], bool) and isinstance(row["sd-ipc shape"], bool)
        verdict = Judge()([row["image"]])[0]
        assert row["sd-ipc colour"] == (verdict["colour"] == d.attributes["colour"])
        size = getattr(d, "size", d.attributes["size"])
        assert (row["sd-ipc size"] is None) == (size is None)


def test_shape_by_size_rows_and_no_judge():
    from sdipc_lab import experiments as E

    lab = S.load_lab("tiny", device="cpu")
    assert E.shape_by_size(lab, judge=None) == []
    rows = E.shape_by_size(lab, judge=Judge(), n=6, n_world=4)
    assert {r["images"] for r in rows} == {"world's renderings", "other drawings"}
    assert sum(r["N"] for r in rows if r["images"] == "other drawings") == 6
    assert sum(r["N"] for r in rows if r["images"] == "world's renderings") == 4
    assert all(0 <= r["SD-IPC shape"] <= 1 and 0 <= r["CLIP shape"] <= 1 for r in rows)
    world_widths = {r["width %"] for r in rows if r["images"] == "world's renderings"}
    assert world_widths <= {32, 50}  # the world's two sizes fall in the 25-40 and 40-60 % buckets


def test_caption_variants_index_the_canonical_captions():
    from sdipc_lab.toyworld import all_captions, caption
    from sdipc_lab.toyworld import data, models
    from sdipc_lab.toyworld.evaluate import VALUES, caption_with

    world = data.render(30, "train")
    varied = [variety.sample(i) for i in range(15)]
    things, backgrounds = world.things + [s.things for s in varied], world.backgrounds + [s.background for s in varied]
    variants = models.caption_variants(things, backgrounds)  # (N, A, V + 1)
    captions = all_captions()
    checked = held_out = 0
    for i, objects in enumerate(things):
        if len(objects) != 1:
            assert (variants[i] == -1).all()
            continue
        sample = Sample(None, "", objects, backgrounds[i])
        for a, (attribute, values) in enumerate(VALUES.items()):
            assert captions[variants[i, a, variants[i, a, -1]]] == caption(objects, backgrounds[i])
            for v, value in enumerate(values):
                t = objects[0]
                pair = (value if attribute == "shape" else t.shape, value if attribute == "colour" else t.colour)
                if pair in HELD_OUT:  # never a negative: no training image shows the pair either way
                    assert variants[i, a, v] == -1
                    held_out += 1
                else:
                    assert captions[variants[i, a, v]] == caption_with(sample, attribute, value)
            assert (variants[i, a, len(values):-1] == -1).all()
        checked += 1
    assert checked > 20 and held_out > 5


def test_attribute_loss_is_the_cross_entropy_over_each_attribute():
    from sdipc_lab.toyworld import data, models

    torch.manual_seed(0)
    captions = torch.nn.functional.normalize(torch.randn(1800, 8), dim=-1)
    trainer = models.ClipTrainer(None, None, captions, hard_negatives=1.0)
    world = data.render(6, "train", two_objects=0)
    variants = models.caption_variants(world.things, world.backgrounds)
    f = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    got = trainer.attribute_loss(f, variants, torch.tensor(10.0))
    losses = []
    for i in range(6):
        for a in range(5):
            index = variants[i, a, :-1]  # -1: past the attribute's values, or a held-out pair: not a candidate
            logits = torch.where(index >= 0, 10.0 * captions[index.clamp(min=0)] @ f[i], float("-inf"))
            losses.append(torch.nn.functional.cross_entropy(logits[None], variants[i, a, -1:]))
    assert torch.allclose(got, torch.stack(losses).mean(), atol=1e-5)
    assert trainer.attribute_loss(f, torch.full_like(variants, -1), torch.tensor(10.0)).item() == 0


def test_alignment_loss_adds_the_cosine_gap_of_each_image_and_its_own_caption():
    from sdipc_lab.toyworld import models

    torch.manual_seed(0)
    f_img, f_txt = (torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for _ in range(2))
    reference = np.mean([1 - float(np.dot(a, b)) for a, b in zip(f_img.numpy(), f_txt.numpy())])
    assert abs(models.ClipTrainer.alignment_loss(f_img, f_txt).item() - reference) < 1e-6
    assert models.ClipTrainer.alignment_loss(f_img, f_img).abs().item() < 1e-6  # no gap, no loss

    # in the trainer's loss: exactly `align` times the gap at the end token, beside the contrastive loss
    from sdipc_lab import build
    from sdipc_lab.toyworld.data import tokenize

    parts = build.random_components()
    text, vision = parts["text_encoder"].eval(), parts["image_encoder"].eval()
    ids, eos = tokenize(parts["tokenizer"], ["a red circle", "a blue square on white", "a star"], "cpu")
    pad = eos + 1
    pixels = torch.randn(3, 3, vision.config.image_size, vision.config.image_size)
    plain, aligned = models.ClipTrainer(text, vision), models.ClipTrainer(text, vision, align=2.0)
    with torch.no_grad():
        f_img = torch.nn.functional.normalize(vision(pixel_values=pixels).image_embeds, dim=-1)
        states = text.text_model(ids).last_hidden_state[torch.arange(3), eos]
        f_txt = torch.nn.functional.normalize(text.text_projection(states), dim=-1)
        gap = models.ClipTrainer.alignment_loss(f_img, f_txt)
        difference = aligned(ids, eos, pad, pixels) - plain(ids, eos, pad, pixels)
    assert gap > 0.1 and torch.allclose(difference, 2 * gap, atol=1e-5)


def test_grey_shape_loss_pulls_each_images_shape_reading_to_its_grey_copys():
    """`ClipTrainer.grey_shape_loss`: KL from the grey copy's shape reading (held fixed) to the image's, plus the
    grey copy's cross-entropy with the true shape, over the shape row of `caption_variants` (held-out pairs left
    out), checked against a loop in NumPy; the gradient reaches the image's embedding, not the grey copy's
    through the KL; and `grey_copy` of CLIP-normalised pixels is the CLIP-normalised `data.grey`."""
    from sdipc_lab.toyworld import data, models

    torch.manual_seed(0)
    captions = torch.nn.functional.normalize(torch.randn(1800, 8), dim=-1)
    trainer = models.ClipTrainer(None, None, captions, grey_shape=1.0)
    world = data.render(6, "train", two_objects=0)
    variants = models.caption_variants(world.things, world.backgrounds)
    f_img, f_grey = (torch.nn.functional.normalize(torch.randn(6, 8), dim=-1).requires_grad_() for _ in range(2))
    got = trainer.grey_shape_loss(f_img, f_grey, variants, torch.tensor(10.0))
    kl, ce = [], []
    for i in range(6):
        index = variants[i, 0, :-1].numpy()  # the shape row; -1: past the shapes, or a held-out pair
        rows = captions.numpy()[index[index >= 0]]
        p = [np.exp(z - z.max()) / np.exp(z - z.max()).sum() for z in (10 * rows @ f.detach().numpy()[i]
                                                                     for f in (f_img, f_grey))]
        kl.append(np.sum(p[1] * (np.log(p[1]) - np.log(p[0]))))
        truth = int(variants[i, 0, -1])  # the true shape's column among all V
        ce.append(-np.log(p[1][int((index[:truth] >= 0).sum())]))
    assert (variants[:, 0, :-1] < 0).any()  # some images' shape rows leave a held-out pair out
    assert abs(got.item() - (np.mean(kl) + np.mean(ce))) < 1e-4
    same = trainer.grey_shape_loss(f_grey.detach(), f_grey.detach(), variants, torch.tensor(10.0))
    assert abs(same.item() - np.mean(ce)) < 1e-4  # read alike: no KL left
    # the KL moves only the colour image's reading: with the grey copy's cross-entropy taken away, no gradient there
    kl_only = got - trainer.grey_shape_loss(f_grey.detach(), f_grey, variants, torch.tensor(10.0))
    grad_img, grad_grey = torch.autograd.grad(kl_only, (f_img, f_grey))
    assert grad_img.abs().max() > 1e-3 and grad_grey.abs().max() < 1e-6
    assert trainer.grey_shape_loss(f_img, f_grey, torch.full_like(variants, -1), torch.tensor(10.0)).item() == 0

    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(models.grey_copy(data.clip_normalize(pixels)), data.clip_normalize(data.grey(pixels)),
                          atol=1e-5)


def test_end_token_only_is_the_end_tokens_contrastive_loss_from_a_shorter_text_run():
    """`ClipTrainer(end_token_only=True)`: the text run up to the batch's last end token gives the same end-token
    states as the full run (causal attention), and the loss is the symmetric cross-entropy there alone, checked
    against NumPy; the full loss averages it with the padding position's."""
    from sdipc_lab import build
    from sdipc_lab.toyworld import models
    from sdipc_lab.toyworld.data import tokenize

    torch.manual_seed(0)
    parts = build.random_components()
    text, vision = parts["text_encoder"].eval(), parts["image_encoder"].eval()
    ids, eos = tokenize(parts["tokenizer"], ["a red circle", "a blue square on white", "a star"], "cpu")
    pad = eos + 3
    pixels = torch.randn(3, 3, vision.config.image_size, vision.config.image_size)
    both, end = models.ClipTrainer(text, vision), models.ClipTrainer(text, vision, end_token_only=True)
    with torch.no_grad():
        f_both, f_end = both.text_features(ids, eos, pad), end.text_features(ids, eos, pad)
        assert len(f_both) == 2 and len(f_end) == 1 and torch.allclose(f_end[0], f_both[0], atol=1e-5)
        f_img = torch.nn.functional.normalize(vision(pixel_values=pixels).image_embeds, dim=-1).numpy()
        scale = float(end.logit_scale.exp())

        def symmetric_ce(f_txt):
            logits = scale * f_img @ f_txt.numpy().T
            ce = [np.mean([np.log(np.exp(z).sum()) - z[i] for i, z in enumerate(m)]) for m in (logits, logits.T)]
            return sum(ce) / 2

        assert abs(end(ids, eos, pad, pixels).item() - symmetric_ce(f_both[0])) < 1e-4
        assert abs(both(ids, eos, pad, pixels).item() - (symmetric_ce(f_both[0]) + symmetric_ce(f_both[1])) / 2) < 1e-4


def test_grey_share_reads_the_grey_copies_of_the_first_share_of_the_images():
    """`ClipTrainer(grey_share=...)`: the grey-shape loss of the first ceil(share * b) images alone, their grey
    copies through the tower; share 1 is every image."""
    import random

    from sdipc_lab import build
    from sdipc_lab.toyworld import data, models
    from sdipc_lab.toyworld.data import tokenize
    from sdipc_lab.toyworld.world import all_captions

    torch.manual_seed(0)
    parts = build.random_components()
    text, vision = parts["text_encoder"].eval(), parts["image_encoder"].eval()
    world = data.render(6, "train", two_objects=0)
    variants = models.caption_variants(world.things, world.backgrounds)
    ids, eos = tokenize(parts["tokenizer"], world.captions(torch.arange(6), random.Random(0)), "cpu")
    pixels = data.clip_normalize(world.pixels(torch.arange(6), "cpu"))
    pixels = torch.nn.functional.interpolate(pixels, size=vision.config.image_size)
    with torch.no_grad():
        all_ids, all_eos = tokenize(parts["tokenizer"], all_captions(), "cpu")
        captions = models.ClipTrainer(text, vision).text_features(all_ids, all_eos, all_eos)[0]  # (C, P)
        plain = models.ClipTrainer(text, vision, captions)(ids, eos, eos, pixels, variants)
        f = torch.nn.functional.normalize(vision(pixel_values=pixels).image_embeds, dim=-1)
        f_grey = torch.nn.functional.normalize(vision(pixel_values=models.grey_copy(pixels)).image_embeds, dim=-1)
        scale = models.ClipTrainer(text, vision).logit_scale.exp()
        for share, k in ((1.0, 6), (0.5, 3), (0.2, 2)):
            trainer = models.ClipTrainer(text, vision, captions, grey_shape=2.0, grey_share=share)
            added = trainer(ids, eos, eos, pixels, variants) - plain
            expected = 2.0 * trainer.grey_shape_loss(f[:k], f_grey[:k], variants[:k], scale)
            assert expected > 0 and torch.allclose(added, expected, atol=1e-5), (share, added, expected)


@pytest.mark.parametrize("option, bad, why", [("--variety", "1.5", "between 0 and 1"), ("--hard-negatives", "-1", ">= 0"),
                                              ("--align", "-1", ">= 0"), ("--align", "nan", ">= 0"),
                                              ("--grey-shape", "-1", ">= 0")])
def test_vision_options_are_refused_elsewhere_and_out_of_range(tmp_path, capsys, option, bad, why):
    from sdipc_lab.toyworld import train as T

    with pytest.raises(SystemExit):
        T.main(["clip", "--size", "test", "--out", str(tmp_path), option, "0.5"])
    assert ("for the vision or the shape stage alone" if option == "--variety" else "for the vision stage alone") in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        T.main(["vision", "--size", "test", "--out", str(tmp_path), option, bad])
    assert why in capsys.readouterr().err


def test_end_token_only_and_grey_share_are_refused_where_they_mean_nothing(tmp_path, capsys):
    from sdipc_lab.toyworld import train as T

    for argv, why in ((["clip", "--end-token-only"], "for the vision stage alone"),
                      (["vision", "--grey-share", "0.5"], "give --grey-shape WEIGHT too"),
                      (["vision", "--grey-shape", "1", "--grey-share", "0"], "above 0 and at most 1"),
                      (["vision", "--grey-shape", "1", "--grey-share", "1.5"], "above 0 and at most 1")):
        with pytest.raises(SystemExit):
            T.main([*argv, "--size", "test", "--out", str(tmp_path)])
        assert why in capsys.readouterr().err


def test_fresh_vision_trains_a_new_tower_of_the_patch_size_and_keeps_the_text_tower(tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig

    from sdipc_lab import checkpoints
    from sdipc_lab.toyworld import train as T

    T.main(["clip", "--size", "test", "--steps", "2", "--out", str(tmp_path)])
    text_before = load_file(tmp_path / "text_encoder" / "model.safetensors")
    assert CLIPVisionConfig.from_pretrained(tmp_path / "image_encoder").patch_size == 16  # the test size's
    T.main(["vision", "--size", "test", "--steps", "2", "--out", str(tmp_path), "--fresh-vision", "8",
            "--variety", "0.5", "--hard-negatives", "1", "--align", "1", "--grey-shape", "1", "--grey-share", "0.5",
            "--end-token-only"])  # every loss, on
    # drawings drawn anew
    signature = json.loads(checkpoints._read_checkpoint(tmp_path / "vision.ckpt.safetensors")[0]["signature"])
    assert signature["images"].endswith("varied, drawn anew") and signature["sizes"]["align"] == 1
    assert signature["sizes"]["grey_share"] == 0.5 and signature["sizes"]["end_token_only"] is True
    assert CLIPVisionConfig.from_pretrained(tmp_path / "image_encoder").patch_size == 8
    text_after = load_file(tmp_path / "text_encoder" / "model.safetensors")
    assert all(torch.equal(v, text_after[k]) for k, v in text_before.items())
    with pytest.raises(SystemExit):
        T.main(["vision", "--size", "test", "--out", str(tmp_path), "--fresh-vision", "7"])
    assert "divides the 64-px image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["clip", "--size", "test", "--out", str(tmp_path), "--fresh-vision", "8"])
    assert "for the vision or the shape stage alone" in capsys.readouterr().err


def test_reading_grey_makes_a_tower_read_each_picture_as_its_grey_copy():
    """`models.reading_grey`: the rewritten tower embeds a colour picture exactly as the tower embedded its grey
    copy (`data.grey`), and grey pictures exactly as before; the tower it started from does neither."""
    import copy

    from sdipc_lab.toyworld import models
    from sdipc_lab.toyworld.data import clip_normalize, grey

    torch.manual_seed(0)
    s = models.MODEL_SIZES["test"]
    tower = models.new_clip(s, models.new_tokenizer())[1].eval()
    with torch.no_grad():  # a tower whose channels differ, as a trained one's do
        tower.vision_model.embeddings.patch_embedding.weight.normal_(0, 0.1)
    rewritten = models.reading_grey(copy.deepcopy(tower))
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1  # colour pictures in [-1, 1]
    with torch.no_grad():
        as_grey = tower(pixel_values=clip_normalize(grey(pixels))).image_embeds
        in_colour = rewritten(pixel_values=clip_normalize(pixels)).image_embeds
        grey_again = rewritten(pixel_values=clip_normalize(grey(pixels))).image_embeds
        before = tower(pixel_values=clip_normalize(pixels)).image_embeds
    assert torch.allclose(in_colour, as_grey, atol=1e-4) and torch.allclose(grey_again, as_grey, atol=1e-4)
    assert (before - as_grey).abs().max() > 100 * (in_colour - as_grey).abs().max()

