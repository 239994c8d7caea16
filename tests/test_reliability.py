"""Nothing a user made is lost or silently wrong: outputs, resumes, refusals (issue 13). All on tiny models."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import sdipc_lab as S
from sdipc_lab import training
from sdipc_lab.training import NonFiniteLoss, TrainingStopped, checkpoint_budget, checkpoint_step, fit
from sdipc_lab.toyworld.judge import JUDGE_FILE


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


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_request_checkpoints_the_step_under_way_and_resumes_as_if_never_stopped(tmp_path, name):
    """Ctrl-C or `kill PID` while training: the step under way finishes and is checkpointed (none lost, unlike a
    crash), the caller's signal handlers come back, and resuming gives the uninterrupted run bit for bit."""
    signum = getattr(signal, name)
    handler = signal.getsignal(signum)
    whole, _ = _fit(tmp_path / "whole", 12)

    def stopped(m, step):
        if step == 7:
            os.kill(os.getpid(), signum)  # arrives mid-step, as from the terminal
        return m(step)

    torch.manual_seed(0)
    with pytest.raises(TrainingStopped, match="stopped at step 8 of 12 as asked.*same command again"):
        fit("toy", Noisy(), stopped, steps=12, lr=0.05, out=tmp_path / "pieces", every=5)
    with safe_open(str(tmp_path / "pieces" / "toy.ckpt.safetensors"), framework="pt") as f:
        assert int(f.metadata()["step"]) == 8  # not the every-5 checkpoint of step 5
    assert signal.getsignal(signum) is handler
    torch.manual_seed(123)
    resumed, _ = _fit(tmp_path / "pieces", 12)
    assert torch.equal(whole.w, resumed.w)


class Clock:
    """Stands in for `time` inside sdipc_lab.training: a second passes per training step, whatever the machine."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        return self.now


def test_an_interrupted_time_budget_is_finished_not_restarted(tmp_path, monkeypatch):
    """`minutes`: stopped halfway, the same call trains the budget's other half, on its clock (bit for bit the
    uninterrupted run); called again once the budget ran out, it trains a new budget (a warm restart)."""
    clock = Clock()
    monkeypatch.setattr(training, "time", clock)

    def ticking(m, step, stop_at=None):
        clock.now += 1.0
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return m(step)

    def run(out, stop_at=None):
        return fit("toy", Noisy(), lambda m, step: ticking(m, step, stop_at), steps=1000, lr=0.05, out=out,
                   every=3, minutes=10 / 60)  # a 10-second budget: 10 steps of this clock

    torch.manual_seed(0)
    whole = run(tmp_path / "whole")
    assert checkpoint_step(tmp_path / "whole" / "toy.ckpt.safetensors") == 10
    torch.manual_seed(0)
    with pytest.raises(TrainingStopped, match="stopped at step 5 of 1000"):
        run(tmp_path / "pieces", stop_at=4)
    assert checkpoint_budget(tmp_path / "pieces" / "toy.ckpt.safetensors") == (5.0, 0)  # 5 s spent, begun at 0
    clock.now = 1e6  # a new process, another day
    torch.manual_seed(123)
    resumed = run(tmp_path / "pieces")
    assert checkpoint_step(tmp_path / "pieces" / "toy.ckpt.safetensors") == 10  # not 5 + a whole new budget
    assert torch.equal(whole.w, resumed.w)
    assert checkpoint_budget(tmp_path / "pieces" / "toy.ckpt.safetensors") is None  # none under way
    run(tmp_path / "pieces")  # the budget ran out: the same command trains a new one
    assert checkpoint_step(tmp_path / "pieces" / "toy.ckpt.safetensors") == 20


def test_a_step_budget_is_a_time_budget_counted_in_steps(tmp_path, monkeypatch, capsys):
    """`budget_steps` is `minutes` made the same on every machine: on a clock of one second a step, a 10-second
    budget and its warm restart give the weights of `budget_steps=10` twice, bit for bit, and the time budget's
    log says so. Interrupted, a step budget is finished, not restarted."""
    clock = Clock()
    monkeypatch.setattr(training, "time", clock)

    def run(out, stop_at=None, **budget):
        def ticking(m, step):
            clock.now += 1.0
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return m(step)
        return fit("toy", Noisy(), ticking, steps=1000, lr=0.05, out=out, every=3, **budget)

    torch.manual_seed(0)
    run(tmp_path / "minutes", minutes=10 / 60)
    by_time = run(tmp_path / "minutes", minutes=10 / 60)  # a new budget: a warm restart from step 10
    assert "budget reached at step 20 of 1000 (0.166667 min, 1.0 steps/s; in steps, the same on any machine: " \
           "--budget-steps 10)" in capsys.readouterr().out
    torch.manual_seed(0)
    run(tmp_path / "steps", budget_steps=10)
    by_steps = run(tmp_path / "steps", budget_steps=10)
    assert checkpoint_step(tmp_path / "steps" / "toy.ckpt.safetensors") == 20
    assert torch.equal(by_time.w, by_steps.w)

    torch.manual_seed(0)
    run(tmp_path / "pieces", budget_steps=10)
    with pytest.raises(TrainingStopped, match="stopped at step 15 of 1000"):
        run(tmp_path / "pieces", stop_at=14, budget_steps=10)
    assert checkpoint_budget(tmp_path / "pieces" / "toy.ckpt.safetensors") == (0.0, 10)  # under way since step 10
    torch.manual_seed(123)
    resumed = run(tmp_path / "pieces", budget_steps=10)
    assert "toy: resumed at step 15 from" in (out := capsys.readouterr().out) and "5 of its 10 steps left" in out
    assert checkpoint_step(tmp_path / "pieces" / "toy.ckpt.safetensors") == 20  # not 15 + a whole new budget
    assert torch.equal(by_steps.w, resumed.w)


def test_stop_at_checkpoints_a_step_of_the_schedule_and_the_rest_follows_it(tmp_path, capsys):
    """`stop_at` stops at a step of the `steps`-step schedule (not a shorter schedule): run on without it, the
    result is the uninterrupted run bit for bit."""
    whole, _ = _fit(tmp_path / "whole", 12)
    torch.manual_seed(0)
    fit("toy", Noisy(), lambda m, step: m(step), steps=12, lr=0.05, out=tmp_path / "pieces", every=5, stop_at=7)
    assert checkpoint_step(tmp_path / "pieces" / "toy.ckpt.safetensors") == 7
    assert "stopped at step 7 of 12 (stop_at)" in capsys.readouterr().out
    torch.manual_seed(123)
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
    (dict(steps=4, stop_at=0), "stop_at must be a positive number, got 0"),
    (dict(steps=4, budget_steps=0), "budget_steps must be a positive number, got 0"),
    (dict(steps=4, minutes=1.0, budget_steps=5), "in minutes or in steps .budget_steps., not both"),
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
    judge = JUDGE_FILE.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sdipc_lab.toyworld.train", "all", "--size", "test", "--out",
                    str(tmp_path / "run")], check=True, env=env, capture_output=True)
    assert (tmp_path / "run" / "lab" / "sdipc_lab.json").exists()  # export went into the run folder
    assert {p: p.stat().st_mtime_ns for p in T.LAB_DIR.rglob("*") if p.is_file()} == shipped
    assert JUDGE_FILE.read_bytes() == judge


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


def test_one_progress_bar_counts_every_generation_inside_it(lab):
    from sdipc_lab.generate import progress

    with progress(3, "experiment") as bar:
        S.generate(lab, "a red star", n=1)
        S.vary(lab, S.generate(lab, "a blue disk", n=1)[0], n=2)
    assert bar.n == 3
    assert lab.pipe._progress_bar_config.get("disable") is True  # no per-call bars left behind in notebooks


def test_careless_arguments_get_a_message_not_a_library_traceback(lab, refs):
    import numpy as np

    with pytest.raises(ValueError, match="device 'gpu' is not a device"):
        S.load_lab("tiny", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            S.load_lab("tiny", device="cuda")
    assert S.load_lab("tiny", device="cpu", dtype="float16").dtype == torch.float16  # names work like dtypes
    with pytest.raises(ValueError, match="seed must be a whole number"):
        S.vary(lab, refs[0], n=1, seed=None)
    with pytest.raises(ValueError, match="seed must be a whole number"):
        S.vary(lab, refs[0], n=1, seed=2**64)
    a = S.vary(lab, refs[0], n=1, seed=np.int64(2))  # NumPy scalars are numbers
    b = S.edit(lab, refs[0], "a red star", alpha=np.float32(0.5), n=1, seed=np.int64(2))
    assert a[0].size == b[0].size
    with pytest.raises(ValueError, match="guidance_scale 1.0 <= 1 turns it off"):
        S.vary(lab, refs[0], n=1, negative_images=[refs[1]], guidance_scale=1.0)
    with pytest.raises(ValueError, match="cannot spell \\('!'\\)"):
        S.encode_text(lab, "a red star!")
    from sdipc_lab.widgets import cutoff_slider
    with pytest.raises(ValueError, match="cutoffs is empty"):
        cutoff_slider(lab, refs[0], [])


def test_images_are_read_as_a_viewer_shows_them(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from sdipc_lab.images import as_rgb_images

    monkeypatch.setenv("HOME", str(tmp_path))
    wide = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    wide.save(tmp_path / "photo.jpg", exif=exif)
    [shown] = as_rgb_images("~/photo.jpg")  # ~ expanded
    assert shown.size == (20, 40)  # EXIF orientation applied, as diffusers' load_image does
    eight_bit_in_i = Image.fromarray(np.full((20, 20), 200, dtype=np.int32), mode="I")
    assert np.asarray(as_rgb_images(eight_bit_in_i)[0]).mean() == pytest.approx(200)  # not divided by 257
    with pytest.raises(ValueError, match="is a folder"):
        as_rgb_images(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="too large to open safely"):
        as_rgb_images(tmp_path / "photo.jpg")


def test_broken_lab_files_are_named(lab, tmp_path):
    folder = S.save_lab(lab, tmp_path / "lab")
    (folder / "sdipc_lab.json").write_text("{not json")
    with pytest.raises(ValueError, match="sdipc_lab.json is not valid JSON"):
        S.load_lab(folder)
    S.save_lab(lab, tmp_path / "lab2")
    weights = tmp_path / "lab2" / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    with pytest.raises(S.WeightsNotFoundError, match="text_encoder"):
        S.load_lab(tmp_path / "lab2")


def test_finetuned_files_and_folders_are_handled(lab, refs, tmp_path):
    from sdipc_lab import finetune as FT

    ct = FT.finetune(lab, FT.Concepts({"c": refs[:2]}), mode="ct", out=tmp_path / "ct", steps=2)
    path = tmp_path / "ct" / "finetuned.safetensors"
    assert S.vary(lab, refs[0], n=1, finetuned=str(path))[0].size == S.vary(lab, refs[0], n=1, finetuned=ct)[0].size
    with pytest.raises(ValueError, match="is a folder.*finetuned.safetensors"):
        FT.load_finetuned(lab, tmp_path / "ct")
    (tmp_path / "mixed" / "sub").mkdir(parents=True)
    refs[0].save(tmp_path / "mixed" / "loose.png")
    refs[1].save(tmp_path / "mixed" / "sub" / "a.png")
    with pytest.raises(ValueError, match="both image files .* and sub-folders"):
        FT.read_folder(tmp_path / "mixed")


@pytest.mark.parametrize("argv, message", [
    (["unet", "--size", "test"], "reads tokenizer, text_encoder, vae"),
    (["clip", "--size", "test", "--minutes", "abc"], "give minutes as a number"),
    (["clip", "--size", "test", "--minutes", "foo=2"], "no stage named ['foo']"),
    (["clip", "--size", "test", "--minutes", "clip=0"], "minutes must be positive"),
    (["clip", "--size", "test", "--batch", "0"], "--batch must be positive"),
    (["clip", "--size", "test", "--stop-at", "0"], "--stop-at must be positive"),
    (["all", "--size", "test", "--stop-at", "5"], "--stop-at is for one training stage"),
    (["clip", "--size", "test", "--budget-steps", "-3"], "--budget-steps must be positive"),
    (["clip,vae", "--size", "test", "--budget-steps", "5"], "--budget-steps is for one training stage"),
    (["clip", "--size", "test", "--budget-steps", "5", "--minutes", "2"], "in --minutes or in --budget-steps, not both"),
    (["export"], "reads tokenizer"),
])
def test_the_training_cli_refuses_what_would_go_wrong(tmp_path, argv, message, capsys):
    from sdipc_lab.toyworld import train as T

    with pytest.raises(SystemExit) as error:
        T.main([*argv, "--out", str(tmp_path / "run")])
    assert message in str(error.value) or message in capsys.readouterr().err  # a message, or argparse's usage error


def test_sampler_settings_size_and_steps_per_call(lab, refs):
    [small] = S.vary(lab, refs[0], n=1, steps=2, height=48, width=64)
    assert small.size == (64, 48)
    assert S.generate(lab, "a red star", n=1)[0].size == (lab.image_size,) * 2  # the lab's default
    with pytest.raises(TypeError, match="unknown sampler setting.*heigth"):
        S.generate(lab, "a red star", n=1, heigth=64)
    with pytest.raises(ValueError, match="multiples of 8"):
        S.edit(lab, refs[0], "a red star", n=1, height=30)


def test_the_demo_checks_its_output_path_before_generating(tmp_path, capsys):
    from sdipc_lab.__main__ import main

    assert main(["demo", "--source", "tiny", "--out", str(tmp_path)]) == 2  # a folder, not an image file
    assert "must name an image file" in capsys.readouterr().err
    assert main(["demo", "--source", "tiny", "--out", str(tmp_path / "nope" / "d.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "demo.png"
    assert main(["demo", "--source", "tiny", "--out", str(out), "--n", "2", "--steps", "2", "--size", "48"]) == 0
    assert out.stat().st_size > 10_000 and str(out) in capsys.readouterr().out


def test_latent_tower_training_never_replaces_the_shipped_towers(tmp_path):
    from sdipc_lab import latent_clip as LC

    shipped = {p: p.read_bytes() for p in LC.TOWERS_DIR.rglob("*.safetensors")}
    with pytest.raises(SystemExit):  # the package's towers belong to the toy lab
        LC.main(["train", "--lab", "tiny", "--export", "toy", "--out", str(tmp_path)])
    LC.main(["train", "--lab", "tiny", "--out", str(tmp_path / "run"), "--steps", "1", "--images", "16"])
    assert sorted(p.name for p in (tmp_path / "run" / "towers").iterdir()) == ["latent", "pixel"]
    assert {p: p.read_bytes() for p in LC.TOWERS_DIR.rglob("*.safetensors")} == shipped


def test_latent_tower_alone_after_a_new_vae(tmp_path, capsys):
    """A new VAE moves the latents, not the pixels: --towers latent trains and exports the latent tower only;
    a tower that does not exist is refused by name."""
    from sdipc_lab import latent_clip as LC

    with pytest.raises(SystemExit):
        LC.main(["train", "--lab", "tiny", "--out", str(tmp_path / "bad"), "--towers", "latent,pixles"])
    assert "pixles" in capsys.readouterr().err
    LC.main(["train", "--lab", "tiny", "--out", str(tmp_path / "run"), "--steps", "1", "--images", "16",
             "--towers", "latent"])
    assert [p.name for p in (tmp_path / "run" / "towers").iterdir()] == ["latent"]


def test_panels_redraw_in_place_with_labels_shown(lab, refs, monkeypatch):
    """Each panel: controls above one output area that keeps its height while it redraws; moving a control draws
    again with the new value; descriptions are never cut off."""
    from sdipc_lab import widgets

    drawn = []
    monkeypatch.setattr(widgets, "_show", lambda images, title: drawn.append((len(images), title)))
    panel = widgets.edit_panel(lab, {"a long caption of the first reference image": refs[0], "b": refs[1]}, n=1)
    controls, out = panel.children
    assert out.layout.min_height and int(out.layout.min_height.rstrip("px")) >= 150
    by_name = {c.description: c for c in controls.children}
    assert all(c.style.description_width == "initial" for c in controls.children)
    assert "ch" in by_name["reference"].layout.width  # as wide as its longest label
    first = len(drawn)
    by_name["alpha"].value = 0.3
    assert len(drawn) == first + 1 and drawn[-1][1] == "'a blue disk', alpha 0.30"
    slider = widgets.cutoff_slider(lab, refs[0], [0.0, lab.cutoff], n=1)
    slider.children[0].children[0].value = 0.0
    assert drawn[-1][1] == "cutoff 0"
