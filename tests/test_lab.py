"""One loader for every source; clear errors for unknown sources and missing weights."""

import json

import numpy as np
import pytest
import torch

import sdipc_lab as S
from sdipc_lab.hub import HUB_SOURCES


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


def test_a_saved_lab_names_no_folder_of_the_machine_that_saved_it(lab, tmp_path):
    first = S.save_lab(lab, tmp_path / "first")
    again = S.save_lab(S.load_lab(first, device="cpu"), tmp_path / "again")  # loaded from a folder: diffusers
    configs = {p.relative_to(again): json.loads(p.read_text()) for p in again.glob("*/config.json")}  # records it
    assert {"unet", "vae", "text_encoder"} <= {p.parts[0] for p in configs}
    assert not [p for p, config in configs.items() if "_name_or_path" in config or str(tmp_path) in json.dumps(config)]
    assert json.loads((again / "unet" / "config.json").read_text())["block_out_channels"] == \
        list(lab.unet.config.block_out_channels)


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


def fake_cgroups(root, lines: str, files: dict) -> None:
    """A fake /proc/self/cgroup and /sys/fs/cgroup under `root`."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(lines)
    for name, text in files.items():
        (root / "sys/fs/cgroup" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup" / name).write_text(text)


def test_usable_cpus_follow_the_cgroup_quota(tmp_path):
    affinity = len(__import__("os").sched_getaffinity(0))
    v2 = tmp_path / "v2"  # JupyterHub / Kubernetes style: a 0.5-CPU limit two levels up
    fake_cgroups(v2, "0::/user/kernel\n", {"user/cpu.max": "50000 100000\n", "user/kernel/cpu.max": "max 100000\n"})
    assert S.cpus.cgroup_cpu_quota(v2) == 0.5
    assert S.usable_cpus(v2) == 1
    v1 = tmp_path / "v1"  # docker --cpus=3 on cgroup v1, the container's own cgroup mounted at the root
    fake_cgroups(v1, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n",
                 {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert S.cpus.cgroup_cpu_quota(v1) == 3.0
    assert S.usable_cpus(v1) == min(affinity, 3)
    free = tmp_path / "free"  # no limit anywhere: the affinity decides
    fake_cgroups(free, "0::/\n", {"cpu.max": "max 100000\n"})
    assert S.cpus.cgroup_cpu_quota(free) is None and S.usable_cpus(free) == affinity
    assert S.usable_cpus(tmp_path / "not-linux") == affinity  # no /proc: no quota


def test_the_lab_runs_on_its_threads_and_gives_the_process_its_own_back(lab, refs):
    seen = []
    hook = lab.unet.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    before, threads = torch.get_num_threads(), lab.threads
    try:
        torch.set_num_threads(2)
        lab.threads = 1
        S.vary(lab, refs[0], n=1, steps=2)
        assert seen and set(seen) == {1}  # every U-Net call on the lab's threads
        assert torch.get_num_threads() == 2  # the user's setting, back
    finally:
        hook.remove()
        lab.threads = threads
        torch.set_num_threads(before)
    assert 1 <= lab.threads <= S.usable_cpus()
    with pytest.raises(ValueError, match="threads must be a whole number"):
        S.load_lab("tiny", device="cpu", threads=0)


def test_replace_builds_its_own_pipeline_and_cache(lab, refs):
    S.image_prompt_embeds(lab, refs[:1])  # fills lab.cache (W_t^+)
    assert lab.cache
    other = S.lab._load_tiny(torch.device("cpu"), torch.float32).text_encoder  # another text tower, same shapes
    new = lab.replace(text_encoder=other)
    assert new.text_encoder is other and new.pipe.text_encoder is other.text_model  # the pipeline uses it too
    assert new.cache == {} and lab.cache and lab.text_encoder is not other  # the old lab is as it was
    assert new.unet is lab.unet and new.pipe is not lab.pipe  # the rest shared, not copied
    torch.testing.assert_close(new.W_t, other.text_projection.weight)
    expected = torch.linalg.pinv(other.text_projection.weight.double(), atol=lab.cutoff)
    torch.testing.assert_close(S.inverse_projection(new).matrix.double(), expected, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="takes components"):
        lab.replace(cutoff=0.5)


def test_a_constant_the_lab_does_not_know_is_refused(lab, tmp_path):
    folder = S.save_lab(lab, tmp_path / "lab")
    constants = json.loads((folder / "sdipc_lab.json").read_text())
    assert set(constants) == set(S.lab.CONSTANTS)  # what a lab saves is exactly what it knows
    (folder / "sdipc_lab.json").write_text(json.dumps({**constants, "guidance": 5.0}))  # a typo for guidance_scale
    with pytest.raises(ValueError, match=r"keys a lab does not know: \['guidance'\]"):
        S.load_lab(folder, device="cpu")
    with pytest.raises(ValueError, match="unknown lab constants"):
        S.assemble(dict(zip(S.lab.COMPONENTS, (getattr(lab, p) for p in S.lab.COMPONENTS))), {**constants, "x": 1})


def test_download_offline_says_so_at_once(tmp_path, monkeypatch):
    """With no network, download=True reads the cache (it may hold the weights) and says the hub cannot be
    reached, instead of minutes of the hub client's retries; `download()` names both repositories."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert not S.hub.hub_reachable(timeout=2)
    with pytest.raises(S.WeightsNotFoundError, match="download=True was asked, but the hub cannot be reached"):
        S.load_lab("sd-v1-4", device="cpu", download=True)
    with pytest.raises(S.WeightsNotFoundError, match="openai/clip-vit-large-patch14 and CompVis/stable-diffusion-v1-4"):
        S.download("sd-v1-4")


def test_loading_hides_the_hub_clients_deprecation_and_keeps_the_users_filters():
    import warnings

    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with S.components.quiet():
            warnings.warn("The `local_dir_use_symlinks` argument is deprecated and ignored in `hf_hub_download`.")
            warnings.warn("something else")  # other warnings still reach the user
    assert [str(w.message) for w in seen] == ["something else"]
    assert warnings.filters == before


def test_a_sessions_steps_and_size_are_every_calls_default():
    lab = S.load_lab("tiny", device="cpu", steps=3, size=16)
    calls = []
    hook = lab.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        [image] = S.generate(lab, "a red star", n=1)
        assert image.size == (16, 16) and len(calls) == 3  # one U-Net call per step (guidance batched)
        [image] = S.generate(lab, "a red star", n=1, steps=1, height=lab.image_size, width=lab.image_size)
        assert image.size == (lab.image_size,) * 2 and len(calls) == 4  # a call's own settings win
    finally:
        hook.remove()
    for bad in ({"steps": 0}, {"size": 12}, {"size": 2.5}):
        with pytest.raises(ValueError, match="steps|size"):
            S.load_lab("tiny", device="cpu", **bad)


def test_auto_source_follows_the_hardware(capsys, monkeypatch, tmp_path):
    import huggingface_hub

    lab = S.load_lab("auto", device="cpu")
    assert lab.source == "toy" and "SOURCE 'auto' -> 'toy': no CUDA GPU (cpu)" in capsys.readouterr().out
    # On a CUDA device "auto" means SD v1.4, fetched if missing: offline here, so the cache is read and the
    # message says why (the device object is all that is consulted; nothing runs on it).
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(S.WeightsNotFoundError, match="download=True was asked"):
        S.lab._load_source("auto", torch.device("cuda"), torch.float16, download=False)
    assert "SOURCE 'auto' -> 'sd-v1-4': a CUDA GPU is present" in capsys.readouterr().out
