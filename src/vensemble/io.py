"""Ensembles in files: one safetensors file per ensemble, ordinary checkpoints in and out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._errors import EnsembleError
from ._io_checkpoints import export as export
from ._io_checkpoints import from_checkpoints as from_checkpoints
from ._io_format import (
    FORMAT_VERSION,
    OPTIMIZER_PREFIX,
    FileInfo,
    damaged,
    dtype_code,
    open_ensemble,
    read_tensors,
    text_crc32,
)
from ._io_state import (
    FactoryOrModule,
    PathLike,
    check_optimizer_fits,
    check_optimizer_owns,
    decode_optimizer,
    device_of,
    encode_optimizer,
    fingerprint_differences,
    member_fingerprint,
    new_ensemble,
    only_settings_differ,
    template_module,
    unique_tensors,
)
from ._io_write import write_safetensors
from ._optim import MemberOptimizer, _inverse
from ._state import _replace_state, fingerprint, fingerprint_digest
from .ensemble import Ensemble

if TYPE_CHECKING:
    from .distributed import ShardedEnsemble

__all__ = ["export", "from_checkpoints", "load", "save"]


# ----------------------------------------------------------------------------- save / load


def save(ens: Ensemble | ShardedEnsemble, path: PathLike, *, optimizer: Any = None) -> None:
    """Write an ensemble (and optionally its optimizer state) to one safetensors file.

    The file holds each distinct parameter and buffer once (weights tied inside a member are
    stored under their first name; the aliases are in the metadata), under the member's
    ``state_dict`` names with a leading member dim ``N``, plus the metadata that
    :func:`load` checks: format and vensemble versions, ``N``, dtypes, the architecture
    fingerprint and its digest, and a CRC-32 of every tensor. The write is atomic: ``path``
    holds either its previous content or the complete new file, even if the process dies
    or the disk fills up mid-write. Any safetensors reader can read the tensors.

    Args:
        ens: the ensemble. Tensors on an accelerator are copied to the CPU to be written.
            A :class:`~vensemble.distributed.ShardedEnsemble` (call on every rank) is
            gathered to rank 0, which writes one file (see ``ShardedEnsemble.save``).
        path: the file to write (conventionally ``*.safetensors``); its folder must exist.
        optimizer: anything with ``state_dict()`` in the torch optimizer format (a torch
            optimizer over ``ens.parameters()`` or a ``MemberOptimizer``); its tensors are
            stored under ``optimizer/...`` and the rest as JSON metadata.

    Raises:
        EnsembleError: ``path`` is a folder or its folder does not exist, the optimizer does
            not optimize this ensemble, or its state holds something that cannot be stored.

    Example:
        >>> import os, tempfile, torch
        >>> from vensemble import Ensemble
        >>> from vensemble.io import load, save
        >>> ens = Ensemble.from_factory(lambda: torch.nn.Linear(4, 2), 3, seed=0)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> save(ens, os.path.join(tmp.name, "ens.safetensors"))
        >>> back = load(os.path.join(tmp.name, "ens.safetensors"), lambda: torch.nn.Linear(4, 2))
        >>> torch.equal(back.state_dict()["weight"], ens.state_dict()["weight"])  # (3, 2, 4)
        True
        >>> tmp.cleanup()
    """
    from . import __version__

    if not isinstance(ens, Ensemble):
        from .distributed import ShardedEnsemble

        if isinstance(ens, ShardedEnsemble):  # collective: gathered, rank 0 writes
            return ens.save(path, optimizer=optimizer)
        raise EnsembleError(f"save expects an Ensemble, got a {type(ens).__name__}")
    template = ens._template
    fp = member_fingerprint(template)
    tensors = {k: t.detach().cpu().contiguous() for k, t in unique_tensors(template).items()}
    meta = {
        "format": "pt",
        "vensemble.format_version": str(FORMAT_VERSION),
        "vensemble.version": __version__,
        "vensemble.num_members": str(len(ens)),
        "vensemble.dtypes": json.dumps(list(dict.fromkeys(str(t.dtype) for t in tensors.values()))),
        "vensemble.fingerprint": json.dumps(fp, sort_keys=True),
        "vensemble.fingerprint_digest": fingerprint_digest(fp),
        "vensemble.aliases": json.dumps(fp["ties"], sort_keys=True),
    }
    if optimizer is not None:
        check_optimizer_owns(ens, optimizer)
        meta["vensemble.optimizer"], opt_tensors = encode_optimizer(optimizer.state_dict())
        meta["vensemble.optimizer_crc32"] = text_crc32(meta["vensemble.optimizer"])
        tensors.update(opt_tensors)
    write_safetensors(Path(path), tensors, meta, checksums=True)


def load(
    path: PathLike,
    factory_or_module: FactoryOrModule,
    map_location: str | torch.device | int | None = None,
    *,
    n: int | None = None,
    optimizer: Any = None,
    **options: Any,
) -> Ensemble:
    """Load an ensemble written by :func:`save`, refusing files that do not fit the model.

    One model is built from ``factory_or_module`` (never ``N`` of them) and its architecture
    fingerprint is compared with the file's; every difference is named. Each tensor is read
    once into fresh memory, checked against its CRC-32, and moved to ``map_location``, so
    memory stays near one copy of the weights. Nothing in the file is ever executed.

    Passing an :class:`Ensemble` loads the file into it in place (its parameters keep their
    identity, so an optimizer built over them stays valid); this is how training resumes::

        ens = Ensemble.from_factory(make_model, 16); opt = torch.optim.Adam(ens.parameters())
        load("ckpt.safetensors", ens, optimizer=opt)

    Args:
        path: a file written by :func:`save`.
        factory_or_module: a zero-argument factory returning the member's ``nn.Module`` (a
            class works), a module instance used as the template (it is not modified; on the
            ``"meta"`` device it costs no memory), or an ``Ensemble`` to load into in place.
        map_location: the device for the new ensemble (default CPU). Must be ``None`` when
            loading in place: the tensors go where the ensemble's are.
        n: the member count you expect; a file with another count is refused.
        optimizer: restore the optimizer state saved with the file into this optimizer (with
            ``opt.load_state_dict``); only when loading into an ``Ensemble`` in place.
        **options: options of the new :class:`Ensemble` (``backend``, ``randomness``,
            ``chunk_size``, ``compile``); not when loading in place.

    Returns:
        The ensemble, ``N`` members; parameters keep the ``requires_grad`` they were saved
        with (in place: the ensemble's own).

    Raises:
        EnsembleError: a missing file, a folder, a file that is not a vensemble file or is
            damaged (truncated, altered: the checksums catch it), another architecture (the
            message lists the differing modules, names, shapes and dtypes), another member
            count than ``n`` or than the ensemble loaded into, or optimizer state that does
            not fit.

    Example:
        >>> import os, tempfile, torch
        >>> from vensemble import Ensemble
        >>> from vensemble.io import load, save
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "ens.safetensors")
        >>> save(Ensemble.from_factory(lambda: torch.nn.Linear(4, 2), 3), path)
        >>> len(load(path, torch.nn.Linear(4, 2), n=3))
        3
        >>> load(path, lambda: torch.nn.Linear(4, 5))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vensemble._errors.EnsembleError: ... parameter 'weight' has shape (2, 4) in the file, (5, 4) in the model...
        >>> tmp.cleanup()
    """
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise EnsembleError(f"n must be a positive int or None, got {n!r}")
    into = factory_or_module if isinstance(factory_or_module, Ensemble) else None
    if into is not None and (map_location is not None or options):
        raise EnsembleError(
            "map_location and Ensemble options apply to a new ensemble; loading into an "
            "Ensemble keeps its options and the devices of its tensors"
        )
    if into is None and optimizer is not None:
        raise EnsembleError(
            "an optimizer can only be restored together with the ensemble it optimizes: build "
            "the ensemble and its optimizer, then load(path, ens, optimizer=opt) loads in place"
        )
    device = device_of(map_location)
    with open_ensemble(path) as info:
        p, count = info.path, info.num_members
        if n is not None and n != count:
            raise EnsembleError(f"{p} holds {count} members, but n={n} members were asked for")
        if into is not None and len(into) != count:
            raise EnsembleError(
                f"{p} holds {count} members, the ensemble it is loaded into has {len(into)}"
            )
        template = into._template if into is not None else template_module(factory_or_module)
        names = _check_fits(info, template, member=into is None)
        opt_keys = _optimizer_keys(info) if optimizer is not None else []
        tensors = read_tensors(info, names + opt_keys)
    if into is not None:
        if optimizer is not None:  # first: it can still refuse, and then nothing has changed
            state = decode_optimizer(p, info.metadata["vensemble.optimizer"], tensors.__getitem__)
            check_optimizer_fits(p, optimizer, state)
            if not isinstance(optimizer, MemberOptimizer):
                state = _in_parameter_layout(state, optimizer)
            put_back = _optimizer_as_it_is(optimizer)
            try:
                optimizer.load_state_dict(state)
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
                put_back()  # (torch replaces its state and groups before it checks them)
                raise EnsembleError(f"{p}: the optimizer refused the saved state: {e!r}") from None
            except EnsembleError:
                put_back()
                raise
            _state_laid_out_as_params(optimizer)
        with torch.no_grad():
            for name, t in unique_tensors(template).items():
                t.copy_(tensors.pop(name))
        return into
    for name in names:  # one tensor at a time: host memory stays near one copy
        tensors[name] = tensors[name].to(device)
    grads = info.fingerprint["parameters"]
    ids = {id(t): k for k, t in unique_tensors(template).items()}

    def make_param(param: nn.Parameter) -> nn.Parameter:
        name = ids[id(param)]
        return nn.Parameter(tensors[name], requires_grad=bool(grads[name]["requires_grad"]))

    stacked = _replace_state(template, make_param, lambda b: tensors[ids[id(b)]])
    return new_ensemble(stacked, count, options)


def _check_fits(info: FileInfo, template: nn.Module, member: bool) -> list[str]:
    """Refuse a file whose architecture differs from ``template``'s (a member, or a stacked
    template); return the names of the tensors to read."""
    model_fp = fingerprint(template) if member else member_fingerprint(template)
    if diffs := fingerprint_differences(info.fingerprint, model_fp):
        more = f"\n  (and {len(diffs) - 12} more)" if len(diffs) > 12 else ""
        hint = (
            "\nOnly settings differ (changed after building, e.g. an annealed "
            "ens.temperature = 0.5 or a Dropout's p): build the model with the file's settings, "
            "then load"
            if only_settings_differ(info.fingerprint, model_fp)
            else ""
        )
        raise EnsembleError(
            f"{info.path} was saved from a different architecture than the model given (file "
            f"fingerprint {info.digest}):\n  - " + "\n  - ".join(diffs[:12]) + more + hint
        )
    names = list(unique_tensors(template))
    stored = sorted(k for k in info.shapes if not k.startswith(OPTIMIZER_PREFIX))
    if stored != sorted(names):
        raise damaged(
            info.path, f"it stores tensors {stored}, its architecture has {sorted(names)}"
        )
    entries = {**info.fingerprint["buffers"], **info.fingerprint["parameters"]}
    for name in names:
        want = [info.num_members, *entries[name]["shape"]]
        code = dtype_code(entries[name]["dtype"])
        if info.shapes[name] != want or info.dtypes[name] != code:
            raise damaged(
                info.path,
                f"tensor '{name}' is {info.dtypes[name]} {info.shapes[name]}, its architecture "
                f"says {code} {want}",
            )
    return names


def _optimizer_as_it_is(optimizer: Any) -> Callable[[], None]:
    """What puts a torch optimizer (a MemberOptimizer's inner one) back as it is now: its
    ``load_state_dict`` replaces its state and param groups with new objects, and may raise
    after that (an SGD file into Adam: no 'step')."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        return lambda: None
    state, groups = inner.state, inner.param_groups
    return lambda: inner.__setstate__({"state": state, "param_groups": groups})


def _in_parameter_layout(state: Any, optimizer: Any) -> Any:
    """A MemberOptimizer's saved state for a plain torch optimizer: each parameter-shaped
    tensor (Adam's moments) in its parameter's dim order. A MemberOptimizer keeps them over
    its views of the parameters, whose dims it saved as ``member_layout`` (``[1, 0, 2]``...)."""
    if not isinstance(state, dict) or "member_layout" not in state:
        return state
    layouts = state["member_layout"]
    params = [q for g in getattr(optimizer, "param_groups", []) for q in g["params"]]
    entries = {}
    for index, entry in state.get("state", {}).items():
        k = int(index)
        was = layouts[k] if k < len(layouts) and k < len(params) else None
        if was is None or not isinstance(entry, dict):
            entries[index] = entry
            continue
        saved_shape = [params[k].shape[d] for d in was]
        entries[index] = {
            name: value.permute(_inverse(was))
            if isinstance(value, Tensor) and list(value.shape) == saved_shape
            else value
            for name, value in entry.items()
        }
    groups = [{k: v for k, v in g.items() if k != "members"} for g in state["param_groups"]]
    rest = {k: v for k, v in state.items() if k not in ("member_layout", "state", "param_groups")}
    return {**rest, "state": entries, "param_groups": groups}


def _state_laid_out_as_params(optimizer: Any) -> None:
    """Lay out each loaded per-element state tensor (Adam's moments, ...) as its parameter:
    files hold them contiguous, and torch's fused kernels pair a parameter's elements with its
    state's by position in memory (the ensemble keeps in-major Linear weights and the members'
    channels-last conv weights)."""
    for group in getattr(optimizer, "param_groups", []):
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if (
                    isinstance(value, Tensor)
                    and value.shape == param.shape
                    and value.stride() != param.stride()
                ):
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _optimizer_keys(info: FileInfo) -> list[str]:
    """The tensors of the optimizer state saved in the file (its JSON checked on the way)."""
    if not info.has_optimizer:
        raise EnsembleError(
            f"{info.path} holds no optimizer state: it was saved without optimizer="
        )
    text = info.metadata["vensemble.optimizer"]
    # (absent in files written before it existed)
    crc = info.metadata.get("vensemble.optimizer_crc32")
    if crc is not None and crc != text_crc32(text):
        raise damaged(info.path, "the optimizer state does not match its CRC-32")
    keys: list[str] = []

    def collect(key: str) -> torch.Tensor:
        keys.append(key)
        return torch.empty(0)

    decode_optimizer(info.path, text, collect)
    if missing := [k for k in keys if k not in info.shapes]:
        raise damaged(info.path, f"optimizer tensors {missing} are missing")
    return keys
