"""Nothing a user made is lost or silently wrong: outputs, resumes, refusals (issue 13). All on tiny models."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import sdipc_lab as S
from sdipc_lab.training import NonFiniteLoss, fit


class Noisy(torch.nn.Module):
    """A model whose loss draws fresh noise from torch's global generator, as the diffusion loss does."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(8))

    def forward(self, step):
        x = torch.randn(8) + step % 3
        return ((self.w * x - 1.0) ** 2).mean()


def _fit(out, steps, lr=0.05, **kwargs):
    torch.manual_seed(0)
    model = Noisy()
    return fit("toy", model, lambda m, step: m(step), steps=steps, lr=lr, out=out, every=3, **kwargs), model


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    whole, _ = _fit(tmp_path / "whole", 12)

    def interrupted(m, step):
        if step == 8:
            raise KeyboardInterrupt  # Ctrl-C after the checkpoint of step 6, two steps lost
        return m(step)

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit("toy", Noisy(), interrupted, steps=12, lr=0.05, out=tmp_path / "pieces", every=3)
    assert not (tmp_path / "pieces" / "toy.lock").exists()  # the lock goes with the process's run
    torch.manual_seed(123)  # whatever the new process's generator holds
    resumed, _ = _fit(tmp_path / "pieces", 12)
    assert torch.equal(whole.w, resumed.w)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 7.*step 6 is kept.*--lr"):
        fit("toy", Noisy(), lambda m, step: m(step) * (float("nan") if step >= 7 else 1.0), steps=12, lr=0.05,
            out=tmp_path, every=3)
    with safe_open(str(tmp_path / "toy.ckpt.safetensors"), framework="pt") as f:
        assert int(f.metadata()["step"]) == 6 and torch.isfinite(f.get_tensor("model.w")).all()


def test_a_checkpoint_of_another_run_is_refused_and_left_intact(tmp_path):
    torch.manual_seed(0)
    fit("toy", Noisy(), lambda m, step: m(step), steps=6, lr=0.05, out=tmp_path, signature={"concept": "red star"})
    before = (tmp_path / "toy.ckpt.safetensors").read_bytes()
    with pytest.raises(ValueError, match="concept: checkpoint 'red star', now 'blue heart'.*another folder"):
        fit("toy", Noisy(), lambda m, step: m(step), steps=12, lr=0.05, out=tmp_path,
            signature={"concept": "blue heart"})
    assert (tmp_path / "toy.ckpt.safetensors").read_bytes() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be a positive number, got 0"),
    (dict(steps=-5), "steps must be a positive number, got -5"),
    (dict(steps=4, lr=0.0), "lr must be a positive number, got 0.0"),
    (dict(steps=4, minutes=0), "minutes must be a positive number, got 0"),
    (dict(steps=4, minutes=-1.0), "minutes must be a positive number"),
])
def test_counts_and_rates_that_mean_nothing_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit("toy", Noisy(), lambda m, step: m(step), out=tmp_path, **{"lr": 0.05, **kwargs})
    assert not (tmp_path / "toy.ckpt.safetensors").exists()


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        fit("toy", Noisy(), lambda m, step: m(step), steps=2, lr=0.05, out=tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "toy.lock").write_text(str(owner.pid))
        with pytest.raises(RuntimeError, match=f"process {owner.pid}"):
            fit("toy", Noisy(), lambda m, step: m(step), steps=2, lr=0.05, out=tmp_path)
    finally:
        owner.kill()
        owner.wait()
    fit("toy", Noisy(), lambda m, step: m(step), steps=2, lr=0.05, out=tmp_path)  # a dead owner's lock is taken over
    assert not (tmp_path / "toy.lock").exists()


def test_save_lab_never_replaces_what_is_not_a_lab(lab, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.txt").write_text("two years")
    with pytest.raises(ValueError, match="not a lab folder"):
        S.save_lab(lab, precious)
    assert (precious / "thesis.txt").read_text() == "two years"
    with pytest.raises(ValueError, match="shipped in the package"):
        S.save_lab(lab, S.lab.TOY_FOLDER)


def test_save_lab_swaps_a_lab_in_whole(lab, tmp_path, monkeypatch):
    folder = S.save_lab(lab, tmp_path / "lab")
    first = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(lab.vae), "save_pretrained", crash)  # interrupted half-way through writing
    with pytest.raises(KeyboardInterrupt):
        S.save_lab(lab, folder)
    monkeypatch.undo()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == first
    assert S.load_lab(folder, device="cpu").W_t.shape == lab.W_t.shape  # the old lab, whole
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("lab.saving")) == ["lab"]


def test_finetuning_a_second_concept_into_the_first_ones_folder_is_refused(lab, tmp_path):
    from sdipc_lab import finetune as FT
    from sdipc_lab.toyworld import concept_samples

    red = FT.Concepts({"red star": [s.image for s in concept_samples("star", "red", 2)]})
    blue = FT.Concepts({"blue heart": [s.image for s in concept_samples("heart", "blue", 2)]})
    FT.finetune(lab, red, mode="ct", out=tmp_path, steps=2)
    before = (tmp_path / "finetuned.safetensors").read_bytes()
    with pytest.raises(ValueError, match="concepts"):
        FT.finetune(lab, blue, mode="ct", out=tmp_path, steps=2)
    assert (tmp_path / "finetuned.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="steps must be a positive number, got 0"):
        FT.finetune(lab, red, mode="ct", out=tmp_path / "zero", steps=0)


def test_trainers_never_write_into_the_package_by_default(tmp_path):
    from sdipc_lab.toyworld import train as T

    shipped = {p: p.stat().st_mtime_ns for p in T.LAB_DIR.rglob("*") if p.is_file()}
    judge = T.JUDGE_FILE.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sdipc_lab.toyworld.train", "all", "--size", "test", "--out",
                    str(tmp_path / "run")], check=True, env=env, capture_output=True)
    assert (tmp_path / "run" / "lab" / "sdipc_lab.json").exists()  # export went into the run folder
    assert {p: p.stat().st_mtime_ns for p in T.LAB_DIR.rglob("*") if p.is_file()} == shipped
    assert T.JUDGE_FILE.read_bytes() == judge


def test_a_blend_that_cancels_out_is_refused_not_nan():
    from sdipc_lab.convert import blend

    f = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])
    with pytest.raises(ValueError, match="cancel out"):
        blend(f, [1.0, 1.0])
    assert torch.isfinite(blend(f, [2.0, 1.0])).all()


def test_a_labs_constants_are_its_own():
    from sdipc_lab.build import random_components
    from sdipc_lab.lab import HUB_CONSTANTS, PAPER_FINETUNE_LR

    before = dict(PAPER_FINETUNE_LR)
    one = S.assemble(random_components(), HUB_CONSTANTS, device="cpu")
    one.finetune_lr["ct"] = 123.0
    assert PAPER_FINETUNE_LR == before and HUB_CONSTANTS["finetune_lr"] == before
