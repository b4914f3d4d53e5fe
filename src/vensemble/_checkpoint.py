"""fit's checkpoints and RNG: plain-tensor files that resume a run exactly where it stopped."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ._errors import EnsembleError
from ._io_write import atomic_write

__all__ = ["load_checkpoint", "rng_state", "save_checkpoint", "seeded", "set_rng_state"]

FORMAT = "vensemble.fit/1"


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for the run; the caller's RNG state is restored afterwards."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if devices or device.type != "cpu":
            torch.manual_seed(seed)
        else:  # the CPU generator alone: torch.manual_seed would also queue a seed for CUDA
            torch.default_generator.manual_seed(seed)  # (0.4 ms, and a state fork_rng leaves)
        yield


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """torch's CPU (and CUDA) RNG states and the data generator's, as tensors."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "data": generator.get_state()}


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """The inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["data"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` of plain tensors and Python values, written atomically and durably
    (a temporary file of its own in the same folder, fsynced, renamed over ``path``, the
    folder fsynced): a crash leaves the previous checkpoint or this one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike[str], config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` for a run with the same ``config``.

    Loaded onto the CPU (RNG states must live there); tensors move to the ensemble's device
    as they are loaded into it.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EnsembleError(f"resume_from: no checkpoint at {os.fspath(path)!r}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise EnsembleError(f"resume_from: {os.fspath(path)!r} is not a vensemble.fit checkpoint")
    for key, want in config.items():
        got = payload["config"].get(key)
        if got != want:
            raise EnsembleError(
                f"resume_from: the checkpoint was written with {key}={got!r}, this call has "
                f"{key}={want!r}; resume with the same settings"
            )
    return payload
