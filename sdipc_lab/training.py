"""The training loop every trainer here shares: seeded, resumable, with progress and a loss curve.

`fit()` runs AdamW (warm-up, then cosine decay or a constant rate) through `accelerate`, so the same code
runs on CPU, one GPU or several. A checkpoint is one safetensors file written atomically every few
hundred steps: the model's weights, an optional EMA copy, the optimizer's state (flattened into tensors,
its hyper-parameters as JSON metadata), the step and the loss history. Nothing is pickled. Run the same
command again and it resumes where the last checkpoint left off. Ctrl-C (or SIGTERM, e.g. `kill PID`) stops
training after the step under way, with a checkpoint of that step: nothing trained is lost.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from .bars import bar as progress_bar
from .checkpoints import check_signature, checkpoint_budget, checkpoint_step, load_checkpoint, save_checkpoint


def new_accelerator(**kwargs):
    """An `accelerate.Accelerator`. Launched as several processes (`accelerate launch --multi_gpu --num_processes N`,
    `torchrun --nproc_per_node N`) on a machine without a GPU, the processes train together on the CPU over gloo;
    accelerate alone would take each of them for a run of its own."""
    from accelerate import Accelerator

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)


def use_local_gpu() -> None:
    """In a process of a multi-GPU launch, make its own GPU (LOCAL_RANK) the default one, so that what it loads
    before its accelerator exists (a lab: load it first, as transformers saves nothing but on rank 0 once the
    processes are joined, and the random 'tiny' lab is loaded through a folder it saves) lands on it."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def processes(accelerator) -> tuple[int, int]:
    """(this process's index, the process count): which contiguous share of each global batch this process trains
    on. Anything with a `process_index` (and optionally `num_processes`) will do; without one, (0, 1)."""
    if accelerator is None:
        return 0, 1
    return int(getattr(accelerator, "process_index", 0)), int(getattr(accelerator, "num_processes", 1))


def check_batch(batch: int, accelerator) -> None:
    """Refuse a global batch that the processes cannot share evenly (each process trains on batch / processes)."""
    count = processes(accelerator)[1]
    if batch % count:
        raise ValueError(f"the batch ({batch}) is the global batch, shared evenly by the {count} processes: give a "
                         f"multiple of {count} (--batch / batch=)")


def shard(x, part: tuple[int, int] = (0, 1)):
    """This process's contiguous share of a global batch `x` (a tensor or a list, split along its first axis);
    `part` is `processes(accelerator)`."""
    index, count = part
    if count == 1:
        return x
    size = len(x) // count
    return x[index * size:(index + 1) * size]


def randn_shard(shape, part: tuple[int, int] = (0, 1), *, generator: torch.Generator | None = None, device=None,
                dtype=None) -> torch.Tensor:
    """Standard normal noise of this process's share of a global batch: drawn for the whole batch (count * B, ...)
    and sharded, so that every process count draws the same noise for the same sample and leaves the generator in
    the same state. `shape` (B, ...) draws as `torch.randn(shape)`; a tensor draws as `torch.randn_like` of it (its
    dtype, device and memory layout: a channels-last layout orders the draws otherwise). One process: exactly those."""
    count = part[1]
    if torch.is_tensor(shape):
        like = torch.empty_like(shape)
        layout = (torch.channels_last if like.dim() == 4 and not like.is_contiguous()
                  and like.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        noise = torch.empty((len(like) * count, *like.shape[1:]), dtype=like.dtype, device=like.device,
                            memory_format=layout).normal_(generator=generator)
    else:
        noise = torch.randn((shape[0] * count, *shape[1:]), generator=generator, device=device, dtype=dtype)
    return shard(noise, part)


class _ScaledGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def gathered(x: torch.Tensor) -> torch.Tensor:
    """The global batch of `x`, this process's share (first axis), gathered from every process in process order.

    For losses over the whole batch (contrastive losses): every process computes the same global loss, and the
    gradient flows back through this process's own share only, multiplied by the process count, so that DDP's
    average of the processes' gradients is exactly that loss's gradient. One process: `x` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    count, index = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(count)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[index] = _ScaledGradient.apply(x, float(count)) if x.requires_grad else x
    return torch.cat(parts)


def diffusion_loss(unet, scheduler, z0: torch.Tensor, context: torch.Tensor, *, snr_gamma: float | None = None,
                   generator: torch.Generator | None = None, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The U-Net's training loss on clean latents z0 (B, 4, h, w) under text states `context` (B, 77, D):
    noise at a uniform random timestep, predict the scheduler's target (noise, or v for v-prediction).

    `snr_gamma`: min-SNR-gamma weighting (Hang et al. 2023), min(SNR, gamma) / SNR for noise targets and
    min(SNR, gamma) / (SNR + 1) for v targets; None weighs every timestep alike.
    `part`: (process index, process count) when z0 is one process's share of a global batch: the noise and the
    timesteps are drawn for the global batch and sharded, so any process count trains alike; the loss is the
    mean over the share (DDP's average over the processes makes it the global mean).
    """
    noise = randn_shard(z0.shape, part, generator=generator, device=z0.device, dtype=z0.dtype)
    t = shard(torch.randint(0, scheduler.config.num_train_timesteps, (len(z0) * part[1],), generator=generator,
                            device=z0.device), part)
    zt = scheduler.add_noise(z0, noise, t)
    v_target = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(z0, noise, t) if v_target else noise
    error = (unet(zt, t, encoder_hidden_states=context).sample.float() - target.float()) ** 2
    if snr_gamma is None:
        return error.mean()
    alphas = scheduler.alphas_cumprod.to(z0.device)[t]
    snr = alphas / (1 - alphas)  # (B,)
    weight = snr.clamp(max=snr_gamma) / (snr + 1 if v_target else snr)
    return (error.mean(dim=(1, 2, 3)) * weight).mean()


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or infinite loss (or gradients, or weights); the last good checkpoint was kept."""


class TrainingStopped(KeyboardInterrupt):
    """Training was asked to stop (Ctrl-C, SIGTERM) and did, after a checkpoint of its last step."""


@contextlib.contextmanager
def stop_requests():
    """While training: Ctrl-C (SIGINT) and SIGTERM are noted in the yielded list instead of killing the process
    mid-step, so the loop can finish the step under way and checkpoint it. A second Ctrl-C interrupts at once (the
    last checkpoint stays intact: it is written atomically). The previous handlers come back afterwards; off the
    main thread, where Python allows no handlers, nothing changes."""
    asked: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def handler(signum, frame):
        asked.append(signum)
        if len(asked) > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How far one call of `fit` trains, in one value.

    `steps`: the schedule's length, the step a run reaches however often it is interrupted and resumed. At most
    one budget under way: `minutes`, a time budget whose clock decays the learning rate too (interrupted, the
    same call finishes it; once spent, the same call starts a new one from the weights reached, a warm restart);
    or `budget_steps`, that budget counted in steps from where the run is, so the same on every machine (a
    `minutes` run prints the steps its budget took). `stop_at`: stop, checkpointed, at that step of the
    schedule (resuming without it goes on along the same schedule). `fit(..., budget=12)` is `Budget(steps=12)`.
    """

    steps: int
    minutes: float | None = None
    budget_steps: int | None = None
    stop_at: int | None = None

    def __post_init__(self):
        check_positive(**{k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "steps"})
        if self.minutes is not None and self.budget_steps is not None:
            raise ValueError("give a budget in minutes or in steps (budget_steps), not both")


def fit(name: str, module: torch.nn.Module, loss_fn, *, budget: Budget | int, lr: float, out: Path,
        accelerator=None, ema_decay: float | None = None, every: int = 250, schedule: str = "cosine",
        weight_decay: float = 0.01, signature: dict | None = None) -> torch.nn.Module:
    """AdamW with warm-up, then cosine decay (or `schedule="constant"`); `loss_fn(module, step)` returns the
    loss of one batch, drawn deterministically from `step` so that a resumed run sees the same data; `budget`
    says how far to train (`Budget`: the schedule's steps, a time or step budget, a step to stop at).

    Resumes from `out/name.ckpt.safetensors` when its `signature` (what the run trains on and with: data,
    settings) matches, refuses otherwise; a resumed run equals an uninterrupted one (random state saved, the
    schedule a function of the step). A NaN or infinite loss, gradient norm or weight stops training with
    `NonFiniteLoss` and keeps the last good checkpoint. A lock file refuses a second process training `name`
    into the same folder. Returns the trained module (its EMA copy if asked).

    Several processes (`accelerate launch`, torchrun) train one run together: `loss_fn` returns the mean loss of this
    process's share of the step's global batch, DDP averages the gradients, the losses logged and checkpointed are
    the processes' mean, and only the main process writes (checkpoint, loss curve) and prints.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if not isinstance(budget, Budget):
        budget = Budget(steps=budget)
    check_positive(lr=lr)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} is a file: name a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    if accelerator is None:
        accelerator = new_accelerator()
    check_processes(accelerator)
    with lock(out / f"{name}.lock") if accelerator.is_main_process else contextlib.nullcontext():
        return _fit(name, module, loss_fn, budget=budget, lr=lr, out=out, accelerator=accelerator,
                    ema_decay=ema_decay, every=every, schedule=schedule, weight_decay=weight_decay,
                    signature=signature or {})


MAX_LR = 1.0  # AdamW moves each weight by about the rate a step: above 1 no run trains, it overflows


def check_positive(**values) -> None:
    """Refuse counts and rates that are zero, negative or not finite, naming the argument (NumPy scalars are
    numbers); a learning rate (`lr`) above `MAX_LR` too."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
        if key == "lr" and value > MAX_LR:
            raise ValueError(f"lr must be a positive number at most {MAX_LR:g} (AdamW rates are around 1e-5 to "
                             f"1e-3), got {value!r}")


@contextlib.contextmanager
def lock(path: Path):
    """An exclusive lock file holding the owner's pid: a second writer is refused while the owner lives; a lock
    left by a process that died is taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise RuntimeError(f"{path.parent} is being trained into by process {pid} ({path.name}); two runs "
                                   "in one folder would overwrite each other's checkpoints. Wait for it, or train "
                                   "into another folder (--out).") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise RuntimeError(f"could not take the lock {path}")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_processes(accelerator) -> None:
    """Refuse an accelerator that sees one process where the launcher started several: each would train alone on
    the same data and write the same files (accelerate on a machine without a GPU: see `new_accelerator`)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but the accelerator sees {accelerator.num_processes}: "
                           "on a machine without a GPU create it with Accelerator(cpu=True) (or "
                           "sdipc_lab.training.new_accelerator()), or launch with ACCELERATE_USE_CPU=1")


def _agreed(accelerator, value: float) -> float:
    """`value` as every process agrees on it (their max): decisions that must not differ between processes (stop
    now, the time budget's clock). One process: the value itself."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], device=accelerator.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def _fit(name, module, loss_fn, *, budget, lr, out, accelerator, ema_decay, every, schedule, weight_decay, signature):
    steps, minutes, budget_steps, stop_at = budget.steps, budget.minutes, budget.budget_steps, budget.stop_at
    main = accelerator.is_main_process
    ckpt = out / f"{name}.ckpt.safetensors"
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ema = copy.deepcopy(module).requires_grad_(False) if ema_decay else None
    budgeted = bool(minutes or budget_steps)
    step, losses = 0, []
    spent, begun = 0.0, 0  # the budget under way: seconds its clock spent before an interruption, its first step
    if ckpt.exists():
        check_signature(ckpt, signature)
        step, losses = load_checkpoint(ckpt, model=module, optimizer=optimizer, ema=ema)
        left = ""
        if budgeted:
            spent, begun = checkpoint_budget(ckpt) or (0.0, None)
            if (not 0 < spent < 60 * minutes) if minutes else (begun is None or step >= begun + budget_steps):
                spent, begun = 0.0, step  # none under way, or it ran out: a new budget from here
            elif minutes:
                left = f", {minutes - spent / 60:.1f} of its {minutes:g} minutes left"
            else:
                left = f", {begun + budget_steps - step} of its {budget_steps} steps left"
        if main:
            print(f"{name}: resumed at step {step} from {ckpt}{left}")
    warmup = max(1, min(100 if budgeted else 500, steps // 20))
    first, last = step, min(steps, stop_at or steps)
    finished = False  # the budget or the schedule ran out: a run after this one starts a new budget

    def clock():  # seconds of the time budget under way, across interruptions
        return spent + time.time() - start

    def progress(k):  # 0 -> 1 over the stage; a budget (the clock, or steps from `begun`) counts too
        by_budget = (_agreed(accelerator, clock()) / (60 * minutes) if minutes else
                     (k - begun) / budget_steps if budget_steps else 0.0)
        return min(1.0, max(k / steps, by_budget))

    def lr_at(k):
        decay = 0.5 * (1 + math.cos(math.pi * progress(k))) if schedule == "cosine" else 1.0
        return lr * min(1.0, (k + 1) / warmup) * decay  # of the step, not of this session: resumes match

    module, optimizer = accelerator.prepare(module, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    start = saved_at = time.time()
    bar = progress_bar(total=steps, initial=step, desc=name, disable=not accelerator.is_main_process)
    module.train()

    def save():
        if main:
            save_checkpoint(ckpt, model=accelerator.unwrap_model(module), optimizer=optimizer, step=step,
                            losses=losses, ema=ema, signature=signature,
                            budget=None if finished or not budgeted else (clock() if minutes else 0.0, begun))

    def stop(what, value):  # a NaN or infinite loss, gradient or weight: nothing of this step is saved
        bar.close()
        kept = f"the checkpoint of step {checkpoint_step(ckpt)} is kept" if ckpt.exists() else "nothing was saved"
        raise NonFiniteLoss(f"{name}: the {what} became {value} at step {step} (lr {lr_at(step):.3g}); "
                            f"training stopped and {kept}. Lower the learning rate (--lr) and run again.")

    with stop_requests() as asked:  # Ctrl-C / SIGTERM: finish the step under way, checkpoint it, stop
        while step < last and not _agreed(accelerator, len(asked)):  # every process stops at the same step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = loss_fn(module, step)  # the mean over this process's share of the global batch
            logged = accelerator.reduce(loss.detach(), "mean") if accelerator.num_processes > 1 else loss.detach()
            if not torch.isfinite(logged).all():
                stop("loss", logged.item())
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, 1.0)
            if accelerator.scaler is None and grad_norm is not None and not torch.isfinite(grad_norm).all():
                stop("gradients", f"{grad_norm.item()} (their norm)")  # (fp16's loss scaler skips such steps itself)
            optimizer.step()
            if not torch.stack([torch.isfinite(p.detach()).all() for p in params]).all():
                stop("weights", "non-finite (NaN or infinite) after its update")
            if ema is not None:  # warmed up (diffusers' EMAModel): early on the average must not hold the random init
                decay = min(ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), accelerator.unwrap_model(module).parameters()):
                        e.lerp_(p, 1 - decay)
            losses.append(logged.item())
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if step % every == 0 or step == steps or time.time() - saved_at > 300:  # at least every 5 minutes
                save()
                saved_at = time.time()
            if budgeted and progress(step) >= 1.0:
                finished = True
                rate = f"{(step - first) / (time.time() - start):.1f} steps/s"
                accelerator.print(
                    f"{name}: budget reached at step {step} of {steps} " +
                    (f"({budget_steps} steps from step {begun}, {rate})" if budget_steps else
                     f"({minutes:g} min, {rate}; in steps, the same on any machine: --budget-steps {step - begun})"
                     if begun is not None else f"({minutes:g} min, {rate})"))
                break
        finished = finished or step >= steps
        save()
        accelerator.wait_for_everyone()  # the checkpoint is written before any process goes on
        stopped = _agreed(accelerator, len(asked))  # (every process asks: it is a collective)
    bar.close()
    if stopped:
        raise TrainingStopped(f"{name}: stopped at step {step} of {steps} as asked; {ckpt} holds it. "
                              "Run the same command again to resume.")
    if not finished:  # stopped at stop_at
        accelerator.print(f"{name}: stopped at step {step} of {steps} (stop_at); {ckpt} holds it: run again without "
                          f"it to go on along the same {steps}-step schedule")
    if main:
        plot_losses(name, losses, out / f"{name}_loss.png")
    final = ema if ema is not None else accelerator.unwrap_model(module)
    return final.eval()


def plot_losses(name: str, losses: list[float], path: Path) -> None:
    """Save the loss curve as a PNG. Drawn on a bare `Figure` (no pyplot): the user's plotting backend and
    open figures are left as they are, in a notebook too."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    k = max(1, len(losses) // 200)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid") if len(losses) > k else losses
    ax.plot(losses, alpha=0.25, lw=0.5)
    ax.plot(np.arange(len(smooth)) + k - 1, smooth)
    ax.set(title=f"{name} training loss", xlabel="step", ylabel="loss", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
