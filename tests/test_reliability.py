"""Nothing a user made is lost or silently wrong: outputs, resumes, refusals. All on tiny models."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import sdipc_lab as S
from sdipc_lab import training
from sdipc_lab.checkpoints import checkpoint_budget, checkpoint_step
from sdipc_lab.training import Budget, NonFiniteLoss, TrainingStopped, fit
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
    return fit("toy", model, lambda m, step: m(step), budget=steps, lr=lr, out=out, every=3, **kwargs), model


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    whole, _ = _fit(tmp_path / "whole", 12)

    def interrupted(m, step):
        if step == 8:
            raise KeyboardInterrupt  # Ctrl-C after the checkpoint of step 6, two steps lost
        return m(step)

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit("toy", Noisy(), interrupted, budget=12, lr=0.05, out=tmp_path / "pieces", every=3)
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
        fit("toy", Noisy(), stopped, budget=12, lr=0.05, out=tmp_path / "pieces", every=5)
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
        return fit("toy", Noisy(), lambda m, step: ticking(m, step, stop_at), budget=Budget(1000, minutes=10 / 60),
                   lr=0.05, out=out, every=3)  # a 10-second budget: 10 steps of this clock

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
        return fit("toy", Noisy(), ticking, budget=Budget(1000, **budget), lr=0.05, out=out, every=3)

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
    fit("toy", Noisy(), lambda m, step: m(step), budget=Budget(12, stop_at=7), lr=0.05,
        out=tmp_path / "pieces", every=5)
    assert checkpoint_step(tmp_path / "pieces" / "toy.ckpt.safetensors") == 7
    assert "stopped at step 7 of 12 (stop_at)" in capsys.readouterr().out
    torch.manual_seed(123)
    resumed, _ = _fit(tmp_path / "pieces", 12)
    assert torch.equal(whole.w, resumed.w)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 7.*step 6 is kept.*--lr"):
        fit("toy", Noisy(), lambda m, step: m(step) * (float("nan") if step >= 7 else 1.0), budget=12, lr=0.05,
            out=tmp_path, every=3)
    with safe_open(str(tmp_path / "toy.ckpt.safetensors"), framework="pt") as f:
        assert int(f.metadata()["step"]) == 6 and torch.isfinite(f.get_tensor("model.w")).all()


def test_a_checkpoint_of_another_run_is_refused_and_left_intact(tmp_path):
    torch.manual_seed(0)
    fit("toy", Noisy(), lambda m, step: m(step), budget=6, lr=0.05, out=tmp_path, signature={"concept": "red star"})
    before = (tmp_path / "toy.ckpt.safetensors").read_bytes()
    with pytest.raises(ValueError, match="concept: checkpoint 'red star', now 'blue heart'.*another folder"):
        fit("toy", Noisy(), lambda m, step: m(step), budget=12, lr=0.05, out=tmp_path,
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
    lr = kwargs.pop("lr", 0.05)
    with pytest.raises(ValueError, match=message):
        fit("toy", Noisy(), lambda m, step: m(step), out=tmp_path, budget=Budget(**kwargs), lr=lr)
    assert not (tmp_path / "toy.ckpt.safetensors").exists()


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        fit("toy", Noisy(), lambda m, step: m(step), budget=2, lr=0.05, out=tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "toy.lock").write_text(str(owner.pid))
        with pytest.raises(RuntimeError, match=f"process {owner.pid}"):
            fit("toy", Noisy(), lambda m, step: m(step), budget=2, lr=0.05, out=tmp_path)
    finally:
        owner.kill()
        owner.wait()
    fit("toy", Noisy(), lambda m, step: m(step), budget=2, lr=0.05, out=tmp_path)  # a dead owner's lock is taken over
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
    from sdipc_lab.toyworld import exporting

    shipped = {p: p.stat().st_mtime_ns for p in exporting.LAB_DIR.rglob("*") if p.is_file()}
    judge = JUDGE_FILE.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sdipc_lab.toyworld.train", "all", "--size", "test", "--out",
                    str(tmp_path / "run")], check=True, env=env, capture_output=True)
    assert (tmp_path / "run" / "lab" / "sdipc_lab.json").exists()  # export went into the run folder
    assert {p: p.stat().st_mtime_ns for p in exporting.LAB_DIR.rglob("*") if p.is_file()} == shipped
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
    (["clip", "--size", "test", "--lr", "1e30"], "--lr must be a positive number at most 1 (0 < lr <= 1; "),
    (["clip", "--size", "test", "--lr", "1e39"], "got 1e+39"),
    (["clip", "--size", "test", "--lr", "nan"], "got nan"),
    (["clip", "--size", "test", "--lr", "0"], "--lr must be a positive number at most 1"),
    (["clip", "--size", "test", "--seed", str(2**64)], "--seed must be a whole number between 0 and 2**63 - 1"),
    (["clip", "--size", "test", "--seed", "-1"], "got -1"),
    (["export", "--sampler", "steps=0"], "steps is a whole number from 1 to 1000"),
    (["export", "--sampler", "guidance_scale=-2"], "guidance_scale is a number >= 0"),
    (["export", "--sampler", "scheduler=euler"], "scheduler is ddim or dpm++"),
    (["export", "--sampler", "steps=ten"], "steps is a whole number"),
    (["export", "--sampler", "stepz=3"], "NAME one of scheduler, steps"),
])
def test_the_training_cli_refuses_what_would_go_wrong(tmp_path, argv, message, capsys):
    from sdipc_lab.toyworld import train as T

    with pytest.raises(SystemExit) as error:
        T.main([*argv, "--out", str(tmp_path / "run")])
    assert message in str(error.value) or message in capsys.readouterr().err  # a message, or argparse's usage error
    if "--lr" in argv or "--seed" in argv or "--sampler" in argv:
        assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_training_cli_refuses_a_lab_dir_export_would_refuse_before_training(tmp_path, monkeypatch, capsys):
    from sdipc_lab.toyworld import exporting, train as T

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("two years")
    monkeypatch.setattr(T, "render", lambda *a, **k: pytest.fail("a stage started before --lab-dir was checked"))
    for lab_dir, message in ((tmp_path / "mine", "not a lab folder"), (exporting.LAB_DIR.resolve(), "shipped in the package")):
        with pytest.raises(SystemExit):
            T.main(["all", "--size", "test", "--out", str(tmp_path / "run"), "--lab-dir", str(lab_dir)])
        assert message in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "two years" and not (tmp_path / "run").exists()


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
    """Each panel: its controls, with descriptions never cut off; moving a control draws again with the new value,
    named in the figure's title (outside a kernel's event loop it draws at once: tests/test_widgets.py)."""
    from sdipc_lab import widgets

    drawn = []
    monkeypatch.setattr(widgets, "_show", lambda images, title: drawn.append((len(images), title)) or b"")
    panel = widgets.edit_panel(lab, {"a long caption of the first reference image": refs[0], "b": refs[1]}, n=1)
    [controls] = panel.children
    by_name = {c.description: c for c in controls.children if c.description}
    assert all(c.style.description_width == "initial" for c in by_name.values())
    assert "ch" in by_name["reference"].layout.width  # as wide as its longest label
    assert drawn == [(2, "'a blue disk', alpha 0.90, seed 0")]
    by_name["alpha"].value = 0.3
    assert drawn[-1] == (2, "'a blue disk', alpha 0.30, seed 0")
    slider = widgets.cutoff_slider(lab, refs[0], [0.0, lab.cutoff], n=1)
    slider.children[0].children[0].value = 0.0
    assert drawn[-1] == (1, "cutoff 0")


def test_save_lab_over_a_lab_keeps_the_users_files(lab, tmp_path):
    folder = S.save_lab(lab, tmp_path / "lab")
    (folder / "notes.md").write_text("my notes")
    with pytest.raises(ValueError, match="files save_lab did not write \\(notes.md\\).*Move them out"):
        S.save_lab(lab, folder)
    (folder / "notes.md").rename(tmp_path / "notes.md")
    (folder / "unet" / "notes.md").write_text("mine too")
    with pytest.raises(ValueError, match="unet/notes.md"):
        S.save_lab(lab, folder)
    assert (folder / "unet" / "notes.md").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab", "notes.md"]  # nothing half-written left beside it
    (folder / "unet" / "notes.md").unlink()
    S.save_lab(lab, folder)  # a lab's own files alone: replaced
    with pytest.raises(ValueError, match="shipped in the package"):  # however the path is spelled
        S.save_lab(lab, tmp_path / os.path.relpath(S.lab.TOY_FOLDER, tmp_path))


def test_export_refuses_the_package_lab_unless_named(tmp_path):
    from sdipc_lab.toyworld import exporting

    with pytest.raises(SystemExit, match="shipped in the package.*--lab-dir toy"):
        exporting.export(tmp_path, exporting.LAB_DIR.resolve())


def test_finetuning_into_another_modes_run_is_refused(lab, tmp_path):
    from sdipc_lab import finetune as FT
    from sdipc_lab.toyworld import concept_samples

    red = FT.Concepts({"red star": [s.image for s in concept_samples("star", "red", 2)]})
    blue = FT.Concepts({"blue heart": [s.image for s in concept_samples("heart", "blue", 2)]})
    FT.finetune(lab, red, mode="ct", out=tmp_path, steps=1, batch=2)
    before = (tmp_path / "finetuned.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds a 'ct' run; this is a 'ft' run.*another folder \\(--out"):
        FT.finetune(lab, blue, mode="ft", out=tmp_path, steps=1, batch=2)
    with pytest.raises(ValueError, match="holds a 'ct' run; this is a 'custom-diffusion' run"):
        FT.custom_diffusion(lab, red.images["red star"], class_word="star", out=tmp_path, steps=1, batch=2)
    assert (tmp_path / "finetuned.safetensors").read_bytes() == before
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.txt").write_text("two years")
    with pytest.raises(ValueError, match="did not write \\(thesis.txt\\)"):
        FT.finetune(lab, red, mode="ct", out=tmp_path / "theirs", steps=1, batch=2)
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["thesis.txt"]


def test_latent_towers_refuse_the_package_folder_by_path_and_a_folder_of_other_files(tmp_path, capsys):
    from sdipc_lab import latent_clip as LC

    with pytest.raises(SystemExit):
        LC.main(["train", "--lab", "tiny", "--export", str(LC.TOWERS_DIR.resolve()), "--out", str(tmp_path)])
    assert "package's own towers" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    with pytest.raises(SystemExit):
        LC.main(["train", "--lab", "tiny", "--export", str(tmp_path / "mine"), "--out", str(tmp_path / "run")])
    assert "not latent CLIP towers (notes.md)" in capsys.readouterr().err
    assert LC.towers_folder_strangers(LC.TOWERS_DIR) == []  # towers alone are the towers' own to replace


def test_hub_cache_refuses_a_real_cache_and_a_missing_parent(tmp_path):
    from sdipc_lab.build import hub_cache

    configs = os.path.join(os.path.dirname(__file__), "data", "hub_configs")
    real = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "refs"
    real.mkdir(parents=True)
    (real / "main").write_text("abc123")
    with pytest.raises(ValueError, match="already holds models--openai--clip-vit-large-patch14.*real Hugging Face"):
        hub_cache(tmp_path / "hub", configs)
    assert (real / "main").read_text() == "abc123"
    with pytest.raises(ValueError, match="does not exist"):
        hub_cache(tmp_path / "nope" / "hub", configs)
    assert not (tmp_path / "nope").exists()


def _broken_lab(lab, tmp_path, part, keep):
    from safetensors.torch import load_file, save_file

    folder = S.save_lab(lab, tmp_path / part)
    weights = next((folder / part).glob("*.safetensors"))
    tensors = load_file(str(weights))
    save_file({k: v for i, (k, v) in enumerate(sorted(tensors.items())) if keep(i, k)}, str(weights))
    return folder, weights


def test_a_lab_with_missing_or_broken_tensors_is_refused_by_name(lab, tmp_path):
    folder, weights = _broken_lab(lab, tmp_path, "text_encoder", lambda i, k: k != "text_projection.weight")
    with pytest.raises(ValueError, match=f"{weights}.*1 tensor\\(s\\) missing: text_projection.weight"):
        S.load_lab(folder)
    folder, weights = _broken_lab(lab, tmp_path, "image_encoder", lambda i, k: i % 2 == 0)  # half of its tensors
    with pytest.raises(ValueError, match="image_encoder weights in .*model.safetensors.*tensor\\(s\\) missing"):
        S.load_lab(folder)

    from safetensors.torch import load_file, save_file
    folder = S.save_lab(lab, tmp_path / "nan")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=f"not finite.*{name}"):
        S.load_lab(folder)
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(S.WeightsNotFoundError, match="vae in .* has no config.json"):
        S.load_lab(folder)


def test_a_finetuned_file_is_for_its_own_lab_and_a_cut_file_is_named(lab, refs, tmp_path):
    import copy

    from sdipc_lab import finetune as FT

    FT.finetune(lab, FT.Concepts({"c": refs[:2]}), mode="ct", out=tmp_path, steps=1, batch=2)
    path = tmp_path / "finetuned.safetensors"
    other_text = copy.deepcopy(lab.text_encoder)
    with torch.no_grad():
        other_text.text_projection.weight.mul_(-1.0)  # the same sizes, another C-space
    with pytest.raises(ValueError, match="another lab of the same sizes.*W_t fingerprint"):
        FT.load_finetuned(lab.replace(text_encoder=other_text), path)
    assert FT.load_finetuned(lab, path).info["mode"] == "ct"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable fine-tuned file"):
        FT.load_finetuned(lab, cut)


def test_non_finite_weights_stop_training_and_keep_the_last_good_checkpoint(tmp_path):
    def poisoned(m, step):
        if step == 7:
            m.w.register_hook(lambda grad: grad * float("inf"))  # the gradient overflows, the loss does not
        return m(step)

    with pytest.raises(NonFiniteLoss, match="gradients became .* at step 7.*step 6 is kept.*--lr"):
        fit("toy", Noisy(), poisoned, budget=12, lr=0.05, out=tmp_path / "grad", every=3)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    def overflowing(m, step):
        if step == 4:  # the update itself overflows a weight (as a rate of 1e39 does in float32)
            def hook(optimizer, args, kwargs):
                with torch.no_grad():
                    m.w[0] = float("inf")
                handle.remove()
            handle = register_optimizer_step_post_hook(hook)
        return m(step)

    with pytest.raises(NonFiniteLoss, match="weights became non-finite .* at step 4.*step 3 is kept"):
        fit("toy", Noisy(), overflowing, budget=12, lr=0.05, out=tmp_path / "w", every=3)
    with safe_open(str(tmp_path / "w" / "toy.ckpt.safetensors"), framework="pt") as f:
        assert int(f.metadata()["step"]) == 3 and torch.isfinite(f.get_tensor("model.w")).all()


@pytest.mark.parametrize("lr", ["1e30", "1e39", "inf", "nan", "0"])
def test_an_absurd_learning_rate_is_refused_at_the_cli(tmp_path, lr, capsys):
    from sdipc_lab import finetune as FT

    with pytest.raises(SystemExit):
        FT.main([str(tmp_path), "--lr", lr, "--out", str(tmp_path / "run")])
    assert "--lr must be a positive number at most 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lr must be a positive number"):
        fit("toy", Noisy(), lambda m, step: m(step), budget=2, lr=float(lr), out=tmp_path / "fit")


def test_public_arguments_are_checked_where_they_enter(lab, refs, tmp_path, capsys):
    import numpy as np

    from sdipc_lab import finetune as FT
    from sdipc_lab.datasets import references
    from sdipc_lab.measure import nearest_texts
    from sdipc_lab.widgets import cutoff_slider, edit_panel

    with pytest.raises(ValueError, match="asked for 1001 references drawn by seed 3.*at most 1000"):
        references(lab, 1001, seed=3, kind="world")
    with pytest.raises(ValueError, match="seed must be a whole number"):
        references(lab, 2, seed=2**64 + 0.5, kind="world")
    assert len(references(lab, np.int64(2), seed=np.int64(5), kind="world")) == 2
    with pytest.raises(SystemExit):
        FT.main([str(tmp_path), "--batch", "0", "--out", str(tmp_path / "run")])
    assert "--batch must be a whole number >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch must be a whole number >= 1, got 0"):
        FT.finetune(lab, FT.Concepts({"c": refs[:2]}), mode="ct", out=tmp_path / "b", steps=1, batch=0)
    with pytest.raises(ValueError, match="seed must be a whole number >= 0 and <= 9223372036854775807, got 18446744"):
        FT.finetune(lab, FT.Concepts({"c": refs[:2]}), mode="ct", out=tmp_path / "s", steps=1, seed=2**64)
    assert not (tmp_path / "b").exists() and not (tmp_path / "s").exists()
    f_cnvrt = S.convert(lab, S.image_embeds(lab, refs[:1]))[0]
    [row] = nearest_texts(lab, f_cnvrt, "a red circle")  # one text: a list of one
    assert row["text"] == "a red circle"
    with pytest.raises(ValueError, match="texts must be one or more strings"):
        nearest_texts(lab, f_cnvrt, [])
    with pytest.raises(ValueError, match=r"k must be a whole number >= 1 \(how many texts to return\), got -1"):
        nearest_texts(lab, f_cnvrt, ["a red star"], k=-1)
    with pytest.raises(ValueError, match="f_cnvrt must be a tensor.*texts come second"):
        nearest_texts(lab, "a red circle", ["a red star"])
    with pytest.raises(ValueError, match="text must be the edit text.*got None"):
        S.edit(lab, refs[0], None, n=1)
    with pytest.raises(ValueError, match="lab.replace\\(vae=...\\) needs a vae component.*got NoneType"):
        lab.replace(vae=None)
    with pytest.raises(ValueError, match="the image comes first, got the number 0.3"):
        cutoff_slider(lab, 0.3, [0.0, 0.3])
    with pytest.raises(ValueError, match="cutoffs must be a list.*got 0.3"):
        cutoff_slider(lab, refs[0], 0.3)
    with pytest.raises(ValueError, match="references must be a non-empty dict"):
        edit_panel(lab, {})


def test_export_refuses_a_folder_of_other_files_before_measuring(tmp_path, monkeypatch):
    from sdipc_lab.toyworld import exporting

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("two years")
    monkeypatch.setattr(exporting, "load_parts", lambda *a, **k: pytest.fail("export measured before checking its target"))
    with pytest.raises(SystemExit, match="not a lab folder"):
        exporting.export(tmp_path, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "two years"


def test_numpy_threads_and_a_component_of_another_kind(lab):
    import numpy as np

    assert S.load_lab("tiny", device="cpu", threads=np.int64(1)).threads == 1
    with pytest.raises(ValueError, match="needs a vae component, got a UNet2DConditionModel \\(a unet: pass it as"):
        lab.replace(vae=lab.unet)
    with pytest.raises(ValueError, match="needs a text_encoder component, got a CLIPVisionModelWithProjection"):
        lab.replace(text_encoder=lab.image_encoder)


def test_the_book_script_says_to_build_the_site_or_install_its_packages(tmp_path):
    book = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "book.py")
    checked = subprocess.run([sys.executable, book, "--check-only", "--site", str(tmp_path / "site")],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode != 0 and "Traceback" not in checked.stderr
    assert "there is none in" in checked.stderr and "build it first" in checked.stderr
    without = ("import runpy, sys; sys.modules['mkdocs'] = None; sys.argv = ['book.py', '--no-execute']; "
               f"runpy.run_path({book!r}, run_name='__main__')")  # mkdocs not installed, as far as imports go
    built = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, timeout=120)
    assert built.returncode != 0 and "Traceback" not in built.stderr
    assert "needs mkdocs" in built.stderr and "pip install -e '.[book]'" in built.stderr


def _battery():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "reliability.py")
    spec = importlib.util.spec_from_file_location("reliability_battery", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_mistakes_battery_classifies_what_each_case_led_to(lab):
    import time

    R = _battery()
    cases = {c.name: c for c in R.CASES}
    for name, cls in (("nearest_texts with []", "handled"), ("nearest_texts with one str", "ok"),
                      ("references 1001 by seed", "handled"), ("Lab.replace(vae=None)", "handled")):
        assert R.run_case(cases[name], lab).cls == cls, name

    def deletes(lab, tmp, watch):
        watch.user_file(tmp / "notes.md").unlink()
        raise ValueError("refused, but only after deleting the user's notes")

    def from_a_library(lab, tmp, watch):
        torch.zeros(2) @ torch.zeros(3)  # a shape error raised inside torch

    def cli_parser(lab, tmp, watch):
        from sdipc_lab import finetune as FT

        FT.main([str(tmp), "--batch", "0"])  # argparse's exit, with our message

    def runs(*code):
        return lambda lab, tmp, watch: subprocess.run([sys.executable, "-c", *code], capture_output=True, text=True)

    outcomes = {
        "data-loss": deletes, "raw": from_a_library, "silent-wrong": lambda lab, tmp, watch: None,
        "hang": lambda lab, tmp, watch: time.sleep(30), "handled": cli_parser,
    }
    for cls, fn in outcomes.items():
        outcome = R.run_case(R.Case(cls, "a made-up mistake", "refuse", fn, timeout=1), lab)
        assert outcome.cls == cls, (cls, outcome)
    assert "--batch must be a whole number" in R.run_case(R.Case("x", "", "refuse", cli_parser, 60), lab).message
    for code, cls in (("pass", "silent-wrong"), ("raise RuntimeError('boom, from no code of ours')", "raw"),
                      ("import sys; sys.exit(2)", "raw"),  # no message
                      ("import sys; sys.exit('the folder holds your files: name another one')", "handled")):
        assert R.run_case(R.Case(code, "", "refuse", runs(code), 60), lab).cls == cls, code
    assert R.classify("work", error=ValueError("x" * 40)) == ("raw", "ValueError: " + "x" * 40 +
                                                               " (refused a call that must work)")
