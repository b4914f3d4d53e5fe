"""Ordinary per-member checkpoints in and out: ``from_checkpoints`` and ``export``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from ._errors import EnsembleError
from ._io_format import checked_file, open_safetensors
from ._io_state import (
    FactoryOrModule,
    PathLike,
    device_of,
    new_ensemble,
    template_module,
    unique_tensors,
)
from ._io_write import atomic_write, write_safetensors
from ._state import _replace_state
from .ensemble import Ensemble

__all__ = ["export", "from_checkpoints"]

# ----------------------------------------------------------------------------- checkpoints


def _read_checkpoint(i: int, path: Path) -> dict[str, Any]:
    """One ordinary checkpoint as a flat dict, without running any code it may hold."""
    where = f"checkpoint {i} ({path})"
    if path.suffix == ".safetensors":
        try:
            with open_safetensors(path) as handle:
                keys = list(handle.keys())
                return {k: handle.get_tensor(k) for k in keys}
        except Exception as e:
            raise EnsembleError(f"{where} could not be read as safetensors: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's weights_only message ends with the reason ("Unsupported global: ...")
        reason = next(
            (ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else ""
        )
        raise EnsembleError(
            f"{where} could not be loaded with torch.load(weights_only=True), which never runs "
            f"code stored in a file: {type(e).__name__}: {reason[:300]}"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise EnsembleError(
            f"{where} holds a {type(obj).__name__}, expected a state_dict (str -> Tensor)"
        )
    return obj


def from_checkpoints(
    paths: Sequence[PathLike],
    factory_or_module: FactoryOrModule,
    map_location: str | torch.device | int | None = None,
    **options: Any,
) -> Ensemble:
    """An ensemble of ``len(paths)`` members, member ``i`` from the ``state_dict`` in ``paths[i]``.

    Checkpoints are ordinary ``state_dict`` files: ``*.safetensors``, or anything else read with
    ``torch.load(weights_only=True)`` (``.pt``, ``.pth``, ``.bin``), which never runs code
    stored in the file. Keys must match the model's like ``load_state_dict(strict=True)``; a
    tied weight may appear under any one of its names (``safetensors.torch.save_model`` keeps
    one). Values are cast to the model's dtypes. Non-persistent buffers come from the model.
    Checkpoints are read one at a time into the stacked tensors: memory stays near one copy
    of the ensemble plus one member.

    Args:
        paths: one checkpoint per member.
        factory_or_module: a zero-argument factory returning the member's module, or a module
            used as the template (not modified).
        map_location: the device of the ensemble (default CPU).
        **options: options of the new :class:`Ensemble` (``backend``, ``randomness``,
            ``chunk_size``, ``compile``).

    Returns:
        The ensemble, ``N = len(paths)``.

    Raises:
        EnsembleError: naming the checkpoint index and path: a missing file or a folder,
            a file that cannot be read safely (such as a pickle that would run code), missing
            or unexpected keys, a shape that differs from the model's.

    Example:
        >>> import os, tempfile, torch
        >>> from vensemble.io import from_checkpoints
        >>> tmp = tempfile.TemporaryDirectory()
        >>> paths = [os.path.join(tmp.name, f"m{i}.pt") for i in range(3)]
        >>> for p in paths:
        ...     torch.save(torch.nn.Linear(4, 2).state_dict(), p)
        >>> ens = from_checkpoints(paths, lambda: torch.nn.Linear(4, 2))
        >>> ens.state_dict()["weight"].shape  # (N, out, in)
        torch.Size([3, 2, 4])
        >>> tmp.cleanup()
    """
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence):
        raise EnsembleError(f"paths must be a list of checkpoint paths, got {paths!r}")
    if len(paths) == 0:
        raise EnsembleError("from_checkpoints needs at least one checkpoint; got an empty list")
    files = [checked_file(p, f"checkpoint {i}") for i, p in enumerate(paths)]
    device = device_of(map_location)
    template = template_module(factory_or_module)
    unique = unique_tensors(template)
    canonical = {id(t): k for k, t in unique.items()}
    names: dict[str, list[str]] = {}  # canonical name -> its state_dict keys (tied: several)
    for key, t in template.state_dict(keep_vars=True).items():
        if id(t) not in canonical:
            raise EnsembleError(
                f"the model's state_dict key '{key}' is not one of its parameters or buffers (a "
                "custom state_dict); from_checkpoints needs the plain parameter and buffer names"
            )
        names.setdefault(canonical[id(t)], []).append(key)
    expected = {key for keys in names.values() for key in keys}
    count = len(files)
    stacked = {
        k: torch.empty((count, *unique[k].shape), dtype=unique[k].dtype, device=device)
        for k in names
    }
    # BatchNorm's step counts: a state dict without them (every safetensors file, which keeps
    # no version; old weights) loads into the model with 0, as torch's BatchNorm loads it
    counters = {
        k
        for k in names
        if k.rsplit(".", 1)[-1] == "num_batches_tracked"
        and isinstance(template.get_submodule(k.rpartition(".")[0]), nn.modules.batchnorm._NormBase)
    }
    for i, path in enumerate(files):
        sd = _read_checkpoint(i, path)
        where = f"checkpoint {i} ({path})"
        for k in counters:
            if not any(key in sd for key in names[k]):
                sd[names[k][0]] = torch.zeros_like(unique[k], device="cpu")
        missing = sorted(k for k, keys in names.items() if not any(key in sd for key in keys))
        unexpected = sorted(set(sd) - expected)
        if missing or unexpected:
            raise EnsembleError(
                f"{where} does not fit the model: missing keys {missing}, unexpected keys "
                f"{unexpected}"
            )
        for k, keys in names.items():
            present = [key for key in keys if key in sd]
            src = sd[present[0]]
            if not isinstance(src, Tensor):
                raise EnsembleError(
                    f"{where}: '{present[0]}' is a {type(src).__name__}, expected a Tensor"
                )
            if src.shape != unique[k].shape:
                raise EnsembleError(
                    f"{where}: '{present[0]}' has shape {tuple(src.shape)}, the model's is "
                    f"{tuple(unique[k].shape)}"
                )
            for other in present[1:]:
                if not (isinstance(sd[other], Tensor) and torch.equal(sd[other], src)):
                    raise EnsembleError(
                        f"{where}: '{present[0]}' and '{other}' are one tied tensor in the model "
                        "but differ in the checkpoint"
                    )
            stacked[k][i].copy_(src)
        del sd
    for k, t in unique.items():  # non-persistent buffers: every member gets the model's
        if k not in stacked:
            if t.is_meta:
                raise EnsembleError(
                    f"the model's non-persistent buffer '{k}' is on the meta device; checkpoints "
                    "do not hold it, so build the model on a real device"
                )
            stacked[k] = t.detach().to(device).unsqueeze(0).expand(count, *t.shape).clone()

    def make_param(param: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(stacked[canonical[id(param)]], requires_grad=param.requires_grad)

    stacked_template = _replace_state(template, make_param, lambda b: stacked[canonical[id(b)]])
    return new_ensemble(stacked_template, count, options)


def export(ens: Ensemble, folder: PathLike, *, format: str = "safetensors") -> list[Path]:
    """Write one ordinary checkpoint per member: ``folder/member_000.safetensors``, ...

    Each file is member ``i``'s ``state_dict`` and needs nothing from vensemble to load:

    * ``format="safetensors"`` (default): a tied weight is stored once under its first name
      (as ``safetensors.torch.save_model`` does); load it with
      ``safetensors.torch.load_model(model, path)``, or, for a model without tied weights,
      ``model.load_state_dict(safetensors.torch.load_file(path))``.
    * ``format="pt"``: ``torch.save(member.state_dict())``; load it with
      ``model.load_state_dict(torch.load(path, weights_only=True))``.

    Files are written atomically, one member in memory at a time; existing files of the same
    names are replaced, and other ``member_*`` files of the format (from an export of more
    members) are refused before anything is written. :func:`from_checkpoints` reads them back.

    Args:
        ens: the ensemble.
        folder: the output folder, created if missing.
        format: ``"safetensors"`` or ``"pt"``.

    Returns:
        The ``N`` paths written, in member order (names zero-padded to at least 3 digits).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import load_file
        >>> from vensemble import Ensemble
        >>> from vensemble.io import export
        >>> ens = Ensemble.from_factory(lambda: torch.nn.Linear(4, 2), 3, seed=0)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> paths = export(ens, tmp.name)
        >>> [p.name for p in paths]
        ['member_000.safetensors', 'member_001.safetensors', 'member_002.safetensors']
        >>> model = torch.nn.Linear(4, 2)
        >>> model.load_state_dict(load_file(paths[2]))
        <All keys matched successfully>
        >>> torch.equal(model.weight, ens.member(2).weight)
        True
        >>> tmp.cleanup()
    """
    if not isinstance(ens, Ensemble):
        raise EnsembleError(f"export expects an Ensemble, got a {type(ens).__name__}")
    if format not in ("safetensors", "pt"):
        raise EnsembleError(f"format must be 'safetensors' or 'pt', got {format!r}")
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise EnsembleError(f"cannot export to {out}: it is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(ens) - 1)))
    names = {f"member_{i:0{width}d}.{format}" for i in range(len(ens))}
    stale = sorted(p.name for p in out.glob(f"member_*.{format}") if p.name not in names)
    if stale:
        raise EnsembleError(
            f"{out} already holds {', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''} "
            f"({len(stale)} file(s)) beyond this ensemble's {len(ens)} members, from an earlier "
            "export: a folder read back with from_checkpoints would mix the two; export into an "
            "empty folder or remove them first"
        )
    written = []
    for i in range(len(ens)):
        path = out / f"member_{i:0{width}d}.{format}"
        state = ens.member(i).state_dict(keep_vars=True)
        if format == "pt":
            plain = {k: v.detach() for k, v in state.items()}

            def write(f: BinaryIO, plain: dict[str, Tensor] = plain) -> None:
                torch.save(plain, f)

            atomic_write(path, write)
        else:
            first: dict[int, str] = {}
            tensors = {
                k: v.detach().cpu().contiguous()
                for k, v in state.items()
                if first.setdefault(id(v), k) == k
            }
            meta = {
                "format": "pt",
                "vensemble.member": str(i),
                "vensemble.num_members": str(len(ens)),
            }
            write_safetensors(path, tensors, meta)
        written.append(path)
    return written
