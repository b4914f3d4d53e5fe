"""The model side of ensemble files: templates, architecture comparison, optimizer state."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ._errors import EnsembleError
from ._io_format import OPTIMIZER_PREFIX, damaged
from ._optim import MemberOptimizer
from ._state import _replace_state, fingerprint
from .ensemble import Ensemble

__all__ = [
    "FactoryOrModule",
    "PathLike",
    "check_optimizer_fits",
    "check_optimizer_owns",
    "decode_optimizer",
    "device_of",
    "encode_optimizer",
    "fingerprint_differences",
    "member_fingerprint",
    "new_ensemble",
    "only_settings_differ",
    "template_module",
    "unique_tensors",
]

PathLike = str | os.PathLike[str]
FactoryOrModule = Callable[[], nn.Module] | nn.Module

# ----------------------------------------------------------------------------- helpers


def new_ensemble(template: nn.Module, n: int, options: dict[str, Any]) -> Ensemble:
    """An Ensemble around an already stacked ``template``, with ``Ensemble(...)`` ``options``.

    Every option ``Ensemble`` accepts (``backend``, ``randomness``, ``chunk_size``,
    ``compile``) works and is validated as there.
    """
    return Ensemble._from_template(template, n, **options)


def unique_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Each distinct parameter and buffer once, under its canonical (first) name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def member_fingerprint(template: nn.Module) -> dict[str, Any]:
    """The fingerprint of one member of a stacked template (no data is copied)."""

    def make_param(p: nn.Parameter) -> nn.Parameter:
        meta = torch.empty(p.shape[1:], dtype=p.dtype, device="meta")
        return nn.Parameter(meta, requires_grad=p.requires_grad)

    def make_buffer(b: Tensor) -> Tensor:
        return torch.empty(b.shape[1:], dtype=b.dtype, device="meta")

    return fingerprint(_replace_state(template, make_param, make_buffer))


def template_module(factory_or_module: Any) -> nn.Module:
    """The single module a factory builds (or the module given), checked."""
    if isinstance(factory_or_module, nn.Module):
        module = factory_or_module
    elif callable(factory_or_module):
        module = factory_or_module()
        if not isinstance(module, nn.Module):
            raise EnsembleError(
                f"the factory returned a {type(module).__name__}, expected an nn.Module"
            )
    else:
        raise EnsembleError(
            "expected a zero-argument factory that returns an nn.Module, or an nn.Module, got "
            f"a {type(factory_or_module).__name__}"
        )
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if is_lazy(t):
            raise EnsembleError(
                f"the model's '{name}' is an uninitialised lazy parameter or buffer; build the "
                "model with known sizes (or run one forward pass) first"
            )
    return module


def device_of(map_location: str | torch.device | int | None) -> torch.device:
    """``map_location`` as a device (default CPU), or an ``EnsembleError`` naming it."""
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, bool) or not isinstance(map_location, (str, torch.device, int)):
        raise EnsembleError(
            f"map_location must be a device (like 'cpu' or 'cuda:0') or None, got {map_location!r}"
        )
    try:
        return torch.device(map_location)
    except RuntimeError as e:
        raise EnsembleError(f"map_location {map_location!r} is not a device: {e}") from None


def check_optimizer_owns(ens: Ensemble, optimizer: Any) -> None:
    """Refuse an optimizer without ``state_dict`` or one holding another module's parameters."""
    if not callable(getattr(optimizer, "state_dict", None)):
        raise EnsembleError(
            f"optimizer is a {type(optimizer).__name__} without state_dict(); pass a torch "
            "optimizer or a MemberOptimizer"
        )
    mine = {id(p) for p in ens.parameters()}
    if isinstance(optimizer, MemberOptimizer):  # its param groups hold views of them
        for i, p in enumerate(optimizer._params):
            if id(p) not in mine:
                raise EnsembleError(
                    f"the MemberOptimizer's parameter {i} is not a parameter of this ensemble; "
                    "build it over this ensemble"
                )
        return
    for g, group in enumerate(getattr(optimizer, "param_groups", None) or []):
        for i, p in enumerate(group.get("params", []) if isinstance(group, dict) else []):
            if isinstance(p, Tensor) and id(p) not in mine:
                raise EnsembleError(
                    f"optimizer param_groups[{g}]['params'][{i}] is not a parameter of this "
                    "ensemble; build the optimizer over ens.parameters()"
                )


def check_optimizer_fits(path: Path, optimizer: Any, state: Any) -> None:
    """Refuse a saved optimizer state whose parameter groups do not match ``optimizer``'s."""
    groups = getattr(optimizer, "param_groups", None)
    saved = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(saved, list):
        return
    have = [len(g["params"]) for g in groups]
    want = [
        len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else -1
        for g in saved
    ]
    if have != want:
        raise EnsembleError(
            f"{path} holds optimizer state for parameter groups of sizes {want}; the optimizer "
            f"has groups of sizes {have}: build it the same way as the one that was saved"
        )
    # another optimizer's hyperparameters (Adam's betas where SGD has momentum): each side has
    # names the other lacks (a torch release that adds one adds it on one side only)
    own = {k for g in groups for k in g} - _GROUP_BOOKKEEPING
    theirs = {k for g in saved if isinstance(g, dict) for k in g} - _GROUP_BOOKKEEPING
    if own - theirs and theirs - own:
        raise EnsembleError(
            f"{path} holds the state of another kind of optimizer: its hyperparameters are "
            f"{sorted(theirs)}, the optimizer's are {sorted(own)}: build the optimizer that "
            "was saved (the same class), then load"
        )


# param group entries that are no optimizer's hyperparameters: the parameters, MemberOptimizer's
# members, a scheduler's starting lr
_GROUP_BOOKKEEPING = frozenset({"params", "members", "initial_lr"})


# ----------------------------------------------------------------------------- architecture


def _shape(shape: list[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _cls(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1]


def fingerprint_differences(saved: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """Every way ``model``'s fingerprint differs from a file's, one line each.

    ``requires_grad`` is not compared: a loaded ensemble takes it from the file.
    """
    out: list[str] = []
    s_mods, m_mods = saved["modules"], model["modules"]
    if s_mods[""]["class"] != m_mods[""]["class"]:
        out.append(
            f"the file holds a {_cls(s_mods['']['class'])}, the model is a {_cls(m_mods['']['class'])}"
        )
    for kind, label in (
        ("modules", "modules"),
        ("parameters", "parameters"),
        ("buffers", "buffers"),
    ):
        missing = sorted(set(saved[kind]) - set(model[kind]))
        extra = sorted(set(model[kind]) - set(saved[kind]))
        if missing:
            out.append(f"{label} in the file but not in the model: {missing}")
        if extra:
            out.append(f"{label} in the model but not in the file: {extra}")
    for path in sorted(set(s_mods) & set(m_mods)):
        s, m = s_mods[path], m_mods[path]
        where = f"module '{path}'" if path else "root module"
        if path and s["class"] != m["class"]:
            out.append(
                f"{where} is {_cls(s['class'])} in the file, {_cls(m['class'])} in the model"
            )
        elif s["extra_repr"] != m["extra_repr"]:
            out.append(
                f"{where} is configured '{s['extra_repr']}' in the file, '{m['extra_repr']}' in the model"
            )
        else:
            for attr in sorted(set(s["attributes"]) | set(m["attributes"])):
                sv = s["attributes"].get(attr, "<missing>")
                mv = m["attributes"].get(attr, "<missing>")
                if sv != mv:
                    out.append(f"{where} attribute '{attr}' is {sv} in the file, {mv} in the model")
    for kind, singular in (("parameters", "parameter"), ("buffers", "buffer")):
        for name in sorted(set(saved[kind]) & set(model[kind])):
            s, m = saved[kind][name], model[kind][name]
            if s["shape"] != m["shape"]:
                out.append(
                    f"{singular} '{name}' has shape {_shape(s['shape'])} in the file, "
                    f"{_shape(m['shape'])} in the model"
                )
            if s["dtype"] != m["dtype"]:
                out.append(
                    f"{singular} '{name}' is {s['dtype']} in the file, {m['dtype']} in the model"
                )
            if s.get("persistent") != m.get("persistent"):
                out.append(
                    f"buffer '{name}' is persistent={s.get('persistent')} in the file, "
                    f"persistent={m.get('persistent')} in the model"
                )
    if saved["ties"] != model["ties"]:
        out.append(
            f"tied weights differ: the file ties {saved['ties']}, the model ties {model['ties']}"
        )
    return out


def only_settings_differ(saved: dict[str, Any], model: dict[str, Any]) -> bool:
    """Whether the fingerprints differ in settings alone: what torch's layers are configured
    with (``extra_repr``) and the values of the modules' plain attributes (the same names in
    both: an attribute one side lacks is another architecture)."""

    def without_settings(fp: dict[str, Any]) -> dict[str, Any]:
        modules = {
            path: {**m, "extra_repr": "", "attributes": dict.fromkeys(m["attributes"], "")}
            for path, m in fp["modules"].items()
        }
        return {**fp, "modules": modules}

    return not fingerprint_differences(without_settings(saved), without_settings(model))


# ----------------------------------------------------------------------------- optimizer


def encode_optimizer(state: Any) -> tuple[str, dict[str, Tensor]]:
    """An optimizer ``state_dict`` as JSON plus its tensors (keys under ``optimizer/``).

    Tensors become ``{"tensor": key}``, tuples ``{"tuple": [...]}`` and dicts
    ``{"dict": [[key, value], ...]}`` (integer keys survive); lists, strings, numbers, bools
    and ``None`` are stored as themselves.
    """
    tensors: dict[str, Tensor] = {}

    def key_of(k: Any, where: str) -> Any:
        if k is None or isinstance(k, (bool, int, float, str)):
            return k
        raise EnsembleError(
            f"optimizer state at '{where}' has a {type(k).__name__} key; cannot save it"
        )

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, Tensor):
            key = OPTIMIZER_PREFIX + where
            while key in tensors:
                key += "_"
            tensors[key] = x.detach().cpu().contiguous()
            return {"tensor": key}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {"tuple": [enc(v, f"{where}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            return {"dict": [[key_of(k, where), enc(v, f"{where}/{k}")] for k, v in x.items()]}
        raise EnsembleError(
            f"optimizer state at '{where or '/'}' is a {type(x).__name__}; only tensors, numbers, "
            "strings, None, lists, tuples and dicts can be saved"
        )

    return json.dumps(enc(state, "")), tensors


def decode_optimizer(path: Path, text: str, get: Callable[[str], Tensor]) -> Any:
    """Invert :func:`encode_optimizer`; ``get(key)`` supplies each tensor."""
    try:
        tree = json.loads(text)
    except ValueError as e:
        raise damaged(path, f"the optimizer state is not valid JSON ({e})") from None

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if set(x) == {"tensor"} and isinstance(x["tensor"], str):
            return get(x["tensor"])
        if set(x) == {"tuple"} and isinstance(x["tuple"], list):
            return tuple(dec(v) for v in x["tuple"])
        if set(x) == {"dict"} and isinstance(x["dict"], list):
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in x["dict"]):
                raise damaged(path, "the optimizer state has a malformed dict")
            return {k: dec(v) for k, v in x["dict"]}
        raise damaged(path, f"the optimizer state has an unknown node {sorted(x)}")

    try:
        return dec(tree)
    except TypeError as e:  # an unhashable key
        raise damaged(path, f"the optimizer state is malformed ({e})") from None
