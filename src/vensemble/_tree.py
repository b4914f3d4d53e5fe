"""Noticing model surgery cheaply: a process-wide count of module, parameter and buffer
registrations.

``nn.Module`` calls torch's global registration hooks whenever a submodule, parameter or
buffer is assigned or registered (``ens.head = ...``, ``register_parametrization``,
``ModuleList.append``), before storing it. An ensemble compares its module tree with what it
held only when this count moved since its last look: one integer comparison per call instead
of a pass over every module's child dict (8 us on a 6-module MLP once a batched layer has pushed
them out of the CPU's cache).

The count moves on any registration in the process, the ensemble's or not; the next call then
compares the tree once (about 0.5 us). A submodule deleted (``del m.child``, which calls no
hook) shrinks its parent's child dict: each call compares those dicts' lengths too.
"""

from __future__ import annotations

import dis
import functools
import itertools
import operator
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.modules import module as _module

__all__ = ["GENERATION", "settings_changed", "traced_settings"]

GENERATION = [0]  # a list, so that readers hold the one mutable cell


def _bump(*_: Any) -> None:
    # returns None: the registered value is kept as given. Not while dynamo traces: it would
    # guard on the count, and any compiled model that assigns a buffer in its forward would
    # recompile on every call (an ensemble under torch.compile compares its tree each call)
    if not torch.compiler.is_compiling():
        GENERATION[0] += 1


_module.register_module_module_registration_hook(_bump)
_module.register_module_parameter_registration_hook(_bump)
_module.register_module_buffer_registration_hook(_bump)


# --- plain settings of the modules a trace reads through ------------------------------------
# A fused or folded program is an fx trace of the members' own forwards: fx writes the plain
# values it reads there (``self.temperature``, ``self.scale``, ``self.cfg["tau"]``) into the
# program. torch's own layers are not traced through (the fused layers read their settings at
# each call); the code of the modules of other classes is, and what it reads is watched: the
# names their methods mention, on any module of the tree (a parent's forward may read
# ``self.fc.scale``), and one level into a container setting (a config dict's values, a
# dataclass's or namespace's fields, a list's items).

# (module.__dict__, name, value, what the value held one level down or None)
Setting = tuple[dict[str, Any], str, Any, "tuple[Any, ...] | None"]


def traced_settings(modules: list[torch.nn.Module]) -> list[Setting]:
    """``(module.__dict__, name, value, held)`` for each plain (non-tensor, non-module)
    attribute of ``modules`` that the code of a module whose forward a trace reads through
    names (its class's methods other than ``__init__``: ``self.temperature`` yes, a size used
    only to build the layers no); ``held`` is what a container value holds (see ``_held``).
    Each call compares them, so the fewer the cheaper. A module's own forward's bookkeeping
    (what it assigns to ``self``) is not a setting; of torch's layers, only public names are
    watched (their private ones are state their methods reassign)."""
    read = frozenset().union(*{_names_of(m)[0] for m in modules if not _torchs(m)})
    return [
        (m.__dict__, name, value, _held(value))
        for m in modules
        for name, value in m.__dict__.items()
        if name in read
        and name not in _INTERNALS
        and name not in _names_of(m)[1]
        and not (name[0] == "_" and _torchs(m))
        and not isinstance(value, (torch.Tensor, torch.nn.Module))
    ]


_INTERNALS = frozenset(torch.nn.Module().__dict__) | {"training"}


def _torchs(m: torch.nn.Module) -> bool:
    """Whether ``m`` is one of torch's own layers (not traced through)."""
    return type(m).__module__.startswith("torch.")


def _names_of(m: torch.nn.Module) -> tuple[frozenset[str], frozenset[str]]:
    """:func:`_names_read` of ``m``'s class."""
    return _names_read(type(m))  # type: ignore[arg-type]  # (a class is hashable)


@functools.lru_cache(maxsize=1024)
def _names_read(cls: type) -> tuple[frozenset[str], frozenset[str]]:
    """Every name the methods of ``cls`` and its bases, ``__init__`` aside, mention (their
    code objects' ``co_names``, nested functions' included), less what its ``forward``
    assigns to ``self`` (``self.x = ...``, ``self.x += ...``: its own state, not a setting);
    and that set of assigned names. ``nn.Module``'s own are left out (its internals: see
    ``_INTERNALS``); of torch's layers, the public ones: a subclass of one (``class
    MyLeaky(nn.LeakyReLU)``) is traced through, and its settings with it (``negative_slope``,
    ``inplace``), but not the layer's bookkeeping, which its methods reassign
    (``nn.LSTM._flat_weights``, on every call that swaps the weights in)."""
    names: set[str] = set()
    stored: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or klass is torch.nn.Module:
            continue
        public_only = klass.__module__.startswith("torch.")
        for attr, member in vars(klass).items():
            if attr == "__init__":
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            funcs = [member.fget, member.fset] if isinstance(member, property) else [member]
            for f in funcs:
                code = getattr(f, "__code__", None)
                for c in _code_objects(code) if isinstance(code, types.CodeType) else ():
                    names.update(n for n in c.co_names if not (public_only and n[0] == "_"))
                    if attr == "forward":  # (self.x = ..., self.x += ...)
                        stored.update(
                            i.argval for i in dis.get_instructions(c) if i.opname == "STORE_ATTR"
                        )
    return frozenset(names - stored), frozenset(stored)


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code of the functions, lambdas and comprehensions nested in it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _held(value: Any) -> tuple[Any, ...] | None:
    """What a container setting holds, one level down: a dict's keys and values, a list's
    items, the fields of an object with a ``__dict__`` (a dataclass, a namespace, a config
    object); ``None`` for anything else (numbers, strings, tuples, functions, classes)."""
    if isinstance(value, dict):
        return tuple(itertools.chain.from_iterable(value.items()))
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, (type, types.ModuleType, types.FunctionType, types.MethodType)):
        return None
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict):
        return tuple(itertools.chain.from_iterable(fields.items()))
    return None


_GONE = object()


def settings_changed(settings: list[Setting]) -> bool:
    """Whether one of ``settings`` was assigned another object since it was taken (an
    annealed temperature), or a container setting holds other objects (``cfg.tau = 0.5``):
    programs traced with the old values must go."""
    return any(
        d.get(name, _GONE) is not value or (held is not None and not _same(held, _held(value)))
        for d, name, value, held in settings
    )


def _same(old: tuple[Any, ...], new: tuple[Any, ...] | None) -> bool:
    """Whether two ``_held`` snapshots hold the same objects, one by one."""
    return new is not None and len(old) == len(new) and all(map(operator.is_, old, new))
