"""SD-IPC-FT/CT: prompts inserted (never overwriting image tokens), k/v from the base, Eq. 9 trains, files round-trip."""

import numpy as np
import pytest
import torch
from PIL import Image

import sdipc_lab as S
from sdipc_lab import finetune as FT
from sdipc_lab.adapters import DeepVisualPrompts, applied
from sdipc_lab.convert import token_ids
from sdipc_lab.toyworld import sample


@pytest.fixture()
def fresh_lab():
    return S.load_lab("tiny", device="cpu")


def _layer_inputs(image_encoder, pixels):
    seen = []
    handles = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
               for layer in image_encoder.vision_model.encoder.layers]
    out = image_encoder(pixel_values=pixels)
    for h in handles:
        h.remove()
    return seen, out


def test_prompts_are_inserted_not_overwriting(fresh_lab):
    enc = fresh_lab.image_encoder
    pixels = fresh_lab.feature_extractor(images=[sample(0, "test").image], return_tensors="pt").pixel_values
    plain_inputs, plain = _layer_inputs(enc, pixels)
    vpt = DeepVisualPrompts(enc, n_tokens=3).eval()
    vpt.attach(enc)
    try:
        inputs, prompted = _layer_inputs(enc, pixels)
    finally:
        vpt.detach()
    n_img = plain_inputs[0].shape[1]  # 1 + HW
    for i, x in enumerate(inputs):
        assert x.shape[1] == n_img + 3  # inserted: every image token is still there
        torch.testing.assert_close(x[:, 1:4], vpt.prompts[i][None])  # fresh prompts at each layer
    torch.testing.assert_close(inputs[0][:, :1], plain_inputs[0][:, :1])  # class token untouched
    torch.testing.assert_close(inputs[0][:, 4:], plain_inputs[0][:, 1:])  # patch tokens untouched
    assert prompted.last_hidden_state.shape == plain.last_hidden_state.shape  # dropped again after each layer
    assert not torch.allclose(prompted.image_embeds, plain.image_embeds)
    torch.testing.assert_close(enc(pixel_values=pixels).image_embeds, plain.image_embeds)  # detach restores


def test_kv_processors_start_from_the_base(fresh_lab):
    ref = sample(0, "test").image
    before = S.vary(fresh_lab, ref, n=1, seed=1)[0]
    ft = FT.new_finetuned(fresh_lab, train_prompts=False)
    assert ft.kv and all(n.endswith("attn2.processor") for n in ft.kv)
    same = S.vary(fresh_lab, ref, n=1, seed=1, finetuned=ft)[0]
    assert np.abs(np.asarray(same, int) - np.asarray(before, int)).max() <= 1
    after = S.vary(fresh_lab, ref, n=1, seed=1)[0]  # nothing left behind
    assert np.array_equal(np.asarray(after), np.asarray(before))


def _concepts(n_per=3, concepts=("a", "b")):
    return FT.Concepts({c: [sample(i + 10 * k, "test", two_objects=0).image for i in range(n_per)]
                        for k, c in enumerate(concepts)})


def _eval_loss(lab, ft, concepts):
    flat = [im for _, im in concepts.flat]
    torch.manual_seed(123)
    pixels = lab.feature_extractor(images=flat, return_tensors="pt").pixel_values
    with applied(lab, ft), torch.no_grad():  # the internal context vary(finetuned=...) uses
        return FT.Eq9(lab, ft)(pixels, FT.latents_of(lab, flat)).item()


def test_training_lowers_the_eq9_loss_and_resumes(fresh_lab, tmp_path, capsys):
    concepts = _concepts()
    untrained = FT.new_finetuned(fresh_lab, n_tokens=4)
    before = _eval_loss(fresh_lab, untrained, concepts)
    ft = FT.finetune(fresh_lab, concepts, mode="ct", steps=12, lr=3e-3, batch=6, out=tmp_path, n_tokens=4)
    assert _eval_loss(fresh_lab, ft, concepts) < before
    assert (tmp_path / "finetuned.safetensors").exists() and (tmp_path / "sdipc-ct_loss.png").exists()
    FT.finetune(fresh_lab, concepts, mode="ct", steps=15, lr=3e-3, batch=6, out=tmp_path, n_tokens=4)
    assert "resumed at step 12" in capsys.readouterr().out


def test_ft_mode_with_ab_and_text_regulariser(fresh_lab, tmp_path):
    concepts = _concepts()
    ft = FT.finetune(fresh_lab, concepts, mode="ft", steps=3, batch=2, out=tmp_path,
                     captions={"a": "a red disk", "b": "a blue box"})
    assert ft.info["ab"] and ft.info["mode"] == "ft"


def test_ft_with_targets_denoises_the_targets_from_the_domain_images(fresh_lab, tmp_path, monkeypatch):
    domain = FT.Concepts({"a": [sample(i, "test").image for i in (0, 1)], "b": [sample(2, "test").image]})
    goals = FT.Concepts({"a": [sample(10, "test").image], "b": [sample(11, "test").image, sample(12, "test").image]})
    encoded, calls = FT.latents_of, []
    monkeypatch.setattr(FT, "latents_of", lambda lab, images: calls.append(list(images)) or encoded(lab, images))
    ft = FT.finetune(fresh_lab, domain, mode="ft", steps=2, batch=2, out=tmp_path / "ft", targets=goals,
                     captions={"a": "a red disk", "b": ["a blue box", "a green star"]})  # one per target image
    assert calls == [[im for _, im in goals.flat]]  # only the targets are denoised: x_target and the regulariser
    assert ft.info["targets"] == {"a": 1, "b": 2} and ft.info["ab"]
    with pytest.raises(ValueError, match="no images for concepts \\['b'\\]"):
        FT.finetune(fresh_lab, domain, mode="ft", steps=1, out=tmp_path / "x", targets=FT.Concepts({"a": goals.images["a"]}))
    with pytest.raises(ValueError, match="an FT option"):
        FT.finetune(fresh_lab, domain, mode="ct", steps=1, out=tmp_path / "y", targets=goals)


def test_file_round_trip_and_wrong_base(fresh_lab, full_lab, tmp_path):
    ft = FT.new_finetuned(fresh_lab, n_tokens=2)
    with torch.no_grad():
        ft.prompts.prompts.add_(1.0)
    path = FT.save_finetuned(ft, tmp_path / "ft.safetensors")
    again = FT.load_finetuned(fresh_lab, path)
    for key, value in ft.tensors().items():
        torch.testing.assert_close(again.tensors()[key], value)
    ref = sample(0, "test").image
    a = S.vary(fresh_lab, ref, n=1, seed=2, finetuned=ft)[0]
    b = S.vary(fresh_lab, ref, n=1, seed=2, finetuned=again)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="same base"):
        FT.load_finetuned(full_lab, path)


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="has no images"):
        FT.read_folder(tmp_path)
    broken = tmp_path / "one"
    broken.mkdir()
    (broken / "x.png").write_text("not a png")
    with pytest.raises(ValueError, match="x.png"):
        FT.read_folder(tmp_path)
    assert FT.main([str(tmp_path / "missing")]) == 2


def test_ab_needs_two_images_per_concept(fresh_lab, tmp_path):
    one = FT.Concepts({"a": [sample(0, "test").image]})
    with pytest.raises(ValueError, match="at least 2 images"):
        FT.finetune(fresh_lab, one, mode="ft", ab=True, steps=1, out=tmp_path)


def test_read_folder_groups_by_subfolder(tmp_path):
    for concept in ("cat", "dog"):
        (tmp_path / concept).mkdir()
        for i in range(2):
            sample(i, "test").image.save(tmp_path / concept / f"{i}.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "cat" / "extra.jpg")
    concepts = FT.read_folder(tmp_path)
    assert {k: len(v) for k, v in concepts.images.items()} == {"cat": 3, "dog": 2}


def test_custom_diffusion_baseline(fresh_lab, tmp_path):
    images = [sample(i, "test", two_objects=0).image for i in range(3)]
    ft = FT.custom_diffusion(fresh_lab, images, class_word="heart", steps=6, batch=3, out=tmp_path)
    tokenizer, encoder = ft.text
    new_id = tokenizer.convert_tokens_to_ids("<new1>")
    assert new_id == len(tokenizer) - 1 and "<new1>" not in fresh_lab.tokenizer.get_vocab()
    base = fresh_lab.text_encoder.get_input_embeddings().weight
    trained = encoder.get_input_embeddings().weight
    torch.testing.assert_close(trained[:-1], base)  # only the new token's row moved
    assert not torch.allclose(trained[-1], base[tokenizer.convert_tokens_to_ids("heart</w>")])
    base_pipe_text = fresh_lab.pipe.text_encoder
    with applied(fresh_lab, ft):
        assert fresh_lab.pipe.text_encoder is encoder.text_model and fresh_lab.pipe.tokenizer is tokenizer  # one text
    images = S.generate(fresh_lab, "a <new1> heart", n=1, finetuned=ft)
    assert len(images) == 1 and fresh_lab.tokenizer is not tokenizer  # the lab's own tokenizer is back
    assert fresh_lab.pipe.text_encoder is base_pipe_text and fresh_lab.pipe.tokenizer is fresh_lab.tokenizer
    again = FT.load_finetuned(fresh_lab, tmp_path / "finetuned.safetensors")
    torch.testing.assert_close(again.text[1].get_input_embeddings().weight[-1], trained[-1])
    with pytest.raises(ValueError, match="one token"):
        FT.custom_diffusion(fresh_lab, images, class_word="zzzz qqq", steps=1, out=tmp_path / "x")


def test_custom_diffusion_pairs_each_image_with_its_own_caption(fresh_lab, tmp_path, monkeypatch):
    images = [sample(i, "test", two_objects=0).image for i in range(3)]
    captions = [f"a {size} <new1> heart on the left" for size in ("small", "large", "big")]
    seen = []
    forward = FT.TextToImageLoss.forward
    monkeypatch.setattr(FT.TextToImageLoss, "forward",
                        lambda self, ids, latents: seen.append((ids.clone(), latents.clone())) or forward(self, ids, latents))
    ft = FT.custom_diffusion(fresh_lab, images, class_word="heart", captions=captions, steps=4, batch=3, out=tmp_path)
    tokenizer = ft.text[0]
    caption_ids = token_ids(tokenizer, captions)[0]  # (3, 77)
    latents = FT.latents_of(fresh_lab, images)  # (3, 4, h, w)
    for ids, z in seen:
        for row, latent in zip(ids, z):
            caption = next(i for i in range(3) if torch.equal(caption_ids[i], row.cpu()))
            image = next(i for i in range(3) if torch.allclose(latents[i], latent))
            assert caption == image
    assert ft.info["lr"] == fresh_lab.finetune_lr["custom-diffusion"]  # the lab's measured lr by default


@pytest.mark.parametrize("captions, match", [
    (["a <new1> heart"], "one per image"),
    (["a heart", "a <new1> heart", "a <new1> heart"], "contain '<new1>'"),
    (["a <new1> heart" + " big" * 80] * 3, "tokens long"),
])
def test_custom_diffusion_refuses_bad_captions(fresh_lab, tmp_path, captions, match):
    images = [sample(i, "test", two_objects=0).image for i in range(3)]
    with pytest.raises(ValueError, match=match):
        FT.custom_diffusion(fresh_lab, images, class_word="heart", captions=captions, steps=1, out=tmp_path)


def test_learning_rate_defaults_to_the_labs(fresh_lab, tmp_path):
    images = [sample(i, "test", two_objects=0).image for i in range(2)]
    fresh_lab.finetune_lr = {**fresh_lab.finetune_lr, "ct": 0.0123}
    ft = FT.finetune(fresh_lab, FT.Concepts({"c": images}), mode="ct", steps=1, batch=2, out=tmp_path)
    assert ft.info["lr"] == 0.0123
    folder = S.save_lab(fresh_lab, tmp_path / "lab")
    assert S.load_lab(folder, device="cpu").finetune_lr["ct"] == 0.0123  # carried in the lab's constants


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finetuning_a_half_precision_lab_stays_finite(dtype, tmp_path):
    """load_lab picks fp16 on a GPU: the trainable k/v, prompts and token embedding must be float32 (AdamW's
    update underflows in fp16 and the loss went NaN after one step), the frozen lab staying in its dtype."""
    from sdipc_lab import finetune as FT
    from sdipc_lab.toyworld import concept_samples

    half = S.load_lab("tiny", device="cpu", dtype=dtype)
    images = [s.image for s in concept_samples("star", "red", 2)]
    ct = FT.finetune(half, FT.Concepts({"red star": images}), mode="ct", steps=3, lr=1e-2, out=tmp_path / "ct")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for proc in ct.kv.values()
               for p in proc.parameters())
    assert half.unet.dtype == dtype
    cd = FT.custom_diffusion(half, images, class_word="star", steps=3, lr=1e-2, out=tmp_path / "cd")
    assert torch.isfinite(cd.text[1].get_input_embeddings().weight).all()
    out = S.vary(half, images[0], n=1, finetuned=ct) + S.generate(half, "a red star", n=1)
    assert all(np.isfinite(np.asarray(im, dtype=np.float32)).all() for im in out)


def test_finetune_comparison_rows_for_several_finetuned(fresh_lab):
    from sdipc_lab import experiments as E

    ft = FT.new_finetuned(fresh_lab, n_tokens=2)  # untrained: its prompts at their (random) initialisation
    concepts = [("star", "red")]
    one = E.finetune_comparison(fresh_lab, concepts, ft, n_refs=2, steps=2)
    many = E.finetune_comparison(fresh_lab, concepts, {"FT at step 0": ft, "the same again": ft}, n_refs=2, steps=2)
    assert [r["method"] for r in one] == ["SD-IPC", "SD-IPC-FT"]
    assert [r["method"] for r in many] == ["SD-IPC", "FT at step 0", "the same again"]
    assert many[0] == one[0]  # the same seed: the same SD-IPC images
    assert many[1]["CLIP-I"] == many[2]["CLIP-I"] == one[1]["CLIP-I"]
    assert not np.isclose(one[1]["CLIP-I"], one[0]["CLIP-I"])  # inserted prompts move the embedding before training


@pytest.mark.parametrize("n_refs", [0, -1, 2.5, True])
def test_finetune_comparison_refuses_a_count_of_references_that_is_not_one_or_more(fresh_lab, n_refs):
    from sdipc_lab import experiments as E

    with pytest.raises(ValueError, match="n_refs"):
        E.finetune_comparison(fresh_lab, [("star", "red")], FT.new_finetuned(fresh_lab, n_tokens=2), n_refs=n_refs)


def test_domain_finetune_rows_compare_before_after_on_the_domain_and_the_world(fresh_lab, tmp_path):
    from sdipc_lab import experiments as E
    from sdipc_lab.toyworld.judge import Judge

    rows, ft = E.domain_finetune(fresh_lab, kind="pil", n_train=12, n_test=4, steps=1, out=tmp_path / "ft",
                                 judge=Judge())
    assert [(r["method"], r["images"]) for r in rows] == [
        ("SD-IPC", "pil drawings (unseen)"), ("SD-IPC", "world test"), ("SD-IPC-FT", "pil drawings (unseen)"),
        ("SD-IPC-FT", "world test"), ("linear probe on the image embedding", "pil drawings (unseen)")]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("shape", "colour"))
    assert ft.info["targets"] and ft.info["mode"] == "ft"  # the world's renderings of each concept as x_target
