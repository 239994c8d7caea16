"""One loader for every source; clear errors for unknown sources and missing weights."""

import json

import numpy as np
import pytest
import torch

import sdipc_lab as S
from sdipc_lab.lab import HUB_SOURCES


def test_lab_bundle(lab):
    assert lab.max_length == 77
    assert lab.tokenizer.pad_token == lab.tokenizer.eos_token  # SD v1 pads with the end token
    assert lab.pipe.text_encoder is lab.text_encoder.text_model  # one text tower, not two
    assert lab.W_t.shape == (lab.text_encoder.config.projection_dim, lab.text_encoder.config.hidden_size)
    assert {"cutoff", "norm", "norm_t"} <= set(lab.constants)
    assert lab.device == torch.device("cpu") and lab.dtype == torch.float32


def test_save_and_load_round_trip(lab, refs, tmp_path):
    folder = S.save_lab(lab, tmp_path / "lab")
    assert json.loads((folder / "sdipc_lab.json").read_text())["cutoff"] == lab.cutoff
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))  # safetensors only
    again = S.load_lab(folder, device="cpu")
    torch.testing.assert_close(S.image_prompt_embeds(again, refs), S.image_prompt_embeds(lab, refs))
    a = S.vary(lab, refs[0], n=1, seed=3)[0]
    b = S.vary(again, refs[0], n=1, seed=3)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown lab source 'sd-v9'.*'toy'.*save_lab"):
        S.load_lab("sd-v9")


def test_folder_that_is_not_a_lab(tmp_path):
    with pytest.raises(ValueError, match="not a lab"):
        S.load_lab(tmp_path)


def test_folder_missing_a_component(lab, tmp_path):
    folder = S.save_lab(lab, tmp_path / "lab")
    for f in (folder / "unet").iterdir():
        f.unlink()
    with pytest.raises(S.WeightsNotFoundError, match="unet"):
        S.load_lab(folder)


@pytest.mark.parametrize("source", list(HUB_SOURCES))
def test_missing_hub_weights_offline(source, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(S.WeightsNotFoundError) as info:
        S.load_lab(source, device="cpu")
    message = str(info.value)
    assert "openai/clip-vit-large-patch14" in message or HUB_SOURCES[source] in message
    assert f"python -m sdipc_lab download {source}" in message and "HF_HOME" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no hub stack trace


def test_toy_falls_back_or_loads():
    lab = S.load_lab("toy", device="cpu")
    assert lab.source.startswith("toy")


def test_same_seed_same_images(lab, refs):
    a = S.vary(lab, refs[0], n=2, seed=7)
    b = S.vary(lab, refs[0], n=2, seed=7)
    c = S.vary(lab, refs[0], n=2, seed=8)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # n images differ from each other


def test_vary_edit_generate_counts(lab, refs):
    assert len(S.vary(lab, refs, n=2)) == 6  # n per reference
    assert len(S.vary(lab, refs, n=2, weights=[1, 1, 1])) == 2  # one blended prompt
    assert len(S.vary(lab, refs[0], n=1, negative_images=refs[1:])) == 1
    assert len(S.edit(lab, refs[0], "a red star", n=3)) == 3
    assert len(S.generate(lab, ["a red star", "a blue box"], n=1)) == 2
    assert S.vary(lab, refs[0], n=1)[0].size == (lab.image_size, lab.image_size)


def test_negative_image_changes_the_result(lab, refs):
    plain = S.vary(lab, refs[0], n=1, seed=1)[0]
    negative = S.vary(lab, refs[0], n=1, seed=1, negative_images=refs[1])[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(negative))


def test_missing_tokenizer_files_are_not_silently_replaced(lab, tmp_path):
    folder = S.save_lab(lab, tmp_path / "lab")
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    with pytest.raises(S.WeightsNotFoundError, match="tokenizer"):
        S.load_lab(folder)


def test_components_that_do_not_fit(lab):
    from sdipc_lab.build import random_components, word_tokenizer

    parts = random_components()
    parts["tokenizer"] = word_tokenizer(["red"], model_max_length=20)
    with pytest.raises(ValueError, match="pads to 20 tokens"):
        S.assemble(parts, lab.constants, device="cpu")


def test_vit_l14_legacy_eos_id_is_accepted(lab):
    """openai/clip-vit-large-patch14's config says eos_token_id=2 (pre-2023 legacy); that lab must load."""
    from sdipc_lab.build import random_components

    parts = random_components()
    parts["text_encoder"].config.eos_token_id = 2
    S.assemble(parts, lab.constants, device="cpu")  # no error
    parts["text_encoder"].config.eos_token_id = 5
    with pytest.raises(ValueError, match="eos_token_id"):
        S.assemble(parts, lab.constants, device="cpu")
