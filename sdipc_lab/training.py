"""The training loop every trainer here shares: seeded, resumable, with progress and a loss curve.

`fit()` runs AdamW (warm-up, then cosine decay or a constant rate) through `accelerate`, so the same code
runs on CPU, one GPU or several. A checkpoint is one safetensors file written atomically every few
hundred steps: the model's weights, an optional EMA copy, the optimizer's state (flattened into tensors,
its hyper-parameters as JSON metadata), the step and the loss history. Nothing is pickled. Run the same
command again and it resumes where the last checkpoint left off.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm


def trainable_state(model: torch.nn.Module) -> dict:
    """The parameters that train (frozen base weights are reloaded from the lab, not checkpointed)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    losses: list[float], ema: torch.nn.Module | None = None) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in trainable_state(model).items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()})
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for key, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
    metadata = {"step": str(step), "losses": json.dumps(losses), "param_groups": json.dumps(state["param_groups"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ema: torch.nn.Module | None = None) -> tuple[int, list[float]]:
    """Restore in place; returns (step, losses)."""
    model_sd, ema_sd, optim_state = {}, {}, {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            kind, rest = key.split(".", 1)
            if kind == "model":
                model_sd[rest] = f.get_tensor(key)
            elif kind == "ema":
                ema_sd[rest] = f.get_tensor(key)
            else:
                index, slot = rest.split(".", 1)
                optim_state.setdefault(int(index), {})[slot] = f.get_tensor(key)
    try:
        unexpected = model.load_state_dict(model_sd, strict=False).unexpected_keys
    except RuntimeError as error:  # size mismatches: another model's checkpoint in this folder
        raise ValueError(f"{path} does not fit this model ({str(error).splitlines()[-1].strip()}). It was written "
                         "by a run with other sizes: train into another folder (--out), or move it away.") from None
    if unexpected:
        raise ValueError(f"{path} does not fit this model: unexpected {unexpected[:5]}")
    if ema is not None and ema_sd:
        ema.load_state_dict(ema_sd)
    if optimizer is not None:
        optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(metadata["param_groups"])})
    return int(metadata["step"]), json.loads(metadata["losses"])


def fit(name: str, module: torch.nn.Module, loss_fn, *, steps: int, lr: float, out: Path, accelerator=None,
        minutes: float | None = None, ema_decay: float | None = None, every: int = 250, schedule: str = "cosine",
        weight_decay: float = 0.01) -> torch.nn.Module:
    """AdamW with warm-up, then cosine decay (or `schedule="constant"`); `loss_fn(module, step)` returns the
    loss of one batch, drawn deterministically from `step` so that a resumed run sees the same data.

    Resumes from `out/name.ckpt.safetensors`; returns the trained module (its EMA copy if asked).
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if accelerator is None:
        from accelerate import Accelerator
        accelerator = Accelerator()
    ckpt = out / f"{name}.ckpt.safetensors"
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ema = copy.deepcopy(module).requires_grad_(False) if ema_decay else None
    step, losses = 0, []
    if ckpt.exists():
        step, losses = load_checkpoint(ckpt, model=module, optimizer=optimizer, ema=ema)
        print(f"{name}: resumed at step {step} from {ckpt}")
    warmup = max(1, min(500 if minutes is None else 100, steps // 20))
    first = step

    def progress(k):  # 0 -> 1 over the stage; with --minutes, the clock counts too, so lr always decays
        by_time = (time.time() - start) / (60 * minutes) if minutes else 0.0
        return min(1.0, max(k / steps, by_time))

    def lr_at(k):
        decay = 0.5 * (1 + math.cos(math.pi * progress(k))) if schedule == "cosine" else 1.0
        return lr * min(1.0, (k - first + 1) / warmup) * decay

    module, optimizer = accelerator.prepare(module, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    start = time.time()
    bar = tqdm(total=steps, initial=step, desc=name, disable=not accelerator.is_main_process)
    module.train()

    def save():
        if accelerator.is_main_process:
            save_checkpoint(ckpt, model=accelerator.unwrap_model(module), optimizer=optimizer, step=step,
                            losses=losses, ema=ema)

    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(module, step)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema.parameters(), accelerator.unwrap_model(module).parameters()):
                    e.lerp_(p, 1 - ema_decay)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % every == 0 or step == steps:
            save()
        if minutes is not None and progress(step) >= 1.0:
            print(f"{name}: time budget reached at step {step} of {steps} ({minutes} min, "
                  f"{(step - first) / (time.time() - start):.1f} steps/s)")
            break
    save()
    bar.close()
    plot_losses(name, losses, out / f"{name}_loss.png")
    final = ema if ema is not None else accelerator.unwrap_model(module)
    return final.eval()


def plot_losses(name: str, losses: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    k = max(1, len(losses) // 200)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid") if len(losses) > k else losses
    ax.plot(losses, alpha=0.25, lw=0.5)
    ax.plot(np.arange(len(smooth)) + k - 1, smooth)
    ax.set(title=f"{name} training loss", xlabel="step", ylabel="loss", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


