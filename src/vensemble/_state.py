"""Stacked state: architecture fingerprints, member validation, stacking and unstacking."""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ._errors import EnsembleError
from ._layout import member_copy, restacked_like, stacked_like

__all__ = [
    "MODULE_INTERNALS",
    "fingerprint",
    "fingerprint_digest",
    "member_module",
    "meta_skeleton",
    "reindex_template",
    "stack_members",
    "stacked_state",
    "validate_members",
]

# Attributes every nn.Module carries (its parameter, buffer, submodule and hook dicts, its mode)
MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}
# ... and what is not part of what a module computes, besides: an instance's own ``forward``
_NOT_COMPUTED = MODULE_INTERNALS | {"forward"}


def _describe(value: Any) -> str:
    """A stable, address-free description of a plain Python attribute value."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, (torch.dtype, torch.device, torch.Size, enum.Enum)):
        return repr(value)
    if isinstance(value, Tensor):
        # (values: see _plain_tensor_differences)
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        items = ", ".join(f"{_describe(k)}: {_describe(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_describe(v) for v in value)) + "}"
    qualname = getattr(value, "__qualname__", None)
    if qualname is not None:  # functions, classes, methods
        return f"{getattr(value, '__module__', '?')}.{qualname}"
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


def _plain_tensor_differences(models: Sequence[nn.Module]) -> None:
    """Warn of plain (unregistered) tensor attributes whose values differ between members.

    Such a tensor is not stacked: every member computes with the ensemble's copy, member
    0's. Not refused: a module that keeps its last activation there (``self.last = h``) holds
    different values after the members ran alone, and overwrites them in forward.
    """
    ref = dict(models[0].named_modules())
    for i, m in enumerate(models[1:], start=1):
        for path, sub in m.named_modules():
            # (a list of the module's own parameters, as an RNN's _flat_weights, is stacked)
            own = {id(t) for t in (*sub._parameters.values(), *sub._buffers.values())}
            for name, value in sub.__dict__.items():
                if name in _NOT_COMPUTED:  # (its parameters, buffers, hooks)
                    continue
                theirs = _plain_tensors(ref[path].__dict__.get(name))
                for where, t in _plain_tensors(value).items():
                    r = theirs.get(where)
                    if (
                        r is not None
                        and id(t) not in own
                        and not t.is_meta
                        and t.shape == r.shape
                        and not torch.equal(t.detach().cpu(), r.detach().cpu())
                    ):
                        advice = (
                            f"make it a buffer (self.register_buffer('{name}', ...))"
                            if not where
                            else "make each a buffer (self.register_buffer), or keep them in "
                            "an nn.ParameterList / nn.ParameterDict"
                        )
                        warnings.warn(
                            f"member {i}'s {_where(path)} holds a plain tensor attribute "
                            f"'{name}{where}' that differs from member 0's: it is not stacked, "
                            f"so every member will compute with member 0's; {advice} to give "
                            "each member its own",
                            stacklevel=4,
                        )
                        return


def _plain_tensors(value: Any) -> dict[str, Tensor]:
    """The tensors of a plain attribute's value by where they sit: ``""`` for a tensor
    itself, ``"[0]"`` / ``"['w']"`` one level into a list, tuple or dict."""
    if isinstance(value, Tensor):
        return {"": value}
    if isinstance(value, (list, tuple)):
        return {f"[{k}]": v for k, v in enumerate(value) if isinstance(v, Tensor)}
    if isinstance(value, dict):
        return {f"[{k!r}]": v for k, v in value.items() if isinstance(v, Tensor)}
    return {}


def _module_attributes(module: nn.Module) -> dict[str, str]:
    return {
        name: _describe(value)
        for name, value in sorted(module.__dict__.items())
        if name not in _NOT_COMPUTED and not name.startswith("_flat_weight")
    }


def _tensor_ties(module: nn.Module) -> dict[str, str]:
    """Map each parameter or buffer name that aliases an earlier one to that earlier name."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            ties[name] = canonical
    return ties


def fingerprint(module: nn.Module) -> dict[str, Any]:
    """Describe the computation a module performs, independent of its weights and device.

    Two modules stack into one ensemble only if their fingerprints are equal: same module
    classes and tree, same parameter and buffer names, shapes and dtypes, same weight tying,
    same ``extra_repr`` and same plain Python attributes (such as ``self.scale = 100.0``).

    Args:
        module: any ``nn.Module``.

    Returns:
        A JSON-serialisable dict with the keys ``modules``, ``parameters``, ``buffers``, ``ties``.

    Example:
        >>> fp = fingerprint(nn.Linear(3, 2))
        >>> fp["parameters"]["weight"]
        {'shape': [2, 3], 'dtype': 'torch.float32', 'requires_grad': True}
    """
    modules = {
        path: {
            "class": f"{type(m).__module__}.{type(m).__qualname__}",
            "extra_repr": m.extra_repr(),
            "attributes": _module_attributes(m),
        }
        for path, m in module.named_modules(remove_duplicate=False)
    }
    parameters = {
        name: {"shape": list(p.shape), "dtype": str(p.dtype), "requires_grad": p.requires_grad}
        for name, p in module.named_parameters(remove_duplicate=False)
    }
    buffers: dict[str, dict[str, Any]] = {}
    for path, m in module.named_modules(remove_duplicate=False):
        for name, b in m._buffers.items():
            if b is None:
                continue
            full = f"{path}.{name}" if path else name
            persistent = name not in m._non_persistent_buffers_set
            buffers[full] = {
                "shape": list(b.shape),
                "dtype": str(b.dtype),
                "persistent": persistent,
            }
    return {
        "modules": modules,
        "parameters": parameters,
        "buffers": buffers,
        "ties": _tensor_ties(module),
    }


def fingerprint_digest(fp: dict[str, Any]) -> str:
    """A short hex digest of a fingerprint, for file metadata and caches."""
    text = json.dumps(fp, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _class_name(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1]


def _where(path: str) -> str:
    return f"module '{path}'" if path else "root module"


def _diff_keys(kind: str, ref: dict[str, Any], other: dict[str, Any], i: int) -> str | None:
    missing = sorted(set(ref) - set(other))
    extra = sorted(set(other) - set(ref))
    if not missing and not extra:
        return None
    return (
        f"member {i} has a different {kind} from member 0: "
        f"missing {missing or '[]'}, extra {extra or '[]'} (relative to member 0)"
    )


def _compare(ref: dict[str, Any], other: dict[str, Any], i: int) -> str | None:
    """The first difference between member 0's fingerprint and member i's, as a message."""
    r_mods, o_mods = ref["modules"], other["modules"]
    if r_mods[""]["class"] != o_mods[""]["class"]:
        return (
            f"member {i} is a {_class_name(o_mods['']['class'])} but member 0 is a "
            f"{_class_name(r_mods['']['class'])}: ensemble members must be the same architecture"
        )
    if (msg := _diff_keys("module tree", r_mods, o_mods, i)) is not None:
        return msg
    for path, r in r_mods.items():
        o = o_mods[path]
        if r["class"] != o["class"]:
            return (
                f"member {i}'s {_where(path)} is {_class_name(o['class'])}, "
                f"member 0 has {_class_name(r['class'])}"
            )
    for kind in ("parameters", "buffers"):
        singular = kind[:-1]
        if (msg := _diff_keys(f"set of {kind}", ref[kind], other[kind], i)) is not None:
            return msg
        for name, r in ref[kind].items():
            o = other[kind][name]
            if r["shape"] != o["shape"]:
                return (
                    f"member {i} {singular} '{name}' has shape {_fmt_shape(o['shape'])}, "
                    f"member 0 has {_fmt_shape(r['shape'])}"
                )
            if r["dtype"] != o["dtype"]:
                return f"member {i} {singular} '{name}' has dtype {o['dtype']}, member 0 has {r['dtype']}"
            for key in ("requires_grad", "persistent"):
                if key in r and r[key] != o[key]:
                    return (
                        f"member {i} {singular} '{name}' has {key}={o[key]}, member 0 has {r[key]}"
                    )
    if ref["ties"] != other["ties"]:
        return (
            f"member {i} ties its weights differently from member 0: "
            f"member 0 ties {ref['ties']}, member {i} ties {other['ties']}"
        )
    for path, r in r_mods.items():
        o = o_mods[path]
        if r["extra_repr"] != o["extra_repr"]:
            return (
                f"member {i}'s {_where(path)} ({_class_name(r['class'])}) is configured "
                f"'{o['extra_repr']}', member 0 '{r['extra_repr']}'"
            )
        for attr in sorted(set(r["attributes"]) | set(o["attributes"])):
            rv, ov = r["attributes"].get(attr, "<missing>"), o["attributes"].get(attr, "<missing>")
            if rv != ov:
                return f"member {i}'s {_where(path)} attribute '{attr}' is {ov}, member 0 has {rv}"
    return None


def _tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def validate_members(models: Sequence[Any]) -> None:
    """Check that ``models`` can be stacked into one ensemble; raise ``EnsembleError`` if not.

    Everything is checked before any work: types, distinct objects, initialised lazy modules,
    the architecture fingerprint, devices, train/eval mode, and that no two members share a
    tensor.
    """
    if len(models) == 0:
        raise EnsembleError("an ensemble needs at least one member; got an empty sequence")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise EnsembleError(f"member {i} is a {type(m).__name__}, expected an nn.Module")
    seen: dict[int, int] = {}
    for i, m in enumerate(models):
        j = seen.setdefault(id(m), i)
        if j != i:
            raise EnsembleError(
                f"member {i} is the same module object as member {j}; pass independent copies "
                "(e.g. copy.deepcopy) or use Ensemble.from_factory"
            )
    for i, m in enumerate(models):
        for name, t in _tensors(m):
            if is_lazy(t):
                raise EnsembleError(
                    f"member {i} has an uninitialised lazy parameter or buffer '{name}'; run one "
                    "forward pass on each member (or build the members with known sizes) first"
                )
    ref = fingerprint(models[0])
    for i, m in enumerate(models[1:], start=1):
        if (msg := _compare(ref, fingerprint(m), i)) is not None:
            raise EnsembleError(msg)
    _plain_tensor_differences(models)
    ref_tensors = dict(_tensors(models[0]))
    for i, m in enumerate(models[1:], start=1):
        for name, t in _tensors(m):
            r = ref_tensors[name]
            if t.device != r.device:
                raise EnsembleError(
                    f"member {i} '{name}' is on device {t.device}, member 0's is on {r.device}; "
                    "move all members to one device first"
                )
    ref_modes = {p: mod.training for p, mod in models[0].named_modules(remove_duplicate=False)}
    for i, m in enumerate(models[1:], start=1):
        for path, mod in m.named_modules(remove_duplicate=False):
            if mod.training != ref_modes[path]:
                mode = "train" if mod.training else "eval"
                ref_mode = "train" if ref_modes[path] else "eval"
                raise EnsembleError(
                    f"member {i}'s {_where(path)} is in {mode} mode, member 0's is in {ref_mode} "
                    "mode; call .train() or .eval() on all members first"
                )
    check_no_shared_memory(models)


def check_no_shared_memory(models: Sequence[nn.Module]) -> None:
    """Refuse two members that share a parameter's or buffer's memory, naming both."""
    owner: dict[int, tuple[int, str]] = {}
    for i, m in enumerate(models):
        for name, t in _tensors(m):
            key = t.untyped_storage().data_ptr() if t.numel() else id(t)
            j, other = owner.setdefault(key, (i, name))
            if j != i:
                raise EnsembleError(
                    f"member {i} '{name}' shares its memory with member {j} '{other}'; "
                    "members must not share parameters or buffers"
                )


def stacked_state(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The unique (untied) parameters and buffers of a stacked template, by canonical name."""
    return dict(module.named_parameters()), dict(module.named_buffers())


def _replace_state(
    module: nn.Module,
    make_param: Callable[[nn.Parameter], nn.Parameter],
    make_buffer: Callable[[Tensor], Tensor],
) -> nn.Module:
    """Deep-copy ``module`` with each unique tensor replaced, keeping weight tying intact."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = make_param(p)
    for b in module.buffers():
        memo[id(b)] = make_buffer(b)
    return copy.deepcopy(module, memo)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside vensemble."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def stack_members(models: Sequence[nn.Module]) -> nn.Module:
    """A copy of member 0 whose parameters and buffers hold all members' values, stacked.

    Each tensor gains a leading member dimension of size ``len(models)``. Weight tying inside a
    member is preserved (the tied names share one stacked tensor); source modules are untouched.
    """
    first = models[0]
    stacked: dict[int, Tensor] = {}
    names = {id(t): n for n, t in [*first.named_parameters(), *first.named_buffers()]}
    others = [dict(_tensors(m)) for m in models]
    with torch.no_grad():
        for t in [*first.parameters(), *first.buffers()]:
            name = names[id(t)]
            held = [o[name].detach() for o in others]
            layouts = {h.stride() for h in held} if t.ndim in (4, 5) else set()
            if len(layouts) > 1:
                warnings.warn(
                    f"vensemble: the members hold '{name}' in different memory layouts "
                    f"(strides {sorted(layouts)}): stacked contiguous, so a "
                    "member whose own differ runs with contiguous ones (torch's conv picks its "
                    "result's layout from them). Convert all models alike "
                    "(model.to(memory_format=...)) before stacking, or the ensemble after.",
                    stacklevel=_user_stacklevel(),
                )
            stacked[id(t)] = stacked_like(held)

    def make_param(p: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(stacked[id(p)], requires_grad=p.requires_grad)

    return _replace_state(first, make_param, lambda b: stacked[id(b)])


def reindex_template(template: nn.Module, index: Tensor) -> nn.Module:
    """A copy of a stacked template holding only the members in ``index`` (copied, no grad;
    channels-last conv weights stay so)."""

    def pick(t: Tensor) -> Tensor:
        return restacked_like(t.detach()[index], t)  # (indexing by a tensor copies)

    def make_param(p: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(pick(p), requires_grad=p.requires_grad)

    return _replace_state(template, make_param, pick)


def member_module(template: nn.Module, i: int) -> nn.Module:
    """A standalone module with member ``i``'s current weights and buffers (copied; contiguous,
    but for conv weights the members had channels-last: see ``vensemble._layout``)."""

    def make_param(p: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(member_copy(p.detach(), i), requires_grad=p.requires_grad)

    return _replace_state(template, make_param, lambda b: member_copy(b.detach(), i))


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose tensors live on the meta device, weight tying preserved."""

    def make_param(p: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)

    return _replace_state(module, make_param, lambda b: torch.empty_like(b, device="meta"))
