"""The epoch checkpoint: what stage 1 keeps at the end of every epoch and stage 2 reads.

ELREA computes its gradient features at each epoch checkpoint of the base adapter, with that
checkpoint's Adam moments as preconditioner (paper step 1 and eq. 5.5), so an epoch checkpoint
is a folder holding:

    adapter_config.json, adapter_model.safetensors   the PEFT adapter (`save_pretrained`)
    adam_state.safetensors     exp_avg/<param name>, exp_avg_sq/<param name> for every LoRA
                               parameter, names as `lora_parameters(model)` gives them
    optimizer_state.json       {"step", "lr", "mean_lr", "epoch", "beta1", "beta2", "eps"}

Only open formats: PEFT, vLLM or plain safetensors/json readers can use it without us.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from elrea_ray.model import lora_parameters

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAM_FILE = "adam_state.safetensors"
STATE_FILE = "optimizer_state.json"
_STATE_KEYS = ("step", "lr", "mean_lr", "epoch", "beta1", "beta2", "eps")


def unwrap(model):
    """The PEFT model inside a DistributedDataParallel wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def parameter_layout(peft_model) -> list[tuple[str, list[int]]]:
    """Names and shapes of the trainable LoRA parameters, in order: the layout of every flat
    gradient, Adam-state vector and projector input (it goes into bundle.json)."""
    return [(n, list(p.shape)) for n, p in lora_parameters(unwrap(peft_model))]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_epoch_checkpoint(
    folder: str | Path, peft_model, optimizer: torch.optim.Adam, step: int, lr: float, mean_lr: float, epoch: int
) -> None:
    """Write the adapter, its Adam moments (by parameter name) and the optimizer scalars.

    `step` is the number of optimizer steps taken, `lr` the learning rate now and `mean_lr` the
    mean rate over the epoch that just ended (the default epoch weight, as LESS). Parameters the
    optimizer has not stepped yet get zero moments. `optimizer_state.json` is written last, so
    its presence means the folder is complete.
    """
    from safetensors.torch import save_file

    model = unwrap(peft_model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = lora_parameters(model)
    if not params:
        raise ValueError("save_epoch_checkpoint: the model has no trainable LoRA parameters")
    if "default" not in getattr(model, "peft_config", {}):
        raise ValueError("save_epoch_checkpoint expects the trained adapter to be named 'default'")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params:
        if id(p) not in in_optimizer:
            raise ValueError(f"save_epoch_checkpoint: LoRA parameter {name} is not in the optimizer")
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            t = torch.zeros_like(p) if t is None else t
            tensors[f"{key}/{name}"] = t.detach().to("cpu", torch.float32).contiguous().clone()
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    meta = {
        "step": int(step),
        "lr": float(lr),
        "mean_lr": float(mean_lr),
        "epoch": int(epoch),
        "beta1": float(beta1),
        "beta2": float(beta2),
        "eps": float(group["eps"]),
    }
    model.save_pretrained(str(folder), selected_adapters=["default"])
    _write_atomic(folder / ADAM_FILE, lambda p: save_file(tensors, str(p)))
    _write_atomic(folder / STATE_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))


@dataclass
class AdamState:
    """One epoch checkpoint's Adam moments (float32 on CPU, keyed by LoRA parameter name)."""

    step: int  # optimizer steps taken when the checkpoint was written
    lr: float
    mean_lr: float
    epoch: int
    beta1: float
    beta2: float
    eps: float
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]


def check_epoch_checkpoint(folder: str | Path) -> Path:
    """The folder as a Path, or FileNotFoundError naming the folder and the first missing file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"epoch checkpoint {folder} does not exist")
    for name in (*ADAPTER_FILES, ADAM_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"epoch checkpoint {folder} is incomplete: {name} is missing")
    return folder


def load_adam_state(folder: str | Path) -> AdamState:
    """Read `adam_state.safetensors` and `optimizer_state.json` of an epoch checkpoint."""
    from safetensors.torch import load_file

    folder = check_epoch_checkpoint(folder)
    try:
        meta = json.loads((folder / STATE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"epoch checkpoint {folder}: {STATE_FILE} is not valid JSON ({e})") from None
    missing = [k for k in _STATE_KEYS if k not in meta]
    if missing:
        raise ValueError(f"epoch checkpoint {folder}: {STATE_FILE} lacks {', '.join(missing)}")
    tensors = load_file(str(folder / ADAM_FILE))
    exp_avg = {k.split("/", 1)[1]: v.float() for k, v in tensors.items() if k.startswith("exp_avg/")}
    exp_avg_sq = {k.split("/", 1)[1]: v.float() for k, v in tensors.items() if k.startswith("exp_avg_sq/")}
    if not exp_avg or set(exp_avg) != set(exp_avg_sq):
        raise ValueError(
            f"epoch checkpoint {folder}: {ADAM_FILE} must hold exp_avg/<name> and "
            f"exp_avg_sq/<name> for the same non-empty set of parameters"
        )
    return AdamState(
        step=int(meta["step"]),
        lr=float(meta["lr"]),
        mean_lr=float(meta["mean_lr"]),
        epoch=int(meta["epoch"]),
        beta1=float(meta["beta1"]),
        beta2=float(meta["beta2"]),
        eps=float(meta["eps"]),
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
    )
