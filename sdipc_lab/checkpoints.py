"""Training checkpoints: one safetensors file, written atomically, holding the weights that train, an optional EMA
copy, the optimizer's state (flattened into tensors, its hyper-parameters as JSON metadata), the step, the loss
history, what the run trains on and with (its signature) and the budget under way. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def trainable_state(model: torch.nn.Module) -> dict:
    """The parameters that train (frozen base weights are reloaded from the lab, not checkpointed)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


FORMAT = "1"  # the checkpoint layout's version: a checkpoint of another version is refused, not misread


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    losses: list[float], ema: torch.nn.Module | None = None, signature: dict | None = None,
                    budget: tuple[float, int] | None = None) -> None:
    """One safetensors file, written beside the target and renamed over it (atomic). Holds the trainable weights,
    the EMA copy, the optimizer state, torch's CPU random state (so a resumed run draws the noise an uninterrupted
    one would) and, as metadata, the step, the losses, `signature` (what the run trains on and with) and `budget`:
    the budget (`minutes` or `budget_steps`) still under way as (seconds its clock spent, the step it began at),
    None when none is."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in trainable_state(model).items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()})
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for key, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
    metadata = {"step": str(step), "losses": json.dumps(losses), "param_groups": json.dumps(state["param_groups"]),
                "format": FORMAT, "signature": json.dumps(signature or {}, sort_keys=True),
                "budget_seconds": repr(float(budget[0] if budget else 0.0)),
                "budget_start": str(-1 if budget is None or budget[1] is None else int(budget[1]))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


def checkpoint_losses(path: Path) -> list[float]:
    """The losses a checkpoint records, one per logged step of its run: the run's curve, readable later."""
    metadata, _ = _read_checkpoint(Path(path))
    return json.loads(metadata["losses"])


def checkpoint_signature(path: Path) -> dict | None:
    """The signature a checkpoint was written with (None for checkpoints from before signatures)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if metadata.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{path} was written by another version of sdipc_lab (checkpoint format "
                         f"{metadata.get('format')}, this one reads {FORMAT}): start fresh in another folder.")
    return json.loads(metadata["signature"]) if "signature" in metadata else None


def check_signature(path: Path, signature: dict) -> None:
    """Refuse to resume a checkpoint written for other data or settings, naming what differs."""
    saved = checkpoint_signature(path)
    if saved is None:
        return
    now = json.loads(json.dumps(signature, sort_keys=True))  # the same JSON round trip the saved one made
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in differ)
        raise ValueError(f"{path} belongs to another run ({details}). Nothing was trained or overwritten. "
                         "Train into another folder (--out), or delete that checkpoint to start this run fresh.")


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    """A checkpoint's metadata and its tensors split by kind: {"model": state, "ema": state, "rng": tensor,
    "optim": {param index: {slot: tensor}}}. Reads only; restores nothing."""
    parts = {"model": {}, "ema": {}, "optim": {}}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            kind, rest = key.split(".", 1)
            if kind == "rng":
                parts["rng"] = f.get_tensor(key)
            elif kind in ("model", "ema"):
                parts[kind][rest] = f.get_tensor(key)
            else:
                index, slot = rest.split(".", 1)
                parts["optim"].setdefault(int(index), {})[slot] = f.get_tensor(key)
    return metadata, parts


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ema: torch.nn.Module | None = None) -> tuple[int, list[float]]:
    """Restore in place (weights, EMA, optimizer, torch's CPU random state); returns (step, losses)."""
    metadata, parts = _read_checkpoint(path)
    model_sd, ema_sd, optim_state = parts["model"], parts["ema"], parts["optim"]
    if "rng" in parts:
        torch.set_rng_state(parts["rng"])
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


def checkpoint_weights(path: Path, model: torch.nn.Module) -> tuple[int, str]:
    """Load a checkpoint's EMA weights into `model` (its training weights if it keeps no EMA copy): a look at a run
    that is still training. Returns (step, "EMA" or "training"); a checkpoint that does not fit is refused."""
    metadata, parts = _read_checkpoint(path)
    step, kind = int(metadata["step"]), "ema" if parts["ema"] else "model"
    weights = parts[kind]
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit this model ({str(error).splitlines()[-1].strip() or error}): it was "
                         "written by a run with other sizes; give the sizes it was trained with (--size, ...)") from None
    return step, "EMA" if kind == "ema" else "training"


def checkpoint_step(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["step"])


def checkpoint_budget(path: Path) -> tuple[float, int] | None:
    """The budget a checkpoint has under way, as (seconds its clock spent, the step it began at); None when none
    is (it ran out, there was none, or the checkpoint is older than budgets). A time budget from before the first
    step was recorded gives its seconds and None."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    seconds, begun = float(metadata.get("budget_seconds", 0.0)), int(metadata.get("budget_start", -1))
    return (seconds, begun if begun >= 0 else None) if seconds > 0 or begun >= 0 else None
