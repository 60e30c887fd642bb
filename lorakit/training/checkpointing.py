"""Resumable training checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

A checkpoint directory is written under a temporary name and renamed into place, so an interrupted
write never leaves a half checkpoint where `--resume` would read it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import AdapterFileError
from ..io.atomic import staged_directory
from .placement import Replicated

CHECKPOINT = "checkpoint"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output: Path, trainable: dict[str, torch.Tensor], optimizer_state: dict, scheduler, progress: dict,
                    name: str = CHECKPOINT) -> Path:
    """``trainable``: the trainable weights by parameter name; ``optimizer_state``: the optimizer's
    state_dict (under FSDP, the whole state keyed by parameter name, fsdp.optimizer_state)."""
    with staged_directory(output / name) as staging:
        save_file({k: v.cpu() for k, v in trainable.items()}, str(staging / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   staging / "training_state.pt")
        (staging / "progress.json").write_text(json.dumps(progress, indent=2))
    return output / name


def find_checkpoint(output: Path, name: str = CHECKPOINT) -> Path | None:
    for candidate in (output / name, output / f".{name}.old"):  # .old survives a crash mid-swap
        if (candidate / "progress.json").is_file():
            return candidate
    return None


def load_checkpoint(directory: Path, model, optimizer, scheduler, placement: Replicated | None = None) -> dict:
    """Restore everything saved by save_checkpoint; checks names and shapes before touching the model.
    Under a sharded placement every process calls it and the whole tensors are scattered into the shards."""
    try:
        weights = load_file(str(directory / "trainable.safetensors"))
        state = torch.load(directory / "training_state.pt", weights_only=False)
        progress = json.loads((directory / "progress.json").read_text())
    except Exception as exc:
        raise AdapterFileError(f"checkpoint {directory} is unreadable ({exc}); delete it or start without --resume") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise AdapterFileError(f"checkpoint {directory} does not match this run's trainable parameters "
                               f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the same options")
    for name, tensor in weights.items():
        if tensor.shape != params[name].shape:
            raise AdapterFileError(f"checkpoint {directory}: {name} has shape {tuple(tensor.shape)}, the model "
                                   f"expects {tuple(params[name].shape)}; resume with the same options")
    placement = placement or Replicated()
    placement.load_trainable(model, weights)
    placement.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return progress
