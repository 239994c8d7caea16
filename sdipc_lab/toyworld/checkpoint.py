"""Training checkpoints: one safetensors file per model, written atomically, resumable.

A checkpoint holds the model's weights, an optional EMA copy, the optimizer's state (flattened into
tensors, its hyper-parameters as JSON metadata), the step and the loss history. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    losses: list[float], ema: torch.nn.Module | None = None) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
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
    model.load_state_dict(model_sd)
    if ema is not None and ema_sd:
        ema.load_state_dict(ema_sd)
    if optimizer is not None:
        optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(metadata["param_groups"])})
    return int(metadata["step"]), json.loads(metadata["losses"])
