"""References each lab is shown (toy-world samples or real photographs) and the measures that work on both."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import sdipc_lab as S
from sdipc_lab import datasets as D
from sdipc_lab import experiments as E
from sdipc_lab import plots
from sdipc_lab.convert import convert
from sdipc_lab.toyworld import Sample, all_captions, sample
from sdipc_lab.toyworld.evaluate import image_features, text_features
from sdipc_lab.toyworld.judge import Judge


@pytest.fixture(scope="module")
def sd_like(lab):
    """The tiny lab under a hub source's name: what `knows_world` sees of SD v1.4 (its tokenizer aside)."""
    return dataclasses.replace(lab, source="sd-v1-4")


def test_photos_are_real_squares_with_captions_and_credits():
    photos = S.photos()
    assert len(photos) == len(D.PHOTOS) >= 6
    for p in photos:
        assert p.image.mode == "RGB" and p.image.size == (D.PHOTO_SIZE, D.PHOTO_SIZE)
        assert p.caption and p.credit and p.attributes == {"subject": p.subject}
        pixels = np.asarray(p.image, np.float32)
        assert pixels.std() > 10  # a photograph, not a blank
    assert len({p.caption for p in photos}) == len(photos)


def test_photos_are_drawn_by_the_seed_and_refuse_too_many():
    a, b = S.photos(3, seed=1), S.photos(3, seed=1)
    assert [p.name for p in a] == [p.name for p in b]
    assert [p.name for p in S.photos(3)] == list(D.PHOTOS)[:3]
    with pytest.raises(ValueError, match="at most"):
        S.photos(len(D.PHOTOS) + 1)


def test_the_world_is_shown_to_world_labs_and_photographs_to_sd(lab, sd_like):
    assert S.knows_world(lab) and not S.knows_world(sd_like)
    world = S.references(lab, 3)
    assert all(isinstance(s, Sample) for s in world)
    assert [s.caption for s in world] == [sample(i, "test", two_objects=0).caption for i in range(3)]
    shown = S.references(sd_like, 3)
    assert all(isinstance(p, D.Photo) for p in shown)
    assert len(S.references(sd_like, 100)) == len(D.PHOTOS)  # a notebook's N works on every lab
    assert all(isinstance(p, D.Photo) for p in S.references(lab, 2, kind="photos"))
    assert all(isinstance(s, Sample) for s in S.references(sd_like, 2, kind="world"))
    drawn = S.references(lab, 3, seed=5)
    assert [s.caption for s in drawn] == [s.caption for s in S.references(lab, 3, seed=5)]
    assert [s.caption for s in drawn] != [s.caption for s in world]


@pytest.mark.parametrize("bad", [dict(n=0), dict(n=2.5), dict(n=True), dict(n=2, kind="cats")])
def test_bad_reference_requests_are_refused(lab, bad):
    with pytest.raises(ValueError, match="n must be a whole number|kind must be"):
        S.references(lab, **bad)


def test_the_judge_and_the_texts_follow_the_lab(lab, sd_like):
    assert isinstance(S.judge_for(lab), Judge) and S.judge_for(sd_like) is None
    assert S.example_edit(lab) != S.example_edit(sd_like)
    world_texts, photo_texts = S.candidate_texts(lab), S.candidate_texts(sd_like)
    assert world_texts == all_captions() and sample(0, "test").attributes["shape"] in " ".join(world_texts)
    assert {p.caption for p in S.photos()} <= set(photo_texts) and len(photo_texts) > len(D.PHOTOS)
    with pytest.raises(ValueError, match="mix"):
        D.zero_shot(lab, S.references(lab, 1) + S.photos(1))


@pytest.mark.parametrize("space", ["c", "t"])
def test_zero_shot_on_photographs_matches_a_numpy_reference(lab, space):
    photos = S.photos()
    subjects, _ = D._subjects()
    f_img = image_features(lab, [p.image for p in photos], space).numpy()  # (N, P or D), unit
    f_txt = text_features(lab, [D.PHOTO_TEMPLATE.format(s) for s in subjects], space).numpy()
    expected = np.mean(np.argmax(f_img @ f_txt.T, axis=1) == [subjects.index(p.subject) for p in photos])
    assert D.zero_shot(lab, photos, space) == {"subject": pytest.approx(expected)}


def test_retrieval_on_photographs_matches_a_numpy_reference(lab):
    photos = S.photos()
    f_img = image_features(lab, [p.image for p in photos], "c").numpy()
    f_txt = text_features(lab, [p.caption for p in photos], "c").numpy()
    sim = f_img @ f_txt.T
    ranks = [int((row > row[i]).sum()) for i, row in enumerate(sim)]  # how many captions beat the right one
    got = D.retrieval(lab, photos, "c")
    assert got["i2t R@1"] == pytest.approx(np.mean([r < 1 for r in ranks]))
    assert got["i2t R@5"] == pytest.approx(np.mean([r < 5 for r in ranks]))
    assert got["i2t R@1"] <= got["i2t R@5"] and got["t2i R@1"] <= got["t2i R@5"]


def test_word_reading_of_a_photograph_names_the_nearest_subject(lab):
    photo = S.photos(1)[0]
    f = convert(lab, S.image_embeds(lab, photo.image))[0]  # (D,)
    row, = D.word_reading(lab, f, like=photo)
    subjects, _ = D._subjects()
    f_eos = text_features(lab, [D.PHOTO_TEMPLATE.format(s) for s in subjects], "t")
    cos = f_eos @ torch.nn.functional.normalize(f.float(), dim=0)
    assert row["read as"] == subjects[int(cos.argmax())] and row["truth"] == photo.subject
    assert row["margin"] >= 0
    assert {r["attribute"] for r in D.word_reading(lab, f, like=sample(0, "test"))} >= {"shape", "colour"}


def test_tables_on_photographs_keep_the_clip_measures_and_leave_the_judge_out(lab):
    photos = S.photos(3)
    rows, images = E.variation_table(lab, photos, judge=None, steps=2)
    assert {r["condition"] for r in rows} >= {"SD-IPC (vary)", "true caption"}
    assert all("CLIP-I to reference" in r and not any(k.startswith("judge") for k in r) for r in rows)
    assert all(len(v) == 3 for v in images.values())


def test_claims_on_what_a_lab_did_not_measure_say_so():
    row = D.measured({"CLIP-I": 0.8})
    assert row["CLIP-I"] == 0.8 and math.isnan(row["judge colour"])
    table = plots.claims([{"claim": "c", "effect": row["judge colour"] - 0.1, "margin": 0.1},
                          {"claim": "d", "effect": row["CLIP-I"] - 0.5}])
    assert [r["verdict"] for r in table.rows] == ["not measured here", "reproduced"]
    with pytest.raises(ValueError, match="finite"):
        plots.verdict(math.inf)


def test_a_photograph_drawn_on_does_not_change_the_next_one():
    first = S.photos(1)[0]
    first.image.paste((255, 0, 0), (0, 0, 64, 64))
    assert np.asarray(S.photos(1)[0].image)[:64, :64].tolist() != np.asarray(first.image)[:64, :64].tolist()


def test_curves_name_what_this_lab_did_not_measure(capsys):
    rows = [{"x": 0, "CLIP-T": 20.0}, {"x": 1, "CLIP-T": 22.0}]
    fig = plots.plot_curves(rows, "x", ["CLIP-T", "judge colour"])
    assert [line.get_label() for line in fig.axes[0].lines] == ["CLIP-T"]
    assert any("not measured on this lab: judge colour" in t.get_text() for t in fig.texts)
    assert plots.plot_curves(rows, "x", ["judge colour"], title="judged") is None
    assert "judged: nothing to draw, not measured on this lab: judge colour" in capsys.readouterr().out
