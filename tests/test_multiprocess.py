"""Several processes train one run: `--batch` is the global batch, each process trains on its share of it.

Two CPU processes over gloo (launched by torchrun, and by `accelerate launch --multi_gpu --num_processes 2` as the
docstrings show; `training.new_accelerator` runs them on the CPU where there is no GPU) must train the same weights as
one process on the same global batch, each on its own half of it, and other weights than one process on half of it
(what each process would train on if both saw the same data).
"""

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdipc_lab.toyworld import sample

# Every trainer, a few steps each: fine-tuning (CT, FT with A/B and captions, Custom Diffusion) on the tiny lab, the
# latent tower, and the seven toy-world stages at --size test. Run as one process and as two.
DRIVER = textwrap.dedent('''
    import json
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    import sdipc_lab as S
    from sdipc_lab import finetune as FT
    from sdipc_lab import latent_clip as LC
    from sdipc_lab.toyworld import data, models, train as T
    from sdipc_lab.training import new_accelerator

    concept, out = Path(sys.argv[1]), Path(sys.argv[2])
    labs = [S.load_lab("tiny") for _ in range(5)]  # before the processes join (the tiny lab round-trips a folder)
    accelerator = new_accelerator()
    concepts = FT.read_folder(concept)
    images = [im for _, im in concepts.flat]
    seen = []  # what this process's U-Net is called on: (batch, a checksum of the noised latents)
    labs[0].unet.register_forward_pre_hook(lambda m, args: seen.append((len(args[0]), float(args[0].double().sum()))))
    FT.finetune(labs[0], concepts, mode="ct", steps=6, batch=4, out=out / "ct", accelerator=accelerator)
    (out / f"seen.{accelerator.process_index}.json").write_text(json.dumps(seen))
    FT.finetune(labs[1], FT.Concepts({"a": images[:2], "b": images[2:]}), mode="ft", steps=3, batch=4,
                captions={"a": "a red disk", "b": "a blue square"}, n_tokens=4, out=out / "ft", accelerator=accelerator)
    FT.custom_diffusion(labs[2], images, class_word="heart", steps=3, batch=4, out=out / "cd", accelerator=accelerator)
    LC.train_tower(labs[3], "latent", world=data.render(32, "train"), out=out / "towers", steps=3, batch=8, width=32,
                   layers=1, accelerator=accelerator)
    try:
        FT.finetune(labs[4], concepts, mode="ct", steps=1, batch=3, out=out / "odd", accelerator=accelerator)
    except ValueError as error:
        if accelerator.is_main_process:
            (out / "odd.txt").write_text(str(error))
    T.main(["clip,vision,vae,decoder,judge,unet", "--size", "test", "--steps", "3", "--out", str(out / "toy")])
    T.main(["shape", "--size", "test", "--steps", "3", "--variety", "0.5", "--out", str(out / "shape")])
    # a time budget: the processes agree on its clock, so they stop at the same step
    T.main(["judge", "--size", "test", "--steps", "100", "--minutes", "0.002", "--out", str(out / "budget")])
    torch.manual_seed(0)
    tokenizer = models.new_tokenizer()
    text = models.new_clip(models.MODEL_SIZES["test"], tokenizer)[0]
    states, _ = data.caption_states(data.render(64), tokenizer, text, "cpu", wordings=3, seed=0, batch=50,
                                 accelerator=accelerator)  # 4 chunks, the last one short: 2 for each process
    if accelerator.is_main_process:
        save_file({"states": states.contiguous()}, str(out / "states.safetensors"))
''')

WEIGHTS = ["ct/finetuned.safetensors", "ft/finetuned.safetensors", "cd/finetuned.safetensors",
           "towers/latent/model.safetensors", "toy/text_encoder/model.safetensors",
           "toy/image_encoder/model.safetensors", "toy/vae/diffusion_pytorch_model.safetensors",
           "toy/unet/diffusion_pytorch_model.safetensors", "toy/judge.safetensors",
           "shape/image_encoder/model.safetensors"]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # new_accelerator finds the CPU by itself
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a process prints when it aborts in torch's C++ code (std::terminate): seen in about 1 of 45 runs of the driver
# on two processes, always in the second process, right after the time-budget stage; never in one process.
GLOO_ABORT = "terminate called without an active exception"


def _launch(*args, processes: int = 2, launcher: str = "accelerate", fresh: Path | None = None):
    """`args` (a script, or -m and a module) on `processes` CPU processes: launched by `accelerate launch` (what the
    docstrings show) or by torchrun (`--standalone`: it picks a free port itself); one process: plain python.
    `fresh`: the folder the command writes, emptied and the command run once more if a process aborted in torch's
    C++ code (`GLOO_ABORT`); a failure of ours, or a second abort, fails the test."""
    if processes == 1:
        command = [sys.executable, *args]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *args]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    aborted = GLOO_ABORT in done.stderr and "(SIGABRT)" in done.stderr  # not a Python exception: exit code 1
    if done.returncode != 0 and fresh is not None and aborted:
        print(f"a process aborted in torch's C++ code ({GLOO_ABORT!r}); running the command again into {fresh}, "
              "emptied")
        shutil.rmtree(fresh, ignore_errors=True)
        done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-8000:]
    return done


def _weights(path: Path) -> dict:
    return load_file(str(path))


def _disagreeing(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """The share of weights that differ beyond float tolerance."""
    assert set(a) == set(b)
    off = sum((~torch.isclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol)).sum().item() for k in a)
    return off / sum(a[k].numel() for k in a)


def _max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _losses(path: Path) -> list:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["losses"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The driver's outputs with one process and with two, and the concept folder both fine-tuned on."""
    root = tmp_path_factory.mktemp("multiprocess")
    concept = root / "concept"
    concept.mkdir()
    for i in range(4):
        sample(i, "test", two_objects=0).image.save(concept / f"{i}.png")
    (root / "driver.py").write_text(DRIVER)
    _launch(str(root / "driver.py"), str(concept), str(root / "one"), processes=1)
    two = _launch(str(root / "driver.py"), str(concept), str(root / "two"), processes=2, launcher="torchrun",
                  fresh=root / "two")
    return root, two


def test_two_processes_train_the_weights_of_one_on_the_same_global_batch(runs):
    """The same losses step by step, and the same weights up to rounding: AdamW scales a gradient that is zero but
    for rounding (a bias before a GroupNorm, an attention key's bias) up to a whole step of the learning rate, so a
    handful of such weights may differ by up to a few steps (the rate is 1e-3)."""
    root, _ = runs
    for name in WEIGHTS:
        one, two = _weights(root / "one" / name), _weights(root / "two" / name)
        assert _disagreeing(one, two) < 1e-3, name
        assert _max_difference(one, two) < 3e-3, name
    # the U-Net stage's caption states of one text tower: each process encodes every other chunk, then they exchange
    states = "states.safetensors"
    assert _max_difference(_weights(root / "one" / states), _weights(root / "two" / states)) == 0
    checkpoints = [p for p in sorted((root / "one").rglob("*.ckpt.safetensors"))
                   if not {"odd", "budget"} & set(p.parts)]
    assert len(checkpoints) == 11  # every trainer's (one process trains the odd batch too; two refuse it)
    for path in checkpoints:
        twin = root / "two" / path.relative_to(root / "one")
        torch.testing.assert_close(torch.tensor(_losses(twin)), torch.tensor(_losses(path)), rtol=1e-5, atol=1e-6)


def test_each_process_trains_on_its_own_share(runs, tmp_path):
    """Each process's U-Net sees half of every global batch, another half than the other's; two processes that
    both saw the same data would train what one process trains on half the batch."""
    import json

    import sdipc_lab as S
    from sdipc_lab import finetune as FT
    from sdipc_lab.toyworld import train as T

    root, _ = runs
    one = json.loads((root / "one" / "seen.0.json").read_text())
    ranks = [json.loads((root / "two" / f"seen.{rank}.json").read_text()) for rank in (0, 1)]
    assert [n for n, _ in one] == [4] * 6 and all([n for n, _ in seen] == [2] * 6 for seen in ranks)
    assert all(abs(a[1] - b[1]) > 1e-3 for a, b in zip(*ranks))  # other samples, other noise
    # together, the global batch's noised latents: the same samples, noise and timesteps as one process's
    assert all(abs(a[1] + b[1] - c[1]) <= 1e-9 * max(1.0, abs(c[1])) for a, b, c in zip(*ranks, one))
    two = _weights(root / "two" / "ct/finetuned.safetensors")
    FT.finetune(S.load_lab("tiny"), FT.read_folder(root / "concept"), mode="ct", steps=6, batch=2, out=tmp_path / "ct")
    half = _weights(tmp_path / "ct/finetuned.safetensors")
    assert _disagreeing(two, half) > 0.1
    T.main(["clip", "--size", "test", "--steps", "3", "--batch", "4", "--out", str(tmp_path / "toy")])
    two = _weights(root / "two" / "toy/image_encoder/model.safetensors")
    assert _disagreeing(two, _weights(tmp_path / "toy/image_encoder/model.safetensors")) > 0.1


def test_only_the_main_process_writes_and_prints(runs):
    root, two = runs
    assert two.stdout.count("vae: scaling_factor") == 1  # printed once, not once per process
    assert two.stdout.count("clip: ") == 1
    assert two.stdout.count("judge: budget reached at step") == 1  # both processes stopped there, one printed it
    assert (root / "two" / "budget" / "judge.safetensors").exists()
    assert sorted(p.name for p in (root / "two" / "ct").iterdir()) == sorted(
        p.name for p in (root / "one" / "ct").iterdir())
    assert not list((root / "two").rglob("*.lock")) and not list((root / "two").rglob("*.tmp"))


def test_a_global_batch_the_processes_cannot_share_is_refused(runs):
    root, _ = runs
    message = (root / "two" / "odd.txt").read_text()
    assert "global batch" in message and "multiple of 2" in message
    assert not (root / "two" / "odd").exists()  # refused before the run folder is claimed


def test_an_interrupted_two_process_run_resumes_where_it_stopped(runs, tmp_path):
    """`--steps 3`, then `--steps 6`, both on two processes through the CLI, equals a straight 6-step run."""
    root, _ = runs
    command = ["-m", "sdipc_lab.finetune", str(root / "concept"), "--mode", "ct", "--lab", "tiny", "--batch", "4",
               "--out", str(tmp_path / "ct")]
    first = _launch(*command, "--steps", "3")
    assert "saved" in first.stdout and first.stdout.count("saved") == 1
    resumed = _launch(*command, "--steps", "6")
    assert resumed.stdout.count("resumed at step 3") == 1
    straight = _weights(root / "two" / "ct/finetuned.safetensors")
    again = _weights(tmp_path / "ct/finetuned.safetensors")
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_an_accelerator_that_sees_one_of_several_launched_processes_is_refused(monkeypatch):
    from sdipc_lab.training import check_processes

    class Alone:
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="2 processes were launched but the accelerator sees 1"):
        check_processes(Alone())
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_processes(Alone())


def test_shares_split_a_global_draw_in_order():
    """`gathered` without processes is the identity; `shard` and `randn_shard` split a global batch (and its noise,
    in the memory layout it is drawn in) in process order, leaving the generator where a whole draw leaves it."""
    from sdipc_lab.training import gathered, randn_shard, shard

    x = torch.randn(6, 3, requires_grad=True)
    assert gathered(x) is x
    assert shard(list(range(6)), (1, 3)) == [2, 3]
    state = torch.get_rng_state()
    whole = torch.randn(6, 4, 2, 2).to(memory_format=torch.channels_last)
    torch.set_rng_state(state)
    noise = torch.randn_like(whole)
    for index in range(2):
        torch.set_rng_state(state)
        share = randn_shard(whole[:3], (index, 2))
        assert torch.equal(share, noise[3 * index:3 * index + 3])
        assert torch.equal(torch.get_rng_state(), _state_after(state, noise))


def _state_after(state, like):
    now = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.randn_like(like)
    after = torch.get_rng_state()
    torch.set_rng_state(now)
    return after


def test_gpu_check_runs_nothing_without_a_gpu():
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no GPU here" in done.stdout and "nothing was run" in done.stdout
